"""Trivial stages for transport tests (test code only, not part of the product)."""

from __future__ import annotations

import time

from spotline.common.envelope import Envelope
from spotline.stages.base import Routed, Stage


class PassThrough(Stage):
    """Reads the frames inbox and forwards every envelope unchanged to `score`."""

    name = "detect"
    delay_s = 0.0

    def process(self, batch: list[Envelope]) -> list[Routed]:
        if self.delay_s:
            time.sleep(self.delay_s)
        return [("score", env) for env in batch]


class SlowPassThrough(PassThrough):
    """Holds each batch for a long time: a worker to kill mid-batch."""

    delay_s = 30.0


class FailOnBoom(PassThrough):
    """Raises for any batch holding a frame captioned 'boom' (a model that raises)."""

    def process(self, batch: list[Envelope]) -> list[Routed]:
        if any("boom" in env.captions for env in batch):
            raise RuntimeError("model exploded")
        return super().process(batch)
