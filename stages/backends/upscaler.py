"""Real-ESRGAN exported with dynamic height and width, run as RealESRGANer.enhance does it (no
tiling): reflect pre-pad bottom/right, mod-pad for ×1/×2 models, the network, the pads cut off,
clip to [0, 1], round to uint8, and a Lanczos resize when ``outscale`` is not the net's scale."""

from __future__ import annotations

import numpy as np

from .engine import Engine


class ExportedUpscaler:
    """Upscales RGB uint8 crops (the network works in RGB, as RealESRGANer feeds it)."""

    def __init__(self, engine: Engine, scale: int) -> None:
        self.engine = engine
        self.scale = int(scale)
        self.input = engine.input_names[0]
        self.mod_scale = {2: 2, 1: 4}.get(self.scale)

    def enhance(self, rgb: np.ndarray, pre_pad: int, outscale: float) -> np.ndarray:
        """One RGB uint8 crop upscaled by ``outscale``."""
        import cv2

        h_in, w_in = rgb.shape[:2]
        x = (rgb.astype(np.float32) / 255.0).transpose(2, 0, 1)[None]
        if pre_pad:
            x = np.pad(x, ((0, 0), (0, 0), (0, pre_pad), (0, pre_pad)), mode="reflect")
        mod_h = mod_w = 0
        if self.mod_scale:
            mod_h = -x.shape[2] % self.mod_scale
            mod_w = -x.shape[3] % self.mod_scale
            x = np.pad(x, ((0, 0), (0, 0), (0, mod_h), (0, mod_w)), mode="reflect")
        out = self.engine.run({self.input: np.ascontiguousarray(x, np.float32)})[0][0]
        cut_h = (mod_h + pre_pad) * self.scale
        cut_w = (mod_w + pre_pad) * self.scale
        out = out[:, :out.shape[1] - cut_h, :out.shape[2] - cut_w]
        image = (np.clip(out, 0, 1).transpose(1, 2, 0) * 255.0).round().astype(np.uint8)
        if outscale != float(self.scale):
            image = cv2.resize(image, (int(w_in * outscale), int(h_in * outscale)),
                               interpolation=cv2.INTER_LANCZOS4)
        return np.ascontiguousarray(image)
