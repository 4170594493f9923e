"""The embedded Valkey broker: started on demand, shared, outliving its starter, stopped on request."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from tests.fixtures_worker import REPO

pytestmark = pytest.mark.timeout(120)


def _cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=60)


def _status(env: dict) -> dict:
    out = _cli(env, "broker", "status", "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _url_in_new_process(env: dict) -> str:
    code = "from worker.broker import broker_url; print(broker_url())"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def _gone(pid: int) -> bool:
    """The process has exited (a zombie not yet reaped by init counts as exited)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


@pytest.fixture
def env(data_dir: Path):
    env = dict(os.environ)
    yield env
    _cli(env, "broker", "stop")  # never leave a server behind, whatever the test did


def test_embedded_broker_lifecycle(data_dir: Path, env: dict):
    assert _status(env)["running"] is False  # status starts nothing

    # Three processes racing to need a broker get one server between them.
    code = "from worker.broker import ensure_embedded; print(ensure_embedded().pid)"
    racers = [subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO, stdout=subprocess.PIPE, text=True) for _ in range(3)]
    pids = {p.communicate(timeout=60)[0].strip() for p in racers}
    assert len(pids) == 1 and pids != {""}

    # Every starter has exited: the server outlived them, and later processes reuse it.
    status = _status(env)
    assert status["running"] is True
    assert str(status["pid"]) in pids
    url = _url_in_new_process(env)
    assert url == _url_in_new_process(env)
    assert ":6379" not in url and "127.0.0.1" in url

    client = redis.Redis.from_url(url)
    assert client.config_get("bind")["bind"] == "127.0.0.1"
    assert client.config_get("appendonly")["appendonly"] == "yes"
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=status["port"]).ping()  # password required
    broker_dir = data_dir / "broker"
    assert (broker_dir / "valkey.pid").read_text().strip() == str(status["pid"])
    assert oct((broker_dir / "broker.json").stat().st_mode & 0o777) == "0o600"

    # Waiting messages survive a stop and start (append-only file in the data dir).
    client.lpush("asr.tiny.en", "a waiting message")
    out = _cli(env, "broker", "stop")
    assert out.returncode == 0 and "stopped" in out.stdout
    assert _status(env)["running"] is False
    assert _gone(status["pid"])

    url2 = _url_in_new_process(env)
    assert url2 == url  # same port and password: workers started earlier reconnect
    assert redis.Redis.from_url(url2).lrange("asr.tiny.en", 0, -1) == [b"a waiting message"]
    assert _cli(env, "broker", "stop").returncode == 0


def test_configured_broker_is_not_managed(data_dir: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("ARCHIVE_ASR_BROKER_URL", "redis://127.0.0.1:1/0")
    env = dict(os.environ)  # not the fixture: nothing embedded to clean up
    out = _cli(env, "broker", "stop")
    assert out.returncode != 0 and "ARCHIVE_ASR_BROKER_URL is set" in out.stderr
    status = _status(env)
    assert status["embedded"] is False and status["running"] is False
    assert "does not answer" in status["error"]
