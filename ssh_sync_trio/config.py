"""Configuration from environment variables, with the Go server's names.

Every setting is read once, at start, into a frozen `Settings`. A value that
does not parse raises `ConfigError` naming the variable, so the server stops
with one clear line instead of failing later.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote

import attrs
from sqlalchemy.engine import URL, make_url

T = TypeVar("T")

DEFAULT_SQLITE_FILE = "ssh-sync.sqlite3"
LOG_FORMATS = ("console", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class ConfigError(Exception):
    """A configuration variable holds a value the server cannot use."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable


@attrs.frozen
class Settings:
    """Everything the server reads from its environment."""

    host: str = "0.0.0.0"
    port: int = 3000
    database_url: str = f"sqlite:///{DEFAULT_SQLITE_FILE}"
    redis_url: str | None = None
    node_id: str = attrs.field(factory=socket.gethostname)
    log_level: str = "INFO"
    log_format: str = "console"
    max_upload_bytes: int = 32 * 1024 * 1024
    challenge_timeout: float = 30.0
    pairing_step_timeout: float = 30.0
    max_pending_per_user: int = 5
    max_pending: int = 10_000
    db_threads: int = 8
    shutdown_grace: float = 5.0
    trusted_proxy_hops: int = 0

    @property
    def database(self) -> URL:
        """The database URL, parsed, with the psycopg 3 driver for PostgreSQL."""
        return make_url(self.database_url)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read the settings from `env` (default: the process environment)."""
        env = os.environ if env is None else env
        reader = _Reader(env)
        return cls(
            host=reader.text("HOST", "0.0.0.0"),
            port=reader.number("PORT", 3000, int, low=0, high=65535),
            database_url=_database_url(reader),
            redis_url=_redis_url(reader),
            node_id=reader.text("NODE_ID", socket.gethostname()),
            log_level=reader.choice("LOG_LEVEL", "INFO", LOG_LEVELS, upper=True),
            log_format=reader.choice("LOG_FORMAT", "console", LOG_FORMATS),
            max_upload_bytes=reader.number(
                "MAX_UPLOAD_BYTES", 32 * 1024 * 1024, int, low=1024
            ),
            challenge_timeout=reader.number("CHALLENGE_TIMEOUT", 30.0, float, low=0.01),
            pairing_step_timeout=reader.number(
                "PAIRING_STEP_TIMEOUT", 30.0, float, low=0.01
            ),
            max_pending_per_user=reader.number("MAX_PENDING_PER_USER", 5, int, low=1),
            max_pending=reader.number("MAX_PENDING", 10_000, int, low=1),
            db_threads=reader.number("DB_THREADS", 8, int, low=1, high=256),
            shutdown_grace=reader.number("SHUTDOWN_GRACE", 5.0, float, low=0.0),
            trusted_proxy_hops=reader.number(
                "TRUSTED_PROXY_HOPS", 0, int, low=0, high=16
            ),
        )


def load_dotenv_unless_disabled(path: Path = Path(".env")) -> bool:
    """Load `.env` from the working directory unless NO_DOTENV is set.

    Variables already in the environment win over the file, as with the Go
    server. Returns whether a file was read.
    """
    if os.environ.get("NO_DOTENV") or not path.is_file():
        return False
    from dotenv import load_dotenv

    return load_dotenv(path, override=False)


@attrs.frozen
class _Reader:
    env: Mapping[str, str]

    def text(self, name: str, default: str) -> str:
        value = self.env.get(name, "").strip()
        return value or default

    def choice(
        self, name: str, default: str, allowed: tuple[str, ...], *, upper: bool = False
    ) -> str:
        value = self.text(name, default)
        value = value.upper() if upper else value.lower()
        if value not in allowed:
            raise ConfigError(
                name, f"must be one of {', '.join(allowed)}, not {value!r}"
            )
        return value

    def number(
        self,
        name: str,
        default: T,
        kind: Callable[[str], T],
        *,
        low: float | None = None,
        high: float | None = None,
    ) -> T:
        raw = self.env.get(name, "").strip()
        if not raw:
            return default
        try:
            value = kind(raw)
        except ValueError:
            raise ConfigError(name, f"not a number: {raw!r}") from None
        # NaN passes every range check, and an infinite timeout is none.
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(name, f"not a finite number: {raw!r}")
        if (low is not None and value < low) or (high is not None and value > high):  # type: ignore[operator]
            raise ConfigError(name, f"{raw} is {_range(low, high)}")
        return value


def _range(low: float | None, high: float | None) -> str:
    if high is None:
        return f"below the least allowed, {low}"
    if low is None:
        return f"above the most allowed, {high}"
    return f"outside {low} to {high}"


def _database_url(reader: _Reader) -> str:
    explicit = reader.text("DATABASE_URL", "")
    if explicit:
        return _normalise_database_url(explicit)
    host = reader.text("DATABASE_HOST", "")
    if not host:
        return f"sqlite:///{Path(DEFAULT_SQLITE_FILE).resolve()}"
    user = quote(reader.text("DATABASE_USERNAME", ""), safe="")
    password = quote(reader.text("DATABASE_PASSWORD", ""), safe="")
    name = quote(reader.text("DATABASE_NAME", ""), safe="")
    credentials = f"{user}:{password}@" if password else (f"{user}@" if user else "")
    return f"postgresql+psycopg://{credentials}{host}/{name}"


def _normalise_database_url(raw: str) -> str:
    try:
        url = make_url(raw)
    except Exception:
        raise ConfigError("DATABASE_URL", "not a database URL") from None
    if url.drivername in ("postgresql", "postgres", "postgresql+psycopg"):
        url = url.set(drivername="postgresql+psycopg")
    elif url.drivername != "sqlite":
        raise ConfigError("DATABASE_URL", "must start with sqlite:/// or postgresql://")
    elif not url.database:
        raise ConfigError("DATABASE_URL", "sqlite:/// needs a file path")
    return url.render_as_string(hide_password=False)


def _redis_url(reader: _Reader) -> str | None:
    explicit = reader.text("REDIS_URL", "")
    if explicit:
        if not explicit.startswith(("redis://", "rediss://")):
            raise ConfigError("REDIS_URL", "must start with redis:// or rediss://")
        return explicit
    address = reader.text("REDIS_ADDR", "")
    if not address:
        return None
    db = reader.number("REDIS_DB", 0, int, low=0)
    password = reader.text("REDIS_PASSWORD", "")
    auth = f":{quote(password, safe='')}@" if password else ""
    return f"redis://{auth}{address}/{db}"
