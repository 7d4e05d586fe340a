"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}} with the right HTTP status."""
from __future__ import annotations

from typing import Dict, Optional

from fastapi.responses import JSONResponse
from pydantic import ValidationError

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          429: "rate_limit_error", 500: "internal_server_error", 503: "service_unavailable"}


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def from_validation(e: ValidationError) -> OpenAIError:
    """The first pydantic error as a 400 naming the field (``param``), e.g. ``messages.0.role``."""
    err = e.errors()[0]
    loc = [str(x) for x in err["loc"] if not str(x).startswith("function-")]
    param = ".".join(loc) or None
    msg = err["msg"].removeprefix("Value error, ")
    text = f"{param}: {msg}" if param and not msg.startswith(param + ":") else msg
    return OpenAIError(400, text, param=param, code="invalid_value")


def from_value_error(e: ValueError, default_param: Optional[str] = None) -> OpenAIError:
    """Engine and protocol ValueErrors start with the field name: 'prompt: ...'."""
    msg = str(e)
    head = msg.split(":", 1)[0]
    param = head if ":" in msg and " " not in head else default_param
    code = "context_length_exceeded" if "session_len" in msg else "invalid_value"
    return OpenAIError(400, msg, param=param, code=code)
