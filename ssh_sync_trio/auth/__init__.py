"""Authentication: the client's signed tokens and the public keys they use."""
