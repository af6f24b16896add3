"""Memory estimates made before the large allocations of a fit."""

from __future__ import annotations

import os

__all__ = ["available_memory", "check_fits_in_memory"]


def available_memory() -> int | None:
    """Bytes the system can still hand out without swapping, or None if unknown.

    Linux's ``MemAvailable`` counts reclaimable caches, which plain free
    memory does not; elsewhere the free pages are a lower estimate.
    """
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits_in_memory(needs: dict[str, int], advice: str) -> None:
    """Raise a MemoryError naming what to change if ``needs`` exceed the available memory.

    Parameters
    ----------
    needs : dict of str to int
        Bytes about to be allocated, by what they hold.
    advice : str
        The parameters that would make them smaller.
    """
    available = available_memory()
    total = sum(needs.values())
    if available is None or total <= available:
        return
    parts = ", ".join(f"{what} {nbytes / 2**30:.2f} GiB" for what, nbytes in needs.items())
    raise MemoryError(
        f"This would need {total / 2**30:.2f} GiB ({parts}), more than the "
        f"{available / 2**30:.2f} GiB of memory available. {advice}"
    )
