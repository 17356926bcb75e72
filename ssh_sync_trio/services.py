"""What the routes need from the running server, in one place."""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

from ssh_sync_trio.config import Settings
from ssh_sync_trio.storage.store import Store

if TYPE_CHECKING:
    from ssh_sync_trio.pairing.service import Pairings


@attrs.define(eq=False)
class Services:
    """The settings, the store and the pairing service of one server."""

    settings: Settings
    store: Store
    pairings: Pairings
