"""Tests of the configuration and of the `ssh-sync-trio` command.

Rules:

- `Settings.from_env` is tested on mappings handed in, never on the test
  process's own environment.
- The command runs as a real subprocess (the venv's console script), with
  `NO_DOTENV=1`, an environment built here from nothing but `PATH`, and a
  fresh working directory, so nothing of the developer's machine leaks in.
- A served node listens on 127.0.0.1 on a port picked by binding port 0,
  and is reached over real sockets.
- Every test has a ceiling (`ceiling`): `trio.fail_after` for async tests,
  an interval timer for the pure ones; subprocesses are killed at theirs.
"""

from __future__ import annotations

import base64
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import trio

from ssh_sync_trio.config import DEFAULT_SQLITE_FILE, ConfigError, Settings
from tests import sshclient
from tests.harness import ceiling
from tests.servers import free_port

SSH_SYNC_TRIO = Path(sys.executable).with_name("ssh-sync-trio")
# Seconds a served node gets to answer after its process starts.
START_TIMEOUT = 15
# Seconds it gets to exit after SIGTERM.
STOP_TIMEOUT = 5


class Recording(dict[str, str]):
    """An environment that remembers every variable looked up in it."""

    def __init__(self, values: Mapping[str, str]) -> None:
        super().__init__(values)
        self.read: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> str:
        self.read.add(key)
        return super().__getitem__(key)


def variables_read() -> set[str]:
    """Every variable `Settings.from_env` may read, and NO_DOTENV."""
    env = Recording({"DATABASE_HOST": "db", "REDIS_ADDR": "redis:6379"})
    Settings.from_env(env)
    return env.read | {"NO_DOTENV"}


# --------------------------------------------------------------------------
# Settings.from_env


@ceiling
def test_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = Settings.from_env({})
    assert settings.host == "0.0.0.0"
    assert settings.port == 3000
    # The SQLite file in the working directory, by its absolute path.
    assert settings.database_url == f"sqlite:///{tmp_path / DEFAULT_SQLITE_FILE}"
    assert settings.database.get_backend_name() == "sqlite"
    assert settings.redis_url is None
    assert settings.node_id == socket.gethostname()
    assert settings.log_level == "INFO"
    assert settings.log_format == "console"
    assert settings.max_upload_bytes == 32 * 1024 * 1024
    assert settings.challenge_timeout == 30.0
    assert settings.db_threads >= 1
    # Empty values count as unset, as with the Go server.
    assert (
        Settings.from_env({"PORT": "", "NODE_ID": "  ", "REDIS_ADDR": ""}) == settings
    )


@ceiling
def test_values_are_read() -> None:
    settings = Settings.from_env(
        {
            "HOST": "127.0.0.1",
            "PORT": " 8080 ",
            "NODE_ID": "node-7",
            "LOG_LEVEL": "debug",
            "LOG_FORMAT": "JSON",
            "MAX_UPLOAD_BYTES": "2048",
            "CHALLENGE_TIMEOUT": "2.5",
            "PAIRING_STEP_TIMEOUT": "3",
            "MAX_PENDING_PER_USER": "2",
            "MAX_PENDING": "9",
            "DB_THREADS": "3",
            "SHUTDOWN_GRACE": "0",
        }
    )
    assert (settings.host, settings.port, settings.node_id) == (
        "127.0.0.1",
        8080,
        "node-7",
    )
    assert (settings.log_level, settings.log_format) == ("DEBUG", "json")
    assert settings.max_upload_bytes == 2048
    assert (settings.challenge_timeout, settings.pairing_step_timeout) == (2.5, 3.0)
    assert (settings.max_pending_per_user, settings.max_pending) == (2, 9)
    assert (settings.db_threads, settings.shutdown_grace) == (3, 0.0)


