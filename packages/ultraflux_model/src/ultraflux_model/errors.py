"""The one exception type of ``ultraflux_model``: messages say what to change."""


class UltraFluxError(Exception):
    """Raised for bad input (sizes, configs, checkpoints, data) with an actionable message."""
