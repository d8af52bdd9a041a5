"""Logging set-up: one line per event, ``key=value`` context (stage, frame, entry) in each."""

from __future__ import annotations

import logging
import os
import sys

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