@ceiling
def test_go_database_names() -> None:
    settings = Settings.from_env(
        {
            "DATABASE_HOST": "db.example:5433",
            "DATABASE_USERNAME": "sync",
            "DATABASE_PASSWORD": "p@ss:w/rd %",
            "DATABASE_NAME": "sshsync",
        }
    )
    url = settings.database
    assert url.drivername == "postgresql+psycopg"
    assert (url.host, url.port, url.database) == ("db.example", 5433, "sshsync")
    assert (url.username, url.password) == ("sync", "p@ss:w/rd %")

    bare = Settings.from_env({"DATABASE_HOST": "db", "DATABASE_NAME": "x"}).database
    assert (bare.host, bare.port, bare.username, bare.password) == (
        "db",
        None,
        None,
        None,
    )
    no_password = Settings.from_env(
        {"DATABASE_HOST": "db", "DATABASE_USERNAME": "u", "DATABASE_NAME": "x"}
    ).database
    assert (no_password.username, no_password.password) == ("u", None)
    # DATABASE_URL wins over the Go names.
    both = Settings.from_env(
        {"DATABASE_URL": "sqlite:///x.db", "DATABASE_HOST": "db", "DATABASE_NAME": "x"}
    )
    assert both.database_url == "sqlite:///x.db"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("sqlite:///relative.db", "sqlite:///relative.db"),
        ("sqlite:////abs/path/data.sqlite3", "sqlite:////abs/path/data.sqlite3"),
        ("postgresql://u:p@h:5432/d", "postgresql+psycopg://u:p@h:5432/d"),
        ("postgres://u:p@h/d", "postgresql+psycopg://u:p@h/d"),
        ("postgresql+psycopg://u@h/d", "postgresql+psycopg://u@h/d"),
        (
            "postgresql:///d?host=/run/postgresql",
            "postgresql+psycopg:///d?host=/run/postgresql",
        ),
    ],
)
@ceiling
def test_database_url_normalised(given: str, expected: str) -> None:
    settings = Settings.from_env({"DATABASE_URL": given})
    # Equal as URLs: the query may come back percent-encoded.
    assert sa.make_url(settings.database_url) == sa.make_url(expected)
    assert settings.database.drivername == sa.make_url(expected).drivername


@ceiling
def test_go_redis_names() -> None:
    settings = Settings.from_env(
        {
            "REDIS_ADDR": "redis.example:6380",
            "REDIS_PASSWORD": "s3cr:t@/",
            "REDIS_DB": "4",
        }
    )
    assert settings.redis_url is not None
    parsed = httpx.URL(settings.redis_url)
    assert (parsed.scheme, parsed.host, parsed.port, parsed.path) == (
        "redis",
        "redis.example",
        6380,
        "/4",
    )
    assert parsed.password == "s3cr:t@/"
    plain = Settings.from_env({"REDIS_ADDR": "localhost:6379"})
    assert plain.redis_url == "redis://localhost:6379/0"
    for url in ("redis://:pw@h:6379/1", "rediss://user:pw@h:6380/0", "redis://h"):
        assert Settings.from_env({"REDIS_URL": url}).redis_url == url
    # REDIS_URL wins over the Go names.
    both = Settings.from_env(
        {"REDIS_URL": "rediss://h:1/2", "REDIS_ADDR": "other:6379"}
    )
    assert both.redis_url == "rediss://h:1/2"


BAD_VALUES = [
    ("PORT", "abc"),
    ("PORT", "70000"),
    ("PORT", "-1"),
    ("PORT", "80.5"),
    ("DATABASE_URL", "mysql://u:p@h/d"),
    ("DATABASE_URL", "sqlite://"),
    ("DATABASE_URL", "not a url"),
    ("DATABASE_URL", "http://example.com/"),
    ("REDIS_URL", "http://redis:6379"),
    ("REDIS_URL", "redis:6379"),
    ("REDIS_DB", "first"),
    ("REDIS_DB", "-1"),
    ("LOG_LEVEL", "LOUD"),
    ("LOG_FORMAT", "xml"),
    ("MAX_UPLOAD_BYTES", "lots"),
    ("MAX_UPLOAD_BYTES", "10"),
    ("CHALLENGE_TIMEOUT", "soon"),
    ("CHALLENGE_TIMEOUT", "0"),
    ("CHALLENGE_TIMEOUT", "nan"),
    ("CHALLENGE_TIMEOUT", "inf"),
    ("PAIRING_STEP_TIMEOUT", "-3"),
    ("PAIRING_STEP_TIMEOUT", "NaN"),
    ("MAX_PENDING_PER_USER", "0"),
    ("MAX_PENDING", "many"),
    ("DB_THREADS", "0"),
    ("DB_THREADS", "1000"),
    ("SHUTDOWN_GRACE", "-1"),
    ("TRUSTED_PROXY_HOPS", "-1"),
    ("TRUSTED_PROXY_HOPS", "many"),
    ("SHUTDOWN_GRACE", "inf"),
]


@pytest.mark.parametrize(("variable", "value"), BAD_VALUES)
@ceiling
def test_bad_value_names_its_variable(variable: str, value: str) -> None:
    env = {variable: value}
    if variable.startswith("REDIS_") and variable != "REDIS_URL":
        env["REDIS_ADDR"] = "redis:6379"
    with pytest.raises(ConfigError) as raised:
        Settings.from_env(env)
    assert raised.value.variable == variable
    assert str(raised.value).startswith(f"{variable}: ")


