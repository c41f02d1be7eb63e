"""A Ray head started by a test with `ray start --head` on loopback, on free non-default ports and
its own temp folder, and stopped by ending exactly its own processes (other Ray clusters may run on
the same machine: `ray stop` would end them all).

Its temp folder is also RAY_TMPDIR for `ray start`, so the "latest cluster" address file lands there
and a plain `ray.init()` elsewhere on the machine never joins this head by accident.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from amldist.loopback_s3 import free_ports

PORT_FLAGS = ("--port", "--dashboard-port", "--ray-client-server-port", "--node-manager-port",
              "--object-manager-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
              "--runtime-env-agent-port", "--metrics-export-port")


@dataclass(frozen=True)
class Head:
    dashboard: str   # http://127.0.0.1:PORT, the job server's address
    gcs: str         # 127.0.0.1:PORT
    env: dict        # the environment the head runs in (the venv's bin first on PATH)
    temp_dir: str


def own_processes(marker: str) -> list[int]:
    """Pids whose command line mentions `marker` (the head's unique temp folder), this process excluded."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            found.append(int(entry.name))
    return found


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def stop_head(temp_dir: str, grace_s: float = 10.0) -> None:
    """SIGTERM the head's own processes, SIGKILL what is left after `grace_s`."""
    _signal_all(own_processes(temp_dir), signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while own_processes(temp_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    _signal_all(own_processes(temp_dir), signal.SIGKILL)


def wait_for_port(port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s} s") from None
            time.sleep(0.5)


@contextmanager
def ray_head(num_cpus: int = 2, extra_env: dict | None = None):
    # Short: Ray's unix sockets live below it and socket paths are limited to ~107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="amlray", dir="/tmp")
    # Distinct ports: Ray refuses to start when two of its components are given the same one.
    ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS)), strict=True))
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, **(extra_env or {}), "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
           "RAY_TMPDIR": temp_dir, "RAY_AUTH_MODE": "disabled"}
    # This head is its own cluster: an address another one left in this process's environment (an
    # earlier test's `start_ray(local=True)` sets RAY_API_SERVER_ADDRESS to its dashboard) is stale.
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_API_SERVER_ADDRESS", None)
    command = [str(Path(venv_bin) / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1",
               "--dashboard-host", "127.0.0.1", "--include-dashboard", "true", "--num-cpus", str(num_cpus),
               "--num-gpus", "0", "--temp-dir", temp_dir, "--disable-usage-stats",
               *[f"{flag}={port}" for flag, port in ports.items()]]
    try:
        started = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=120)
        if started.returncode != 0:
            raise RuntimeError(f"ray start failed:\n{started.stdout}\n{started.stderr}")
        # `ray start` returns before the dashboard agent listens, and the job server hands every submission
        # to an agent ("No available agent to submit job" until then): wait for the head to be ready.
        wait_for_port(ports["--dashboard-agent-listen-port"], timeout_s=120)
        yield Head(f"http://127.0.0.1:{ports['--dashboard-port']}", f"127.0.0.1:{ports['--port']}", env,
                   temp_dir)
    finally:
        stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
