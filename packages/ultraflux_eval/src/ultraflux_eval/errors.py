"""The one exception type of ``ultraflux_eval``: messages say what to change."""

from ultraflux_core.errors import UltraFluxError


class EvalError(UltraFluxError):
    """Raised for bad evaluation input (images, prompts, specs, weights, tracking) with an actionable message.

    A subclass of the project's one base, so an entry point that reports ``UltraFluxError`` reports these too.
    """
