"""Logging set-up: one line per event, ``key=value`` context (stage, frame, entry) in each."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable
from typing import Any

FORMAT = "%(asctime)s %(levelname)s %(name)s pid=%(process)d %(message)s"


def setup_logging(level: str = "INFO") -> None:
    """Configure the root logger once per process (stderr)."""
    root = logging.getLogger()
    if getattr(root, "_spotline", False):
        root.setLevel(level.upper())
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root._spotline = True  # type: ignore[attr-defined]
    # Model libraries are chatty at INFO; keep their warnings.
    for name in ("ultralytics", "transformers", "urllib3", "httpx", "matplotlib", "PIL"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("YOLO_VERBOSE", "False")


class StageLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """A logger bound to a stage (and a consumer): every line starts ``stage=… consumer=…``,
    and a line about one message carries ``frame=… entry=…`` (see ``about``)."""

    def __init__(self, logger: logging.Logger, stage: str, consumer: str = "") -> None:
        super().__init__(logger, {"stage": stage, "consumer": consumer})
        self.prefix = f"stage={stage}" + (f" consumer={consumer}" if consumer else "")

    def process(self, msg: object, kwargs: Any) -> tuple[object, Any]:
        return f"{self.prefix} {msg}", kwargs


def about(frame: str | None, entry: str | None = None) -> str:
    """``frame=… entry=…``: the context of a log line about one message."""
    return f"frame={frame} entry={entry or '-'}"


def frame_list(frame_ids: Iterable[str], limit: int = 20) -> str:
    """The frames of a batch for a log line: ``frames=a,b,c`` (the first ``limit``)."""
    ids = list(frame_ids)
    more = f",…(+{len(ids) - limit})" if len(ids) > limit else ""
    return "frames=" + ",".join(ids[:limit]) + more
