"""The HTTP layer: routes, request parsing, the client's JSON, errors."""
