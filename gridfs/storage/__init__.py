"""The storage server: where shares live on disk."""
