"""facetwin.core: what the server and training share -- face geometry, the model bundle contract, the model
architectures and file helpers. It imports neither of them (tests/test_layers.py keeps it so)."""
