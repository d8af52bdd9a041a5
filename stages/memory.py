"""Ask the past: what the track stage keeps of each source's tracks, and a caption asked now
answered over it (docs/ask.md).

The track stage already embeds each track's crop on keyframes. For every frame it tracked it
hands ``Recorder.record`` the frame's boxes with their track ids and the embeddings it
computed; the recorder keeps them in Redis (common/trackmemory.py) as one small record per
frame: the boxes at half precision, and the fresh embeddings (at most one per track every
``ask_embed_every_s``) as int8 with a per-vector scale, or float16 (``ask_precision``).

``answer`` scores a caption's text embedding against every stored embedding of the window
(one matrix product, the scorer's own formula), rates each track by the mean of its best
``TOP_K`` scores, calibrates that with the scorer's calibration (stages/tracking/calibration.py)
and keeps the tracks whose probability of being in view passes the "not in view" threshold,
each with its first and last time seen and its boxes over time. Nothing passing: "not seen".
The tracks kept come best first by their evidence: the same mean with the embeddings a short
track lacks of ``TOP_K`` counted at the window's median score (``track_scores``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..common.codec import decode_state, encode_state
from ..common.errors import ConfigError
from ..common.trackmemory import MemoryStore

TOP_K = 3  # a track's score: the mean of its best TOP_K embeddings' scores
# A track that starts at most STITCH_GAP_S after another ended, near where it ended (centres
# within STITCH_REACH of the larger box's larger side), continues it when both match: the
# tracker lost the object for a moment and took it up again under a new id.
STITCH_GAP_S = 1.0
STITCH_REACH = 1.5
MAX_POINTS = 300  # boxes per track in an answer at most (evenly thinned, the last kept)
BOX_ROW = np.dtype([("tid", "<i4"), ("box", "<f2", (4,))])


# --- precision ---------------------------------------------------------------------------------
def quantize(vectors: np.ndarray, precision: str) -> tuple[bytes, bytes]:
    """(raw values, per-vector scales) of N×D float embeddings: int8 with a float32 scale per
    vector (max |v| / 127), or float16 with no scales."""
    v = np.asarray(vectors, np.float32).reshape(len(vectors), -1)
    if precision == "float16":
        return v.astype("<f2").tobytes(), b""
    if precision != "int8":
        raise ValueError(f"precision must be int8 or float16, got {precision!r}")
    scale = np.abs(v).max(axis=1) / 127.0
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(v / scale[:, None]), -127, 127).astype(np.int8)
    return q.tobytes(), scale.astype("<f4").tobytes()


def dequantize(raw: bytes, scales: bytes, dim: int, precision: str) -> np.ndarray:
    """N×D float32 unit vectors back from ``quantize``'s bytes. An int8 vector's scale is
    positive, so its unit vector is the int8 values' own: the scales are not read."""
    dtype = "<f2" if precision == "float16" else np.int8
    v = np.frombuffer(raw, dtype).reshape(-1, dim).astype(np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", v, v))
    v *= (1.0 / np.where(norms > 0, norms, 1.0))[:, None]  # in place: one N×D array in all
    return v


# --- recording ---------------------------------------------------------------------------------
def frame_record(seq: int, t: float, boxes: np.ndarray, track_ids: np.ndarray,
                 embeds: Mapping[int, np.ndarray], precision: str, frame_id: str = "") -> bytes:
    """One frame's record: its tracked boxes and the embeddings kept of it (track id -> D),
    and its frame id (the live view finds the frame's stored preview by it)."""
    ids = np.asarray(track_ids, np.int64).reshape(-1)
    keep = ids >= 0
    rows = np.zeros(int(keep.sum()), BOX_ROW)
    rows["tid"] = ids[keep]
    rows["box"] = np.asarray(boxes, np.float32).reshape(-1, 4)[keep]
    rec: dict[str, Any] = {"s": int(seq), "t": float(t), "b": rows.tobytes(), "f": frame_id}
    if embeds:
        tids = sorted(embeds)
        vecs = np.stack([np.asarray(embeds[k], np.float32).reshape(-1) for k in tids])
        raw, scales = quantize(vecs, precision)
        rec.update(e=np.asarray(tids, "<i4").tobytes(), q=raw, z=scales, d=vecs.shape[1],
                   p=precision)
    return encode_state(rec)


class Recorder:
    """The track stage's side of the memory: one record per tracked frame, with a track's
    embedding kept at most every ``every_s`` seconds (its first always)."""

    def __init__(self, store: MemoryStore, precision: str = "int8", every_s: float = 1.0,
                 ) -> None:
        self.store = store
        self.precision = precision
        self.every_s = every_s
        self.kept: dict[tuple[str, int], float] = {}  # (source, track) -> time of the last kept

    def record(self, source_id: str, seq: int, t: float, boxes: np.ndarray,
               track_ids: np.ndarray, fresh: Mapping[int, Any], frame_id: str = "") -> None:
        """Keep frame ``seq`` of a source: ``fresh`` maps track ids to what the frame embedded
        (arrays, or the track cache's entries with an ``embedding``)."""
        embeds = {}
        for tid, entry in fresh.items():
            last = self.kept.get((source_id, tid))
            if last is None or not 0 <= t - last < self.every_s:
                embeds[int(tid)] = getattr(entry, "embedding", entry)
                self.kept[(source_id, int(tid))] = t
        if len(self.kept) > 65536:  # forget tracks unseen for a retention's time
            cutoff = t - self.store.retention_s
            self.kept = {k: v for k, v in self.kept.items() if v >= cutoff}
        self.store.add(source_id, seq, t,
                       frame_record(seq, t, boxes, track_ids, embeds, self.precision,
                                    frame_id))


def remember(stage: Any, env: Any, answer: Mapping[str, Any], fresh: Mapping[int, Any]) -> None:
    """The track stage's hook: keep a tracked frame in its source's memory (with
    ``ask_memory`` on; the recorder is made on first use, on the stage's own connection). A
    stage whose stores live in this process (spotline/pipeline/trackmode.py's Tracked) keeps
    none."""
    recorder = getattr(stage, "_memory", None)
    if recorder is False:
        return
    if recorder is None:
        settings = stage.settings
        transport = getattr(stage.cache, "t", None)  # None: stores in this process, no Redis
        if not settings.ask_memory or transport is None:
            stage._memory = False
            return
        recorder = Recorder(MemoryStore.for_settings(settings, transport),
                            settings.ask_precision, settings.ask_embed_every_s)
        stage._memory = recorder
    recorder.record(env.source_id, env.seq, env.capture_time, answer["boxes"],
                    answer["track_ids"], fresh, env.frame_id)


# --- reading -----------------------------------------------------------------------------------
@dataclass
class Window:
    """A source's memory over a window, as arrays: every tracked box, every kept embedding."""

    source_id: str
    box_seq: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    box_t: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    box_tid: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    box_frame: np.ndarray = field(default_factory=lambda: np.zeros(0, object))
    emb_seq: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    emb_t: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    emb_tid: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    embeds: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    frames: int = 0


def window(source_id: str, raws: Sequence[bytes]) -> Window:
    """The arrays of a source's frame records (oldest first)."""
    recs = [decode_state(r) for r in raws]
    w = Window(source_id, frames=len(recs))
    if not recs:
        return w
    counts = np.fromiter((len(r["b"]) // BOX_ROW.itemsize for r in recs), np.int64, len(recs))
    rows = np.frombuffer(b"".join(r["b"] for r in recs), BOX_ROW)
    seqs = np.fromiter((r["s"] for r in recs), np.int64, len(recs))
    times = np.fromiter((r["t"] for r in recs), np.float64, len(recs))
    w.box_seq, w.box_t = np.repeat(seqs, counts), np.repeat(times, counts)
    w.box_tid, w.boxes = rows["tid"].astype(np.int64), rows["box"].astype(np.float32)
    w.box_frame = np.repeat(np.array([r.get("f", "") for r in recs], object), counts)
    parts: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in recs:
        if "e" in r:
            parts.setdefault((r["p"], int(r["d"])), []).append(r)
    vecs, tids, eseq, et = [], [], [], []
    for (precision, dim), group in parts.items():
        vecs.append(dequantize(b"".join(r["q"] for r in group),
                               b"".join(r["z"] for r in group), dim, precision))
        n = [len(r["e"]) // 4 for r in group]
        tids.append(np.frombuffer(b"".join(r["e"] for r in group), "<i4").astype(np.int64))
        eseq.append(np.repeat([r["s"] for r in group], n))
        et.append(np.repeat([r["t"] for r in group], n))
    if len(vecs) == 1:  # one precision and size: no copy of the embeddings
        w.embeds, w.emb_tid, w.emb_seq, w.emb_t = vecs[0], tids[0], eseq[0], et[0]
    elif vecs and len({v.shape[1] for v in vecs}) == 1:  # one scorer's embeddings
        w.embeds, w.emb_tid = np.concatenate(vecs), np.concatenate(tids)
        w.emb_seq, w.emb_t = np.concatenate(eseq).astype(np.int64), np.concatenate(et)
    elif vecs:  # the scorer changed within the window: the newest embeddings' size only
        w.embeds, w.emb_tid, w.emb_seq, w.emb_t = vecs[-1], tids[-1], eseq[-1], et[-1]
    return w


# --- answering ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Match:
    """A track that matches the caption."""

    source_id: str
    track_id: int
    score: float  # the scorer's, mean of the track's best TOP_K embeddings
    probability: float  # calibrated (nan without a calibration)
    in_view: float  # probability of being the caption's object (the "not seen" test)
    first_seen: float
    last_seen: float
    boxes: list[list[float]]  # [seq, time, x1, y1, x2, y2] over time
    frame_ids: list[str] = field(default_factory=list)  # each box's frame
    track_ids: list[int] = field(default_factory=list)  # it and the tracks continuing it

    def as_json(self) -> dict[str, Any]:
        def num(v: float) -> float | None:
            return None if math.isnan(v) else round(v, 4)

        return {"source_id": self.source_id, "track_id": self.track_id,
                "score": round(self.score, 4), "probability": num(self.probability),
                "in_view": num(self.in_view), "first_seen": self.first_seen,
                "last_seen": self.last_seen, "boxes": self.boxes, "frame_ids": self.frame_ids,
                "track_ids": self.track_ids or [self.track_id]}


@dataclass(frozen=True)
class Answer:
    caption: str
    since: float
    matches: list[Match]
    searched: dict[str, dict[str, int]]  # source -> frames, tracks, embeddings searched
    threshold: float | None
    took_ms: float = 0.0

    @property
    def seen(self) -> bool:
        return bool(self.matches)

    def as_json(self) -> dict[str, Any]:
        return {"caption": self.caption, "since": self.since, "seen": self.seen,
                "threshold": self.threshold, "matches": [m.as_json() for m in self.matches],
                "searched": self.searched, "took_ms": round(self.took_ms, 2)}


def track_scores(scores: np.ndarray, tids: np.ndarray) -> dict[int, tuple[float, float]]:
    """Each track's (score, evidence). Score: the mean of its best ``TOP_K`` embedding scores.
    Evidence, which ranks the tracks: the same mean with a track of fewer than ``TOP_K`` kept
    embeddings counting each one it lacks at the window's median score (the level of what the
    source mostly saw), so that one lucky embedding of a track seen for a moment weighs less
    than the same score held over several seconds."""
    out: dict[int, tuple[float, float]] = {}
    if len(tids) == 0:
        return out
    order = np.lexsort((-scores, tids))
    s, t = scores[order], tids[order]
    starts = np.flatnonzero(np.r_[True, t[1:] != t[:-1]])
    ends = np.r_[starts[1:], len(t)]
    level = float(np.median(scores))
    # each track's best TOP_K scores summed at once (its scores come best first)
    rank = np.arange(len(t)) - np.repeat(starts, ends - starts)
    sums = np.add.reduceat(np.where(rank < TOP_K, s, 0.0), starts)
    counts = np.minimum(ends - starts, TOP_K)
    for tid, total, n in zip(t[starts].tolist(), sums.tolist(), counts.tolist(), strict=True):
        out[int(tid)] = (total / n, (total + (TOP_K - n) * level) / TOP_K)
    return out


def box_track(w: Window, tids: Sequence[int], max_points: int = MAX_POINTS
              ) -> tuple[list[list[float]], list[str]]:
    """The boxes over time of a track (or of the tracks that continue one another), [seq,
    time, x1, y1, x2, y2], thinned to ``max_points``, and their frames' ids."""
    idx = np.flatnonzero(np.isin(w.box_tid, list(tids)))
    if len(idx) > max_points:
        idx = idx[np.unique(np.r_[np.linspace(0, len(idx) - 1, max_points).round().astype(int),
                                  len(idx) - 1])]
    rows = np.column_stack([w.box_t[idx].round(3),
                            w.boxes[idx].astype(np.float64).round(1)]).tolist()
    return ([[seq, *row] for seq, row in zip(w.box_seq[idx].tolist(), rows, strict=True)],
            w.box_frame[idx].astype(str).tolist())


Scorer = Callable[[str, np.ndarray], np.ndarray]  # (caption, N×D embeddings) -> N scores


def continuations(w: Window) -> dict[int, int]:
    """Track id -> the track that continues it (see ``STITCH_GAP_S``): for each track, in the
    order they start, the nearest track that ended just before, near its first box."""
    if len(w.box_tid) == 0:
        return {}
    order = np.argsort(w.box_tid, kind="stable")  # a track's boxes stay in time order
    tids = w.box_tid[order]
    starts = np.flatnonzero(np.r_[True, tids[1:] != tids[:-1]])
    ends = np.r_[starts[1:], len(tids)] - 1
    first, last = order[starts], order[ends]
    ids = tids[starts]

    def centre(i: np.ndarray) -> np.ndarray:
        b = w.boxes[i]
        return np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2], axis=1)

    side = np.maximum(w.boxes[:, 2] - w.boxes[:, 0], w.boxes[:, 3] - w.boxes[:, 1])
    c_first, c_last = centre(first), centre(last)
    t_first, t_last = w.box_t[first], w.box_t[last]
    # Only tracks that ended in the STITCH_GAP_S before a track's start can be continued by it:
    # found by bisection in the tracks ordered by their end, so that a window of thousands of
    # tracks (a busy source's half hour) costs T log T, not T², and the few candidates each
    # are weighed as plain floats.
    by_end = np.argsort(t_last, kind="stable")
    los = np.searchsorted(t_last[by_end], t_first - 2 * STITCH_GAP_S, side="left").tolist()
    his = np.searchsorted(t_last[by_end], t_first, side="left").tolist()
    order, tf, tl = by_end.tolist(), t_first.tolist(), t_last.tolist()
    cf, cl = c_first.tolist(), c_last.tolist()
    sf, sl, tid = side[first].tolist(), side[last].tolist(), ids.tolist()
    out: dict[int, int] = {}
    taken: set[int] = set()
    for b in np.argsort(t_first, kind="stable").tolist():
        best: tuple[float, int] | None = None
        for a in sorted(order[los[b]:his[b]]):
            if a == b or tid[a] in taken or not 0 < tf[b] - tl[a] <= STITCH_GAP_S:
                continue
            d = math.hypot(cl[a][0] - cf[b][0], cl[a][1] - cf[b][1])
            if d <= STITCH_REACH * max(sl[a], sf[b]) and (best is None or d < best[0]):
                best = (d, a)  # the nearest; the first of equals
        if best is not None:
            out[tid[best[1]]] = tid[b]
            taken.add(tid[best[1]])
    return out


def chain(tid: int, after: Mapping[int, int], matches: Callable[[int], bool]) -> list[int]:
    """``tid`` and the tracks before and after it that continue one another and match."""
    before = {b: a for a, b in after.items()}
    out = [tid]
    while before.get(out[0]) is not None and matches(before[out[0]]) \
            and before[out[0]] not in out:
        out.insert(0, before[out[0]])
    while after.get(out[-1]) is not None and matches(after[out[-1]]) and after[out[-1]] not in out:
        out.append(after[out[-1]])
    return out


def lowest_passing(scores: Sequence[float], passes: Callable[[float], bool]) -> float:
    """The lowest of ``scores`` that ``passes`` (inf when none does), for a test that passes
    any score above one it passes (the calibration's probability of being in view rises with
    the score): a bisection, a few calls of ``passes`` however many tracks there are."""
    ordered = sorted(scores, reverse=True)
    lo, hi = 0, len(ordered)  # ordered[:lo] pass, ordered[hi:] do not
    while lo < hi:
        mid = (lo + hi) // 2
        if passes(ordered[mid]):
            lo = mid + 1
        else:
            hi = mid
    return ordered[lo - 1] if lo else math.inf


def answer(caption: str, windows: Sequence[Window], scorer: Scorer, calibration: Any = None,
           threshold: float | None = None, since: float = 0.0, limit: int = 5,
           max_points: int = MAX_POINTS, stitch: bool = True) -> Answer:
    """The tracks of ``windows`` that match ``caption``, best first (see the module doc);
    with ``stitch``, a track and those continuing it are one match."""
    from .tracking.assign import in_view

    started = time.perf_counter()
    rated: list[tuple[float, float, Window, int]] = []  # evidence, score, window, track
    searched = {}
    per_source: dict[str, dict[int, float]] = {}
    for w in windows:
        try:
            scores = (np.asarray(scorer(caption, w.embeds), np.float64).reshape(-1)
                      if len(w.embeds) else np.zeros(0))
        except (ValueError, RuntimeError) as exc:  # e.g. a scorer of another embedding size
            raise ConfigError(f"source {w.source_id}: its kept {w.embeds.shape[1]}-d embeddings"
                              f" do not fit this scorer ({exc}): ask with the scorer its "
                              "track stage ran") from None
        rates = track_scores(scores, w.emb_tid)
        per_track = per_source[w.source_id] = {tid: r[0] for tid, r in rates.items()}
        searched[w.source_id] = {"frames": w.frames, "tracks": len(per_track),
                                 "embeddings": len(w.embeds)}
        rated += [(evidence, s, w, tid) for tid, (s, evidence) in rates.items()]
    rated.sort(key=lambda r: (-r[0], -r[1]))

    def presence(s: float) -> tuple[float, float]:
        prob = math.nan if calibration is None else float(calibration.apply(np.array(s)))
        return prob, (float(in_view(calibration, np.array([[s]]), [caption])[0])
                      if calibration is not None else prob)

    cut = -math.inf if threshold is None else lowest_passing(
        [r[1] for r in rated], lambda s: presence(s)[1] >= threshold)
    matches: list[Match] = []
    used: set[tuple[str, int]] = set()
    links: dict[str, dict[int, int]] = {}
    for _, s, w, tid in rated:
        if len(matches) >= limit:
            break
        if (w.source_id, tid) in used or not s >= cut:
            continue  # part of a better track's match, or not in view
        prob, present = presence(s)
        tids = [tid]
        if stitch:
            if w.source_id not in links:
                links[w.source_id] = continuations(w)
            def matching(other: int, scores_of: dict[int, float] = per_source[w.source_id],
                         source: str = w.source_id) -> bool:
                return other in scores_of and (source, other) not in used and (
                    scores_of[other] >= cut)

            tids = chain(tid, links[w.source_id], matching)
        used.update((w.source_id, t) for t in tids)
        seen = w.box_t[np.isin(w.box_tid, tids)]
        first, last = (float(seen.min()), float(seen.max())) if len(seen) else (math.nan,) * 2
        boxes, frame_ids = box_track(w, tids, max_points)
        matches.append(Match(w.source_id, tid, s, prob, present, first, last, boxes,
                             frame_ids, tids))
    return Answer(caption, since, matches, searched, threshold,
                  (time.perf_counter() - started) * 1000)
