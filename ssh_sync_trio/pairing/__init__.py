"""Pairing a new machine: the handshake of docs/protocol.md §4."""
