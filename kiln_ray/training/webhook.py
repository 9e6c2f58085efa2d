"""Webhooks: a job's final status POSTed as JSON to a configured URL.

Each POST runs on its own short-lived thread, so a slow or hanging receiver holds up nothing
but that thread, and only for `timeout` seconds per phase (connect, write, read). Redirects
are not followed (a redirect could point the trainer anywhere); failures are logged, never
raised.
"""

from __future__ import annotations

import logging

import httpx

log = logging.getLogger("kiln_ray.training")


def post_status(url: str, status: dict, timeout: float) -> None:
    """POST `status` (a job status dict) to `url`; log a non-2xx answer or a failure."""
    try:
        response = httpx.post(url, json=status, timeout=timeout, follow_redirects=False)
        if response.status_code >= 300:
            log.warning("webhook %s answered %d for %s", url, response.status_code, status["job_id"])
    except httpx.HTTPError as error:
        log.warning("webhook %s failed for %s: %s", url, status["job_id"], error)
