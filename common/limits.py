"""Caption limits, one implementation for every place that checks them: producers and the
gateway before a frame enters the pipeline, and the detect stage again for entries that some
other writer put on the frames stream (settings ``max_captions`` and ``max_caption_chars``)."""

from __future__ import annotations

from typing import Any

from .errors import InputError
from .settings import Settings


def check_captions(captions: Any, settings: Settings) -> None:
    """Raise InputError unless captions is a non-empty list of usable strings within the limits."""
    if isinstance(captions, str | bytes):
        raise InputError("captions must be a list of strings, not a single string")
    if not captions:
        raise InputError("no captions")
    if len(captions) > settings.max_captions:
        raise InputError(f"too many captions: {len(captions)} > {settings.max_captions}")
    for i, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise InputError(f"caption {i} is not a string: {type(caption).__name__}")
        if not caption.strip():
            raise InputError(f"caption {i} is empty")
        if len(caption) > settings.max_caption_chars:
            raise InputError(f"caption {i} is too long: {len(caption)} > "
                             f"{settings.max_caption_chars} characters")
        try:
            caption.encode("utf-8")
        except UnicodeEncodeError:
            raise InputError(f"caption {i} is not valid Unicode text") from None
