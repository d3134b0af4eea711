"""A tiny trained workdir and a real ``main.py --mode=serve`` process over it, shared by the serving tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time

import httpx
import pytest

from tests import shared_runs
from tests.modes.test_train import environment, fresh_workdir, main_command

# Small and fast: greedy replies of at most 8 tokens, batches of up to 4, chunks written every 0.2 s.
SERVE_FLAGS = ("--config.generation.method=greedy", "--config.generation.beam_size=1",
               "--config.generation.max_len=8", "--config.serve.max_batch=4", "--config.serve.compact_every_s=0.2")


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory):
    """A workdir with a 12-step MLE model on a small synthetic release (the model to serve)."""
    return fresh_workdir(shared_runs.mle_base(), tmp_path_factory.mktemp("serve_base"), "run")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """``main.py --mode=serve`` in its own process, ready when its API answers."""

    def __init__(self, workdir: str, *overrides: str, timeout_s: float = 300):
        self.workdir, self.port = workdir, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = main_command(workdir, *SERVE_FLAGS, f"--config.serve.port={self.port}", *overrides, mode="serve")
        self.log_path = os.path.join(workdir, f"serve_{self.port}.log")
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(command, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
                                        env=environment(), stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.output()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/api/settings", timeout=2).status_code == 200:
                    return
            time.sleep(0.3)
        self.kill()
        raise RuntimeError(f"the server did not answer within {timeout_s} s:\n{self.output()}")

    def output(self) -> str:
        """What the server printed so far (also after it stopped)."""
        if not self.log.closed:
            self.log.flush()
        return open(self.log_path).read()

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60) -> int:
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout_s)
        finally:
            self.log.close()

    def kill(self) -> int:
        return self.stop(signal.SIGKILL)


@pytest.fixture
def serve():
    """Starts servers (``serve(workdir, *overrides)``) and stops those a test left running."""
    started: list[Server] = []

    def start(workdir: str, *overrides: str) -> Server:
        server = Server(workdir, *overrides)
        started.append(server)
        return server

    yield start
    for server in started:
        if server.process.poll() is None:
            server.kill()
