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

from minipaged.entrypoints.openai.protocol import UNSUPPORTED_FIELDS
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


def _extra_fields(errors: list[dict[str, Any]]) -> APIError | None:
    """One 400 naming every field the body should not have: unsupported ones, then unknown ones."""
    extra = [str(e["loc"][-1]) for e in errors if e.get("type") == "extra_forbidden" and e.get("loc")]
    if not extra:
        return None
    unsupported = [f for f in extra if f in UNSUPPORTED_FIELDS]
    unknown = [f for f in extra if f not in UNSUPPORTED_FIELDS]
    parts = []
    if unsupported:
        parts.append(f"{', '.join(unsupported)}: not supported by this server")
    if unknown:
        parts.append(f"{', '.join(unknown)}: unknown field{'s' if len(unknown) > 1 else ''}")
    return APIError(400, "; ".join(parts), (unsupported or unknown)[0])


def from_validation_error(err: RequestValidationError, content_type: str | None = None) -> APIError:
    """Malformed JSON or a wrongly typed field: a 400 (FastAPI's default is 422) naming the field.

    ``content_type``: the request's header; a body not sent as JSON gets a hint about it.
    """
    errors = err.errors()
    if content_type is not None and "json" not in content_type.lower():
        return APIError(
            400, f"the body must be JSON sent with the header 'Content-Type: application/json' (got {content_type!r})"
        )
    if not errors:
        return APIError(400, "invalid request body")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return APIError(400, f"malformed JSON body: {first.get('msg', '')}")
    extra = _extra_fields(errors)
    if extra is not None:
        return extra
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = loc[0] if loc else None
    # A union field (prompt, stop) fails once per branch: say so once, not five times.
    same_field = [e for e in errors if [str(p) for p in e.get("loc", ()) if p != "body"][:1] == loc[:1]]
    if len(same_field) > 1:
        kinds = sorted({e.get("msg", "") for e in same_field})
        return APIError(400, f"{param}: has the wrong type ({'; '.join(kinds)})", param)
    return APIError(400, f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid value')}", param)
