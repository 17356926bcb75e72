"""Pairing a new machine: the handshake of PROTOCOL.md section 4."""
