"""This process's resident host memory and its high-water mark (Linux ``/proc/self``), resettable.

``ru_maxrss`` only ever grows, so it cannot isolate one phase (e.g. building the model) from an earlier peak
(imports, a previous stage). Linux lets a process reset its high-water mark (``VmHWM``) to the current RSS by
writing ``5`` to ``/proc/self/clear_refs``; a phase's peak is then exactly ``VmHWM`` after it.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_bytes(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # the kernel reports kB
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    """Resident memory now (``VmRSS``); without ``/proc``, the lifetime peak as the best available bound."""
    return _status_bytes("VmRSS") or peak_rss_bytes()


def reset_peak_rss() -> bool:
    """Make the high-water mark equal the current RSS; False where the OS does not allow it (then peaks are
    lifetime peaks, an upper bound)."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Highest resident memory since the last ``reset_peak_rss`` (or since the process started)."""
    hwm = _status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, kB on Linux
