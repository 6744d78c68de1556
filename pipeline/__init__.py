"""imgpipe: asynchronous image preprocessing and batched inference."""

__version__ = "0.1.0"
