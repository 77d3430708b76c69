"""The grid client: find servers, upload and download immutable files."""
