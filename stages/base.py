"""The stage contract (common/stage.py) and the checks every crop-reading stage shares."""

from __future__ import annotations

import numpy as np

from ..common.envelope import Envelope
from ..common.errors import InputError
from ..common.stage import RESULT, Routed, Stage

__all__ = ["RESULT", "Routed", "Stage", "check_crops"]


def check_crops(env: Envelope) -> None:
    """Refuse crops a model cannot take (upscale and score read crops that detect cut, but
    anything may write to their inboxes): InputError names the frame, the crop and why."""
    if env.boxes is not None and len(env.boxes) != len(env.crops):
        raise InputError(f"frame {env.frame_id}: {len(env.crops)} crops for "
                         f"{len(env.boxes)} boxes")
    for i, crop in enumerate(env.crops):
        if crop.ndim != 3 or crop.shape[2] != 3 or crop.dtype != np.uint8:
            raise InputError(f"frame {env.frame_id}: crop {i} is {crop.dtype} of shape "
                             f"{crop.shape}, not uint8 H×W×3")
        if min(crop.shape[:2]) == 0:
            raise InputError(f"frame {env.frame_id}: crop {i} has a zero-size side "
                             f"({crop.shape[1]}x{crop.shape[0]} px)")
