"""upscale: Real-ESRGAN (SRVGGNetCompact x4v3, or RRDBNet x4plus) on every crop, then cap each
crop at the scorer's input size so entries stay bounded."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..common.envelope import Envelope
from ..common.errors import ModelError
from ..common.images import cap_crop, swap_rb
from ..common.settings import Settings
from ..common.topology import next_stage
from . import backends, runtime
from .base import Routed, Stage, check_crops
from .libs import torchvision_shim


class Upscale(Stage):
    """Super-resolves crops with the seed's pre_pad rule; tiny crops pass through."""

    name = "upscale"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.upsampler: Any = None
        self.crop_cap = 0

    def setup(self) -> None:
        """Load the Real-ESRGAN weights (architecture inferred from the state dict), or their
        export (settings ``backend``: no torch then)."""
        paths = runtime.resolve_weights(self.settings, ("upscaler",))
        backend, choice = backends.precision.choose(
            "upscaler", self.settings, paths.upscaler,
            runtime.export_threads(self.settings, self.name))
        precision, self.precision_choices = choice.precision, (choice,)
        if backend == "torch":
            device = runtime.resolve_device(self.settings)
            runtime.set_threads(self.settings, self.name)
            self.upsampler = load_upscaler(paths.upscaler, device,
                                           runtime.use_half(self.settings, device))
            self.model_name = paths.upscaler.name
            self.device_name = device
        else:
            self.upsampler = backends.load_upscaler(
                paths.upscaler, backend, precision,
                runtime.export_threads(self.settings, self.name), self.settings.device)
            self.model_name = f"{paths.upscaler.name} ({backend} {precision})"
            self.device_name = self.upsampler.engine.provider
        self.crop_cap = runtime.scorer_input_size(self.settings, paths.scorer)

    def use_threads(self, threads: int) -> int:
        """The next crops on ``threads`` threads (the export's engine, or torch)."""
        exported = isinstance(self.upsampler, backends.ExportedUpscaler)
        return runtime.apply_threads(threads, [self.upsampler.engine] if exported else [],
                                     self.settings.follow_copy_max_mb)

    def process(self, batch: list[Envelope]) -> list[Routed]:
        """Upscale every crop of every envelope; route each envelope onward."""
        if self.upsampler is None:
            self.setup()
        for env in batch:
            check_crops(env)
        out: list[Routed] = []
        for env in batch:
            crops = tuple(cap_crop(upscale_crop(self.upsampler, crop, self.settings),
                                          self.crop_cap) for crop in env.crops)
            out.append((next_stage(self.name, self.settings), env.replace(crops=crops)))
        return out


def pre_pad_for(crop: np.ndarray, settings: Settings) -> int:
    """The seed's rule: pre_pad_large when both sides > pre_pad_min_side, else pre_pad_small
    (never as large as a side, which reflect padding cannot do)."""
    h, w = crop.shape[:2]
    large = h > settings.pre_pad_min_side and w > settings.pre_pad_min_side
    pad = settings.pre_pad_large if large else settings.pre_pad_small
    return max(0, min(pad, h - 1, w - 1))


def upscale_crop(upsampler: Any, crop: np.ndarray, settings: Settings) -> np.ndarray:
    """One RGB crop upscaled by ``upscale_factor`` (RGB in, RGB out; enhance works in BGR)."""
    if min(crop.shape[:2]) <= settings.upscale_skip_side:
        return crop
    if isinstance(upsampler, backends.ExportedUpscaler):  # RGB in, RGB out
        return upsampler.enhance(crop, pre_pad_for(crop, settings), settings.upscale_factor)
    upsampler.pre_pad = pre_pad_for(crop, settings)
    out, _mode = upsampler.enhance(swap_rb(crop), outscale=settings.upscale_factor)
    return swap_rb(out)


def load_upscaler(path: Path | str, device: str = "cpu", half: bool = False) -> Any:
    """A RealESRGANer for a .pth whose architecture is read from its state dict."""
    import torch

    torchvision_shim()
    from realesrgan import RealESRGANer

    path = Path(path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any load failure is a ModelError
        raise ModelError(f"cannot load upscaler {path}: {type(exc).__name__}: {exc}") from exc
    net, scale = build_upscaler_net(_state_dict(loaded, path))
    return RealESRGANer(scale=scale, model_path=str(path), model=net, tile=0, pre_pad=0,
                        half=half, device=torch.device(device))


def _state_dict(loaded: Any, path: Path) -> dict[str, Any]:
    if isinstance(loaded, dict):
        for key in ("params_ema", "params"):
            if isinstance(loaded.get(key), dict):
                return loaded[key]
    raise ModelError(f"{path} is not a Real-ESRGAN checkpoint (no 'params' or 'params_ema')")


def build_upscaler_net(state: dict[str, Any]) -> tuple[Any, int]:
    """(network, scale) for an SRVGGNetCompact or RRDBNet state dict."""
    if "conv_first.weight" in state:
        return _rrdbnet(state)
    if "body.0.weight" in state:
        return _srvgg(state)
    raise ModelError("unknown Real-ESRGAN architecture (neither SRVGGNetCompact nor RRDBNet)")


def _srvgg(state: dict[str, Any]) -> tuple[Any, int]:
    from realesrgan.archs.srvgg_arch import SRVGGNetCompact

    convs = sorted(int(m.group(1)) for k in state
                   if (m := re.fullmatch(r"body\.(\d+)\.weight", k)) and state[k].ndim == 4)
    in_ch = int(state["body.0.weight"].shape[1])
    out = int(state[f"body.{convs[-1]}.weight"].shape[0])
    scale = math.isqrt(out // in_ch)
    act = "prelu" if "body.1.weight" in state else "leakyrelu"
    net = SRVGGNetCompact(num_in_ch=in_ch, num_out_ch=in_ch,
                          num_feat=int(state["body.0.weight"].shape[0]),
                          num_conv=len(convs) - 2, upscale=scale, act_type=act)
    return net, scale


def _rrdbnet(state: dict[str, Any]) -> tuple[Any, int]:
    from basicsr.archs.rrdbnet_arch import RRDBNet

    first_in = int(state["conv_first.weight"].shape[1])
    out_ch = int(state["conv_last.weight"].shape[0])
    scale = {out_ch * 16: 1, out_ch * 4: 2}.get(first_in, 4)
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"body\.(\d+)\.rdb1", k))}
    net = RRDBNet(num_in_ch=out_ch, num_out_ch=out_ch,
                  num_feat=int(state["conv_first.weight"].shape[0]), num_block=len(blocks),
                  num_grow_ch=int(state["body.0.rdb1.conv1.weight"].shape[0]), scale=scale)
    return net, scale