@ceiling
def test_every_variable_is_covered_here() -> None:
    # A variable added to config.py must be tested for bad values too.
    tested = {variable for variable, _ in BAD_VALUES}
    free_text = {
        "HOST",
        "NODE_ID",
        "NO_DOTENV",
        "DATABASE_HOST",
        "DATABASE_USERNAME",
        "DATABASE_PASSWORD",
        "DATABASE_NAME",
        "REDIS_ADDR",
        "REDIS_PASSWORD",
    }
    assert variables_read() - free_text == tested


# --------------------------------------------------------------------------
# The command line


def command_env(**variables: str) -> dict[str, str]:
    """A clean environment for the command: PATH, NO_DOTENV, `variables`."""
    return {"PATH": os.environ.get("PATH", ""), "NO_DOTENV": "1", **variables}


async def entries(directory: Path) -> list[Path]:
    """What `directory` holds."""
    return await trio.to_thread.run_sync(lambda: list(directory.iterdir()))


async def run_command(
    args: list[str], env: dict[str, str], cwd: Path
) -> subprocess.CompletedProcess[bytes]:
    """Run `ssh-sync-trio args` to its end, capturing its output."""
    return await trio.run_process(
        [str(SSH_SYNC_TRIO), *args],
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )


@pytest.mark.parametrize(
    "args", [["--help"], ["serve", "--help"], ["migrate", "--help"]]
)
@ceiling
async def test_help_names_every_variable(args: list[str], tmp_path: Path) -> None:
    result = await run_command(args, command_env(), tmp_path)
    assert result.returncode == 0, result.stderr
    text = result.stdout.decode()
    missing = {v for v in variables_read() if not re.search(rf"\b{v}\b", text)}
    assert not missing, text
    assert await entries(tmp_path) == []


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PORT", "abc"),
        ("DATABASE_URL", "mysql://u@h/d"),
        ("REDIS_URL", "http://h"),
        ("SHUTDOWN_GRACE", "inf"),
    ],
)
@ceiling
async def test_bad_configuration_is_one_line(
    variable: str, value: str, tmp_path: Path
) -> None:
    result = await run_command(["serve"], command_env(**{variable: value}), tmp_path)
    assert result.returncode != 0
    assert result.stdout == b""
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert variable in lines[0]
    # It stopped before touching anything: no database file either.
    assert await entries(tmp_path) == []


