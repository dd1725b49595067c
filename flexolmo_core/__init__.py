"""FlexOlmo core: the method as pure library code (no Prefect, no DVC)."""
__version__ = "0.1.0"
