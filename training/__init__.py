"""facetwin.training: extract faces, train the autoencoder, export model bundles."""


def main() -> None:
    """Console entry point `facetwin-train`."""
    from facetwin.core.entry import run_command

    run_command("facetwin-train", "training", "facetwin.training.cli")
