"""Progress messages and bars, quiet unless ``verbose`` is set.

Messages go through the ``skpatchcore`` logger (``logging``), never
``print``, so that a program's own output (the CLI's tables on stdout) is not
interleaved with them. When ``verbose`` is set and logging is not configured
anywhere, a handler writing to stderr is added so the messages show, as
scikit-learn's ``verbose`` output does; a configured application keeps full
control. Bars (tqdm) write to stderr.
"""

from __future__ import annotations

import logging
import sys

from tqdm.auto import tqdm

__all__ = ["logger", "log", "progress_bar"]

logger = logging.getLogger("skpatchcore")
logger.addHandler(logging.NullHandler())


def _make_visible() -> None:
    if any(not isinstance(h, logging.NullHandler) for h in logger.handlers) or logging.getLogger().handlers:
        return  # configured by the application
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[skpatchcore] %(message)s"))
    logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)


def log(message: str, verbose) -> None:
    """Log ``message`` at INFO level if ``verbose``."""
    if verbose:
        _make_visible()
        logger.info(message)


def progress_bar(total: int, description: str, verbose) -> tqdm:
    """A tqdm bar over ``total`` items on stderr, disabled unless ``verbose``."""
    return tqdm(total=total, desc=description, unit="image", disable=not verbose, leave=False,
                file=sys.stderr)
