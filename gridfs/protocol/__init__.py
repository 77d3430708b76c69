"""The wire protocol, sans I/O: bytes in, events out; events in, bytes out."""
