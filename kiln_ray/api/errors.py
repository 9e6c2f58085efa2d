"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` with a 4xx/5xx status.

Routes raise APIError; FastAPI's own validation errors and malformed JSON become 400s here
(FastAPI would answer 422), and anything unexpected becomes a 500 with the request id, never
a stack trace.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"), "param": param, "code": code}}


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def engine_error(error: BaseException) -> APIError | None:
    """The HTTP answer for an error from the engine, its adapters or the trainer (None for
    anything unexpected, which stays a 500). An error raised in another process arrives
    wrapped (a Ray task error) with the original as `cause`: its text has no remote traceback."""
    from kiln_ray.adapters.archive import UnsafeArchive
    from kiln_ray.adapters.store import AdapterNotFound, AdapterStoreError, InvalidAdapter, InvalidAdapterName
    from kiln_ray.engine.adapter_manager import AdapterNotLoaded, AdapterSlotsFull
    from kiln_ray.engine.async_engine import EngineDeadError
    from kiln_ray.engine.engine import EngineFullError
    from kiln_ray.node import TrainerUnavailable, TrainingDisabled
    from kiln_ray.training.service import JobNotFound, QueueFull

    cause = getattr(error, "cause", None) or error
    text = str(cause.args[0]) if cause.args else type(cause).__name__
    if isinstance(error, (AdapterNotFound, AdapterNotLoaded)):
        return APIError(404, f"{text} (see /v1/models)", "model", "model_not_found")
    if isinstance(error, JobNotFound):
        return APIError(404, text, code="not_found")
    if isinstance(error, EngineFullError):
        return APIError(429, f"the server is busy ({text}); retry shortly", code="rate_limit_exceeded",
                        headers={"Retry-After": "1"})
    if isinstance(error, QueueFull):
        return APIError(503, text, code="queue_full", headers={"Retry-After": "5"})
    if isinstance(error, AdapterSlotsFull):
        return APIError(503, text, code="adapter_slots_full", headers={"Retry-After": "1"})
    if isinstance(error, EngineDeadError):
        return APIError(503, text, code="engine_unavailable", headers={"Retry-After": "5"})
    if isinstance(error, TrainerUnavailable):
        return APIError(503, text, code="trainer_unavailable", headers={"Retry-After": "5"})
    if isinstance(error, TrainingDisabled):
        return APIError(503, text, code="training_disabled")
    if isinstance(error, (UnsafeArchive, InvalidAdapter, InvalidAdapterName)):
        return APIError(400, text, code="invalid_adapter")
    if isinstance(error, AdapterStoreError):
        return APIError(500, text, code="adapter_store_error")
    if isinstance(error, ValueError):
        return APIError(400, text)
    return None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
        if first.get("type") == "json_invalid":
            message, param = "the request body is not valid JSON", None
        else:
            message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid value')}"
            param = ".".join(loc) or None
        return JSONResponse(error_body(400, message, param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(error.status_code, str(error.detail)), status_code=error.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        request_id = getattr(request.state, "request_id", "")  # set by the app's middleware
        log.exception("unhandled error in %s %s (request %s)", request.method, request.url.path, request_id)
        # Answered outside the app's middleware: the x-request-id header is set here.
        return JSONResponse(error_body(500, f"internal error ({type(error).__name__})", code="internal_error"),
                            status_code=500, headers={"x-request-id": request_id} if request_id else None)
