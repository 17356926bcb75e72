"""ssh-sync-trio: a wire-compatible server for the ssh-sync client, on Trio."""

__version__ = "0.1.0"
