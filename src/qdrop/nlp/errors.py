"""Errors raised by qdrop.nlp. Both derive from ValueError (through qdrop's own error types),
so the CLI can report them as one line and exit with status 2."""
from __future__ import annotations

from ..errors import DataError, ModelError


class UnsupportedModelError(ModelError):
    """The model has nothing qdrop.nlp can quantize or transform (the message names its class)."""


class TokenizerMissingError(ModelError):
    """No tokenizer could be loaded (typically: offline, and the files are not on disk)."""


__all__ = ["DataError", "ModelError", "TokenizerMissingError", "UnsupportedModelError"]
