"""Poison and bad input through running worker processes: every case gets its documented
outcome (docs/reliability.md), the workers keep running, and the good frames that shared a
batch with a bad one get normal results. Also: the producer-side limits, and `spotline dead`."""

from __future__ import annotations

import signal

import cv2
import msgpack
import numpy as np
import pytest
from click.testing import CliRunner

from spotline.cli import cli
from spotline.common.codec import encode
from spotline.common.embedded import EmbeddedRedis
from spotline.common.envelope import Envelope, Result
from spotline.common.errors import InputError
from spotline.common.settings import Settings
from spotline.common.transport import DATA_FIELD, FRAME_FIELD, Transport
from spotline.common.worker import Worker
from spotline.producer.client import Client
from tests.conftest import FAST, spawn_worker
from tests.faultlib import (
    drained,
    encode_png,
    huge_black_png,
    png_header_only,
    results,
    small_frame,
    wait_for,
)
from tests.stagelib import PassThrough

LIMITS = {"max_captions": 4, "max_caption_chars": 64}
CAPS = ("red box", "grey thing")


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    rng = np.random.default_rng(7)
    colour = rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)
    grey = cv2.cvtColor(colour, cv2.COLOR_BGR2GRAY)
    rgba = cv2.cvtColor(colour, cv2.COLOR_BGR2BGRA)
    jpeg = small_frame(1)
    return {
        "grey-jpeg": cv2.imencode(".jpg", grey)[1].tobytes(),
        "grey-png": encode_png(grey),
        "rgba-png": encode_png(rgba),
        "rgb16-png": encode_png(colour.astype(np.uint16) * 257),
        "grey16-png": encode_png(grey.astype(np.uint16) * 257),
        "corrupt-jpeg": jpeg[:20] + bytes(rng.integers(0, 255, 400, dtype=np.uint8)),
        "truncated-png": encode_png(colour)[:3000],
        "zero-sized-png": png_header_only(0, 240),
        "huge-png": huge_black_png(20000),
    }


def _env(fid: str, image: bytes | None = b"", captions: tuple[str, ...] = CAPS) -> bytes:
    return encode(Envelope(frame_id=fid, source_id="bad", captions=captions, image=image))


def _invalid_utf8_caption(image: bytes) -> bytes:
    """A msgpack str whose bytes are not UTF-8 (only a raw payload can carry one)."""
    raw = msgpack.packb(["envelope", {"frame_id": "invalid-utf8-caption", "v": 1,
                                      "captions": ["@@@@"], "image": image}], use_bin_type=True)
    assert raw.count(b"\xa4@@@@") == 1
    return raw.replace(b"\xa4@@@@", b"\xa4\xff\xfe\xfd\xfc")


def _crop_env(fid: str, crop: np.ndarray) -> bytes:
    return encode(Envelope(frame_id=fid, source_id="bad", captions=CAPS, image_size=(320, 240),
                           boxes=np.array([[0, 0, 5, 5]], np.float32),
                           det_scores=np.array([0.5], np.float32), crops=(crop,)))


# frame id -> (outcome, words the error or dead-letter reason must contain)
EXPECTED = {
    "garbage-payload": ("dead", "undecodable"),
    "result-at-detect": ("dead", "is not an input of stage detect"),
    "bytes-caption": ("dead", "field 'captions' has the wrong type"),
    "invalid-utf8-caption": ("dead", "UnicodeDecodeError"),
    "corrupt-jpeg": ("error", "cannot decode the image"),
    "truncated-png": ("error", "cannot decode the image"),
    "empty-image": ("error", "no image bytes"),
    "no-image": ("error", "no image bytes"),
    "zero-sized-png": ("error", "zero-sized"),
    "huge-png": ("error", "20000x20000 is over max_pixels"),
    "no-captions": ("error", "no captions"),
    "empty-caption": ("error", "caption 1 is empty"),
    "long-caption": ("error", "caption 0 is too long: 65 > 64"),
    "too-many-captions": ("error", "too many captions: 5 > 4"),
    "model-raises": ("error", "detect failed: RuntimeError: detector exploded"),
    "zero-crop-at-upscale": ("error", "crop 0 has a zero-size side (5x0 px)"),
    "zero-crop-at-score": ("error", "crop 0 has a zero-size side (0x7 px)"),
    "flat-crop-at-score": ("error", "crop 0 is uint8 of shape (4, 4), not uint8 H×W×3"),
    "grey-jpeg": ("ok", ""),
    "grey-png": ("ok", ""),
    "rgba-png": ("ok", ""),
    "rgb16-png": ("ok", ""),
    "grey16-png": ("ok", ""),
}


