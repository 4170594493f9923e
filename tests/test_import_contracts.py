"""The direction of imports, as pyproject.toml's import-linter contracts state it, checked on every run.

The first test runs `lint-imports` on this tree. The others run the same contracts on a small tree
of the same packages with one wrong arrow each, so a contract that stopped catching anything
(a typo in a module name, a contract type renamed) fails here too.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
PACKAGES = ("cli", "scheduler", "worker", "migrations", "models", "engine", "archive_asr")


def _lint(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_this_tree_keeps_every_import_contract():
    result = _lint(REPO)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def _tree(tmp_path: Path, modules: dict[str, str]) -> Path:
    """Our root packages as empty packages, plus `modules` ({"engine/bad.py": "import models"}), and our contracts."""
    root = tmp_path / "tree"
    for package in PACKAGES:
        (root / package).mkdir(parents=True)
        (root / package / "__init__.py").write_text("")
    for name, source in modules.items():
        (root / name).write_text(source)
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    lines = ["[importlinter]", "root_packages =\n    " + "\n    ".join(config["root_packages"]),
             f"include_external_packages = {config['include_external_packages']}"]
    for i, contract in enumerate(config["contracts"]):
        lines.append(f"\n[importlinter:contract:{i}]")
        for key, value in contract.items():
            if isinstance(value, list):
                lines.append(f"{key} =\n    " + "\n    ".join(value))
            else:
                lines.append(f"{key} = {value}")
    (root / ".importlinter").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize("modules, broken", [
    ({"scheduler/enqueue.py": "from worker import dispatch\n"}, "Layers"),
    ({"models/jobs.py": "import engine\n"}, "Layers"),
    ({"archive_asr/records.py": "from models import tables\n"}, "Layers"),
    ({"engine/transcribe.py": "import sqlalchemy\n"}, "The engine imports no database, queue or CLI"),
    ({"engine/transcribe.py": "import click\n"}, "The engine imports no database, queue or CLI"),
    ({"scheduler/status.py": "def f():\n    import mlx.core\n"}, "The scheduler imports no MLX"),
    ({"worker/tasks.py": "from worker import reconcile\n", "worker/reconcile.py": "from worker.tasks import X\n"},
     "No import circles"),
])
def test_a_wrong_arrow_breaks_its_contract(tmp_path: Path, modules: dict[str, str], broken: str):
    tree = _tree(tmp_path, modules)
    clean = _lint(tree)
    assert clean.returncode != 0, clean.stdout
    line = next(line for line in clean.stdout.splitlines() if line.startswith(broken))
    assert line.endswith("BROKEN"), clean.stdout


def test_the_empty_tree_keeps_them(tmp_path: Path):
    result = _lint(_tree(tmp_path, {}))
    assert result.returncode == 0, result.stdout + result.stderr


def test_enqueue_with_dispatch_never_imports_mlx_or_the_engine(redis_url: str, tmp_path: Path):
    """What `archive-asr enqueue` loads at run time, dispatching to a real broker: no MLX, no engine."""
    import redis

    redis_url = redis_url.rsplit("/", 1)[0] + "/11"  # a database number of its own
    redis.Redis.from_url(redis_url).flushdb()
    code = (
        "import sys; from click.testing import CliRunner; from cli import main\n"
        "r = CliRunner().invoke(main, ['enqueue', sys.argv[1]]); assert r.exit_code == 0, r.output\n"
        "assert 'dispatched 3 job(s)' in r.output, r.output\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlx', 'mlx_whisper', 'engine', 'torch')))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARCHIVE_ASR_")}
    env.update(ARCHIVE_ASR_DATA_DIR=str(tmp_path / "data"), ARCHIVE_ASR_BROKER_URL=redis_url)
    out = subprocess.run([sys.executable, "-c", code, str(REPO / "tests" / "data" / "samples")],
                         capture_output=True, text=True, env=env, timeout=120)
    redis.Redis.from_url(redis_url).flushdb()
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
