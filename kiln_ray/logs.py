"""Logging for kiln-ray processes: `kiln_ray.*` loggers at INFO to stderr (which Ray forwards
to the driver's terminal and the dashboard's log view), one line per event."""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure(level: int | str = logging.INFO) -> None:
    """Idempotent: safe to call from every actor's constructor."""
    logger = logging.getLogger("kiln_ray")
    logger.setLevel(level)
    if not any(getattr(h, "_kiln", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT))
        handler._kiln = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False
