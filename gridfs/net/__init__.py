"""Networking: node keys and addresses, TLS, and the RPC transport on trio."""
