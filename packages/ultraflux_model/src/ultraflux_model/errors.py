"""The exception type of ``ultraflux_model``: the project's one base, ``ultraflux_core.errors.UltraFluxError``.

Bound here, not re-declared, so that errors raised by the shared ground floor (tracking, config) and by this
package are one type for its entry points and callers; modules may import it from ``ultraflux_core.errors``.
"""

from ultraflux_core.errors import UltraFluxError

__all__ = ["UltraFluxError"]
