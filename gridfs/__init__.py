"""gridfs: files encrypted and erasure-coded across servers you do not have to trust."""

__version__ = "0.1.0"
