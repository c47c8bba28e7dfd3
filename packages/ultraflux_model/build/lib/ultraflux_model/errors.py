"""The one exception type of ``ultraflux_model``: messages say what to change."""


class UltraFluxError(ValueError):
    """Raised for bad input (sizes, configs, checkpoints, data) with an actionable message.

    A ``ValueError`` so that pydantic validators can raise it and report it as a field error.
    """
