"""Subprocess and port helpers. Every wait is bounded; every process gets its own group."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx


def free_port() -> int:
    """A currently free loopback TCP port (racy by nature; callers retry on bind failure)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http_ok(url: str, timeout: float, proc: subprocess.Popen | None = None, interval: float = 0.1) -> float:
    """Poll ``url`` until it answers 200. Returns seconds waited. Raises on timeout/exit."""
    start = time.monotonic()
    deadline = start + timeout
    last_err: Exception | str | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            r = httpx.get(url, timeout=2.0)
            if r.status_code == 200:
                return time.monotonic() - start
            last_err = f"HTTP {r.status_code}"
        except httpx.HTTPError as e:
            last_err = e
        time.sleep(interval)
    raise TimeoutError(f"{url} not ready after {timeout:.0f}s (last: {last_err})")


def stop_process_group(proc: subprocess.Popen, term_timeout: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL after ``term_timeout``. Idempotent."""
    if proc.poll() is not None:
        _reap_group(proc)
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=term_timeout)
    except subprocess.TimeoutExpired:
        kill_process_group(proc)
    _reap_group(proc)


def kill_process_group(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGKILL the whole process group (the hard crash a later test simulates)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass


def _reap_group(proc: subprocess.Popen) -> None:
    # Children (tmux/bash of the terminal tool) may outlive the leader; kill leftovers.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def tail(path: Path, max_bytes: int = 6000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return "<no log>"
    return data[-max_bytes:].decode("utf-8", "replace")
