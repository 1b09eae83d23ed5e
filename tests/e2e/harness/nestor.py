"""Start/stop the nestor binary under test."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from .procs import free_port, stop_process_group, kill_process_group, tail, wait_http_ok

REPO = Path(__file__).resolve().parents[3]


def nestor_bin() -> str:
    """``$NESTOR_BIN``, else the workspace's debug build, else its release build."""
    explicit = os.environ.get("NESTOR_BIN")
    if explicit:
        return explicit
    for profile in ("debug", "release"):
        p = REPO / "target" / profile / "nestor"
        if p.exists():
            return str(p)
    raise RuntimeError("nestor binary not found: build it (cargo build -p nestor-aggregator) or set NESTOR_BIN")


class Nestor:
    """One nestor process with its own config file and state. ``start()`` is bounded."""

    def __init__(self, work_dir: Path, config: str, port: int | None = None) -> None:
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.config_path = self.work_dir / "nestor.toml"
        self.config_path.write_text(f'bind = "127.0.0.1:{self.port}"\n' + config)
        self.log_path = self.work_dir / "nestor.log"
        self.proc: subprocess.Popen | None = None
        self.state_dir = None
        for line in config.splitlines():
            if line.strip().startswith("state_dir"):
                self.state_dir = Path(line.split("=", 1)[1].strip().strip('"'))

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> "Nestor":
        log = open(self.log_path, "ab")
        env = dict(os.environ)
        env.setdefault("NESTOR_LOG", "info,nestor_ws_proxy=debug")
        self.proc = subprocess.Popen(
            [nestor_bin(), "serve", "--config", str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, start_new_session=True,
        )
        log.close()
        try:
            wait_http_ok(f"{self.base_url}/alive", timeout=timeout, proc=self.proc)
        except Exception as e:
            raise RuntimeError(f"nestor did not start: {e}\n--- log ---\n{tail(self.log_path)}") from e
        return self

    def stop(self, timeout: float = 40) -> None:
        """Graceful stop (SIGTERM: drain, stop downstreams), bounded."""
        if self.proc is not None:
            try:
                self.proc.send_signal(15)
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                stop_process_group(self.proc, term_timeout=5)

    def kill(self) -> None:
        """kill -9 of nestor alone (its downstreams keep running, as after a crash)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def log_tail(self, n: int = 8000) -> str:
        return tail(self.log_path, n)

    def agent_server_pids(self, conversation_id: str) -> list[int]:
        """Pids running in the process provisioner's directory of one conversation."""
        if self.state_dir is None:
            return []
        d = str(self.state_dir / "process" / conversation_id.replace("-", ""))
        found = []
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    if os.readlink(f"/proc/{pid}/cwd").startswith(d):
                        found.append(int(pid))
                except OSError:
                    pass
        return found

    def leftover_agent_servers(self) -> list[int]:
        """Pids of agent-server processes whose state lives under this nestor's state_dir."""
        if self.state_dir is None:
            return []
        found = []
        deadline = time.monotonic() + 5
        while True:
            found = []
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    cwd = os.readlink(f"/proc/{pid}/cwd")
                except OSError:
                    continue
                if cwd.startswith(str(self.state_dir)):
                    found.append(int(pid))
            if not found or time.monotonic() > deadline:
                return found
            time.sleep(0.2)
