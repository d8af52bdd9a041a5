"""The one stage contract: set up once, then turn a batch of decoded envelopes into outputs.

Stages do model work only; reading, acking, claiming, retries and metrics live in common/.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np
from spotline.common.envelope import Envelope, Result
from spotline.common.errors import InputError
from spotline.common.settings import Settings

# Where an output goes: the name of the next stage ("upscale", "score", "collect"), or
# RESULT for a finished frame (collect only).
RESULT = "result"
Routed = tuple[str, Envelope | Result]


class Stage(ABC):
    """A pipeline stage. ``name`` is the stage whose inbox it reads."""

    name: ClassVar[str]
    model_name: str = ""
    device_name: str = "cpu"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def setup(self) -> None:  # noqa: B027 - optional hook
        """Load models and warm up; called once before the first batch."""

    @abstractmethod
    def process(self, batch: list[Envelope]) -> list[Routed]:
        """Model work on a batch of envelopes; returns routed outputs (any number per input).

        Raising fails the whole batch: the worker then retries item by item, and an item that
        fails alone is answered with an error result.
        """


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
