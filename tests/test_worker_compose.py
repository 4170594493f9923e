"""compose.yaml: the fleet's shared services, checked for structure (no Docker engine here)."""

from __future__ import annotations

import re

import yaml

from tests.fixtures_worker import REPO

COMPOSE = REPO / "compose.yaml"
SECRET_NAMES = ("PASSWORD", "BASIC_AUTH")


def _load() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_services_and_their_wiring():
    services = _load()["services"]
    assert {"valkey", "postgres", "migrate", "flower", "worker"} <= set(services)

    valkey = " ".join(map(str, services["valkey"]["command"]))
    assert "--requirepass" in valkey and "--appendonly yes" in valkey
    assert any(v.endswith(":/data") for v in services["valkey"]["volumes"])

    pg = services["postgres"]
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    assert any(v.endswith("/var/lib/postgresql/data") for v in pg["volumes"])

    migrate = services["migrate"]
    assert migrate["command"] == ["archive-asr", "db", "upgrade"]
    assert migrate["restart"] == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"

    flower = services["flower"]
    user, password = flower["environment"]["ARCHIVE_ASR_FLOWER_BASIC_AUTH"].split("}:", 1)
    assert user.startswith("${FLOWER_USER:-") and user[len("${FLOWER_USER:-"):]  # never an empty user name
    assert password.startswith("${FLOWER_PASSWORD:?")  # compose refuses an empty or missing password
    assert flower["depends_on"]["migrate"]["condition"] == "service_completed_successfully"

    worker = services["worker"]
    assert worker["profiles"] == ["worker"]  # optional: Mac workers run natively
    assert worker["command"][:2] == ["archive-asr", "worker"]
    for name in ("flower", "worker", "migrate"):
        env = services[name]["environment"]
        assert env["ARCHIVE_ASR_DATABASE_URL"].startswith("postgresql")
        assert env["ARCHIVE_ASR_BROKER_URL"].startswith("redis://:")


def test_no_secret_has_a_default():
    text = COMPOSE.read_text()
    for match in re.finditer(r"\$\{([A-Z_]+)([^}]*)\}", text):
        name, rest = match.groups()
        if any(s in name for s in SECRET_NAMES):
            assert rest.startswith(":?"), f"${{{name}}} must be required (${{{name}:?...}}), not defaulted"
    assert re.search(r"\$\{VALKEY_PASSWORD:\?", text) and re.search(r"\$\{POSTGRES_PASSWORD:\?", text)


def test_published_ports_default_to_localhost():
    for name, service in _load()["services"].items():
        for port in service.get("ports", []):
            assert port.startswith("${ARCHIVE_ASR_BIND_ADDRESS:-127.0.0.1}:"), f"{name} publishes {port} beyond localhost"
