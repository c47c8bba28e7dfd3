"""The one exception type of ``ultraflux_eval``: messages say what to change."""


class EvalError(Exception):
    """Raised for bad evaluation input (images, prompts, specs, weights, tracking) with an actionable message."""
