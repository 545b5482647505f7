"""flash_gla's version: the one place it is written. setup.py reads it from this file (without
importing the package, which needs torch), and ``flash_gla.__version__`` imports it."""

__version__ = "0.1.0"

#: The oldest torch whose stable C ABI the compiled extension targets (setup.py passes it to the
#: compiler as TORCH_TARGET_VERSION): one build loads under this torch and every newer one.
MIN_TORCH = "2.10"
