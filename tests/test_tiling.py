"""The detector's input size follows the frame, and frames above the cap are tiled: the plan
(sizes, tiles), the merge of boxes across tile seams (constructed cases) and the demo detector
finding an object cut by a tile edge once, at its full box."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from spotline.common.settings import load_settings
from spotline.stages.backends import tiling
from spotline.stages.backends.tiling import Tile
from spotline.stages.detect import detect_frames, load_detector, predict_groups
from spotline.train.demo import DEMO_DIR, apply_demo_models


@pytest.mark.parametrize(("size", "expected"), [
    ((384, 256), 384), ((960, 544), 960), ((1520, 870), 1536), ((1000, 300), 1024),
    ((300, 1000), 1024), ((20, 10), 32), ((1600, 1200), 1600)])
def test_imgsz_follows_the_frame(size: tuple[int, int], expected: int) -> None:
    plan = tiling.plan(*size, imgsz=0, cap=1600, overlap=0.2)
    assert plan == tiling.Plan(expected)  # one pass, no tiles


def test_explicit_imgsz_is_kept_whatever_the_frame() -> None:
    for size in ((384, 256), (1920, 1080), (4000, 3000)):
        assert tiling.plan(*size, imgsz=448, cap=1600, overlap=0.2) == tiling.Plan(448)
    assert load_settings(env={"SPOTLINE_IMGSZ": "448"}).imgsz == 448
    assert load_settings(env={}).imgsz == 0  # the default follows the frame


def test_imgsz_follows_the_frame_at_the_training_scale() -> None:
    """The demo detector was trained at 448 on 384-px frames: it runs at 448/384 of any frame
    (exactly 448 on its own 384x256 frames), tiled where that exceeds the cap."""
    scale = 448 / 384
    assert tiling.plan(384, 256, 0, 1600, 0.2, scale) == tiling.Plan(448)
    assert tiling.plan(960, 544, 0, 1600, 0.2, scale) == tiling.Plan(1120)
    big = tiling.plan(1520, 870, 0, 1600, 0.2, scale)
    assert big.imgsz == 1600 and big.tiles is not None
    assert [(t.x, t.w, t.h) for t in big.tiles] == [(0, 1371, 870), (149, 1371, 870)]


def test_demo_models_follow_the_frame_unless_imgsz_is_set() -> None:
    followed = apply_demo_models(load_settings(env={}))
    assert (followed.imgsz, followed.imgsz_scale) == (0, pytest.approx(448 / 384))
    fixed = apply_demo_models(load_settings(env={"SPOTLINE_IMGSZ": "448"}))
    assert (fixed.imgsz, fixed.imgsz_scale) == (448, 1.0)  # today's behaviour
    scaled = apply_demo_models(load_settings(env={"SPOTLINE_IMGSZ_SCALE": "1.5"}))
    assert (scaled.imgsz, scaled.imgsz_scale) == (0, 1.5)  # the user's scale is kept


@pytest.mark.parametrize(("size", "cap", "overlap"), [
    ((1920, 1080), 1600, 0.2), ((3840, 2160), 1280, 0.2), ((1000, 700), 384, 0.25),
    ((641, 200), 320, 0.0), ((5000, 400), 1024, 0.5)])
def test_tiles_cover_the_frame_with_the_overlap(size: tuple[int, int], cap: int,
                                                 overlap: float) -> None:
    width, height = size
    plan = tiling.plan(width, height, imgsz=0, cap=cap, overlap=overlap)
    assert plan.tiles is not None and len(plan.tiles) > 1
    assert plan.imgsz == tiling.follow_size(min(width, cap), min(height, cap)) <= cap + 31
    covered = np.zeros((height, width), bool)
    for t in plan.tiles:
        assert (t.w, t.h) == (min(width, cap), min(height, cap))  # one shape: one batch
        assert 0 <= t.x and t.x + t.w <= width and 0 <= t.y and t.y + t.h <= height
        covered[t.y:t.y + t.h, t.x:t.x + t.w] = True
    assert covered.all()
    xs = sorted({t.x for t in plan.tiles})
    for a, b in zip(xs, xs[1:], strict=False):  # neighbours share at least the overlap
        assert a + min(width, cap) - b >= math.ceil(min(width, cap) * overlap)


def _tile_view(box: list[float], tile: Tile) -> np.ndarray:
    """What a detector sees of a frame box (xyxy) in one tile: shifted and clipped."""
    b = np.asarray(box, np.float32) - [tile.x, tile.y, tile.x, tile.y]
    return np.clip(b, 0, [tile.w, tile.h, tile.w, tile.h])


def test_an_object_cut_by_a_seam_is_kept_once_at_its_full_box() -> None:
    tiles = (Tile(0, 0, 384, 256), Tile(256, 0, 384, 256))  # common region x 256..384
    obj = [360.0, 100.0, 410.0, 150.0]  # cut by tile 0's right edge, whole in tile 1
    other = [100.0, 30.0, 140.0, 70.0]  # only in tile 0
    found = [(np.stack([_tile_view(obj, tiles[0]), _tile_view(other, tiles[0])]),
              np.array([0.9, 0.7], np.float32)),
             (_tile_view(obj, tiles[1])[None], np.array([0.6], np.float32))]
    boxes, scores = tiling.merge_tiles(found, tiles, 640, 256, iou=0.5, max_det=10)
    assert len(boxes) == 2
    np.testing.assert_allclose(boxes[0], obj)  # the whole view, with the piece's score
    assert scores[0] == pytest.approx(0.9)
    np.testing.assert_allclose(boxes[1], other)


def test_an_object_larger_than_the_overlap_is_the_union_of_its_pieces() -> None:
    tiles = (Tile(0, 0, 300, 200), Tile(250, 0, 300, 200))  # common region x 250..300
    obj = [200.0, 40.0, 380.0, 120.0]  # cut in both tiles
    found = [(_tile_view(obj, t)[None], np.array([s], np.float32))
             for t, s in zip(tiles, (0.5, 0.8), strict=True)]
    boxes, scores = tiling.merge_tiles(found, tiles, 550, 200, iou=0.5, max_det=10)
    np.testing.assert_allclose(boxes, [obj])
    assert scores.tolist() == [pytest.approx(0.8)]


def test_neighbours_across_a_seam_stay_apart() -> None:
    """Two objects side by side in the common region: a piece of one does not take the other."""
    tiles = (Tile(0, 0, 300, 200), Tile(200, 0, 300, 200))
    left, right = [230.0, 50.0, 262.0, 82.0], [280.0, 50.0, 330.0, 100.0]
    found = [(np.stack([_tile_view(left, tiles[0]), _tile_view(right, tiles[0])]),
              np.array([0.9, 0.8], np.float32)),
             (np.stack([_tile_view(left, tiles[1]), _tile_view(right, tiles[1])]),
              np.array([0.85, 0.95], np.float32))]
    boxes, _ = tiling.merge_tiles(found, tiles, 500, 200, iou=0.1, max_det=10)
    assert sorted(b.tolist() for b in boxes) == sorted([left, right])


def test_a_frame_edge_is_not_a_seam() -> None:
    """A box touching the frame's own border is whole, not a piece."""
    tile = Tile(0, 0, 300, 200)
    cut = tiling.cut_edges(np.array([[0, 0, 20, 20], [280, 10, 300, 30]], np.float32), tile,
                           600, 200)
    assert cut.tolist() == [False, True]