def bad_entries(images: dict[str, bytes]) -> list[tuple[str, bytes | None, bytes]]:
    """(inbox stage, frame id field, payload) for every case; detect cases in EXPECTED order."""
    jpeg = small_frame(2)
    detect: dict[str, bytes] = {
        "garbage-payload": b"\xc1 not msgpack",
        "result-at-detect": encode(Result(frame_id="result-at-detect", source_id="bad",
                                          capture_time=0.0, captions=(), boxes=(), scores=())),
        "bytes-caption": msgpack.packb(["envelope", {"frame_id": "bytes-caption", "v": 1,
                                                     "captions": [b"\xff\xfe"], "image": jpeg}],
                                       use_bin_type=True),
        "invalid-utf8-caption": _invalid_utf8_caption(jpeg),
        "empty-image": _env("empty-image", b""),
        "no-image": _env("no-image", None),
        "no-captions": _env("no-captions", jpeg, ()),
        "empty-caption": _env("empty-caption", jpeg, ("red box", "")),
        "long-caption": _env("long-caption", jpeg, ("x" * 65,)),
        "too-many-captions": _env("too-many-captions", jpeg, tuple("abcde")),
        "model-raises": _env("model-raises", jpeg, ("boom",)),
    }
    detect.update({name: _env(name, images[name]) for name in images})
    out: list[tuple[str, bytes | None, bytes]] = [
        ("detect", None, b"\xc1 no frame id either")]
    out += [("detect", fid.encode(), detect[fid]) for fid in EXPECTED if fid in detect]
    out += [("upscale", b"zero-crop-at-upscale",
             _crop_env("zero-crop-at-upscale", np.zeros((0, 5, 3), np.uint8))),
            ("score", b"zero-crop-at-score",
             _crop_env("zero-crop-at-score", np.zeros((7, 0, 3), np.uint8))),
            ("score", b"flat-crop-at-score",
             _crop_env("flat-crop-at-score", np.zeros((4, 4), np.uint8)))]
    return out


def test_every_bad_input_gets_its_outcome(redis_server: EmbeddedRedis, settings: Settings,
                                          images: dict[str, bytes]) -> None:
    s = settings.replace(**FAST, **LIMITS, tta=False, upscale=True, batch_detect=4,
                         max_wait_ms=100)
    t = Transport(s, url=redis_server.url)
    published_good = set()
    # A good frame before every other bad one: each detect batch of 4 mixes good and bad.
    for i, (stage, fid, payload) in enumerate(bad_entries(images)):
        if stage == "detect" and i % 2 == 0:
            gid = f"good-{i}"
            t.add(t.keys.inbox("detect"), gid, _env(gid, small_frame(100 + i)))
            published_good.add(gid)
        fields = {DATA_FIELD: payload, **({FRAME_FIELD: fid} if fid is not None else {})}
        t.r.xadd(t.keys.inbox(stage), fields)
    procs = [spawn_worker(s, redis_server.url, "detect",
                          stage_class="tests.stagelib:RaisingDetect"),
             *(spawn_worker(s, redis_server.url, st) for st in ("upscale", "score", "collect"))]
    try:
        want = set(EXPECTED) | published_good
        wait_for(lambda: want <= set(results(t)), timeout=180, what="every frame answered")
        wait_for(lambda: drained(t, ["detect", "upscale", "score", "collect"]), timeout=60,
                 what="drained inboxes")
        alive = [p.poll() for p in procs]
        got = results(t)
        dead = {f[b"frame"].decode(): f for _, f in t.r.xrange(t.keys.dead)}
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=60) for p in procs]
    assert alive == [None] * 4, "every worker survived the bad input"
    assert codes == [0] * 4
    assert len(got) == len(want) and t.r.xlen(t.keys.results) == len(want), "one result each"
    for fid in sorted(published_good):
        assert got[fid].error is None and len(got[fid].boxes) == len(CAPS), fid
    for fid, (outcome, words) in EXPECTED.items():
        res = got[fid]
        if outcome == "ok":
            assert res.error is None and res.image_size == (320, 240), (fid, res.error)
            assert len(res.boxes) == len(CAPS) == len(res.scores), fid
        elif outcome == "error":
            assert res.error and words in res.error, (fid, res.error)
            assert res.fallback and fid not in dead, fid
        else:
            assert words in dead[fid][b"reason"].decode(), (fid, dead[fid][b"reason"])
            assert dead[fid][b"stage"] == b"detect" and dead[fid][b"deliveries"] == b"1"
            assert res.error and "dead-lettered in detect" in res.error, (fid, res.error)
    # The entry without a frame id is dead-lettered with its reason, and answers nobody.
    assert "undecodable" in dead[""][b"reason"].decode()
    assert set(dead) == {"", *(f for f, (o, _) in EXPECTED.items() if o == "dead")}


