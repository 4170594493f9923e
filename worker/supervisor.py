"""`archive-asr worker --per-gpu`: one worker process per device, started, signalled and waited for together.

Each child is a plain `archive-asr worker --device gpu:N` (its own process, so CUDA shows it its
card alone). The supervisor holds no device itself. SIGTERM or SIGINT is passed on to every
child, which shuts down warm (finishing the files in hand); a second SIGINT makes Celery's cold
shutdown, as for a single worker, and a second SIGTERM kills the children outright (their jobs
come back through their leases): a warm shutdown finishes every file a worker holds, which on a
CPU can be many minutes, and whoever asks twice wants it over. When one child exits on its own
(a crash, a card that failed) the others are stopped warm and the supervisor exits with that
child's status, so a service manager restarts the set as a whole.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable

FORWARDED = (signal.SIGTERM, signal.SIGINT)
POLL_S = 0.5
KILL_GRACE_S = 5.0  # after a second SIGTERM, for a supervisor to kill its workers and exit


def child_argv(device: str, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "cli", "worker", "--device", device, *args]


def _die_with_parent() -> None:
    """In the child, before exec (Linux): get SIGTERM if the supervisor itself is killed, not orphaned."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def supervise(devices: list[str], args: list[str], *, echo: Callable[[str], None]) -> int:
    """Run one worker per device until all have exited; their first failure's status, else 0."""
    children: dict[str, subprocess.Popen] = {}
    stopping = False
    status = 0

    def forward(signum: int, _frame) -> None:
        nonlocal stopping
        again = stopping and signum == signal.SIGTERM
        stopping = True
        for proc in children.values():
            if proc.poll() is None and again:
                proc.kill()
            elif proc.poll() is None:
                proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in FORWARDED}
    try:
        for device in devices:
            # Its own process group: a terminal's Ctrl-C reaches the children once, through forward().
            children[device] = subprocess.Popen(child_argv(device, args), stdin=subprocess.DEVNULL,
                                                process_group=0, preexec_fn=_die_with_parent)
        ended: set[str] = set()
        while len(ended) < len(children):
            for device, proc in children.items():
                code = proc.poll()
                if code is None or device in ended:
                    continue
                ended.add(device)
                if code != 0 and not stopping:
                    echo(f"the worker on {device} exited with status {code}: stopping the others")
                    status = exit_status(code)
                    forward(signal.SIGTERM, None)
            time.sleep(POLL_S)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return status or next((exit_status(p.returncode) for p in children.values() if p.returncode), 0)


def stop_gracefully(proc: subprocess.Popen, timeout_s: float = 60) -> None:
    """SIGTERM a worker (or supervisor) process: its warm shutdown finishes the files in hand.
    If it has not exited after ``timeout_s``, SIGTERM again (a supervisor then kills its workers,
    which SIGKILLing it alone would leave running, orphaned) and SIGKILL it soon after."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def exit_status(returncode: int) -> int:
    """A child's status as a shell reports it: 128 + N for a child killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode
