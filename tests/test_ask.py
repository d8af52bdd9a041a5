"""Ask the past: the memory's bounds (retention, byte cap), its reduced precision against
float32, the answer against the track stage's own per-frame grounding on a scripted clip, the
HTTP routes with and without a key, and a track worker killed mid-clip."""

from __future__ import annotations

import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from spotline.common.errors import ConfigError
from spotline.common.trackmemory import OVERHEAD, MemoryStore
from spotline.common.transport import Transport
from spotline.producer.client import Client
from spotline.producer.gateway import create_app
from spotline.results.ask import Asker, parse_since
from spotline.stages import memory
from spotline.train.demo import apply_demo_models

LOCAL = "http://127.0.0.1"


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def test_retention_drops_the_oldest_frames(transport: Transport) -> None:
    store = MemoryStore(transport, retention_s=10.0, max_bytes=1 << 20)
    for seq in range(1, 31):  # 30 frames, one a second
        store.add("cam", seq, 1000.0 + seq, memory.frame_record(
            seq, 1000.0 + seq, np.array([[0, 0, 5, 5]]), np.array([1]), {}, "int8"))
    stats = store.stats("cam")
    assert stats["newest"] == 1030.0 and stats["oldest"] == 1020.0  # 10 s before the newest
    assert [memory.decode_state(r)["s"] for r in store.since("cam", 0)] == list(range(20, 31))
    assert store.sources() == ["cam"]
    # the same frame again (a worker's retry, or a frame taken over): counted once
    before = store.stats("cam")["bytes"]
    store.add("cam", 30, 1030.0, memory.frame_record(30, 1030.0, np.zeros((0, 4)),
                                                     np.zeros(0), {}, "int8"))
    assert store.stats("cam")["bytes"] == before


def test_byte_cap_keeps_the_newest(transport: Transport) -> None:
    cap = 20_000
    store = MemoryStore(transport, retention_s=3600.0, max_bytes=cap)
    recorder = memory.Recorder(store, "int8", every_s=0.0)
    vec = unit(np.ones((1, 512)))[0]
    sizes = []
    for seq in range(1, 101):
        recorder.record("cam", seq, 2000.0 + seq, np.array([[0, 0, 5, 5], [5, 5, 9, 9]]),
                        np.array([3, 4]), {3: vec})
        sizes.append(store.stats("cam")["bytes"])
    assert max(sizes) <= cap
    kept = [memory.decode_state(r)["s"] for r in store.since("cam", 0)]
    assert kept == list(range(kept[0], 101)) and kept[0] > 1  # oldest dropped first
    raw = store.since("cam", 0)
    assert store.stats("cam")["bytes"] == sum(len(r) + OVERHEAD for r in raw)


def test_a_long_window_reads_back_whole_and_in_order(transport: Transport) -> None:
    """More records than one packed part of the read holds (1,000): every record back, byte
    for byte, oldest first, from where the window starts."""
    store = MemoryStore(transport, retention_s=3600.0, max_bytes=1 << 30)
    written = [memory.frame_record(seq, 1000.0 + seq / 10, np.array([[seq, 0, seq + 5, 5]]),
                                   np.array([seq % 7]), {}, "int8", frame_id=f"f{seq}")
               for seq in range(1, 2502)]
    for seq, rec in enumerate(written, start=1):
        store.add("long", seq, 1000.0 + seq / 10, rec)
    assert store.since("long", 0.0) == written
    assert store.since("long", 1000.0 + 1001 / 10) == written[1000:]
    assert store.since("long", 2000.0) == [] and store.since("none", 0.0) == []
    w = memory.window("long", store.since("long", 0.0))
    assert w.frames == 2501 and w.box_seq.tolist() == list(range(1, 2502))


@pytest.mark.parametrize("precision", ["int8", "float16"])
def test_reduced_precision_keeps_the_ranking(precision: str) -> None:
    """Embeddings kept at int8 (with a scale) or float16 score as float32 does: cosine to the
    original above 0.999 and the same best track for every caption."""
    rng = np.random.default_rng(7)
    images = unit(rng.normal(size=(400, 768)))
    texts = unit(images[rng.choice(400, 50, replace=False)] + 0.8 * unit(
        rng.normal(size=(50, 768))))
    raw, scales = memory.quantize(images, precision)
    back = memory.dequantize(raw, scales, 768, precision)
    cos = (back * images).sum(axis=1)
    assert cos.min() > 0.999
    full, reduced = texts @ images.T, texts @ back.T
    assert (full.argmax(axis=1) == reduced.argmax(axis=1)).all()
    top10 = [set(np.argsort(-r)[:10]) for r in full]
    assert np.mean([len(a & set(np.argsort(-r)[:10])) / 10
                    for a, r in zip(top10, reduced, strict=True)]) >= 0.95
    assert len(raw) == 768 * (1 if precision == "int8" else 2) * 400


def test_answer_ranks_tracks_and_abstains() -> None:
    """Best track first, its boxes over time, first and last seen; nothing over the threshold:
    not seen."""
    dim = 8
    red, blue = unit(np.eye(dim)[None, 0])[0], unit(np.eye(dim)[None, 1])[0]
    raws = []
    for seq in range(1, 21):
        embeds = {5: red, 6: blue} if seq % 5 == 1 else {}
        ids = np.array([5, 6]) if seq <= 15 else np.array([6])
        boxes = np.array([[seq, 0, seq + 10, 10], [50, 50, 60, 60]])[:len(ids)]
        raws.append(memory.frame_record(seq, 100.0 + seq, boxes, ids, embeds, "float16"))
    w = memory.window("cam", raws)

    def scorer(caption: str, e: np.ndarray) -> np.ndarray:
        return e @ (red if caption == "red" else blue)

    ans = memory.answer("red", [w], scorer)
    assert [m.track_id for m in ans.matches] == [5, 6]
    best = ans.matches[0]
    assert (best.first_seen, best.last_seen) == (101.0, 115.0)
    assert [b[0] for b in best.boxes] == list(range(1, 16))
    assert best.boxes[3][2:] == [4.0, 0.0, 14.0, 10.0]
    assert ans.searched == {"cam": {"frames": 20, "tracks": 2, "embeddings": 8}}
    none = memory.answer("red", [w], lambda c, e: e @ red * 0.1, threshold=0.5)
    assert not none.seen and none.as_json()["matches"] == []


def test_a_track_seen_for_a_moment_ranks_after_one_held() -> None:
    """One lucky embedding of a track seen for a moment (track 2: 0.9) ranks after a track
    that held 0.8 over five embeddings (track 1): the embeddings a short track lacks of TOP_K
    count at the window's median score. Its score stays its own, it still matches, and the
    "not seen" test still reads the scores alone."""
    dim = 16
    text = unit(np.eye(dim)[None, 0])[0]

    def at(cos: float, k: int) -> np.ndarray:  # a unit vector at ``cos`` to the text
        return (cos * text + np.sqrt(1 - cos * cos) * np.eye(dim)[k]).astype(np.float32)

    raws = []
    for seq in range(1, 7):  # track 1 on every frame; background tracks 3-8 on three
        embeds = {1: at(0.8, 1)}
        if seq <= 3:
            embeds.update({tid: at(0.1, tid) for tid in range(3, 9)})
        if seq == 4:
            embeds[2] = at(0.9, 2)
        ids = np.array(sorted(embeds))
        raws.append(memory.frame_record(seq, 100.0 + seq, np.tile([[0, 0, 9, 9]], (len(ids), 1)),
                                        ids, embeds, "float16"))
    w = memory.window("cam", raws)
    ans = memory.answer("red", [w], lambda c, e: e @ text)
    assert [m.track_id for m in ans.matches[:2]] == [1, 2]
    assert ans.matches[1].score == pytest.approx(0.9, abs=2e-3)  # the score is unpadded
    assert memory.track_scores(np.array([0.9, 0.1, 0.1]), np.array([2, 3, 3]))[2] == (
        pytest.approx(0.9), pytest.approx((0.9 + 2 * 0.1) / 3))
    # a threshold only the lucky embedding's score passes keeps that track alone
    alone = memory.answer("red", [w], lambda c, e: e @ text, threshold=0.85,
                          calibration=Identity())
    assert [m.track_id for m in alone.matches] == [2]


