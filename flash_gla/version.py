"""flash_gla's version: the one place it is written. setup.py reads it from this file (without
importing the package, which needs torch), and ``flash_gla.__version__`` imports it."""

__version__ = "0.1.0"