@ceiling
async def test_dotenv_is_read_unless_disabled(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("PORT=abc\n")
    database = f"sqlite:///{tmp_path / 'data.sqlite3'}"
    env = {"PATH": os.environ.get("PATH", ""), "DATABASE_URL": database}

    read = await run_command(["migrate"], env, tmp_path)
    assert read.returncode != 0
    assert "PORT" in read.stderr.decode()
    skipped = await run_command(["migrate"], {**env, "NO_DOTENV": "1"}, tmp_path)
    assert skipped.returncode == 0, skipped.stderr
    # The environment wins over the file.
    overridden = await run_command(["migrate"], {**env, "PORT": "3001"}, tmp_path)
    assert overridden.returncode == 0, overridden.stderr


async def wait_until_listening(url: str, process: trio.Process) -> None:
    """Poll `url` until the node answers; fail if the process ends first."""
    with trio.fail_after(START_TIMEOUT):
        async with httpx.AsyncClient(timeout=2) as client:
            while True:
                assert process.returncode is None, "the server exited"
                try:
                    await client.get(url)
                    return
                except httpx.TransportError:
                    await trio.sleep(0.05)


async def serve_and_stop(
    env: dict[str, str],
    cwd: Path,
    log_path: Path,
    exercise: Callable[[httpx.AsyncClient], Any],
) -> int:
    """Run `ssh-sync-trio serve`, `exercise` it, SIGTERM it; its exit code."""
    port = free_port()
    env = {**env, "HOST": "127.0.0.1", "PORT": str(port)}
    base = f"http://127.0.0.1:{port}/api/v1"
    with log_path.open("wb") as log:
        async with trio.open_nursery() as nursery:
            process: trio.Process = await nursery.start(
                partial(
                    trio.run_process,
                    [str(SSH_SYNC_TRIO), "serve"],
                    env=env,
                    cwd=cwd,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    check=False,
                )
            )
            await wait_until_listening(base + "/", process)
            async with httpx.AsyncClient(base_url=base, timeout=10) as client:
                await exercise(client)
            process.send_signal(signal.SIGTERM)
            with trio.fail_after(STOP_TIMEOUT):
                await process.wait()
    assert process.returncode is not None
    return process.returncode


def secrets_of(machine: sshclient.Machine, token: str) -> list[str]:
    """Everything about `machine` that must never reach the log."""
    _, _, signature = token.split(".")
    found = [token, signature, base64.b64encode(machine.public_key_pem).decode()]
    _, der = sshclient.pem_decode(machine.public_key_pem)
    found.append(base64.b64encode(der).decode()[:40])
    if machine.encapsulation_key_pem is not None:
        found.append(base64.b64encode(machine.encapsulation_key_pem).decode()[:40])
    return found


async def exercise_api(
    client: httpx.AsyncClient, machine: sshclient.Machine, key_material: bytes
) -> list[str]:
    """Setup, upload, download, a rotation: what a client does; its secrets."""
    root = await client.get("/")
    assert root.status_code == 200
    assert root.text
    setup = await client.post("/setup", **sshclient.setup_form(machine))
    assert setup.status_code == 200, setup.text
    token = machine.token()
    auth = {"Authorization": f"Bearer {token}"}
    body = sshclient.data_upload_body(
        [sshclient.ssh_config_entry("secret-host", {"User": ["secret-user"]})],
        None,
        {"id_ed25519": key_material},
    )
    upload = await client.post("/data", **body.request_kwargs(auth))
    assert upload.status_code == 200, upload.text
    data = await client.get("/data", headers=auth)
    assert base64.b64decode(data.json()["keys"][0]["data"]) == key_material
    refused = await client.get("/data", headers={"Authorization": f"Bearer {token}x"})
    assert refused.status_code == 401
    return [
        *secrets_of(machine, token),
        key_material.decode(),
        base64.b64encode(key_material).decode(),
    ]


@ceiling
async def test_serve_on_sqlite_starts_answers_and_stops(tmp_path: Path) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    log_path = tmp_path / "serve.log"
    machine = sshclient.Machine.post_quantum("alice", "laptop")
    key_material = f"KEY-MATERIAL-{secrets.token_hex(16)}".encode()
    sent: list[str] = []

    async def exercise(client: httpx.AsyncClient) -> None:
        sent.extend(await exercise_api(client, machine, key_material))

    node_id = f"node-{secrets.token_hex(4)}"
    code = await serve_and_stop(command_env(NODE_ID=node_id), cwd, log_path, exercise)
    log = log_path.read_text()
    assert code == 0, log

    # With no database configured: the SQLite file in the working directory.
    database = cwd / DEFAULT_SQLITE_FILE
    assert database.is_file()
    assert re.search(rf"database: .*{re.escape(str(database))}", log), log
    assert re.search(r"listening on http://127\.0\.0\.1:\d+", log), log
    assert re.search(r"bus: in memory", log), log
    assert re.search(rf"node id: {node_id}\b", log), log
    assert re.search(r"GET /api/v1/ 200\b", log), log
    assert re.search(r"POST /api/v1/data 200\b", log), log
    assert re.search(r"GET /api/v1/data 401\b", log), log
    assert "SIGTERM" in log
    assert "Traceback" not in log
    leaked = [s for s in sent if s in log]
    assert not leaked, leaked


@pytest.mark.postgres
@ceiling
async def test_serve_with_go_database_names(pg_url: str, tmp_path: Path) -> None:
    url = sa.make_url(pg_url)
    password = f"pw-{secrets.token_hex(8)}"  # trust auth: accepted, unused
    env = command_env(
        DATABASE_HOST=f"{url.host}:{url.port}",
        DATABASE_USERNAME=url.username or "",
        DATABASE_PASSWORD=password,
        DATABASE_NAME=url.database or "",
    )
    machine = sshclient.Machine.classic("bob", "desktop")
    key_material = f"KEY-MATERIAL-{secrets.token_hex(16)}".encode()
    sent: list[str] = []

    async def exercise(client: httpx.AsyncClient) -> None:
        sent.extend(await exercise_api(client, machine, key_material))

    log_path = tmp_path / "serve.log"
    code = await serve_and_stop(env, tmp_path, log_path, exercise)
    log = log_path.read_text()
    assert code == 0, log
    assert re.search(
        rf"database: postgresql {url.host}:{url.port}/{url.database}", log
    ), log
    # Nothing went to a SQLite file, and the password never reached the log.
    assert not (tmp_path / DEFAULT_SQLITE_FILE).exists()
    leaked = [s for s in [*sent, password] if s in log]
    assert not leaked, leaked
