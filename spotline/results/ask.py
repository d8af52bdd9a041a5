"""Ask the past (docs/ask.md): a caption asked now, answered over sources' last minutes from
the memory the track stage keeps (common/trackmemory.py, stages/memory.py).

``Asker`` holds the scorer's text tower (the score stage's own code: one text-tower pass per
new caption, cached) and its calibration, and answers for one source, several, or every
source with a memory. `spotline ask` and the gateway's ``GET /ask`` and
``GET /sources/{id}/ask`` (producer/ask_http.py) use it.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from spotline.common.errors import ConfigError
from spotline.common.settings import Settings
from spotline.common.trackmemory import MemoryStore
from spotline.common.transport import Transport
from spotline.stages import memory

SINCE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|min|h)?\s*$")
UNITS = {None: 60.0, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_since(text: str | float | None, default_s: float = 600.0) -> float:
    """A window's length in seconds from '90s', '10m', '1h' or a number of minutes."""
    if text is None or text == "":
        return default_s
    if isinstance(text, int | float):
        seconds = float(text) * 60.0
    else:
        m = SINCE.match(text)
        if m is None:
            raise ConfigError(f"since {text[:40]!r}: a duration such as 90s, 10m or 1h")
        seconds = float(m.group(1)) * UNITS[m.group(2)]
    if not seconds > 0:
        raise ConfigError("since must be more than 0")
    return seconds


class Asker:
    """Answers captions over the memory; the scorer is loaded on the first question."""

    def __init__(self, settings: Settings, transport: Transport | None = None,
                 scorer: memory.Scorer | None = None, calibration: Any = None,
                 threshold: float | None = None) -> None:
        self.settings = settings
        self.store = MemoryStore.for_settings(settings, transport or Transport(settings))
        self._scorer = scorer
        self.calibration = calibration
        self.threshold = threshold
        self._lock = threading.Lock()

    def _load(self) -> memory.Scorer:
        with self._lock:
            if self._scorer is None:
                from spotline.stages import runtime
                from spotline.stages.score import Score
                from spotline.stages.tracking import calibration

                score = Score(self.settings.replace(tracking=False))
                score.setup()

                def scorer(caption: str, embeds: np.ndarray) -> np.ndarray:
                    return score.scores_for((caption,), embeds)[0]

                scorer_dir = runtime.resolve_weights(self.settings).scorer
                self.calibration = calibration.load(scorer_dir)
                self.threshold = calibration.abstain_threshold(
                    self.settings.replace(not_in_view="auto")
                    if self.settings.not_in_view == "false" else self.settings,
                    self.calibration)
                self._scorer = scorer
            return self._scorer

    def sources(self) -> list[str]:
        return self.store.sources()

    def ask(self, caption: str, sources: Sequence[str] | None = None, since_s: float = 600.0,
            limit: int = 5, now: float | None = None) -> memory.Answer:
        """The tracks of ``sources`` (every source with a memory when None) seen in the last
        ``since_s`` seconds that match ``caption``, best first."""
        caption = caption.strip()
        if not caption:
            raise ConfigError("a caption is required")
        scorer = self._load()
        start = (time.time() if now is None else now) - since_s
        names = list(sources) if sources is not None else self.store.sources()
        windows = [memory.window(s, self.store.since(s, start)) for s in names]
        return memory.answer(caption, windows, scorer, self.calibration, self.threshold,
                             since=start, limit=limit)

    def __call__(self, caption: str, sources: Sequence[str] | None, since_s: float,
                 limit: int = 5) -> dict[str, Any]:
        """The answer as JSON (the gateway's hook)."""
        return self.ask(caption, sources, since_s, limit).as_json()


def render(answer: memory.Answer) -> str:
    """The answer for a terminal."""
    if not answer.seen:
        searched = sum(v["tracks"] for v in answer.searched.values())
        return (f"{answer.caption!r}: not seen ({searched} track(s) of "
                f"{len(answer.searched)} source(s) searched)")
    lines = [f"{answer.caption!r}: {len(answer.matches)} track(s), best first"]
    for m in answer.matches:
        first = time.strftime("%H:%M:%S", time.localtime(m.first_seen))
        last = time.strftime("%H:%M:%S", time.localtime(m.last_seen))
        box = m.boxes[-1][2:] if m.boxes else []
        prob = "n/a" if np.isnan(m.probability) else f"{m.probability:.2f}"
        lines.append(f"  {m.source_id} track {m.track_id}: p={prob} seen {first}-{last}, "
                     f"{len(m.boxes)} box(es), last at {box}")
    return "\n".join(lines)
