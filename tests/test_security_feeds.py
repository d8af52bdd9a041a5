"""What a feed added over HTTP may touch, against the real gateway, a real supervisor and a real
Redis: a host folder refused unless it lies inside feed_roots (symlinks and '..' resolved),
loopback, link-local and private addresses refused before any connection (by the gateway, and
by the supervisor again when it opens the feed), cameras refused, caps on captions, spec length
and feed count, a source id ending in a newline refused, and URLs shown without credentials or
secret query values. The CLI on the host keeps its freedom (tests/test_sources_control.py)."""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from spotline.common.embedded import EmbeddedRedis
from spotline.common.errors import InputError
from spotline.common.settings import Settings
from spotline.producer.client import Client
from spotline.producer.control import FeedSpec, Registry, Supervisor
from spotline.producer.feedpolicy import FeedPolicy, FeedRefused, address_refused
from spotline.producer.gateway import create_app
from tests.faultlib import small_frame, wait_for

# producer/access.py: an entry is KEY or KEY:SCOPE+SCOPE; /sources needs the admin scope
ADMIN_KEY = "feeds-admin-key"
AUTH = {"X-API-Key": ADMIN_KEY}


def gateway(s: Settings, client: Client) -> TestClient:
    """The real gateway app, called as a local client would (its Host allow-list)."""
    return TestClient(create_app(s, client), base_url="http://127.0.0.1")


def keyed(settings: Settings, **changes: object) -> Settings:
    return settings.replace(api_keys=f"{ADMIN_KEY}:admin", **changes)


@pytest.fixture
def client(redis_server: EmbeddedRedis, settings: Settings) -> Iterator[Client]:
    c = Client.connect(redis_server.url, settings)
    yield c
    c.close()


