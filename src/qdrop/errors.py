"""The errors qdrop raises on purpose: each is a user error that the command line prints as one
line ('qdrop: error: ...', exit status 2). Anything else is a bug and keeps its traceback.

Each also derives from the built-in type it refines (ValueError, RuntimeError, OSError), so code
that caught those before keeps working.
"""
from __future__ import annotations


class QdropError(Exception):
    """Something the user can fix; the message says what and how."""


class UsageError(QdropError, ValueError):
    """A bad argument: unknown name, value out of range, options that do not go together."""


class DataError(QdropError, ValueError):
    """Data is missing, unreadable or inconsistent (the message names the path involved)."""


class ModelError(QdropError, ValueError):
    """Unknown model name, missing weights or missing optional packages (the message says what to do)."""


class CheckpointError(QdropError, ValueError):
    """A checkpoint or state file that is missing, unreadable, not qdrop's, or unsafe to load."""


class ConfigError(QdropError, ValueError):
    """A benchmark sweep config that is invalid (the message names the key and the file)."""


class TraceError(QdropError, RuntimeError):
    """torch.fx cannot trace a module. `module` is its qualified name ('' for the root); the message
    names it and the --leaf fix."""

    def __init__(self, module: str, cls: str, reason: BaseException):
        self.module = module
        where = f"module '{module}' ({cls})" if module else f"the model's own forward ({cls})"
        super().__init__(
            f"cannot trace {where}: {type(reason).__name__}: {reason}. "
            f"Mark it as a leaf (leaf_modules=['{module or '<name>'}'] or --leaf {module or '<name>'}) "
            "to keep it in floating point, or make its forward traceable."
        )


class PartitionError(QdropError, ValueError):
    """The graph cannot be cut into reconstruction units."""


class ReconstructionError(QdropError, RuntimeError):
    """Reconstruction cannot run on this model or state."""


class ExportError(QdropError, ValueError):
    """The model or the request cannot be exported (the message says what and why)."""


class WriteError(QdropError, OSError):
    """An output file could not be written (disk full, file-size limit, permissions); nothing partial is left."""
