"""Every failure leaves the server as an OpenAI error envelope:
``{"error": {"message", "type", "param", "code"}}``. Errors are raised where the fact is
known and turned into responses here, in one place."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.jobs import JobDeadlineError, JobLimitError
from app.steering_policy import SteeringPolicyError
from steering.adapters import AdapterError
from steering.engine import (
    DeadlineExceededError,
    DrainingError,
    EngineDeadError,
    EngineError,
    QueueFullError,
    RequestTooLongError,
    UnsupportedOnEngineError,
)
from steering.extract import DefinitionError
from steering.limits import PromptTooLongError
from steering.monitor import MonitorConfigError
from steering.registry import VectorInUseError, VectorNotFoundError
from steering.steer import SteeringError
from steering.store import PreconditionFailedError
from steering.vector import VectorFormatError, VectorModelMismatchError

log = logging.getLogger(__name__)
MAX_MESSAGE = 500


class APIError(Exception):
    """An error with its HTTP status and OpenAI envelope fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}
        self.extra = extra or {}


def envelope(message: str, type: str, param: str | None = None, code: str | None = None, **extra) -> dict:
    if len(message) > MAX_MESSAGE:
        message = message[: MAX_MESSAGE - 3] + "..."
    return {"error": {"message": message, "type": type, "param": param, "code": code, **extra}}


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(
        envelope(exc.message, exc.type, exc.param, exc.code, **exc.extra), status_code=exc.status, headers=exc.headers
    )


def as_api_error(exc: Exception) -> APIError:
    """Map a domain exception to its HTTP meaning."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, AdapterError):
        codes = {400: "invalid_adapter", 404: "model_not_found", 409: "adapter_conflict"}
        return APIError(exc.status, str(exc), type="not_found_error" if exc.status == 404 else "invalid_request_error",
                        param=exc.param, code=codes[exc.status])
    if isinstance(exc, VectorNotFoundError):
        return APIError(404, str(exc), param=getattr(exc, "param", None), code="vector_not_found")
    if isinstance(exc, VectorModelMismatchError):
        return APIError(409, str(exc), code="vector_model_mismatch")
    if isinstance(exc, VectorInUseError):
        return APIError(409, str(exc), code="vector_in_use")
    if isinstance(exc, PreconditionFailedError):
        return APIError(412, str(exc), param=exc.param, code="precondition_failed")
    if isinstance(exc, SteeringError):
        return APIError(400, str(exc), param=exc.param, code="invalid_steering")
    if isinstance(exc, SteeringPolicyError):
        return APIError(403, str(exc), type="permission_error", param=exc.param, code="steering_not_allowed")
    if isinstance(exc, MonitorConfigError):
        return APIError(400, str(exc), param=exc.param, code="invalid_monitor")
    if isinstance(exc, VectorFormatError):
        return APIError(400, str(exc), param=exc.param, code="invalid_vector")
    if isinstance(exc, PromptTooLongError):
        return APIError(400, str(exc), param=exc.param, code="prompt_too_long")
    if isinstance(exc, DefinitionError):
        return APIError(400, str(exc), param=exc.param, code="invalid_trait")
    if isinstance(exc, JobLimitError):
        return APIError(429, str(exc), type="rate_limit_error", code="too_many_jobs",
                        headers={"Retry-After": str(exc.retry_after)})
    if isinstance(exc, JobDeadlineError):
        return APIError(504, str(exc), type="timeout_error", code="deadline_exceeded")
    if isinstance(exc, QueueFullError):
        return APIError(
            429, str(exc), type="rate_limit_error", code="queue_full", headers={"Retry-After": str(exc.retry_after)}
        )
    if isinstance(exc, DrainingError):
        return APIError(503, str(exc), type="server_error", code="draining",
                        headers={"Retry-After": str(exc.retry_after)})
    if isinstance(exc, DeadlineExceededError):
        return APIError(504, str(exc), type="timeout_error", code="deadline_exceeded")
    if isinstance(exc, RequestTooLongError):
        return APIError(400, str(exc), code="context_length_exceeded")
    if isinstance(exc, EngineDeadError):
        return APIError(503, str(exc), type="server_error", code="engine_dead")
    if isinstance(exc, UnsupportedOnEngineError):
        return APIError(501, f"{exc}; start the server with --engine hf for it", type="not_implemented_error",
                        param=exc.param, code="unsupported_on_engine")
    if isinstance(exc, EngineError):
        return APIError(500, str(exc), type="server_error", code="engine_error")
    log.exception("unhandled error", exc_info=exc)
    return APIError(500, "internal server error", type="server_error", code="internal_error")


# pydantic's wording where it would leave a client guessing.
_MESSAGES = {
    "extra_forbidden": "this field is not supported by this server",
    "model_attributes_type": "should be a JSON object",
    "model_type": "should be a JSON object",
    "dict_type": "should be a JSON object",
}


def _loc_to_param(loc: tuple) -> str | None:
    parts = [p for p in loc if p not in ("body", "query", "path", "header")]
    # pydantic adds the union member's type name to the location; it means nothing to a client.
    parts = [p for p in parts if not (isinstance(p, str) and (p.startswith(("list[", "dict[", "function-", "constrained-", "literal[")) or p in ("str", "int", "float", "bool")))]
    if "[key]" in parts:  # a bad mapping key: name the mapping, the key is in the message
        parts = parts[: parts.index("[key]") - 1]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out or None


def validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors() or [{"loc": (), "msg": "invalid request"}]
    if errors[0].get("type") == "json_invalid":
        detail = errors[0].get("ctx", {}).get("error", "")
        return APIError(400, f"request body is not valid JSON: {detail}".rstrip(": "), param="body", code="invalid_json")
    # A field typed as a union reports one error per member; the deepest location is the
    # member the client meant (e.g. steering.optimistic rather than "steering: not a list").
    first = max(errors, key=lambda e: len(e.get("loc", ())))
    loc = tuple(first.get("loc", ()))
    # A body that is missing or not an object fails at the body itself: name it.
    param = _loc_to_param(loc) or "body"
    text = _MESSAGES.get(first.get("type"), first["msg"])
    message = f"{param}: {text}"
    if "[key]" in loc:
        message = f"{param}: key {str(loc[loc.index('[key]') - 1])[:80]!r}: {text}"
    return APIError(400, message, param=param, code="invalid_value")


def install(app: FastAPI) -> None:
    """Register the handlers that turn every exception into the envelope."""

    @app.exception_handler(RequestValidationError)
    async def _validation(_req: Request, exc: RequestValidationError):
        return error_response(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(APIError(exc.status_code, str(exc.detail), type=kind, headers=getattr(exc, "headers", None)))

    async def _domain(_req: Request, exc: Exception):
        return error_response(as_api_error(exc))

    for kind in (APIError, AdapterError, VectorNotFoundError, VectorModelMismatchError, VectorInUseError, SteeringError, VectorFormatError, EngineError,
                 SteeringPolicyError, MonitorConfigError, PromptTooLongError, DefinitionError, JobLimitError,
                 JobDeadlineError, PreconditionFailedError):
        app.add_exception_handler(kind, _domain)
    # Anything else is a bug: answer with the envelope (Starlette still logs the traceback).
    app.add_exception_handler(Exception, _domain)
