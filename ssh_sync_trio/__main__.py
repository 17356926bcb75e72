"""Run the server with ``python -m ssh_sync_trio``."""

from ssh_sync_trio.cli import main

if __name__ == "__main__":
    main()
