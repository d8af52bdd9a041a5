"""The pipeline on a real 3-node Redis Cluster (redis-server + redis-cli --cluster create):
every key shares the {ns} hash tag, so the commit, join and finish scripts run unchanged."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.cluster import RedisCluster

from spotline.common.embedded import find_redis_server
from spotline.common.settings import Settings
from spotline.pipeline.supervisor import LocalPipeline
from spotline.producer.client import Client
from tests.conftest import FAST


def _cli(server: str) -> str:
    beside = Path(server).with_name("redis-cli")
    found = str(beside) if beside.exists() else shutil.which("redis-cli")
    if not found:
        pytest.skip("no redis-cli to create a cluster with")
    return found


@pytest.fixture(scope="module")
def cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = find_redis_server()
    ports = cluster_ports(3)
    procs = []
    for port in ports:
        d = tmp_path_factory.mktemp(f"node{port}")
        procs.append(subprocess.Popen(
            [server, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
             "--cluster-config-file", "nodes.conf", "--dir", str(d), "--save", "",
             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    try:
        for port in ports:
            _await(lambda p=port: redis.Redis(host="127.0.0.1", port=p).ping())
        subprocess.run([_cli(server), "--cluster", "create",
                        *(f"127.0.0.1:{p}" for p in ports), "--cluster-replicas", "0",
                        "--cluster-yes"], check=True, capture_output=True, timeout=60)
        url = f"redis://127.0.0.1:{ports[0]}/0?cluster=true"
        _await(lambda: RedisCluster.from_url(url.split("?")[0]).set("{probe}:x", 1))
        yield url
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=10)


def cluster_ports(n: int) -> list[int]:
    """Free ports whose cluster bus ports (port + 10000) are free too, so below 55536."""
    ports: list[int] = []
    for port in range(31000 + os.getpid() % 5000, 45000):
        if all(_free(p) for p in (port, port + 10000)) and len(ports) < n:
            ports.append(port)
        if len(ports) == n:
            return ports
    pytest.skip("no free ports for a cluster")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _await(fn, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        try:
            fn()
            return
        except (redis.RedisError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_pipeline_runs_on_redis_cluster(cluster_url: str, settings: Settings) -> None:
    from spotline.pipeline.demo import DEMO_FRAMES, demo_images

    s = settings.replace(redis_url=cluster_url, crops_per_part=3, **FAST)
    with LocalPipeline(s) as url:
        client = Client.connect(url, s)
        assert isinstance(client.t.r, RedisCluster)
        frames = [(img, DEMO_FRAMES[name]) for name, img in demo_images().items()]
        ids = [client.publish(img, caps) for img, caps in frames]
        results = client.await_results(ids, timeout=300)
    assert sorted(results) == sorted(ids)
    assert all(r.error is None and len(r.boxes) == len(r.captions) for r in results.values())
