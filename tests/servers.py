"""Real servers on loopback for tests: a free port, waiting for a health URL, and a clean stop."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], health_url: str, timeout_s: float = 180, **popen) -> subprocess.Popen:
    """Start ``cmd`` in its own process group and wait until ``health_url`` answers 200."""
    proc = subprocess.Popen(cmd, start_new_session=True, **popen)
    deadline = time.time() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(health_url, timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            stop(proc)
            raise RuntimeError(f"{cmd[0]}: no answer on {health_url} after {timeout_s} s (exit code {proc.poll()})")
        time.sleep(0.5)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (its workers too), SIGKILL after 30 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    with contextlib.suppress(ProcessLookupError):  # children that outlived their parent
        os.killpg(proc.pid, signal.SIGKILL)
