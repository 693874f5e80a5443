"""image-indexer: embed folders of photos with SigLIP 2 into a SQLite-backed vector index."""

__version__ = "0.1.0"
