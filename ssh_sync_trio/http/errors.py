"""Domain errors become HTTP errors here, and only here.

Every error response is `{"message": ...}` with a short text; the client
shows only the status code, but an operator with curl reads the text.
"""

from __future__ import annotations

import logging

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from ssh_sync_trio.auth.tokens import Unauthorized
from ssh_sync_trio.storage.store import (
    Conflict,
    NotFound,
    NotYours,
    RotationPending,
    StorageError,
    Unavailable,
)

log = logging.getLogger("ssh_sync_trio.http")

ROTATION_PENDING = (
    "a master key rotation is pending; "
    "run 'ssh-sync download' to apply it before uploading"
)


class ApiError(Exception):
    """A request the server refuses, with the status and message to send."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class BadRequest(ApiError):
    """400: the request is malformed; `message` says what is wrong."""

    def __init__(self, message: str) -> None:
        super().__init__(400, message)


class BodyTooLarge(ApiError):
    """413: the body is larger than MAX_UPLOAD_BYTES."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body larger than {limit} bytes")


def error_response(status: int, message: str) -> JSONResponse:
    """The JSON body every error carries."""
    return JSONResponse({"message": message}, status_code=status)


def storage_error(error: StorageError) -> ApiError:
    """The HTTP meaning of a storage outcome."""
    if isinstance(error, RotationPending):
        return ApiError(409, ROTATION_PENDING)
    if isinstance(error, Conflict):
        return ApiError(409, str(error) or "already exists")
    if isinstance(error, NotFound):
        return ApiError(404, f"{error} not found" if str(error) else "not found")
    if isinstance(error, NotYours):
        return ApiError(403, "a machine id is not one of this user's machines")
    if isinstance(error, Unavailable):
        return ApiError(503, "storage unavailable, try again")
    return ApiError(500, "internal error")


async def on_api_error(_request: Request, error: Exception) -> Response:
    assert isinstance(error, ApiError)
    return error_response(error.status, error.message)


async def on_storage_error(_request: Request, error: Exception) -> Response:
    assert isinstance(error, StorageError)
    api = storage_error(error)
    return error_response(api.status, api.message)


async def on_unauthorized(_request: Request, _error: Exception) -> Response:
    return error_response(401, "unauthorized")


async def on_http_exception(_request: Request, error: Exception) -> Response:
    assert isinstance(error, HTTPException)
    if error.status_code >= 500:
        log.error("HTTP %d: %s", error.status_code, error.detail)
    return error_response(error.status_code, str(error.detail))


async def on_client_disconnect(request: Request, _error: Exception) -> Response:
    # The client went away (or stalled past the read timeout) mid-body:
    # nothing was stored and nobody is left to read the answer.
    log.info("client left during %s %s", request.method, request.url.path)
    return error_response(400, "request body incomplete")


async def on_unexpected(request: Request, error: Exception) -> Response:
    log.exception(
        "unhandled error on %s %s", request.method, request.url.path, exc_info=error
    )
    return error_response(500, "internal error")


HANDLERS = {
    ClientDisconnect: on_client_disconnect,
    ApiError: on_api_error,
    StorageError: on_storage_error,
    Unauthorized: on_unauthorized,
    HTTPException: on_http_exception,
    Exception: on_unexpected,
}
