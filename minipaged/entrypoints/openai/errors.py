"""OpenAI-shaped error bodies: ``{"error": {"message", "type", "param", "code"}}``.

``type`` names the HTTP error class and ``code`` repeats the status (vLLM's convention);
``param`` is the offending request field, taken from the engine's typed ``InputError.field``
or from pydantic's error location.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from minipaged.errors import InputError

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestTooLargeError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


@dataclass
class APIError(Exception):
    """An error the server answers with ``status`` and an OpenAI-shaped body."""

    status: int
    message: str
    param: str | None = None

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": _TYPES.get(self.status, "APIError"),
                "param": self.param,
                "code": self.status,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def from_input_error(err: InputError) -> APIError:
    """A 400 naming the field the engine's typed error names."""
    return APIError(400, str(err), err.field)


def from_validation_error(err: RequestValidationError) -> APIError:
    """Malformed JSON or a wrongly typed field: a 400 (FastAPI's default is 422) naming the field."""
    errors = err.errors()
    if not errors:
        return APIError(400, "invalid request body")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return APIError(400, f"malformed JSON body: {first.get('msg', '')}")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = loc[0] if loc else None
    # A union field (prompt, stop) fails once per branch: say so once, not five times.
    same_field = [e for e in errors if [str(p) for p in e.get("loc", ()) if p != "body"][:1] == loc[:1]]
    if len(same_field) > 1:
        kinds = sorted({e.get("msg", "") for e in same_field})
        return APIError(400, f"{param}: has the wrong type ({'; '.join(kinds)})", param)
    return APIError(400, f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid value')}", param)
