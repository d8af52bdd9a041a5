"""One error hierarchy: every error spotline raises on purpose is a SpotlineError."""

from __future__ import annotations


class SpotlineError(Exception):
    """Root of every error spotline raises on purpose."""


class ConfigError(SpotlineError):
    """A setting is unknown or has an invalid value; the message names the key."""


class DecodeError(SpotlineError):
    """An entry or payload could not be decoded; keeps the raw bytes for the dead letter."""

    def __init__(self, message: str, raw: bytes | None = None) -> None:
        super().__init__(message)
        self.raw = raw


class InputError(SpotlineError):
    """A frame or request is unusable (corrupt image, no captions, over a limit)."""


class ModelError(SpotlineError):
    """A model could not be loaded or failed on its input."""


class TransportError(SpotlineError):
    """Redis could not be reached after the configured retries."""
