"""The version of moa (kernel caches are keyed by it)."""
__version__ = "0.1.0"
