"""A Redis URL's password never reaches a log line: the redact helper, and a real worker and
`spotline up` against a password-protected real redis-server, through a wrong password and an
outage (the reconnect logs)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from spotline.common.embedded import EmbeddedRedis
from spotline.common.redact import redact, redact_url
from spotline.common.settings import Settings
from tests.conftest import ROOT, child_env
from tests.faultlib import wait_for

SECRET = "s3cret-Pa55word"


@pytest.mark.parametrize("text, expected", [
    ("redis://:pw@redis:6379/0", "redis://:***@redis:6379/0"),
    ("rediss://app:pw@10.0.0.5:6380/0", "rediss://app:***@10.0.0.5:6380/0"),
    ("redis://:p@ss:w0rd@h:1/0", "redis://:***@h:1/0"),  # an unescaped '@' in the password
    ("unix://:pw@/tmp/redis.sock?db=0", "unix://:***@/tmp/redis.sock?db=0"),
    ("redis://h/0?password=pw&db=1", "redis://h/0?password=***&db=1"),
    ("redis://redis:6379/0", "redis://redis:6379/0"),  # nothing to hide
    ("redis://user@h/0", "redis://user@h/0"),
    ("lost redis://:a@x and redis://:b@y then", "lost redis://:***@x and redis://:***@y then"),
    ("mail me@example.org at redis://h:1/0", "mail me@example.org at redis://h:1/0"),
])
def test_redact(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.parametrize("url, shown, without_user", [
    # a password holding '@' (and ':', '?', '#'): cut at the LAST '@' before the path
    ("rtsp://user:p@ss@cam.example/live", "rtsp://user:***@cam.example/live",
     "rtsp://cam.example/live"),
    ("rtsp://admin:a@b:c@10.0.0.5:554/s", "rtsp://admin:***@10.0.0.5:554/s",
     "rtsp://10.0.0.5:554/s"),
    ("rtsp://u:pa?ss#x@h/s?ch=1", "rtsp://u:***@h/s?ch=1", "rtsp://h/s?ch=1"),
    ("http://u:@h/", "http://u:@h/", "http://h/"),
    ("http://h/?a@b=1", "http://h/?a@b=1", "http://h/?a@b=1"),  # '@' after the path stays
    # secret query keys, any case, by name or by ending
    ("http://h/s?token=T&password=P&ch=2", "http://h/s?token=***&password=***&ch=2", None),
    ("http://h/s?passwd=1&pwd=2&secret=3&pass=4", "http://h/s?passwd=***&pwd=***&secret=***"
     "&pass=***", None),
    ("http://h/s?Access_Token=1&API_KEY=2&apikey=3&key=4", "http://h/s?Access_Token=***"
     "&API_KEY=***&apikey=***&key=***", None),
    ("http://h/s?sig=1&Signature=2&auth=3&Authorization=4", "http://h/s?sig=***"
     "&Signature=***&auth=***&Authorization=***", None),
    ("https://b.s3.amazonaws.com/o.mp4?X-Amz-Algorithm=AWS4&X-Amz-Credential=AKIA%2F1"
     "&X-Amz-Signature=abc&X-Amz-Security-Token=tok&X-Amz-Expires=60",
     "https://b.s3.amazonaws.com/o.mp4?X-Amz-Algorithm=AWS4&X-Amz-Credential=***"
     "&X-Amz-Signature=***&X-Amz-Security-Token=***&X-Amz-Expires=60", None),
    ("http://h/s?refresh_token=1&client_secret=2&my-key=3", "http://h/s?refresh_token=***"
     "&client_secret=***&my-key=***", None),
    ("http://h/s?monkey=1&keyframe=2&tokens=3", "http://h/s?monkey=1&keyframe=2&tokens=3",
     None),  # not secret names
    ("http://h/s?a=1;sig=2#access_token=3&state=4", "http://h/s?a=1;sig=***"
     "#access_token=***&state=4", None),
    ("http://h/s?token=&x=1", "http://h/s?token=&x=1", None),  # nothing to hide
    ("http://u:p@ss@h/s?token=T", "http://u:***@h/s?token=***", "http://h/s?token=***"),
])
def test_redact_url_table(url: str, shown: str, without_user: str | None) -> None:
    assert redact_url(url) == shown
    assert redact(f"cannot open {url}: timeout") == f"cannot open {shown}: timeout"
    if without_user is not None:
        assert redact_url(url, drop_user=True) == without_user


def test_redact_url_keeps_what_the_url_says() -> None:
    assert redact_url(f"redis://:{SECRET}@127.0.0.1:6379/0") == "redis://:***@127.0.0.1:6379/0"


@pytest.fixture
def locked(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path / "redis", password=SECRET).start()
    yield server
    server.close()


def test_embedded_redis_requires_its_password(locked: EmbeddedRedis) -> None:
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=locked.port, password="wrong").ping()
    assert redis.Redis.from_url(locked.url).ping()
    cmdline = Path(f"/proc/{locked.proc.pid}/cmdline").read_bytes()  # type: ignore[union-attr]
    assert SECRET.encode() not in cmdline, "the password is on redis-server's command line"


def test_a_worker_never_logs_the_password(locked: EmbeddedRedis, settings: Settings) -> None:
    """Wrong password: the worker fails saying so; right one, then Redis goes away: the
    reconnect warnings. No line shows the password."""
    wrong = locked.url.replace(SECRET, SECRET[::-1])
    out = subprocess.run([sys.executable, "-m", "spotline", "worker", "collect"], cwd=ROOT,
                         env=child_env(settings, wrong), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0
    text = out.stdout + out.stderr
    assert "Authentication" in text or "WRONGPASS" in text or "invalid" in text, text[-2000:]
    assert SECRET not in text and SECRET[::-1] not in text

    log = Path(locked.data_dir) / "worker.log"
    env = child_env(settings.replace(reconnect_max_s=1.0), locked.url)
    with log.open("wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "spotline", "worker", "collect"], cwd=ROOT,
                                env=env, stdout=fh, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "ready" in log.read_text() or proc.poll() is not None, 120,
                 "collect worker ready")
        locked.stop()  # the outage: reconnect warnings, then the worker gives up
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "unreachable" in text, text[-2000:]
    assert SECRET not in text, "a log line shows the Redis password"
