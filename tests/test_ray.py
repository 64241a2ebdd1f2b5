"""--ray on a real local Ray cluster (a head and a second node started with `ray start`, CPU only):
same bytes as a local run, also when a task's worker is killed and Ray retries it."""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import tree_digest
from helpers import run_cli

ray = pytest.importorskip("ray", reason="the ray extra is part of the test extra")
psutil = pytest.importorskip("psutil")
ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def ray_node(log: Path, *args) -> subprocess.Popen:
    """`ray start --block` in a session of its own (so teardown kills exactly its processes), waited
    for until it reports the runtime started."""
    ports = free_ports(6)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["ray", "start", "--block", "--num-cpus", "1", "--disable-usage-stats", "--node-ip-address", "127.0.0.1",
             "--node-manager-port", str(ports[0]), "--object-manager-port", str(ports[1]),
             "--metrics-export-port", str(ports[2]), "--dashboard-agent-listen-port", str(ports[3]),
             "--dashboard-agent-grpc-port", str(ports[4]), "--runtime-env-agent-port", str(ports[5]),
             "--object-store-memory", str(100 << 20), *args],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + 180
    while b"Ray runtime started" not in log.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError(f"ray start failed: {log.read_text()[-2000:]}")
        time.sleep(0.2)
    return proc


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # its session: the node's GCS, raylet, agents and workers
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


@pytest.fixture(scope="module")
def cluster():
    """A Ray head (GCS on a free port) plus a second node, torn down whatever happens."""
    temp = Path(tempfile.mkdtemp(prefix="fp8ray", dir="/tmp"))  # short: Ray's unix sockets live under it
    gcs, dashboard = free_ports(2)
    address = f"127.0.0.1:{gcs}"
    nodes = []
    try:
        nodes.append(ray_node(temp / "head.log", "--head", "--port", str(gcs), "--temp-dir", str(temp / "t"),
                              "--include-dashboard", "false", "--dashboard-port", str(dashboard)))
        nodes.append(ray_node(temp / "node.log", "--address", address))
        yield address
    finally:
        for node in reversed(nodes):
            stop(node)
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_cluster_matches_local_run(sample, tmp_path, cluster):
    src = sample("llama-tiny")
    run_cli("quantize", src, "-o", tmp_path / "local", "--max-shard-size", "500KB", "-q")
    result = subprocess.run([sys.executable, "-m", "fp8conv", "quantize", str(src), "-o", str(tmp_path / "ray"),
                             "--max-shard-size", "500KB", "--ray", cluster, "--parts", "3", "-q"],
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert result.returncode == 0, result.stderr
    assert tree_digest(tmp_path / "ray") == tree_digest(tmp_path / "local")
    assert not (tmp_path / ".ray.fp8conv-parts").exists()
    # the model card too: the same as the local run's but for the command line it quotes
    from fp8conv.report.card import card_digest_matches, split_front_matter

    ray_keys, ray_body = split_front_matter((tmp_path / "ray" / "README.md").read_text())
    local_keys, local_body = split_front_matter((tmp_path / "local" / "README.md").read_text())
    assert "--ray" in ray_keys.pop("fp8conv_command") and ray_keys == {k: v for k, v in local_keys.items()
                                                                        if k != "fp8conv_command"}
    assert card_digest_matches(tmp_path / "ray") is True
    done = re.compile(r"## What was done.*?## Provenance", re.S)
    assert done.search(ray_body).group(0) == done.search(local_body).group(0)


def ray_task_workers() -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if cmdline.startswith("ray::convert_part"):
            found.append(proc)
    return found


def test_killed_task_worker_is_retried_with_identical_bytes(tmp_path, cluster):
    from test_reliability import sharded_model

    src = sharded_model(tmp_path / "src", shards=4, rows=2048, cols=4096)
    run_cli("quantize", src, "-o", tmp_path / "local", "-q")
    driver = subprocess.Popen([sys.executable, "-m", "fp8conv", "quantize", str(src), "-o", str(tmp_path / "ray"),
                               "--ray", cluster, "--parts", "2", "-q"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    killed = None
    deadline = time.monotonic() + 120
    parts = tmp_path / ".ray.fp8conv-parts"
    while killed is None and driver.poll() is None and time.monotonic() < deadline:
        started = parts.is_dir() and any(p.name.endswith(".fp8conv-partial") for p in parts.iterdir())
        workers = ray_task_workers() if started else []
        if workers:
            killed = workers[0].pid
            os.kill(killed, signal.SIGKILL)  # the worker process dies mid-task: Ray retries the task
        time.sleep(0.01)
    _, err = driver.communicate(timeout=300)
    assert killed is not None, "no Ray task worker seen to kill"
    assert driver.returncode == 0, err
    assert tree_digest(tmp_path / "ray") == tree_digest(tmp_path / "local")


def test_ray_missing_names_the_extra(sample, tmp_path):
    code = ("import sys; sys.modules['ray'] = None; from fp8conv.cli import main; "
            f"sys.argv = ['fp8conv', 'quantize', {str(sample('bert-tiny-fp32'))!r}, '-o', {str(tmp_path / 'o')!r}, '--ray']; main()")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert result.returncode == 2
    assert result.stderr == "fp8conv: error: --ray needs Ray, which is not installed: pip install 'fp8conv[ray]'\n"