class Identity:
    """A calibration that keeps the score (its probability of being in view is the score)."""

    def apply(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(scores, np.float64)


def continuations_by_every_pair(w: memory.Window) -> dict[int, int]:
    """What ``continuations`` means, pair by pair: for each track in the order they start, the
    nearest track not yet continued that ended at most STITCH_GAP_S before it, within
    STITCH_REACH of the larger box's larger side."""
    spans = {}
    for i, tid in enumerate(w.box_tid.tolist()):
        first, _ = spans.get(tid, (i, i))
        spans[tid] = (first, i)
    side = np.maximum(w.boxes[:, 2] - w.boxes[:, 0], w.boxes[:, 3] - w.boxes[:, 1])
    centre = (w.boxes[:, :2] + w.boxes[:, 2:]) / 2
    out: dict[int, int] = {}
    for b, (fb, _) in sorted(spans.items(), key=lambda kv: w.box_t[kv[1][0]]):
        best = None
        for a, (_, la) in sorted(spans.items()):
            gap = w.box_t[fb] - w.box_t[la]
            d = float(np.linalg.norm(centre[la] - centre[fb]))
            if a == b or a in out or not 0 < gap <= memory.STITCH_GAP_S \
                    or d > memory.STITCH_REACH * max(side[la], side[fb]):
                continue
            if best is None or d < best[0]:
                best = (d, a)
        if best is not None:
            out[best[1]] = b
    return out


def test_continuations_of_a_busy_window_are_those_of_every_pair() -> None:
    """Hundreds of short tracks (a busy source: the tracker starting a new id every few frames,
    some near where others ended, some far): the stitching found by bisection over the tracks'
    ends is the one every pair gives."""
    raws = []
    tracks = []  # (id, first seq, frames, x, y): pairs, the second starting near and soon
    for j in range(150):  # after the first ended (every seventh too far away to continue it)
        s0, n, x, y = 3 * j, 2 + j % 4, (j * 37) % 300, (j * 53) % 200
        tracks.append((2 * j + 1, s0, n, x, y))
        tracks.append((2 * j + 2, s0 + n + j % 3, 3, x + n + j % 5 + (50 if j % 7 == 0 else 0),
                       y))
    for seq in range(0, 460):
        live = [(k, x + (seq - s0), y) for k, s0, n, x, y in tracks if s0 <= seq < s0 + n]
        if not live:
            continue
        boxes = np.array([[x, y, x + 10 + k % 3, y + 10] for k, x, y in live], np.float32)
        ids = np.array([k for k, _, _ in live])
        raws.append(memory.frame_record(seq, 100.0 + seq / 10, boxes, ids, {}, "int8"))
    w = memory.window("busy", raws)
    expected = continuations_by_every_pair(w)
    assert len(expected) > 20, "the window has continuations to find"
    assert memory.continuations(w) == expected


def test_a_track_taken_up_again_is_one_match() -> None:
    """The tracker lost the object after frame 10 and took it up at frame 12 as track 8, near
    where track 5 ended: one match, both ids, every box; track 9, far away, stays apart."""
    red = np.eye(4, dtype=np.float32)[0]
    raws = []
    for seq in range(1, 21):
        ids = [5] if seq <= 10 else [] if seq == 11 else [8]
        ids.append(9)
        boxes = [[2 * seq, 0, 2 * seq + 10, 10] for _ in ids[:-1]] + [[200, 200, 210, 210]]
        raws.append(memory.frame_record(seq, 100.0 + seq / 10, np.array(boxes), np.array(ids),
                                        {t: red for t in ids}, "int8"))
    w = memory.window("cam", raws)
    assert memory.continuations(w) == {5: 8}
    ans = memory.answer("red", [w], lambda c, e: e @ red)
    best = ans.matches[0]
    assert sorted(best.track_ids) == [5, 8] and len(best.boxes) == 19
    assert [m.track_ids for m in ans.matches[1:]] == [[9]]
    apart = memory.answer("red", [w], lambda c, e: e @ red, stitch=False)
    assert len(apart.matches) == 3


def test_since_parses_durations() -> None:
    assert parse_since("90s") == 90 and parse_since("10m") == 600 and parse_since("1h") == 3600
    assert parse_since("5") == 300 and parse_since(None) == 600
    with pytest.raises(ConfigError):
        parse_since("ten minutes")


def clip_frames(tmp_path, seed: int = 29, frames: int = 24):
    """A synthetic clip (spotline data synth --video), its frames and truth."""
    from click.testing import CliRunner

    from spotline.bench.video import find_clips, load_clip
    from spotline.cli import cli

    out = tmp_path / "clips"
    res = CliRunner().invoke(cli, ["data", "synth", str(out), "--video", "--seed", str(seed),
                                   "--clips", "1", "--frames", str(frames)])
    assert res.exit_code == 0, res.output
    return load_clip(find_clips(out)[0])


def track_clip(s, source: str, frames, start: float = 1000.0, fps: float = 10.0):
    """The clip through detect and the track stage in this process (as the workers run
    them), each frame's answer back; the track stage keeps the memory."""
    from spotline.common.envelope import Envelope
    from spotline.stages.detect import Detect
    from spotline.stages.track import Track

    detect, track = Detect(s), Track(s)
    out = []
    for k, f in enumerate(frames, start=1):
        env = Envelope(frame_id=f"{source}-{k}", source_id=source, captions=f.captions,
                       image=f.image, seq=k, capture_time=start + k / fps)
        (_, det), = detect.process([env])
        (_, done), = track.process([det])
        out.append(done)
    return out


def test_answer_matches_per_frame_grounding(redis_server, settings, tmp_path) -> None:
    """On a scripted clip, the track the answer puts first for a caption is the one the track
    stage picked for it frame by frame, with the same boxes."""
    s = apply_demo_models(settings).replace(redis_url=redis_server.url, tracking=True,
                                            ask_embed_every_s=0.0)
    frames = clip_frames(tmp_path)
    answers = track_clip(s, "clip29", frames)
    asker = Asker(s)
    checked = 0
    for c, caption in enumerate(frames[0].captions):
        picked = [(env.seq, int(env.track_ids[env.picks[c]]), env.boxes[env.picks[c]])
                  for env in answers if env.picks[c] >= 0 and env.track_ids[env.picks[c]] >= 0]
        if len(picked) < len(frames) // 2:
            continue  # "not in view" most of the clip: nothing to compare
        tracks = [t for _, t, _ in picked]
        usual = max(set(tracks), key=tracks.count)
        ans = asker.ask(caption, ["clip29"], since_s=3600, now=1000.0 + len(frames))
        assert ans.seen and ans.matches[0].track_id == usual, (caption, ans.as_json())
        boxes = {b[0]: b[2:] for b in ans.matches[0].boxes}
        for seq, tid, box in picked:
            if tid == usual:
                np.testing.assert_allclose(boxes[seq], box, atol=0.5)
        checked += 1
    assert checked >= 2
    absent = asker.ask("purple cross", ["clip29"], since_s=3600, now=1000.0 + len(frames))
    assert all(m.track_id not in {int(t) for env in answers for t in env.track_ids}
               or m.in_view >= (asker.threshold or 0) for m in absent.matches)


def test_routes_with_and_without_a_key(redis_server, settings) -> None:
    s = settings.replace(redis_url=redis_server.url, api_keys="reader:read,feeder:identify")
    t = Transport(s)
    store = MemoryStore.for_settings(s, t)
    vec = unit(np.ones((1, 16)))[0]
    now = time.time()
    for source in ("cam", "http-abc"):
        memory.Recorder(store).record(source, 1, now, np.array([[1, 2, 3, 4]]), np.array([1]),
                                      {1: vec}, frame_id="f1")
    asker = Asker(s, t, scorer=lambda caption, e: e @ vec, threshold=None)
    app = create_app(s, Client(t), timeout_s=1)
    app.state.asker = asker
    with TestClient(app, base_url=LOCAL) as http:
        assert http.get("/sources/cam/ask", params={"caption": "x"}).status_code == 401
        assert http.get("/ask", params={"caption": "x"}).status_code == 401
        wrong = {"X-API-Key": "feeder"}
        assert http.get("/sources/cam/ask", params={"caption": "x"},
                        headers=wrong).status_code == 403
        key = {"X-API-Key": "reader"}
        one = http.get("/sources/cam/ask", params={"caption": "x", "since": "5m"}, headers=key)
        assert one.status_code == 200, one.text
        body = one.json()
        assert body["seen"] and body["matches"][0]["source_id"] == "cam"
        assert body["matches"][0]["boxes"][0][2:] == [1.0, 2.0, 3.0, 4.0]
        assert body["matches"][0]["frame_ids"] == ["f1"]  # the live view's preview
        # another key's /identify source: not this key's to read
        assert http.get("/sources/http-abc/ask", params={"caption": "x"},
                        headers=key).status_code == 404
        every = http.get("/ask", params={"caption": "x"}, headers=key).json()
        assert set(every["searched"]) == {"cam"}
        assert http.get("/ask", params={"caption": "x", "since": "soon"},
                        headers=key).status_code == 400
        assert http.get("/ask", headers=key).status_code == 422
    t.close()


def test_bench_at_small_size(redis_server, settings) -> None:
    """The bench's speed run (python -m spotline.bench.ask) on a minute of memory: int8 holds
    less than float16, and both answer over every kept embedding."""
    from spotline.bench.ask import speed

    s = settings.replace(redis_url=redis_server.url)
    small = speed(s, dim=256, minutes=0.5, tracks=2, repeats=2, precision="int8")
    half = speed(s, dim=256, minutes=0.5, tracks=2, repeats=2, precision="float16")
    assert small["frames"] == half["frames"] == 300
    assert small["embeddings"] == half["embeddings"] == 2 * 30  # one a second per track
    assert small["bytes"] < half["bytes"] and small["answer_ms_median"] > 0


def test_ask_command(redis_server, settings) -> None:
    """`spotline ask SOURCE CAPTION` over a memory kept by the recorder, in words and JSON,
    one source or every one; an unreadable --since is an error line."""
    import json

    from click.testing import CliRunner

    from spotline.cli import cli

    s = apply_demo_models(settings).replace(redis_url=redis_server.url)
    t = Transport(s)
    from spotline.common.settings import settings_env
    from spotline.stages.score import Score

    # the demo scorer: the track's kept embedding is the text embedding of the caption asked
    score = Score(s.replace(tracking=False))
    score.setup()
    red = score.text_embeds(("red star",))
    red = np.asarray(red if isinstance(red, np.ndarray) else red.cpu().numpy())[0]
    now = time.time()
    recorder = memory.Recorder(MemoryStore.for_settings(s, t))
    for seq in range(1, 11):
        recorder.record("cam", seq, now - 60 + seq, np.array([[10, 10, 30, 30]]),
                        np.array([7]), {7: red}, frame_id=f"f{seq}")
    env = settings_env(s)
    runner = CliRunner()
    out = runner.invoke(cli, ["ask", "cam", "red star", "--json"], env=env)
    assert out.exit_code == 0, out.output
    body = json.loads(out.stdout)
    assert body["seen"] and body["matches"][0]["track_id"] == 7
    assert body["matches"][0]["first_seen"] == pytest.approx(now - 59, abs=1e-3)
    words = runner.invoke(cli, ["ask", "-", "red star", "--since", "5m"], env=env)
    assert words.exit_code == 0 and "cam track 7" in words.stdout, words.output
    old = runner.invoke(cli, ["ask", "cam", "red star", "--since", "30s", "--json"], env=env)
    assert json.loads(old.stdout)["searched"]["cam"]["frames"] == 0
    bad = runner.invoke(cli, ["ask", "cam", "red star", "--since", "soon"], env=env)
    assert bad.exit_code == 1 and "since" in bad.output
    t.close()
