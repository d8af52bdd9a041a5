"""Stage model work with tiny random models in the real formats, loaded by the real loaders."""

from __future__ import annotations

import math
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from spotline.common import images
from spotline.common.envelope import Envelope
from spotline.common.errors import InputError, ModelError
from spotline.common.settings import Settings
from spotline.pipeline.reference import Reference
from spotline.stages import libs, runtime
from spotline.stages import tiny as tiny_models
from spotline.stages.collect import Collect, frame_result, ltwh
from spotline.stages.detect import (
    Detect,
    crop_boxes,
    decode_frame,
    load_detector,
    predict_groups,
)
from spotline.stages.score import Score, load_scorer
from spotline.stages.upscale import (
    Upscale,
    build_upscaler_net,
    load_upscaler,
    pre_pad_for,
    upscale_crop,
)

ASSETS = libs.ultralytics_assets()
BUS = (ASSETS / "bus.jpg").read_bytes()  # 810×1080
ZIDANE = (ASSETS / "zidane.jpg").read_bytes()  # 1280×720


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return tiny_models.write_tiny_models(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def base(tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """The seed's settings with the tiny models, a smaller imgsz and no warm-up (speed)."""
    return Settings(detector_weights=str(tiny["detector"]), upscaler_weights=str(tiny["upscaler"]),
                    scorer_dir=str(tiny["scorer"]), imgsz=320, warmup=0, max_det=6,
                    data_dir=str(tmp_path_factory.mktemp("data")))


@pytest.fixture(scope="module")
def detect(base: Settings) -> Detect:
    stage = Detect(base.replace(crops_per_part=4))
    stage.setup()
    return stage


@pytest.fixture(scope="module")
def upscale(base: Settings) -> Upscale:
    stage = Upscale(base)
    stage.setup()
    return stage


@pytest.fixture(scope="module")
def score(base: Settings) -> Score:
    stage = Score(base)
    stage.setup()
    return stage


def frame(image: bytes, *captions: str, fid: str = "f1") -> Envelope:
    return Envelope(frame_id=fid, captions=captions or ("red bus",), image=image)


# --- models --------------------------------------------------------------------------------
def test_tiny_models_load_through_the_real_loaders(tiny: dict[str, Path], base: Settings) -> None:
    assert load_detector(tiny["detector"]).task == "detect"
    assert load_upscaler(tiny["upscaler"]).scale == 4
    model, processor = load_scorer(tiny["scorer"])
    assert type(model).__name__ == "SiglipModel" and processor.tokenizer.pad_token == "<pad>"
    assert runtime.scorer_input_size(base, tiny["scorer"]) == 64
    assert runtime.scorer_input_size(base.replace(scorer_input_size=32), tiny["scorer"]) == 32


def test_detector_architecture_yaml_builds_offline(base: Settings) -> None:
    paths = runtime.resolve_weights(base.replace(detector_weights="yolov8n.yaml"))
    assert str(paths.detector) == "yolov8n.yaml" and not paths.tiny
    assert load_detector(paths.detector).task == "detect"


def test_ultralytics_pil_patch_is_undone(detect: Detect) -> None:
    import io

    from PIL import Image, UnidentifiedImageError

    with pytest.raises(UnidentifiedImageError):  # not a pip install of a HEIF plugin
        Image.open(io.BytesIO(b"GIF89a junk"))


def test_tiny_models_are_deterministic(tiny: dict[str, Path], tmp_path: Path) -> None:
    again = tiny_models.write_tiny_models(tmp_path)
    for key in ("upscaler",):
        a = torch.load(tiny[key], weights_only=True)["params"]
        b = torch.load(again[key], weights_only=True)["params"]
        assert all(torch.equal(a[k], b[k]) for k in a)
    da = torch.load(tiny["detector"], weights_only=False)["model"].state_dict()
    db = torch.load(again["detector"], weights_only=False)["model"].state_dict()
    assert all(torch.equal(da[k], db[k]) for k in da)


def test_upscaler_architecture_is_read_from_the_state_dict() -> None:
    libs.torchvision_shim()
    from basicsr.archs.rrdbnet_arch import RRDBNet
    from realesrgan.archs.srvgg_arch import SRVGGNetCompact

    srvgg = SRVGGNetCompact(num_feat=8, num_conv=3, upscale=2)
    net, scale = build_upscaler_net(srvgg.state_dict())
    assert (scale, net.num_feat, net.num_conv) == (2, 8, 3)
    rrdb = RRDBNet(3, 3, num_feat=8, num_block=2, num_grow_ch=4, scale=4)
    net, scale = build_upscaler_net(rrdb.state_dict())
    assert scale == 4 and len(net.body) == 2
    net.load_state_dict(rrdb.state_dict())
    with pytest.raises(ModelError):
        build_upscaler_net({"foo.weight": torch.zeros(1)})


def test_resolve_weights(tmp_path: Path) -> None:
    settings = Settings(data_dir=str(tmp_path))
    with pytest.raises(ModelError, match="does not exist"):
        runtime.resolve_weights(settings.replace(upscaler_weights=str(tmp_path / "nope.pth")))
    found: list[runtime.ModelPaths] = []
    threads = [threading.Thread(target=lambda: found.append(runtime.resolve_weights(settings)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(found) == 2 and found[0] == found[1] and found[0].tiny
    assert found[0].detector.is_file() and (found[0].scorer / "config.json").is_file()
    assert not list((tmp_path / tiny_models.TINY_DIR).glob(".*tmp*"))


def test_device_and_precision(base: Settings) -> None:
    assert runtime.resolve_device(base.replace(device="cpu")) == "cpu"
    assert runtime.resolve_device(base.replace(device="cuda")) == "cuda:0"
    assert not runtime.use_half(base, "cpu")
    assert runtime.use_half(base, "cuda:0")
    assert not runtime.use_half(base.replace(half=False), "cuda")


# --- detect --------------------------------------------------------------------------------
def test_detect_fans_out_well_formed_parts(detect: Detect) -> None:
    routed = detect.process([frame(BUS, fid="bus"), frame(ZIDANE, fid="zid")])
    for fid, size in (("bus", (810, 1080)), ("zid", (1280, 720))):
        parts = [env for _, env in routed if env.frame_id == fid]
        assert {t for t, env in routed if env.frame_id == fid} == {"upscale"}
        assert [p.part for p in parts] == list(range(parts[0].nparts))
        total = sum(len(p.boxes) for p in parts)
        assert 1 <= total <= 6 and parts[0].nparts == math.ceil(total / 4)
        for p in parts:
            assert p.image is None and p.image_size == size and 1 <= len(p.crops) <= 4
            assert p.boxes.dtype == np.float32 and p.boxes.shape == (len(p.crops), 4)
            assert p.det_scores.dtype == np.float32 and p.det_scores.shape == (len(p.crops),)
            assert all(c.dtype == np.uint8 and c.ndim == 3 and c.shape[2] == 3 for c in p.crops)
            assert (p.boxes[:, 2:] >= p.boxes[:, :2]).all()


def test_detect_boxes_do_not_depend_on_the_batch(detect: Detect) -> None:
    flipped = cv2.imencode(".png", cv2.flip(cv2.imdecode(np.frombuffer(BUS, np.uint8), 1), 1))[1]
    frames = [frame(BUS, fid="a"), frame(flipped.tobytes(), fid="b"), frame(ZIDANE, fid="c")]
    together = detect.process(frames)
    alone = [out for f in frames for out in detect.process([f])]
    assert [(t, e) for t, e in together] == [(t, e) for t, e in alone]
    images = [np.zeros((4, 6, 3)), np.zeros((5, 6, 3)), np.zeros((4, 6, 3))]
    assert predict_groups(images, "cuda:0") == [[0, 2], [1]]
    assert predict_groups(images, "cpu") == [[0], [1], [2]]


def test_crops_are_plain_rgb_crops_of_the_box(detect: Detect) -> None:
    (_, env), *_ = detect.process([frame(BUS)])
    rgb = cv2.cvtColor(cv2.imdecode(np.frombuffer(BUS, np.uint8), cv2.IMREAD_COLOR),
                       cv2.COLOR_BGR2RGB)
    x1, y1, x2, y2 = (round(v) for v in env.boxes[0].tolist())
    np.testing.assert_array_equal(env.crops[0], rgb[y1:y2, x1:x2])


def test_detect_without_upscale_routes_to_score_with_capped_crops(base: Settings) -> None:
    stage = Detect(base.replace(upscale=False, warmup=1))
    stage.setup()
    routed = stage.process([frame(BUS)])
    assert {t for t, _ in routed} == {"score"}
    assert all(max(c.shape[:2]) <= 64 for _, env in routed for c in env.crops)


def test_frame_without_detections_goes_to_collect(base: Settings) -> None:
    stage = Detect(base.replace(conf=1.0))
    stage.setup()
    [(target, env)] = stage.process([frame(BUS)])
    assert target == "collect" and env.boxes.shape == (0, 4) and env.nparts == 1
    assert env.image is None and env.image_size == (810, 1080)


@pytest.mark.parametrize("data", [b"", b"not an image at all", BUS[:200]])
def test_corrupt_frames_raise_input_error(detect: Detect, data: bytes) -> None:
    with pytest.raises(InputError, match="frame bad"):
        detect.process([frame(data, fid="bad")])


def test_frame_limits(base: Settings) -> None:
    with pytest.raises(InputError, match="max_frame_bytes"):
        decode_frame(frame(BUS), base.replace(max_frame_bytes=1000))
    with pytest.raises(InputError, match="max_pixels"):
        decode_frame(frame(BUS), base.replace(max_pixels=1000))


@pytest.mark.parametrize("image", [
    np.full((20, 30), 200, np.uint8),
    np.dstack([np.full((20, 30, 3), 200, np.uint8), np.zeros((20, 30), np.uint8)]),
    np.full((20, 30, 3), 200 * 257, np.uint16),
    np.full((20, 30), 200 * 257, np.uint16),
])
def test_grey_rgba_and_16_bit_pngs_decode_to_8_bit_bgr(base: Settings, image: np.ndarray) -> None:
    ok, png = cv2.imencode(".png", image)
    decoded = decode_frame(frame(png.tobytes()), base)
    assert decoded.shape == (20, 30, 3) and decoded.dtype == np.uint8
    assert (decoded == 200).all()


def test_zero_size_boxes_give_one_pixel_crops() -> None:
    rgb = np.arange(10 * 12 * 3, dtype=np.uint8).reshape(10, 12, 3)
    boxes = np.array([[3, 4, 3, 4], [11.6, 9.7, 12, 10], [2, 2, 5, 6]], np.float32)
    crops = crop_boxes(rgb, boxes)
    assert [c.shape for c in crops] == [(1, 1, 3), (1, 1, 3), (4, 3, 3)]
    np.testing.assert_array_equal(crops[1][0, 0], rgb[9, 11])


# --- upscale -------------------------------------------------------------------------------
def test_pre_pad_rule(base: Settings) -> None:
    def pad(h: int, w: int) -> int:
        return pre_pad_for(np.zeros((h, w, 3), np.uint8), base)

    assert (pad(11, 11), pad(10, 40), pad(40, 10), pad(2, 2)) == (10, 1, 1, 1)


def test_upscale_sizes_pass_through_and_cap(upscale: Upscale, base: Settings) -> None:
    thin = np.zeros((1, 30, 3), np.uint8)
    assert upscale_crop(upscale.upsampler, thin, base) is thin
    assert upscale_crop(upscale.upsampler, np.zeros((7, 9, 3), np.uint8), base).shape == (
        28, 36, 3)
    env = frame(BUS).replace(image=None, crops=(thin, np.zeros((5, 12, 3), np.uint8),
                                                np.zeros((40, 20, 3), np.uint8)))
    [(target, out)] = upscale.process([env])
    assert target == "score"
    assert [c.shape for c in out.crops] == [(1, 30, 3), (20, 48, 3), (64, 32, 3)]
    assert all(c.dtype == np.uint8 for c in out.crops)


def test_upscale_feeds_the_network_rgb(upscale: Upscale, base: Settings) -> None:
    """enhance() takes BGR and hands the network RGB: our RGB crops must reach it as RGB."""
    seen: list[torch.Tensor] = []

    class Probe(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x.clone())
            return torch.nn.functional.interpolate(x, scale_factor=4, mode="nearest")

    upsampler = load_upscaler(upscale.settings.upscaler_weights)
    upsampler.model = Probe()
    red = np.zeros((12, 12, 3), np.uint8)
    red[..., 0] = 255
    out = upscale_crop(upsampler, red, base)
    assert seen[0][0, 0].min() == 1.0 and seen[0][0, 2].max() == 0.0  # channel 0 is red
    assert out.shape == (48, 48, 3) and (out[..., 0] == 255).all() and (out[..., 2] == 0).all()
    np.testing.assert_array_equal(images.swap_rb(red)[..., 2], red[..., 0])


# --- score ---------------------------------------------------------------------------------
def test_scores_match_siglip_and_cache_captions(score: Score, base: Settings) -> None:
    rng = np.random.default_rng(0)
    crops = tuple(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                  for h, w in ((30, 20), (3, 40), (1, 1)))
    env = frame(BUS, "red bus", "grey missile").replace(image=None, crops=crops,
                                                        boxes=np.zeros((3, 4), np.float32))
    hits = score.cache_hits
    [(target, out)] = score.process([env, env.replace(frame_id="f2", crops=crops[:1],
                                                      boxes=np.zeros((1, 4), np.float32))])[:1]
    assert target == "collect" and out.crops == ()
    assert out.scores.dtype == np.float32 and out.scores.shape == (2, 3)
    assert ((out.scores >= 0) & (out.scores <= 1)).all()
    assert score.cache_hits == hits + 2  # the second envelope's captions
    # The same numbers as SiglipModel's own forward pass.
    proc = score.processor
    text = proc.tokenizer([base.prompt.format(caption=c) for c in env.captions],
                          padding="max_length", truncation=True, return_tensors="pt")
    pixels = proc.image_processor(images=list(crops), return_tensors="pt",
                                  input_data_format="channels_last")["pixel_values"]
    with torch.no_grad():
        ref = torch.sigmoid(score.model(input_ids=text["input_ids"], pixel_values=pixels)
                            .logits_per_text).numpy()
    np.testing.assert_allclose(out.scores, ref, rtol=1e-5, atol=1e-6)


def test_caption_cache_is_bounded(base: Settings) -> None:
    stage = Score(base.replace(caption_cache_size=2))
    stage.setup()
    crop = np.zeros((8, 8, 3), np.uint8)
    for caption in ("a", "b", "c", "a"):
        stage.process([frame(BUS, caption).replace(crops=(crop,))])
    assert list(stage.cache) == ["c", "a"] and stage.cache_misses == 4


def test_clip_family_scores_are_its_logits(base: Settings, tmp_path: Path) -> None:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tok = tiny_models.build_tokenizer(16)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=dict(small, vocab_size=len(tok), max_position_embeddings=16,
                                          eos_token_id=2, pad_token_id=0, bos_token_id=2),
                         vision_config=dict(small, image_size=32, patch_size=16),
                         projection_dim=16)).save_pretrained(tmp_path)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                     crop_size={"height": 32, "width": 32}),
                  tokenizer=tok).save_pretrained(tmp_path)
    settings = base.replace(scorer_dir=str(tmp_path))
    assert runtime.scorer_input_size(settings, tmp_path) == 32
    stage = Score(settings)
    stage.setup()
    crops = (np.zeros((10, 20, 3), np.uint8), np.full((5, 5, 3), 200, np.uint8))
    [(_, out)] = stage.process([frame(BUS, "red bus", "man").replace(crops=crops)])
    enc = stage.processor(text=[base.prompt.format(caption=c) for c in ("red bus", "man")],
                          images=list(crops), padding="max_length", max_length=16,
                          return_tensors="pt")
    with torch.no_grad():
        ref = stage.model(**enc).logits_per_text.numpy()
    assert not stage.is_siglip and out.scores.shape == (2, 2)
    np.testing.assert_allclose(out.scores, ref, rtol=1e-5, atol=1e-5)


# --- collect -------------------------------------------------------------------------------
def test_collect_argmax_ltwh_and_fallback(base: Settings) -> None:
    boxes = np.array([[10, 20, 30, 60], [0, 0, 5, 5]], np.float32)
    env = Envelope(frame_id="f", source_id="cam", capture_time=5.0, captions=("a", "b"),
                   image_size=(100, 80), boxes=boxes, scores=np.array([[0.1, 0.9], [0.7, 0.2]],
                                                                     np.float32),
                   trace=(("detect", 1.0, 2.0, 3.0),))
    [(target, result)] = Collect(base).process([env])
    assert target == "result" and result.boxes == ((0, 0, 5, 5), (10, 20, 20, 40))
    assert result.scores == pytest.approx((0.9, 0.7)) and not result.fallback
    assert (result.source_id, result.capture_time, result.image_size, result.trace) == (
        "cam", 5.0, (100, 80), env.trace)
    empty = frame_result(env.replace(boxes=np.zeros((0, 4), np.float32), scores=None),
                         base.replace(fallback_box=(1, 2, 3, 4)))
    assert empty.fallback and empty.boxes == ((1, 2, 3, 4),) * 2 and math.isnan(empty.scores[0])
    assert ltwh(np.array([1, 2, 4, 8])) == (1, 2, 3, 6)


# --- the in-process reference --------------------------------------------------------------
def test_reference_identify_end_to_end(base: Settings) -> None:
    ref = Reference(base)
    captions = [["red bus", "person", "grey missile"], ["man with tie", "yellow helicopter"]]
    results = ref.identify([BUS, ZIDANE, b"garbage"], [*captions, ["x"]])
    bus, zid, bad = results
    assert [r.frame_id for r in results] == ["ref-0", "ref-1", "ref-2"]
    for result, size, caps in ((bus, (810, 1080), captions[0]), (zid, (1280, 720), captions[1])):
        assert result.error is None and not result.fallback and result.captions == tuple(caps)
        assert result.image_size == size and len(result.boxes) == len(caps)
        for left, top, width, height in result.boxes:
            assert 0 <= left and 0 <= top and width >= 0 and height >= 0
            assert left + width <= size[0] + 1e-3 and top + height <= size[1] + 1e-3
        assert all(0.0 <= s <= 1.0 for s in result.scores)
        assert [row[0] for row in result.trace] == ["detect", "upscale", "score", "collect"]
    assert bad.error and "InputError" in bad.error and bad.fallback
    again = Reference(base).identify([ZIDANE, BUS], [captions[1], captions[0]])
    assert (again[0].boxes, again[1].boxes) == (zid.boxes, bus.boxes)
    assert (again[0].scores, again[1].scores) == (zid.scores, bus.scores)
