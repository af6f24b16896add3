"""Resident memory of this process, for the benchmark scripts (and the peer's worker).

Peaks come from ``VmHWM``, not ``ru_maxrss``: on Linux a child started with
``subprocess`` (vfork, then exec) inherits its parent's ``ru_maxrss``, so a
worker spawned by a large harness would report the harness's peak, not its own.
"""

import math
import resource
import sys


def rss_mib(field: str = "VmRSS") -> float:
    """A memory field of ``/proc/self/status`` in MiB: ``VmRSS`` (now), ``VmHWM``
    (peak), ``RssAnon`` (own allocations, without mapped files); NaN if absent."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def peak_rss_mib() -> float:
    """Peak resident memory of this process (``VmHWM``; ``ru_maxrss`` where /proc is missing)."""
    peak = rss_mib("VmHWM")
    if not math.isnan(peak):
        return peak
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / (1024**2 if sys.platform == "darwin" else 1024)
