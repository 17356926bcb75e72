"""The ASGI application: routes, error handlers, middleware."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import BaseRoute, Route, Router, WebSocketRoute

from ssh_sync_trio.http import routes
from ssh_sync_trio.http.errors import HANDLERS
from ssh_sync_trio.http.middleware import AccessLog, LimitBody
from ssh_sync_trio.pairing import websocket
from ssh_sync_trio.services import Services

API = "/api/v1"


def both(
    path: str, endpoint: Callable[..., Any], methods: list[str]
) -> list[BaseRoute]:
    """The route with and without a trailing slash, served directly.

    The client sends some paths with the slash and some without and follows
    no redirects, so neither form may redirect to the other.
    """
    bare = (API + path).rstrip("/")
    return [
        Route(bare, endpoint, methods=methods),
        Route(bare + "/", endpoint, methods=methods),
    ]


def both_ws(path: str, endpoint: Callable[..., Any]) -> list[BaseRoute]:
    bare = API + path
    return [WebSocketRoute(bare, endpoint), WebSocketRoute(bare + "/", endpoint)]


def api_routes() -> list[BaseRoute]:
    table: list[BaseRoute] = [
        *both("/", routes.root, ["GET"]),
        *both("/users/{username}", routes.get_user, ["GET"]),
        *both("/setup", routes.setup, ["POST"]),
        *both_ws("/setup/existing", websocket.new_machine),
        *both_ws("/setup/challenge", websocket.existing_machine),
        *both("/machines", routes.list_machines, ["GET"]),
        *both("/machines", routes.delete_machine, ["DELETE"]),
        # Before /machines/{id}, which would otherwise take "public-keys".
        *both("/machines/public-keys", routes.machine_public_keys, ["GET"]),
        *both("/machines/key", routes.replace_machine_key, ["PUT"]),
        *both("/machines/{id}", routes.get_machine, ["GET"]),
        *both("/data", routes.get_data, ["GET"]),
        *both("/data", routes.post_data, ["POST"]),
        *both("/data/key/{id}", routes.delete_key, ["DELETE"]),
        *both("/data/config", routes.post_config, ["POST"]),
        *both("/data/config/{id}", routes.delete_config, ["DELETE"]),
        *both("/key-rotation", routes.post_rotation, ["POST"]),
        *both("/key-rotation", routes.get_rotation, ["GET"]),
        *both("/key-rotation", routes.delete_rotation, ["DELETE"]),
    ]
    return table


def build_app(services: Services) -> Starlette:
    """The whole HTTP and WebSocket application of one server."""
    app = Starlette(
        routes=api_routes(),
        exception_handlers=HANDLERS,  # type: ignore[arg-type]
        middleware=[
            Middleware(AccessLog),
            Middleware(LimitBody, limit=services.settings.max_upload_bytes),
        ],
    )
    app.router.redirect_slashes = False
    app.state.services = services
    return app


__all__ = ["Router", "build_app"]
