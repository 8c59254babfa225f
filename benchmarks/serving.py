"""``excp serve`` in a subprocess for the benchmark scripts (service, load, crash).

The tests have their own harness (tests/serve_fixtures.py), built around pytest's
fixtures; the scripts share this one so that they start, wait for and stop a server
the same way.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
READY_S = 120.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServeProcess:
    """``excp serve --store STORE`` on a free port of 127.0.0.1, started and ready
    (``/readyz`` answers 200) when the constructor returns.

    ``env`` is its environment (default: this one without ``EXCP_TOKENS``/``EXCP_STORE``);
    ``tokens`` a tokens-file dict; ``own_group`` puts it and its workers in a process group
    of their own, so :meth:`kill` takes them all at once, as a lost node would.
    """

    def __init__(self, root: Path, store: str, *, workers: int = 2, env: dict[str, str] | None = None,
                 tokens: dict | None = None, own_group: bool = False) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = f"excp://127.0.0.1:{self.port}"
        self.log_path = root / f"server-{self.port}.log"
        self._own_group = own_group
        command = [sys.executable, "-c", "from excp.cli import main; main()", "serve", "--store", store,
                   "--port", str(self.port), "--cache-dir", str(root / "serve-cache"),
                   "--workers", str(workers)]
        if tokens is not None:
            path = root / "tokens.json"
            path.write_text(json.dumps(tokens))
            command += ["--tokens", str(path)]
        if env is None:
            env = {k: v for k, v in os.environ.items() if k not in ("EXCP_TOKENS", "EXCP_STORE")}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=own_group)
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"excp serve exited:\n{self.log_path.read_text()[-3000:]}")
            try:
                if requests.get(f"{self.base}/readyz", timeout=5).status_code == 200:
                    return
            except (requests.ConnectionError, requests.Timeout):
                pass
            time.sleep(0.1)
        self.stop()
        raise SystemExit(f"excp serve did not become ready within {READY_S:.0f} s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> bool:
        """SIGKILL the server (with its workers, in its own group); False if it had exited."""
        alive = self.proc.poll() is None
        if alive:
            if self._own_group:
                os.killpg(self.proc.pid, signal.SIGKILL)
            else:
                self.proc.kill()
        self.proc.wait()
        return alive
