"""Logging for kiln-ray processes: `kiln_ray.*` loggers at INFO to stderr (which Ray forwards
to the driver's terminal and the dashboard's log view), one line per event. A line logged
while the ingress handles a request ends with that request's x-request-id (`request_id`)."""

from __future__ import annotations

import contextvars
import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s%(request_suffix)s"

# The x-request-id of the HTTP request being handled (set by the ingress middleware; asyncio
# tasks the request starts inherit it).
request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("kiln_request_id", default=None)


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        rid = request_id.get()
        # A line that already names the request (the ingress's per-request line) keeps one copy.
        named = rid is None or "x-request-id=" in str(record.msg)
        record.request_suffix = "" if named else f" x-request-id={rid}"
        return True


def configure(level: int | str = logging.INFO) -> None:
    """Idempotent: safe to call from every actor's constructor."""
    logger = logging.getLogger("kiln_ray")
    logger.setLevel(level)
    if not any(getattr(h, "_kiln", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT))
        handler.addFilter(_RequestIdFilter())
        handler._kiln = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False
