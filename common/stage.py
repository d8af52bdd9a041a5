"""The one stage contract: set up once, then turn a batch of decoded envelopes into outputs.

Stages (stages/) do model work only; reading, acking, claiming, retries and metrics live in
common/, which drives any Stage through this contract.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from .envelope import Envelope, Result
from .settings import Settings
from .topology import RESULT

__all__ = ["RESULT", "Routed", "Stage"]

# Where an output goes: the next stage (topology.next_stage), or RESULT for a finished frame
# (the collector only).
Routed = tuple[str, Envelope | Result]


class Stage(ABC):
    """A pipeline stage. ``name`` is the stage whose inbox it reads."""

    name: ClassVar[str]
    model_name: str = ""
    device_name: str = "cpu"
    # Each model's precision and why (stages/backends/precision.py's Choice: model, precision,
    # reason), set by setup; the worker exports them as spotline_model_precision.
    precision_choices: tuple[Any, ...] = ()
    # The worker's metrics (common/metrics.py), set by the worker: a stage may count what
    # only it knows (the track stage's tracks and reuse). None when run without a worker.
    metrics: Any = None

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def setup(self) -> None:  # noqa: B027 - optional hook
        """Load models and warm up; called once before the first batch."""

    def use_threads(self, threads: int) -> int | None:
        """Run the next batch's model on ``threads`` intra-op threads (common/cores.py: the
        worker decides before each batch); returns the count the model runs on, which an
        export loaded once keeps whatever is asked (None: as asked). Stages that run no model
        ignore it."""
        return None

    @abstractmethod
    def process(self, batch: list[Envelope]) -> list[Routed]:
        """Model work on a batch of envelopes; returns routed outputs (any number per input).

        Raising fails the whole batch: the worker then retries item by item, and an item that
        fails alone is answered with an error result.
        """
