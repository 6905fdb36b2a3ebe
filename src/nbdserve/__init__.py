"""nbdserve: an NBD server for raw images with persistent dirty bitmaps."""

__version__ = "0.1.0"