@pytest.mark.parametrize("name, captions, match", [
    ("empty", CAPS, "empty image"),
    ("corrupt-jpeg", CAPS, "could not be decoded"),
    ("zero-sized-png", CAPS, "could not be decoded|empty image"),
    ("huge-png", CAPS, "too many pixels"),
    ("good", (), "no captions"),
    ("good", ("red box", ""), "caption 1 is empty"),
    ("good", ("x" * 65,), "caption 0 is too long"),
    ("good", tuple("abcde"), "too many captions"),
    ("good", ("ok", "bad \ud800 text"), "not valid Unicode"),
])
def test_client_publish_enforces_the_limits(transport: Transport, settings: Settings,
                                            images: dict[str, bytes], name: str,
                                            captions: tuple[str, ...], match: str) -> None:
    client = Client(Transport(settings.replace(**LIMITS), client=transport.r))
    image = images[name] if name in images else {"empty": b"", "good": small_frame(3)}[name]
    with pytest.raises(InputError, match=match):
        client.publish(image, captions)
    assert transport.r.xlen(transport.keys.inbox("detect")) == 0, "nothing was published"


# A truncated PNG passes too: producers read headers only; detect answers it with an error.
@pytest.mark.parametrize("name", ["grey-jpeg", "grey-png", "rgba-png", "rgb16-png",
                                  "grey16-png", "truncated-png"])
def test_client_publish_accepts_other_pixel_formats(transport: Transport, settings: Settings,
                                                    images: dict[str, bytes], name: str) -> None:
    fid = Client(transport).publish(images[name], CAPS)
    assert [f[FRAME_FIELD] for _, f in transport.r.xrange(transport.keys.inbox("detect"))] == [
        fid.encode()]


def test_dead_letter_cli_lists_and_retries(redis_server: EmbeddedRedis,
                                           settings: Settings) -> None:
    s = settings.replace(max_deliveries=1, visibility_timeout_ms=1)
    t = Transport(s, url=redis_server.url)
    t.ensure_group("detect")
    t.add(t.keys.inbox("detect"), "poison", b"\xc1 not msgpack")
    t.add(t.keys.inbox("detect"), "stuck", _env("stuck", b"jpeg"))
    t.read("detect", "gone-1", 10, 10, 0)  # both delivered once to a consumer that died ...
    wait_for(lambda: t.claim("detect", "gone-2", 10) != [], what="a second delivery")
    worker = Worker(PassThrough(s), s, t, burst=True)  # ... and the third delivery is too many
    counts = worker.run()
    assert counts.dead == 2 and t.r.xlen(t.keys.dead) == 2
    assert worker.metrics.registry.get_sample_value(
        "spotline_dead_letters_total", {"stage": "detect"}) == 2
    env = {"SPOTLINE_REDIS_URL": redis_server.url, "SPOTLINE_NAMESPACE": s.namespace,
           "SPOTLINE_DATA_DIR": s.data_dir}
    runner = CliRunner()
    listed = runner.invoke(cli, ["dead", "list"], env=env)
    assert listed.exit_code == 0, listed.output
    lines = listed.output.strip().splitlines()
    assert len(lines) == 2
    assert all("detect" in ln and "deliveries=3" in ln and " age=" in ln for ln in lines)
    assert "frame=poison" in lines[0] and "delivered 3 times (max 1)" in lines[0]
    assert "frame=stuck" in lines[1]
    first_id = lines[0].split()[0]
    one = runner.invoke(cli, ["dead", "retry", first_id], env=env)
    assert one.exit_code == 0 and "re-queued 1 entry" in one.output, one.output
    assert runner.invoke(cli, ["dead", "retry"], env=env).exit_code == 2  # ids or --all
    rest = runner.invoke(cli, ["dead", "retry", "--all"], env=env)
    assert rest.exit_code == 0 and "re-queued 1 entry" in rest.output, rest.output
    assert t.r.xlen(t.keys.dead) == 0
    assert runner.invoke(cli, ["dead", "list"], env=env).output.strip() == "no dead letters"
    # Back on the stream they came from, as they were: fresh deliveries, same frame and payload.
    requeued = {f[FRAME_FIELD]: f[DATA_FIELD] for _, f in t.r.xrange(t.keys.inbox("detect"))}
    assert requeued == {b"poison": b"\xc1 not msgpack", b"stuck": _env("stuck", b"jpeg")}
    again = Worker(PassThrough(s), s, t, burst=True).run()
    assert again.dead == 1 and again.outputs == 1  # the poison is poison; the other flows on


@pytest.mark.parametrize("fmt", ["TIFF", "BMP", "WEBP"])
def test_detect_refuses_oversized_images_of_any_format_from_the_header(
        fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from PIL import Image

    from spotline.stages.detect import decode_frame

    buf = io.BytesIO()
    Image.new("RGB", (100, 50)).save(buf, fmt)
    env = Envelope(frame_id="f", captions=CAPS, image=buf.getvalue())
    with monkeypatch.context() as m:
        m.setattr(cv2, "imdecode", lambda *a: pytest.fail("decoded an oversized image"))
        with pytest.raises(InputError, match="frame f: 100x50 is over max_pixels 4999"):
            decode_frame(env, Settings(max_pixels=4999))
    assert decode_frame(env, Settings(max_pixels=5000)).shape == (50, 100, 3)
