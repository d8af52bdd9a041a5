"""The one settings object. Read once at start from ``SPOTLINE_*`` environment variables and an
optional TOML or YAML file (``SPOTLINE_CONFIG`` or ``--config``); this is the only module that
reads the environment. Unknown keys and invalid values are errors that name the key."""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .topology import STAGES

ENV_PREFIX = "SPOTLINE_"
CONFIG_ENV = "SPOTLINE_CONFIG"

BACKPRESSURE = ("block", "drop-oldest")
BACKENDS = ("auto", "torch", "onnx", "openvino")
PRECISIONS = ("auto", "fp32", "fp16", "int8")
THREAD_POLICIES = ("follow", "static")  # common/cores.py


@dataclass(frozen=True)
class Settings:
    """Every knob of spotline, with the seed method's defaults (shared/SEED-FACTS.md)."""

    # --- where things live
    redis_url: str = field(default="", metadata={"help": "Redis URL; empty: embedded server"})
    namespace: str = field(default="spotline", metadata={"help": "key prefix and Cluster hash tag"})
    data_dir: str = field(default=".spotline", metadata={"help": "embedded Redis, tiny models"})
    # --- model weights (local paths; empty: tiny random models under data_dir)
    detector_weights: str = field(default="", metadata={"help": "YOLO .pt or architecture .yaml"})
    upscaler_weights: str = field(default="", metadata={"help": "Real-ESRGAN .pth"})
    scorer_dir: str = field(default="", metadata={"help": "SigLIP/CLIP save_pretrained dir"})
    models: str = field(default="demo", metadata={
        "help": "with no weight paths set, every spotline command runs: demo (models/demo/, "
                "trained on synthetic shapes, with their settings) or tiny (random; tests)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N"})
    half: bool = field(default=True, metadata={"help": "fp16 on CUDA (ignored on CPU)"})
    torch_threads: int = field(default=0, metadata={
        "help": "threads per model worker; 0: auto (threads_policy decides, docs/performance.md)"})
    threads_policy: str = field(default="follow", metadata={
        "help": "with torch_threads 0: follow (before each batch, a stage takes the cores the "
                "idle stages leave: all when alone, its share when all are busy) or static "
                "(always its share)"})
    follow_copy_max_mb: int = field(default=0, metadata={
        "help": "threads_policy follow on an exported model: neither runtime changes a loaded "
                "model's threads, so each count is one more copy of its weights and buffers; "
                "exports up to this many MB keep one per count, larger ones stay one model "
                "(loaded again only for more threads); 0: no copies, each export on every core "
                "(faster under load on OpenVINO here, docs/performance.md)"})
    backend: str = field(default="auto", metadata={
        "help": "model runtime: auto (an export of the checkpoint when there is one: OpenVINO "
                "on x86 CPUs, else ONNX Runtime; torch when none), torch, onnx, openvino"})
    export_precision: str = field(default="auto", metadata={
        "help": "which export the onnx/openvino backends load: auto (per model, the fastest of "
                "the exports this CPU runs fast, fp16 as bf16 on AMX/AVX512_BF16 and int8 on "
                "VNNI/AMX, whose outputs stay within precision_max_drift of fp32's: measured "
                "once per machine, docs/performance.md), fp32, fp16, int8 (spotline export)"})
    export_precision_detector: str = field(default="", metadata={
        "help": "the detector's export precision (auto, fp32, fp16, int8); empty: "
                "export_precision"})
    export_precision_upscaler: str = field(default="", metadata={
        "help": "the upscaler's export precision (auto, fp32, fp16, int8); empty: "
                "export_precision"})
    export_precision_scorer: str = field(default="", metadata={
        "help": "SigLIP's export precision (auto, fp32, fp16, int8); empty: export_precision"})
    precision_max_drift: float = field(default=0.01, metadata={
        "help": "export_precision auto refuses a precision whose outputs on held-out inputs "
                "drift more than this from fp32's (1 - cosine)"})
    score_chunk: int = field(default=0, metadata={
        "help": "crops per SigLIP image-tower call (a batch's crops go through in chunks of "
                "this many): bounds its activation memory (SigLIP-large ~16 MiB per crop); 0: "
                "auto (on the CPU 2·384² input pixels per call: 2 crops for SigLIP-384, where "
                "larger chunks are no faster per crop, up to 64 for small inputs; 64 on a GPU)"})
    # --- detect (seed: predict(imgsz=1600, conf=0.1, iou=0.1, max_det=10, augment=True))
    imgsz: int = field(default=0, metadata={
        "help": "YOLO inference size; 0: follow the frame (its long side rounded up to the "
                "stride, 32, up to imgsz_cap; larger frames are tiled). The seed ran a fixed "
                "1600"})
    imgsz_scale: float = field(default=1.0, metadata={
        "help": "with imgsz 0: the detector runs at the frame's long side times this (the "
                "scale its training letterboxed images by: trained at imgsz T on frames of long "
                "side L, T/L), rounded up to the stride"})
    imgsz_cap: int = field(default=1600, metadata={
        "help": "with imgsz 0: the largest size the detector runs at; a frame whose long side "
                "is larger is cut into overlapping tiles of at most this size, merged by NMS"})
    tile_overlap: float = field(default=0.2, metadata={
        "help": "with imgsz 0: the least overlap of neighbouring tiles, as a share of the tile "
                "side (make it at least the largest object's size)"})
    conf: float = field(default=0.1, metadata={"help": "YOLO confidence threshold"})
    iou: float = field(default=0.1, metadata={"help": "YOLO NMS IoU threshold"})
    max_det: int = field(default=10, metadata={"help": "boxes per frame at most"})
    tta: bool = field(default=True, metadata={"help": "YOLO test-time augmentation"})
    warmup: int = field(default=3, metadata={"help": "warm-up predictions at start (seed: 3)"})
    crops_per_part: int = field(default=10, metadata={"help": "fan-out: crops per entry"})
    # --- upscale (realesr-general-x4v3, pre_pad 10 when both sides > 10 px else 1)
    upscale: bool = field(default=True, metadata={"help": "Real-ESRGAN stage on/off"})
    upscale_factor: int = field(default=4, metadata={"help": "Real-ESRGAN outscale"})
    pre_pad_large: int = field(default=10, metadata={"help": "pre_pad for larger crops"})
    pre_pad_small: int = field(default=1, metadata={"help": "pre_pad for small crops"})
    pre_pad_min_side: int = field(default=10, metadata={"help": "both sides > this: large"})
    upscale_skip_side: int = field(default=1, metadata={"help": "crops with a side <= this pass"})
    # --- score
    prompt: str = field(default="This is a photo of {caption}.",
                        metadata={"help": "SigLIP text prompt"})
    caption_cache_size: int = field(default=4096, metadata={"help": "cached text embeddings"})
    scorer_input_size: int = field(default=0, metadata={"help": "crop cap; 0: the processor's"})
    # --- collect
    fallback_box: tuple[int, int, int, int] = field(
        default=(0, 0, 0, 0), metadata={"help": "[l, t, w, h] when a frame has no box"})
    result_ttl_s: int = field(default=3600, metadata={"help": "life of result/join keys"})
    results_maxlen: int = field(default=10000, metadata={"help": "results stream cap (~)"})
    # --- track mode (video feeds; docs/architecture.md, "Tracks")
    tracking: bool = field(default=False, metadata={
        "help": "track mode: detect → track (ByteTrack, reuse, evidence) → collect"})
    track_keyframe_every: int = field(default=10, metadata={
        "help": "a track's crop is embedded again at least every this many frames"})
    track_min_iou: float = field(default=0.45, metadata={
        "help": "embed again when the box's IoU with the box last embedded is below this"})
    track_contend_margin: float = field(default=1.0, metadata={
        "help": "a moved or resized track's crop is embedded again only while the track "
                "contends for a caption: its posterior log-odds within this margin of the "
                "best track's, with another as close (keyframes and new tracks always are); "
                "negative: every moved crop is embedded again"})
    track_max_size_change: float = field(default=0.2, metadata={
        "help": "embed again when width or height changed by more than this share"})
    track_decay: float = field(default=0.7, metadata={
        "help": "evidence weight of a frame one frame later (decaying log-odds)"})
    track_margin: float = field(default=0.0, metadata={
        "help": "log-odds lead another track needs to take a caption"})
    track_switch_frames: int = field(default=1, metadata={
        "help": "consecutive frames of lead before a caption switches track"})
    track_hold: int = field(default=8, metadata={
        "help": "with \"not in view\" on: frames a caption answers no box while its track is "
                "lost and every track of the frame trails it by more than track_hold_margin "
                "(a hidden target, not a look-alike's box); 0: the best track takes over"})
    track_hold_margin: float = field(default=1.0, metadata={
        "help": "log-odds within which a track of the frame takes a caption whose track is "
                "lost (the object back under a new id)"})
    track_buffer: int = field(default=30, metadata={"help": "frames a lost track is kept"})
    track_detect_every: int = field(default=7, metadata={
        "help": "run the detector on every Nth frame of a source; between, boxes follow the "
                "tracks' Kalman prediction (1: every frame)"})
    track_settle: int = field(default=2, metadata={
        "help": "with track_detect_every > 1: detect every frame while a track has fewer "
                "detections than this"})
    track_redetect_motion: float = field(default=0.25, metadata={
        "help": "with track_detect_every > 1: detect when a track would have moved more than "
                "this share of its smaller side since its last detection (0: never)"})
    track_match: float = field(default=0.75, metadata={
        "help": "with track_detect_every > 1: between detections, find each track by its look "
                "(template similarity, 1 - RMS difference / 255, at least this; else detect the "
                "frame; 0: the Kalman prediction alone)"})
    track_reorder_ms: int = field(default=200, metadata={
        "help": "wait this long for a source's missing earlier frame before going on"})
    track_state_ttl_s: int = field(default=3600, metadata={
        "help": "life of a source's tracking state and cached embeddings in Redis"})
    track_cache_tracks: int = field(default=256, metadata={
        "help": "cached track embeddings per source at most"})
    ask_memory: bool = field(default=True, metadata={
        "help": "track mode: keep each source's tracks (embeddings, boxes) in Redis for "
                "`spotline ask` (docs/ask.md)"})
    ask_retention_min: float = field(default=30.0, metadata={
        "help": "ask: minutes of a source's past kept (older frames dropped first)"})
    ask_max_bytes_per_source: int = field(default=8 * 1024 * 1024, metadata={
        "help": "ask: bytes of memory per source at most (oldest frames dropped first)"})
    ask_precision: str = field(default="int8", metadata={
        "help": "ask: stored embeddings as int8 (with a per-vector scale) or float16"})
    ask_embed_every_s: float = field(default=1.0, metadata={
        "help": "ask: keep a track's embedding at most this often (seconds; 0: every one)"})
    joint_assign: bool = field(default=True, metadata={
        "help": "track mode: one box per caption (Hungarian) when a frame has several"})
    not_in_view: str = field(default="auto", metadata={
        "help": "track mode: no box (bbox null) for a caption probably not in the frame, from "
                "the calibration.json beside the scorer (`spotline eval DATA --calibrate`; the "
                "demo scorer ships one): auto (when the scorer has one with a threshold), true "
                "(the track stage refuses to start without one), false (always a box)"})
    not_in_view_threshold: float = field(default=0.0, metadata={
        "help": "with not_in_view: abstain under this probability of being in view; 0: the "
                "threshold fitted with the calibration (track mode: the one it fitted on "
                "clips, where it has one)"})
    # --- batching (dynamic: max entries or max wait, whichever first)
    batch_detect: int = field(default=4, metadata={"help": "max frames per YOLO call"})
    batch_upscale: int = field(default=8, metadata={"help": "max entries per upscale batch"})
    batch_score: int = field(default=8, metadata={"help": "max entries per SigLIP batch"})
    batch_collect: int = field(default=64, metadata={"help": "max entries per collect batch"})
    batch_track: int = field(default=8, metadata={"help": "max frames per track batch"})
    max_wait_ms: int = field(default=0, metadata={
        "help": "wait to fill a batch; 0: take what is queued (batches fill under load)"})
    # --- delivery
    visibility_timeout_ms: int = field(default=60000,
                                       metadata={"help": "pending this long: reclaimed"})
    max_deliveries: int = field(default=3, metadata={"help": "more: dead-lettered"})
    block_ms: int = field(default=1000, metadata={"help": "XREADGROUP block when idle"})
    reconnect_max_s: float = field(default=30.0, metadata={"help": "give up after this long"})
    dead_maxlen: int = field(default=100000, metadata={"help": "dead-letter stream cap (~)"})
    # --- producers
    backpressure: str = field(default="block", metadata={"help": "block or drop-oldest"})
    high_water: int = field(default=200, metadata={"help": "inbox backlog that triggers it"})
    # --- feeds added over HTTP (POST /sources; producer/feedpolicy.py). The CLI is not bound.
    feed_roots: str = field(default="", metadata={
        "help": "folders whose files feeds added over HTTP may read, comma-separated (checked "
                "after resolving symlinks and ..); empty: no local paths over HTTP"})
    feed_schemes: str = field(default="rtsp,rtsps,http,https", metadata={
        "help": "URL schemes feeds added over HTTP may use, comma-separated"})
    feed_allow_private: bool = field(default=False, metadata={
        "help": "feeds added over HTTP may reach loopback, link-local, private, multicast and "
                "reserved addresses (every address the host name resolves to is checked, again "
                "before each connection)"})
    feed_allow_cameras: bool = field(default=False, metadata={
        "help": "feeds added over HTTP may open the host's cameras (an index such as 0, or "
                "/dev/video*)"})
    max_feeds: int = field(default=64, metadata={
        "help": "feeds the registry holds at most when one is added over HTTP (a supervisor "
                "thread each)"})
    feed_max_spec_chars: int = field(default=2048, metadata={
        "help": "characters of a feed's spec (URL or path) added over HTTP"})
    # --- limits (checked at the producer/gateway and again at detect)
    max_frame_bytes: int = field(default=25 * 1024 * 1024, metadata={"help": "encoded frame"})
    max_pixels: int = field(default=50_000_000, metadata={"help": "width × height"})
    max_captions: int = field(default=32, metadata={"help": "captions per frame"})
    max_caption_chars: int = field(default=512, metadata={"help": "characters per caption"})
    meta_max_bytes: int = field(default=4096, metadata={
        "help": "a frame's meta (a JSON object given at publish time, returned on its result) "
                "at most, as compact UTF-8 JSON"})
    # --- surfaces
    http_host: str = field(default="127.0.0.1", metadata={
        "help": "gateway bind address; another than loopback needs API keys (or "
                "insecure_open_gateway)"})
    http_port: int = field(default=5004, metadata={"help": "gateway port (seed: 5004)"})
    metrics_port: int = field(default=0, metadata={"help": "base /metrics port; 0: off"})
    metrics_host: str = field(default="127.0.0.1", metadata={
        "help": "/metrics bind address (workers, gateway, sinks): loopback unless set; "
                "containers set 0.0.0.0 for Prometheus (docs/security.md)"})
    slo_end_to_end_s: float = field(default=5.0, metadata={
        "help": "end-to-end objective: alert SpotlineEndToEndSlow fires when capture-to-result "
                "p95 stays above it (exported as spotline_end_to_end_objective_seconds; "
                "docs/metrics.md)"})
    log_level: str = field(default="INFO", metadata={"help": "DEBUG, INFO, WARNING, ERROR"})
    # --- gateway access (producer/access.py)
    api_keys: str = field(default="", metadata={
        "help": "gateway API keys, comma-separated: KEY (scopes identify+read) or "
                "KEY:SCOPE+SCOPE (identify, read, admin); none here or in api_keys_file: an "
                "open gateway (loopback only, docs/security.md)"})
    api_keys_file: str = field(default="", metadata={
        "help": "file of gateway API keys, one a line as in api_keys (# comments); re-read "
                "when it changes; empty or gone: nobody gets in"})
    rate_limit: float = field(default=0.0, metadata={
        "help": "gateway tokens/s per API key (token bucket in Redis): a token a request, on "
                "/identify a token a distinct image; 0: off"})
    rate_burst: int = field(default=20, metadata={"help": "requests a key may send at once"})
    insecure_open_gateway: bool = field(default=False, metadata={
        "help": "let `spotline serve` run with no API keys on an address other than loopback "
                "(anyone who reaches it may use every route; said at start and on /health)"})
    allowed_hosts: str = field(default="", metadata={
        "help": "Host header names the gateway answers, comma-separated (DNS rebinding guard); "
                "empty: localhost, 127.0.0.1, [::1] and the bind address; *: any"})
    max_request_bytes: int = field(default=65536, metadata={
        "help": "gateway body limit of every route but /identify (whose limit is "
                "2 x max_frame_bytes + 1 MiB); refused before it is read"})
    identify_max_instances: int = field(default=64, metadata={
        "help": "instances per POST /identify at most"})
    identify_max_images: int = field(default=16, metadata={
        "help": "distinct images (frames) per POST /identify at most"})
    auth_fail_per_minute: float = field(default=10.0, metadata={
        "help": "failed gateway authentications per client address per minute (burst as "
                "many) before 429; independent of rate_limit; 0: off"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "not_in_view", _tristate("not_in_view", self.not_in_view))
        _validate(self)
        _validate_tracking(self)

    def precision_for(self, model: str) -> str:
        """The export precision of one model (detector, upscaler, scorer): its own setting,
        else export_precision."""
        return str(getattr(self, f"export_precision_{model}") or self.export_precision)

    def batch_for(self, stage: str) -> int:
        """The max batch of one stage."""
        return int(getattr(self, f"batch_{stage}"))

    def replace(self, **changes: Any) -> Settings:
        """A copy with some values changed (validated like the original)."""
        return dataclasses.replace(self, **changes)


def _validate_tracking(s: Settings) -> None:
    for key in ("track_keyframe_every", "track_switch_frames", "track_buffer", "track_detect_every",
                "track_state_ttl_s", "track_cache_tracks", "batch_track"):
        if getattr(s, key) <= 0:
            raise ConfigError(f"{key} must be > 0, got {getattr(s, key)!r}")
    for key in ("track_min_iou", "not_in_view_threshold", "track_match"):
        if not 0.0 <= getattr(s, key) <= 1.0:
            raise ConfigError(f"{key} must be in [0, 1], got {getattr(s, key)!r}")
    if not 0.0 < s.track_decay <= 1.0:
        raise ConfigError(f"track_decay must be in (0, 1], got {s.track_decay!r}")
    if s.track_settle < 0 or s.track_redetect_motion < 0:
        raise ConfigError("track_settle and track_redetect_motion must be >= 0, got "
                          f"{s.track_settle!r} and {s.track_redetect_motion!r}")
    for key in ("track_margin", "track_max_size_change", "track_reorder_ms", "track_hold",
                "track_hold_margin"):
        if getattr(s, key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {getattr(s, key)!r}")
    if s.ask_retention_min <= 0 or s.ask_max_bytes_per_source <= 0 or s.ask_embed_every_s < 0:
        raise ConfigError("ask_retention_min and ask_max_bytes_per_source must be > 0 and "
                          "ask_embed_every_s >= 0")
    if s.ask_precision not in ("int8", "float16"):
        raise ConfigError(f"ask_precision must be int8 or float16, got {s.ask_precision!r}")


def _validate_choices(s: Settings) -> None:
    """The settings that name one of a few choices."""
    if s.models not in ("demo", "tiny"):
        raise ConfigError(f"models must be demo or tiny, got {s.models!r}")
    if s.backpressure not in BACKPRESSURE:
        raise ConfigError(f"backpressure must be one of {BACKPRESSURE}, got {s.backpressure!r}")
    if s.threads_policy not in THREAD_POLICIES:
        raise ConfigError(f"threads_policy must be one of {THREAD_POLICIES}, got "
                          f"{s.threads_policy!r}")
    if s.score_chunk < 0:
        raise ConfigError(f"score_chunk must be >= 0, got {s.score_chunk}")
    if s.follow_copy_max_mb < 0:
        raise ConfigError(f"follow_copy_max_mb must be >= 0, got {s.follow_copy_max_mb}")
    if s.backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {BACKENDS}, got {s.backend!r}")
    if s.export_precision not in PRECISIONS:
        raise ConfigError(f"export_precision must be one of {PRECISIONS}, got "
                          f"{s.export_precision!r}")
    for model in ("detector", "upscaler", "scorer"):
        value = getattr(s, f"export_precision_{model}")
        if value and value not in PRECISIONS:
            raise ConfigError(f"export_precision_{model} must be empty or one of "
                              f"{PRECISIONS}, got {value!r}")


def _validate_detect(s: Settings) -> None:
    if not 0.0 <= s.tile_overlap < 0.9:
        raise ConfigError(f"tile_overlap must be in [0, 0.9), got {s.tile_overlap!r}")
    if not 0.25 <= s.imgsz_scale <= 4.0:
        raise ConfigError(f"imgsz_scale must be in [0.25, 4], got {s.imgsz_scale!r}")


def _validate(s: Settings) -> None:
    positive = ("imgsz_cap", "max_det", "crops_per_part", "upscale_factor",
                "caption_cache_size",
                "result_ttl_s", "results_maxlen", "visibility_timeout_ms", "max_deliveries",
                "block_ms", "dead_maxlen", "high_water", "max_frame_bytes", "max_pixels",
                "max_captions", "max_caption_chars", "meta_max_bytes", "rate_burst", "max_feeds",
                "feed_max_spec_chars", "max_request_bytes",
                "identify_max_instances", "identify_max_images", "slo_end_to_end_s",
                *(f"batch_{st}" for st in STAGES))
    for key in positive:
        if getattr(s, key) <= 0:
            raise ConfigError(f"{key} must be > 0, got {getattr(s, key)!r}")
    for key in ("conf", "iou", "precision_max_drift"):
        if not 0.0 <= getattr(s, key) <= 1.0:
            raise ConfigError(f"{key} must be in [0, 1], got {getattr(s, key)!r}")
    _validate_detect(s)
    for key in ("imgsz", "max_wait_ms", "warmup", "torch_threads", "metrics_port",
                "scorer_input_size",
                "pre_pad_large", "pre_pad_small", "pre_pad_min_side", "upscale_skip_side",
                "rate_limit", "auth_fail_per_minute"):
        if getattr(s, key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {getattr(s, key)!r}")
    _validate_choices(s)
    if "{caption}" not in s.prompt:
        raise ConfigError("prompt must contain '{caption}'")
    if not s.namespace or any(c in s.namespace for c in "{}: "):
        raise ConfigError(f"namespace must be non-empty without braces, colons or spaces: "
                          f"{s.namespace!r}")
    if not (s.device in ("auto", "cpu", "cuda", "mps") or s.device.startswith("cuda:")):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {s.device!r}")
    if len(s.fallback_box) != 4:
        raise ConfigError("fallback_box must have 4 numbers [left, top, width, height]")


_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}
_HINTS = typing.get_type_hints(Settings)


def _coerce(key: str, value: Any) -> Any:
    """Turn a string (env) or file value into the field's type; errors name the key."""
    if key == "not_in_view":
        return _tristate(key, value)
    hint = _HINTS[key]
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"not a boolean: {value!r}")
        if hint is int:
            if isinstance(value, bool):
                raise ValueError("a boolean is not an integer")
            return int(value)
        if hint is float:
            return float(value)
        if hint is str:
            if not isinstance(value, str):
                raise ValueError(f"expected a string, got {type(value).__name__}")
            return value
        # tuple[int, int, int, int]
        items = value.split(",") if isinstance(value, str) else list(value)
        return tuple(int(float(v)) for v in items)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid value for {key}: {value!r} ({exc})") from None


def _tristate(key: str, value: Any) -> str:
    """auto, true or false, from those words, a boolean or its other words (1, yes, on...)."""
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return "true"
    if text in ("0", "false", "no", "off"):
        return "false"
    if text != "auto":
        raise ConfigError(f"{key} must be auto, true or false, got {value!r}")
    return text


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a table of settings")
    return data


def load_settings(
    env: Mapping[str, str] | None = None,
    config_file: str | Path | None = None,
    **overrides: Any,
) -> Settings:
    """Build the settings: defaults < config file < SPOTLINE_* env < explicit overrides."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    path = config_file or env.get(CONFIG_ENV)
    if path:
        for key, value in _read_file(Path(path)).items():
            if key not in _FIELDS:
                raise ConfigError(f"unknown setting {key!r} in {path}")
            values[key] = _coerce(key, value)
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name == CONFIG_ENV:
            continue
        key = name[len(ENV_PREFIX):].lower()
        if key not in _FIELDS:
            raise ConfigError(f"unknown setting {name} (no such key {key!r})")
        values[key] = _coerce(key, value)
    for key, value in overrides.items():
        if key not in _FIELDS:
            raise ConfigError(f"unknown setting {key!r}")
        if value is not None:
            values[key] = _coerce(key, value)
    return Settings(**values)


def settings_env(settings: Settings) -> dict[str, str]:
    """The SPOTLINE_* variables that reproduce these settings in a child process."""
    out: dict[str, str] = {}
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if value == f.default:
            continue
        if isinstance(value, tuple):
            value = ",".join(str(v) for v in value)
        out[ENV_PREFIX + f.name.upper()] = str(value)
    return out


def describe() -> list[tuple[str, str, str]]:
    """(key, default, help) for every setting: the docs table and `spotline config`."""
    rows = []
    for f in dataclasses.fields(Settings):
        rows.append((f.name, repr(f.default), f.metadata.get("help", "")))
    return rows


# --- `spotline config`: where each value came from, and values fit to print -------------------
SECRET_WORDS = ("password", "secret", "token", "api_key", "credential")


def origins(env: Mapping[str, str] | None = None, config_file: str | Path | None = None,
            **overrides: Any) -> dict[str, str]:
    """Where ``load_settings`` (same arguments) takes each value from, later ones winning:
    ``default``, ``file PATH`` (the settings file), ``env SPOTLINE_<KEY>``, or ``option``."""
    env = os.environ if env is None else env
    out = {name: "default" for name in _FIELDS}
    path = config_file or env.get(CONFIG_ENV)
    if path:
        for key in _read_file(Path(path)):
            if key in out:
                out[key] = f"file {Path(path).resolve()}"
    for name in env:
        key = name[len(ENV_PREFIX):].lower()
        if name.startswith(ENV_PREFIX) and name != CONFIG_ENV and key in out:
            out[key] = f"env {name}"
    for key, value in overrides.items():
        if key in out and value is not None:
            out[key] = f"option --{key.replace('_', '-')}"
    return out


def shown(key: str, value: Any) -> Any:
    """A setting's value fit to print: a secret's (api keys, passwords, tokens) masked, and in
    any text the passwords and secret query values of URLs (``redis://:***@host``)."""
    from .redact import MASK, redact

    if not isinstance(value, str) or not value:
        return value
    if any(word in key for word in SECRET_WORDS) and not key.endswith(("_file", "_dir")):
        return MASK
    return redact(value)
