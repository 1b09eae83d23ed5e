"""Start/stop a real OpenHands agent-server as a subprocess with its own state dirs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .procs import free_port, kill_process_group, stop_process_group, tail, wait_http_ok

STARTUP_TIMEOUT = float(os.environ.get("NESTOR_E2E_STARTUP_TIMEOUT", "90"))


def agent_server_bin() -> str:
    """The ``agent-server`` console script: $NESTOR_AGENT_SERVER_BIN, else next to this python."""
    explicit = os.environ.get("NESTOR_AGENT_SERVER_BIN")
    if explicit:
        return explicit
    candidate = Path(sys.executable).parent / "agent-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("agent-server")
    if found:
        return found
    raise RuntimeError(
        "agent-server not found: run tests with the venv from scripts/setup-agent-server.sh "
        "(scripts/run-e2e.sh does) or set NESTOR_AGENT_SERVER_BIN"
    )


def agent_server_env(state_dir: Path, api_key: str, tmux_dir: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OH_", "SESSION_API_KEY"))}
    env.update(
        {
            "SESSION_API_KEY": api_key,
            "OH_SESSION_API_KEYS_0": api_key,
            "OH_SECRET_KEY": f"secret-{api_key}",
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "OH_PRELOAD_TOOLS": "false",
            "OH_ENABLE_BROWSER": "false",
            "OH_ENABLE_VSCODE": "false",
            "OPENHANDS_SUPPRESS_BANNER": "1",
            "OH_CONVERSATIONS_PATH": str(state_dir / "conversations"),
            "OH_BASH_EVENTS_DIR": str(state_dir / "bash_events"),
            "OH_PERSISTENCE_DIR": str(state_dir / "persistence"),
            "OH_WORKSPACE_PATH": str(state_dir / "workspace"),
            "HOME": str(state_dir / "home"),
            "TMUX_TMPDIR": str(tmux_dir),
            "TZ": "UTC",
            "PYTHONUNBUFFERED": "1",
            # No proxy for loopback traffic (LLM calls go to the fake LLM on 127.0.0.1).
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }
    )
    env.update(extra or {})
    return env


@dataclass
class AgentServer:
    """One agent-server process. ``start()`` blocks (bounded) until ``/alive`` answers."""

    state_dir: Path
    api_key: str
    extra_env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    proc: subprocess.Popen | None = None
    startup_seconds: float = 0.0
    die_with_parent: bool = True

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir)
        for d in ("conversations", "bash_events", "persistence", "workspace", "home"):
            (self.state_dir / d).mkdir(parents=True, exist_ok=True)
        # tmux socket paths must stay short (< 108 bytes), so not under pytest's tmp dir.
        self.tmux_dir = Path(tempfile.mkdtemp(prefix="nestor-e2e-tmux-"))
        self.log_path = self.state_dir / "agent-server.log"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = STARTUP_TIMEOUT, attempts: int = 3) -> "AgentServer":
        last: Exception | None = None
        for _ in range(attempts):
            self.port = free_port()
            log = open(self.log_path, "ab")
            t0 = time.monotonic()
            self.proc = subprocess.Popen(
                self._command(),
                cwd=self.state_dir,
                env=agent_server_env(self.state_dir, self.api_key, self.tmux_dir, self.extra_env),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # own process group: teardown kills the whole tree
            )
            log.close()
            try:
                wait_http_ok(f"{self.base_url}/alive", timeout=timeout, proc=self.proc)
                self.startup_seconds = time.monotonic() - t0
                return self
            except (RuntimeError, TimeoutError) as e:  # port race or crash: retry on a new port
                last = e
                stop_process_group(self.proc, term_timeout=5)
        raise RuntimeError(f"agent-server failed to start: {last}\n--- log tail ---\n{tail(self.log_path)}")

    @staticmethod
    def start_many(servers: list["AgentServer"], timeout: float = STARTUP_TIMEOUT) -> None:
        """Start several servers at once (they boot in parallel): spawned from this thread
        (see ``_command``), then waited for; one that fails is started again on its own."""
        started = []
        for s in servers:
            s.port = free_port()
            log = open(s.log_path, "ab")
            s._t0 = time.monotonic()
            s.proc = subprocess.Popen(
                s._command(), cwd=s.state_dir, env=agent_server_env(s.state_dir, s.api_key, s.tmux_dir, s.extra_env),
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
            log.close()
            started.append(s)
        for s in started:
            try:
                wait_http_ok(f"{s.base_url}/alive", timeout=timeout, proc=s.proc)
                s.startup_seconds = time.monotonic() - s._t0
            except (RuntimeError, TimeoutError):
                stop_process_group(s.proc, term_timeout=5)
                s.start(timeout=timeout)

    def restart_same_port(self, timeout: float = STARTUP_TIMEOUT, attempts: int = 20) -> "AgentServer":
        """Start again on the **same port** and the same state dirs, after ``kill()`` or
        ``stop()``: what a supervisor restarting a crashed server does, and what a proxy
        holding sockets to it must survive (same URL, same persisted conversations).

        The port normally rebinds at once (uvicorn sets SO_REUSEADDR); if it is briefly
        unavailable the start is retried, bounded by ``attempts`` and ``timeout`` each."""
        if not self.port:
            raise RuntimeError("restart_same_port() needs a server that was started before")
        if self.alive():
            raise RuntimeError("restart_same_port(): the server is still running; kill() or stop() it first")
        last: Exception | None = None
        for _ in range(attempts):
            log = open(self.log_path, "ab")
            log.write(b"\n--- restart on the same port ---\n")
            t0 = time.monotonic()
            self.proc = subprocess.Popen(
                self._command(),
                cwd=self.state_dir,
                env=agent_server_env(self.state_dir, self.api_key, self.tmux_dir, self.extra_env),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
            log.close()
            try:
                wait_http_ok(f"{self.base_url}/alive", timeout=timeout, proc=self.proc)
                self.startup_seconds = time.monotonic() - t0
                return self
            except (RuntimeError, TimeoutError) as e:  # port still held, or a crash: retry
                last = e
                stop_process_group(self.proc, term_timeout=5)
                time.sleep(0.5)
        raise RuntimeError(f"agent-server did not restart on port {self.port}: {last}\n--- log tail ---\n{tail(self.log_path)}")

    def _command(self) -> list[str]:
        cmd = [agent_server_bin(), "--host", "127.0.0.1", "--port", str(self.port)]
        # If the test process dies without teardown, take the server down with it. (The
        # death signal fires when the *thread* that spawned it exits: start servers from the
        # main thread or a thread that outlives them.)
        setpriv = shutil.which("setpriv")
        if self.die_with_parent and setpriv:
            cmd = [setpriv, "--pdeathsig", "TERM", "--", *cmd]
        return cmd

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """Hard crash (SIGKILL to the process group), as a later fault-injection test needs."""
        if self.proc is not None:
            kill_process_group(self.proc)
        self._kill_tmux()

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_group(self.proc)
        self._kill_tmux()

    def _kill_tmux(self) -> None:
        # The terminal tool starts one tmux server per terminal; tmux daemonizes out of our
        # process group, so stop exactly the servers whose sockets live in our private dir.
        for sock in self.tmux_dir.glob("tmux-*/*"):
            if sock.is_socket():
                try:
                    subprocess.run(["tmux", "-S", str(sock), "kill-server"], timeout=5,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                except (OSError, subprocess.TimeoutExpired):
                    pass

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.tmux_dir, ignore_errors=True)

    def log_tail(self, n: int = 6000) -> str:
        return tail(self.log_path, n)