def test_tiles_of_a_frame_share_one_predict_call_on_an_accelerator() -> None:
    tiles = [np.zeros((256, 384, 3), np.uint8)] * 3 + [np.zeros((256, 320, 3), np.uint8)]
    assert predict_groups(tiles, "cuda:0", [384, 384, 384, 384]) == [[0, 1, 2], [3]]
    assert predict_groups(tiles, "cpu", [384] * 4) == [[0], [1], [2], [3]]


# --- the demo detector -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_detector() -> object:
    return load_detector(DEMO_DIR / "detector.pt")


def _scene_with_square(width: int, height: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """A pale sky (BGR) with one red square at ``box`` (xyxy) and a grey one far from it."""
    t = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    sky = np.array([210, 160, 110], np.float32) * (1 - t) + np.array([235, 215, 190]) * t
    image = np.broadcast_to(sky, (height, width, 3)).astype(np.uint8).copy()
    x0, y0, x1, y1 = box
    image[y0:y1, x0:x1] = (30, 30, 220)
    image[40:80, 60:100] = (128, 128, 128)
    return image


def _iou(a: np.ndarray, b: list[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_demo_detector_finds_a_square_cut_by_a_tile_edge_once(demo_detector: object) -> None:
    settings = load_settings(env={}, imgsz=0, imgsz_cap=384, tile_overlap=0.25, conf=0.1,
                             iou=0.5, max_det=20, tta=False, warmup=0)
    width, height = 640, 256
    plan = tiling.plan(width, height, 0, 384, 0.25)
    assert plan.tiles is not None and [t.x for t in plan.tiles] == [0, 256]
    square = (360, 100, 408, 148)  # across tile 0's right edge (x 384), whole in tile 1
    image = _scene_with_square(width, height, square)
    boxes, _ = detect_frames(demo_detector, [image], settings)[0]
    matches = [b for b in boxes if _iou(b, list(square)) > 0.1]
    assert len(matches) == 1
    assert _iou(matches[0], list(square)) > 0.8
    # the tile alone sees the same square whole: tiling changed nothing there
    whole, _ = detect_frames(demo_detector, [np.ascontiguousarray(image[:, 256:])],
                             settings)[0]
    assert any(np.allclose(b + [256, 0, 256, 0], matches[0], atol=0.01) for b in whole)


def test_demo_detector_runs_at_the_frames_size(demo_detector: object) -> None:
    """imgsz 0 on a 960x544 frame is imgsz 960: the same boxes, to the bit."""
    image = _scene_with_square(960, 544, (500, 300, 540, 340))
    follow = load_settings(env={}, imgsz=0, conf=0.1, iou=0.5, max_det=20, tta=False)
    fixed = follow.replace(imgsz=960)
    a, b = (detect_frames(demo_detector, [image], s)[0] for s in (follow, fixed))
    assert len(a[0]) > 0
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


# --- the torch path's boxes mapped back with the letterbox really applied ---------------------
@pytest.mark.parametrize(("h", "w", "imgsz"), [(1008, 1762, 448), (870, 1520, 448),
                                               (256, 384, 448), (544, 960, 1120),
                                               (1080, 810, 320), (300, 900, 640)])
def test_torch_boxes_use_the_letterbox_really_applied(h: int, w: int, imgsz: int) -> None:
    """A box in letterbox pixels, mapped back by Ultralytics' scale_boxes then corrected, is
    where the exported path's exact mapping puts it."""
    from ultralytics.utils import ops

    from spotline.stages.backends.detector import letterbox, rescale_ultralytics, scale_boxes

    box = letterbox(np.zeros((h, w, 3), np.uint8), imgsz)
    ph, pw = box.tensor.shape[2:]
    raw = np.array([[10.0, 12.0, pw - 20.0, ph - 8.0], [pw / 2, ph / 3, pw / 2 + 9, ph / 3 + 7]],
                   np.float32)
    theirs = ops.scale_boxes((ph, pw), raw.copy(), (h, w))
    exact = scale_boxes(raw, box)
    np.testing.assert_allclose(rescale_ultralytics(theirs, h, w, imgsz), exact, atol=1e-3)


def _clipped_short(boxes: np.ndarray, ref: np.ndarray, off: np.ndarray, frame: np.ndarray,
                   settings: object) -> bool:
    """The one way torch and the export may still differ by more than 1 px: a box reaching the
    frame's far edge. Ultralytics clips to the extent it infers, up to one input pixel short of
    the far edge, before ``rescale_ultralytics`` corrects the mapping; the export clips at the
    edge itself. So a differing coordinate is a right or bottom edge, torch's within one input
    pixel (frame / imgsz) of the frame's edge and the export's nearer to it."""
    h, w = frame.shape[:2]
    fixed, scale = settings.imgsz, settings.imgsz_scale  # type: ignore[attr-defined]
    pixel = max(h, w) / fixed if fixed else 1.0 / scale  # following the frame: at its scale
    rows, cols = np.nonzero(off)
    for r, c in zip(rows, cols, strict=True):
        edge = w if c == 2 else h if c == 3 else None
        if edge is None or not (edge - pixel <= ref[r, c] < boxes[r, c] <= edge):
            return False
    return True


@pytest.fixture(scope="module")
def demo_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo detector exported (OpenVINO and ONNX, fp32) beside a copy of it."""
    import shutil

    from spotline.export import export_model

    path = tmp_path_factory.mktemp("demo-export") / "detector.pt"
    shutil.copyfile(DEMO_DIR / "detector.pt", path)
    export_model("detector", path, ("openvino", "onnx"), ("fp32",))
    return path


def test_demo_detector_exports_give_torchs_boxes_at_any_frame_shape(demo_export: Path,
                                                                    demo_detector: object) -> None:
    """Non-square frames that Ultralytics' own mapping got wrong by up to 4 px at imgsz 448
    (1762x1008) and others, fixed and following the frame, tiled too: within 1 px."""
    from spotline.data import synth
    from spotline.stages import backends

    frames = []
    for k, size in enumerate(((1762, 1008), (1520, 870), (960, 544), (384, 256), (600, 1000))):
        scene = synth.make_scene(synth.SynthOptions(seed=7, images=1, size=size), k)
        frames.append(np.ascontiguousarray(scene.image[..., ::-1]))
    base = load_settings(env={}, conf=0.1, iou=0.5, max_det=20, tta=False)
    for settings in (base.replace(imgsz=448), base.replace(imgsz_scale=448 / 384),
                     base.replace(imgsz_cap=640)):
        reference = detect_frames(demo_detector, frames, settings)
        assert sum(len(b) for b, _ in reference) >= 5
        for engine in ("openvino", "onnx"):
            model = backends.load_detector(demo_export, engine)
            for (boxes, scores), (ref, ref_scores), frame in zip(
                    detect_frames(model, frames, settings), reference, frames, strict=True):
                assert boxes.shape == ref.shape, (engine, settings.imgsz)
                off = np.abs(boxes - ref) > 1.0
                assert not off.any() or _clipped_short(boxes, ref, off, frame, settings), \
                    (engine, settings.imgsz, boxes[off.any(axis=1)], ref[off.any(axis=1)])
                assert np.abs(scores - ref_scores).max(initial=0) <= 1e-3


def test_the_exported_detectors_nms_is_torchvisions_zero_area_boxes_too() -> None:
    """The NMS the exported detector runs keeps what torchvision.ops.nms keeps, in its order,
    on overlapping boxes, a duplicate, and zero-area boxes (a random detector's raw output has
    them: 0/0 overlaps, which torchvision keeps), and warns of nothing."""
    import warnings

    import torch
    import torchvision

    from spotline.stages.backends.detector import nms

    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10],
                      [5, 5, 5, 5], [5, 5, 5, 5], [40, 40, 40, 50], [25, 22, 33, 31]],
                     np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.45, 0.4, 0.3], np.float32)
    for iou in (0.1, 0.5, 0.7):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ours = nms(boxes, scores, iou)
        theirs = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), iou)
        assert ours.tolist() == theirs.tolist(), iou
