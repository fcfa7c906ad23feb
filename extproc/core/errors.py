"""The gateway's error hierarchy and its OpenAI-style wire form.

Every refusal the core can make is one of these classes; the gRPC adapters map them
to an immediate response (ext_proc) or a denied response (ext_authz) and never
invent status codes of their own::

    GatewayError                      any refusal, carries status/type/code/param
    ├── BadRequestError               400 invalid_request_error
    │   ├── InvalidJSONError          400 code=invalid_json
    │   ├── InvalidParameterError     400 code=invalid_parameter (wrong type, bad value)
    │   └── MissingParameterError     400 code=missing_parameter
    ├── AuthenticationError           401 authentication_error (missing/invalid/expired key)
    ├── PermissionDeniedError         403 permission_error (blocked, model not allowed)
    ├── NotFoundError                 404 invalid_request_error
    │   ├── ModelNotFoundError        404 code=model_not_found
    │   └── UnknownRouteError         404 code=unknown_route
    ├── MethodNotAllowedError         405 code=method_not_allowed (with an Allow header)
    ├── PayloadTooLargeError          413 code=payload_too_large
    ├── BudgetExceededError           429 budget_exceeded (code names the budget kind)
    ├── RateLimitError                429 rate_limit_error (rpm/tpm, with retry-after)
    ├── UnsupportedMediaTypeError     415 code=unsupported_content_encoding
    ├── InternalError                 500 code=internal_error (a bug; logged with traceback)
    └── ServiceUnavailableError       503 code=service_unavailable (store down, fail closed)

Rule: messages never contain credentials; callers pass only names and shapes.
"""

from __future__ import annotations

import json
from typing import ClassVar

__all__ = [
    "AuthenticationError",
    "BadRequestError",
    "BudgetExceededError",
    "GatewayError",
    "InternalError",
    "InvalidJSONError",
    "InvalidParameterError",
    "MethodNotAllowedError",
    "MissingParameterError",
    "ModelNotFoundError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "RateLimitError",
    "ServiceUnavailableError",
    "UnknownRouteError",
    "UnsupportedMediaTypeError",
    "error_body",
]

#: Response header set on every error the gateway itself produces. Envoy's
#: local_reply_config uses it to tell our errors from its own.
ERROR_HEADER = "x-extproc-error"


def error_body(message: str, err_type: str, code: str | None, param: str | None = None) -> bytes:
    """Serialise an OpenAI-style error object."""
    payload = {"error": {"message": message, "type": err_type, "param": param, "code": code}}
    return json.dumps(payload, ensure_ascii=True).encode()


class GatewayError(Exception):
    """A request the gateway refuses, with everything needed to answer it."""

    status: ClassVar[int] = 400
    err_type: ClassVar[str] = "invalid_request_error"
    default_code: ClassVar[str] = "invalid_request"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.param = param
        self.headers: dict[str, str] = dict(headers or {})

    def body(self) -> bytes:
        return error_body(self.message, self.err_type, self.code, self.param)

    def response_headers(self) -> dict[str, str]:
        """Headers for the error response: content type, marker and any extras."""
        return {"content-type": "application/json", ERROR_HEADER: self.code, **self.headers}


class BadRequestError(GatewayError):
    status = 400


class InvalidJSONError(BadRequestError):
    default_code = "invalid_json"


class InvalidParameterError(BadRequestError):
    default_code = "invalid_parameter"


class MissingParameterError(BadRequestError):
    default_code = "missing_parameter"


class AuthenticationError(GatewayError):
    status = 401
    err_type = "authentication_error"
    default_code = "invalid_api_key"


class PermissionDeniedError(GatewayError):
    status = 403
    err_type = "permission_error"
    default_code = "permission_denied"


class NotFoundError(GatewayError):
    status = 404


class ModelNotFoundError(NotFoundError):
    default_code = "model_not_found"


class UnknownRouteError(NotFoundError):
    default_code = "unknown_route"


class MethodNotAllowedError(GatewayError):
    status = 405
    default_code = "method_not_allowed"


class PayloadTooLargeError(GatewayError):
    status = 413
    default_code = "payload_too_large"


class UnsupportedMediaTypeError(GatewayError):
    status = 415
    default_code = "unsupported_content_encoding"


class BudgetExceededError(GatewayError):
    status = 429
    err_type = "budget_exceeded"
    default_code = "budget_exceeded"


class RateLimitError(GatewayError):
    status = 429
    err_type = "rate_limit_error"
    default_code = "rate_limit_exceeded"


class ServiceUnavailableError(GatewayError):
    status = 503
    err_type = "service_unavailable_error"
    default_code = "service_unavailable"


class InternalError(GatewayError):
    status = 500
    err_type = "api_error"
    default_code = "internal_error"
