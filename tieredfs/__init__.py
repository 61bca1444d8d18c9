"""tieredfs: a FUSE caching filesystem that serves S3 through local and shared block caches."""

__version__ = "0.1.0"
