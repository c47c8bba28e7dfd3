"""The project's one exception type: every package raises it (or, in the eval package, its subclass), with a
message that says what to change."""


class UltraFluxError(ValueError):
    """Raised for bad input (sizes, configs, checkpoints, data, tracking) with an actionable message.

    A ``ValueError`` so that pydantic validators can raise it and report it as a field error.
    """