class Listener:
    """A TCP server on 127.0.0.1 that counts the connections it is offered (and closes them)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        except OSError:
            pass
        self.sock.close()
        self.thread.join(5)
        assert not self.thread.is_alive()


@pytest.fixture
def listener() -> Iterator[Listener]:
    srv = Listener()
    yield srv
    srv.close()


def run_supervisor(settings: Settings, client: Client) -> tuple[Supervisor, threading.Thread]:
    sup = Supervisor(settings, client, poll_s=0.1, stall_s=30.0, base_backoff_s=0.05,
                     max_backoff_s=0.4, source_attempts=1)
    th = threading.Thread(target=sup.run, daemon=True)
    th.start()
    return sup, th


def stop_supervisor(sup: Supervisor, th: threading.Thread) -> None:
    sup.stop()
    th.join(20)
    assert not th.is_alive()


def status(client: Client, sid: str) -> dict:
    st = Registry(client.t).statuses().get(sid)
    return st.__dict__ if st else {}


def folder_with_jpeg(path: Path, name: str = "private.jpg") -> Path:
    path.mkdir(parents=True)
    (path / name).write_bytes(small_frame(7))
    return path


def add(http: TestClient, spec: str, sid: str = "x", **extra: object) -> object:
    body = {"source_id": sid, "spec": spec, "captions": ["anything"], **extra}
    return http.post("/sources", json=body, headers=AUTH)


def inbox(client: Client) -> int:
    return int(client.t.r.xlen(client.keys.inbox("detect")))


# --- host files -------------------------------------------------------------------------------
def test_a_host_folder_is_refused_over_http_by_default(settings: Settings, client: Client,
                                                       tmp_path: Path) -> None:
    """The reproduction: a host folder holding one JPEG, POSTed with the default settings, is
    refused, so the supervisor never reads it."""
    private = folder_with_jpeg(tmp_path / "private")
    s = keyed(settings)
    sup, th = run_supervisor(s, client)
    try:
        with gateway(s, client) as http:
            r = add(http, str(private))
            assert r.status_code == 403, r.text
            assert "feed_roots" in r.text
            assert http.get("/sources", headers=AUTH).json() == []
        sup.step()
    finally:
        stop_supervisor(sup, th)
    assert Registry(client.t).feeds() == {} and inbox(client) == 0


def test_a_folder_inside_feed_roots_is_read_and_escapes_are_refused(
        settings: Settings, client: Client, tmp_path: Path) -> None:
    root = tmp_path / "feeds"
    allowed = folder_with_jpeg(root / "cam")
    private = folder_with_jpeg(tmp_path / "private")
    os.symlink(private, root / "link")  # a link inside the root to a folder outside it
    os.symlink(private / "private.jpg", allowed / "leak.jpg")  # a file link out of the root
    s = keyed(settings, feed_roots=str(root))
    sup, th = run_supervisor(s, client)
    try:
        with gateway(s, client) as http:
            for spec in (str(root / "link"), str(root / "link" / "private.jpg"),
                         f"{root}/../private", f"{root}/cam/../../private/private.jpg",
                         str(private)):
                r = add(http, spec, "escape")
                assert r.status_code == 403 and "outside feed_roots" in r.text, (spec, r.text)
            rel = add(http, "feeds/cam", "relative")
            assert rel.status_code == 400 and "absolute" in rel.text
            ok = add(http, str(allowed), "inside")
            assert ok.status_code == 201, ok.text
            assert ok.json()["origin"] == "http"
        wait_for(lambda: status(client, "inside").get("state") == "finished", 30, "the folder")
    finally:
        stop_supervisor(sup, th)
    # the folder's own image only: the link in it to a file outside the root is not followed
    assert status(client, "inside")["published"] == 1 and inbox(client) == 1
    assert set(Registry(client.t).feeds()) == {"inside"}


def test_the_supervisor_checks_an_http_feed_again_before_opening_it(
        settings: Settings, client: Client, tmp_path: Path) -> None:
    """A feed added over HTTP when its folder was allowed, run by a supervisor whose feed_roots
    no longer allow it (or an entry that does not say who added it): refused, never read. The
    same folder registered from the host is read."""
    folder = folder_with_jpeg(tmp_path / "feeds" / "cam")
    with gateway(keyed(settings, feed_roots=str(tmp_path / "feeds")), client) as http:
        assert add(http, str(folder), "was-allowed").status_code == 201
    reg = Registry(client.t)
    legacy = json.dumps({"source_id": "legacy", "spec": str(folder), "captions": ["x"]})
    client.t.r.hset(client.keys.sources, "legacy", legacy)  # written by an older spotline
    reg.add(FeedSpec("from-host", str(folder), ("x",)))  # `spotline sources add`
    sup, th = run_supervisor(settings, client)  # feed_roots empty here
    try:
        wait_for(lambda: status(client, "from-host").get("state") == "finished", 30, "host feed")
        for sid in ("was-allowed", "legacy"):
            wait_for(lambda sid=sid: status(client, sid).get("restarts", 0) >= 2, 30, sid)
    finally:
        stop_supervisor(sup, th)
    for sid in ("was-allowed", "legacy"):
        st = status(client, sid)
        assert st["published"] == 0 and "feed_roots" in st["error"], st
    assert status(client, "from-host")["published"] == 1 and inbox(client) == 1


# --- connections the caller chooses -----------------------------------------------------------
@pytest.mark.parametrize("url, why", [
    ("http://127.0.0.1:{port}/stream.mjpg", "loopback"),
    ("rtsp://localhost:{port}/live", "loopback"),
    ("http://0x7f.1:{port}/", "loopback"),  # 127.0.0.1 written another way
    ("http://[::1]:{port}/", "loopback"),
    ("http://[::ffff:127.0.0.1]:{port}/", "loopback"),
    ("http://169.254.169.254/latest/meta-data/", "link-local"),  # a cloud metadata service
    ("http://10.0.0.1/", "private"),
    ("rtsp://192.168.1.10/cam", "private"),
    ("http://100.64.0.1/", "non-public"),
    ("http://0.0.0.0:{port}/", "unspecified"),
    ("rtsp://239.1.1.1/", "multicast"),
    ("http://evil.example@127.0.0.1:{port}/", "loopback"),  # the host is after the '@'
])
def test_private_addresses_are_refused_before_any_connection(
        settings: Settings, client: Client, listener: Listener, url: str, why: str) -> None:
    s = keyed(settings)
    with gateway(s, client) as http:
        r = add(http, url.format(port=listener.port))
        assert r.status_code == 403, r.text
        assert why in r.text and "feed_allow_private" in r.text
    assert Registry(client.t).feeds() == {} and listener.accepted == 0


@pytest.mark.parametrize("spec, status_code, words", [
    ("file:///etc/passwd", 403, "feed_schemes"),
    ("udp://8.8.8.8:1234", 403, "feed_schemes"),
    ("rtmp://8.8.8.8/live", 403, "feed_schemes"),
    ("0", 403, "feed_allow_cameras"),
    ("3", 403, "feed_allow_cameras"),
    ("http://", 400, "no host"),
    ("http://8.8.8.8/a b", 400, "whitespace"),
    ("http://8.8.8.8\\@127.0.0.1/", 400, "backslash"),
])
def test_schemes_cameras_and_malformed_specs_are_refused(
        settings: Settings, client: Client, spec: str, status_code: int, words: str) -> None:
    with gateway(keyed(settings), client) as http:
        r = add(http, spec)
        assert r.status_code == status_code and words in r.text, r.text
    assert Registry(client.t).feeds() == {}


def test_the_supervisor_refuses_a_name_that_resolves_to_loopback_at_connect_time(
        settings: Settings, client: Client, listener: Listener) -> None:
    """A feed added while private addresses were allowed (or a name that resolved to a public
    address then: DNS rebinding) is checked again by the supervisor, which resolves the name
    right before connecting: it never connects. The same URL from the host does connect (so
    the listener would have seen it)."""
    url = f"http://localhost:{listener.port}/stream.mjpg"
    with gateway(keyed(settings, feed_allow_private=True), client) as http:
        assert add(http, url, "rebound").status_code == 201
    sup, th = run_supervisor(settings, client)
    try:
        wait_for(lambda: status(client, "rebound").get("restarts", 0) >= 2, 30, "refusals")
        assert listener.accepted == 0
        assert "loopback" in status(client, "rebound")["error"]
        Registry(client.t).add(FeedSpec("host-feed", url, ("x",)))
        wait_for(lambda: listener.accepted >= 1, 30, "the host's feed connecting")
    finally:
        stop_supervisor(sup, th)


def test_a_public_address_is_allowed_and_the_policy_resolves_every_address() -> None:
    policy = FeedPolicy()
    assert policy.check_url("rtsp://8.8.8.8/live") == ["8.8.8.8"]
    assert address_refused("2001:4860:4860::8888") is None
    mixed = FeedPolicy(resolver=lambda _h, _p: ["8.8.8.8", "10.1.2.3"])  # one bad answer
    with pytest.raises(FeedRefused, match="10.1.2.3, a private address"):
        mixed.check_url("http://cam.example/x")
    with pytest.raises(FeedRefused, match="cannot resolve"):
        policy.check_url("http://no-such-host.invalid/x")
    assert FeedPolicy(allow_cameras=True).check_target("0") is None


# --- caps and ids -----------------------------------------------------------------------------
def test_caps_on_captions_spec_length_and_feed_count(settings: Settings,
                                                     client: Client) -> None:
    s = keyed(settings, max_feeds=2)
    with gateway(s, client) as http:
        many = add(http, "rtsp://8.8.8.8/a", captions=[f"c{i}" for i in range(33)])
        assert many.status_code == 400 and "max_captions" in many.text
        long_caption = add(http, "rtsp://8.8.8.8/a", captions=["x" * 513])
        assert long_caption.status_code == 400 and "max_caption_chars" in long_caption.text
        long_spec = add(http, "rtsp://8.8.8.8/" + "a" * 2048)
        assert long_spec.status_code == 400 and "feed_max_spec_chars" in long_spec.text
        assert add(http, "rtsp://8.8.8.8/a", "one").status_code == 201
        assert add(http, "rtsp://8.8.8.8/b", "two").status_code == 201
        third = add(http, "rtsp://8.8.8.8/c", "three")
        assert third.status_code == 409 and "max_feeds" in third.text
        assert add(http, "rtsp://8.8.8.8/a", "one").status_code == 409  # exists
        assert http.delete("/sources/one", headers=AUTH).status_code == 204
        assert add(http, "rtsp://8.8.8.8/c", "three").status_code == 201
    assert set(Registry(client.t).feeds()) == {"two", "three"}


def test_a_source_id_ending_in_a_newline_is_refused(settings: Settings,
                                                    client: Client) -> None:
    for sid in ("cam1\n", "cam1\r\n", "\ncam1", "cam 1"):
        with pytest.raises(InputError, match="source id"):
            FeedSpec(sid, "rtsp://8.8.8.8/a", ("x",))
    with gateway(keyed(settings), client) as http:
        r = add(http, "rtsp://8.8.8.8/a", "cam1\n")
        assert r.status_code == 400 and "source id" in r.text
        assert add(http, "rtsp://8.8.8.8/a", "cam1").status_code == 201
    assert list(Registry(client.t).feeds()) == ["cam1"]


# --- redaction --------------------------------------------------------------------------------
def test_get_sources_shows_no_credentials_or_secret_query_values(settings: Settings,
                                                                 client: Client) -> None:
    secret_url = ("rtsp://viewer:p@ss@8.8.8.8:554/live?token=T0KEN&password=PW0RD"
                  "&X-Amz-Signature=S1G&api_key=AP1&channel=2")
    Registry(client.t).add(FeedSpec("from-host", secret_url, ("x",)))
    with gateway(keyed(settings), client) as http:
        created = add(http, secret_url.replace("live", "other"), "over-http")
        assert created.status_code == 201, created.text
        listed = http.get("/sources", headers=AUTH)
    text = created.text + listed.text
    for secret in ("p@ss", "ss@", "viewer", "T0KEN", "PW0RD", "S1G", "AP1"):
        assert secret not in text, secret
    specs = {row["source_id"]: row["spec"] for row in listed.json()}
    assert specs["from-host"] == ("rtsp://8.8.8.8:554/live?token=***&password=***"
                                  "&X-Amz-Signature=***&api_key=***&channel=2")
    assert specs["over-http"].startswith("rtsp://8.8.8.8:554/other?token=***")
