"""Error type for models that cannot be built or loaded."""


class ModelError(ValueError):
    """Unknown model name, missing weights or missing optional packages (the message says what to do)."""
