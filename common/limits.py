"""The limits a frame must pass, one implementation for every place that checks them:
producers and the gateway before a frame enters the pipeline (``check_frame``,
``validate_frame``), and the detect stage again for entries that some other writer put on the
frames stream (``check_captions``; settings ``max_captions``, ``max_caption_chars``,
``max_frame_bytes``, ``max_pixels``)."""

from __future__ import annotations

from typing import Any

from .errors import InputError
from .images import image_size
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


def check_frame(image: Any, captions: Any, settings: Settings) -> None:
    """Raise InputError unless the image bytes and captions are within the settings' limits."""
    if not isinstance(image, (bytes, bytearray, memoryview)):
        raise InputError(f"image must be bytes, got {type(image).__name__}")
    if not len(image):
        raise InputError("empty image")
    if len(image) > settings.max_frame_bytes:
        raise InputError(f"image too large: {len(image)} bytes > {settings.max_frame_bytes}")
    check_captions(captions, settings)


def validate_frame(image: bytes, captions: Any, settings: Settings) -> tuple[int, int]:
    """check_frame then image_size: the image's (width, height) if the frame is acceptable."""
    check_frame(image, captions, settings)
    return image_size(bytes(image), settings)
