"""End-to-end demos of facetwin: each runs the CLIs and the SDK exactly as a user would (see README.md)."""
