"""The gridfs mount: a trio daemon serving a grid tree over FUSE (pyfuse3)."""
