"""One exception tree for all of Lamina, with stable codes and HTTP statuses.

    class                              code               status
    LaminaError                        lamina_error        500
    ├── ConfigError                    config_invalid      500  (CLI exit 2)
    ├── InvalidRequestError            invalid_request     400
    │   ├── ContextLengthError         context_length_exceeded 400
    │   ├── UnsupportedCapabilityError unsupported_capability  400
    │   ├── PayloadTooLargeError       request_too_large   413
    │   ├── ContentBlockedError        content_blocked     400
    │   └── UnsupportedMediaTypeError  unsupported_media_type 415
    ├── AuthenticationError            invalid_api_key     401
    ├── PermissionDeniedError          permission_denied   403
    ├── NotFoundError                  not_found           404
    │   ├── ModelNotFoundError         model_not_found     404
    │   └── SourceNotFoundError        source_not_found    404
    ├── ConflictError                  conflict            409
    ├── RateLimitError                 rate_limit_exceeded 429
    │   └── BudgetExceededError        insufficient_quota  429
    ├── RegistryError                  registry_error      400
    │   ├── UnsafeFormatError          unsafe_format       400
    │   ├── UnknownFormatError         unknown_format      400
    │   ├── CorruptFileError           corrupt_file        400
    │   ├── ChecksumMismatchError      checksum_mismatch   409
    │   └── GateFailedError            gate_failed         409
    ├── EngineError                    engine_error        500
    │   ├── EngineCrashedError         engine_crashed      502
    │   │   └── PoisonRequestError     poison_request      422
    │   └── UpstreamError              upstream_error      502
    │       └── UpstreamTimeoutError   upstream_timeout    504
    ├── UnavailableError               unavailable         503
    │   ├── NoReadyReplicaError        no_ready_replica    503
    │   └── OfflineError               offline             503
    └── StoreError                     store_error         500

Every error message says what to do next. Foreign exceptions are mapped to this tree by type at the
edge (the gateway's error handler, the CLI), never by matching message text.
"""

from __future__ import annotations

from typing import Any, ClassVar


class LaminaError(Exception):
    """Base of every error Lamina raises on purpose."""

    code: ClassVar[str] = "lamina_error"
    status: ClassVar[int] = 500
    #: OpenAI's error ``type`` field for the HTTP body.
    kind: ClassVar[str] = "server_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        **details: Any,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        #: HTTP headers the error response carries (Retry-After, x-ratelimit-*)
        self.headers = headers or {}
        self.details = details

    def to_body(self) -> dict[str, Any]:
        """The OpenAI-style error body: ``{"error": {"message", "type", "param", "code"}}``."""
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
                **({"details": self.details} if self.details else {}),
            }
        }


class ConfigError(LaminaError):
    code = "config_invalid"


class InvalidRequestError(LaminaError):
    code = "invalid_request"
    status = 400
    kind = "invalid_request_error"


class ContextLengthError(InvalidRequestError):
    code = "context_length_exceeded"


class UnsupportedCapabilityError(InvalidRequestError):
    code = "unsupported_capability"


class PayloadTooLargeError(InvalidRequestError):
    """A request over one of the gateway's size limits (body bytes, messages, inputs...)."""

    code = "request_too_large"
    status = 413


class ContentBlockedError(InvalidRequestError):
    """A guardrail refused the request's input or the model's output."""

    code = "content_blocked"


class UnsupportedMediaTypeError(InvalidRequestError):
    """A request body the gateway does not take: every body it accepts is ``application/json``."""

    code = "unsupported_media_type"
    status = 415


class AuthenticationError(LaminaError):
    code = "invalid_api_key"
    status = 401
    kind = "authentication_error"


class PermissionDeniedError(LaminaError):
    code = "permission_denied"
    status = 403
    kind = "permission_error"


class NotFoundError(LaminaError):
    code = "not_found"
    status = 404
    kind = "invalid_request_error"


class ModelNotFoundError(NotFoundError):
    code = "model_not_found"


class SourceNotFoundError(NotFoundError):
    """A model source (a path, a file in a package, a file on the hub) does not exist."""

    code = "source_not_found"


class ConflictError(LaminaError):
    code = "conflict"
    status = 409
    kind = "invalid_request_error"


class RateLimitError(LaminaError):
    """Over a requests- or tokens-per-minute limit; ``Retry-After`` says when to try again."""

    code = "rate_limit_exceeded"
    status = 429
    kind = "rate_limit_error"


class BudgetExceededError(RateLimitError):
    """The spend of a key or of the whole gateway reached its budget for the period."""

    code = "insufficient_quota"
    kind = "insufficient_quota"


class RegistryError(LaminaError):
    code = "registry_error"
    status = 400
    kind = "invalid_request_error"


class UnsafeFormatError(RegistryError):
    code = "unsafe_format"


class UnknownFormatError(RegistryError):
    code = "unknown_format"


class CorruptFileError(RegistryError):
    code = "corrupt_file"


class ChecksumMismatchError(RegistryError):
    code = "checksum_mismatch"
    status = 409


class GateFailedError(RegistryError):
    """A quantized variant failed its accuracy gate: it is recorded with its figures and never serves."""

    code = "gate_failed"
    status = 409


class EngineError(LaminaError):
    code = "engine_error"


class EngineCrashedError(EngineError):
    code = "engine_crashed"
    status = 502


class PoisonRequestError(EngineCrashedError):
    """A request that two replicas died serving: failed instead of replayed on every replica.

    422, not 5xx: clients (the OpenAI SDKs among them) retry a 5xx on their own, and each retry of this
    request would crash more replicas; a 4xx tells them that this request, as sent, cannot be served.
    """

    code = "poison_request"
    status = 422
    kind = "invalid_request_error"


class UpstreamError(EngineError):
    """A remote upstream (an ``openai`` engine's API) failed, refused the key, or answered something
    unusable."""

    code = "upstream_error"
    status = 502


class UpstreamTimeoutError(UpstreamError):
    """A remote upstream did not answer in time."""

    code = "upstream_timeout"
    status = 504


class UnavailableError(LaminaError):
    code = "unavailable"
    status = 503


class NoReadyReplicaError(UnavailableError):
    code = "no_ready_replica"


class OfflineError(UnavailableError):
    """A download was needed and the network is not there."""

    code = "offline"


class StoreError(LaminaError):
    code = "store_error"


def _tree(cls: type[LaminaError]) -> list[type[LaminaError]]:
    return [cls, *(sub for child in cls.__subclasses__() for sub in _tree(child))]


#: Every error class by its stable code, so a body received over HTTP maps back to its type; built from
#: the classes themselves, so a new error cannot be forgotten (codes are unique: a test checks).
ERRORS_BY_CODE: dict[str, type[LaminaError]] = {cls.code: cls for cls in _tree(LaminaError)}


def from_body(status: int, body: dict[str, Any]) -> LaminaError:
    """Rebuild an error from an OpenAI-style body (as a replica worker sends it)."""
    err = body.get("error") if isinstance(body.get("error"), dict) else {}
    assert isinstance(err, dict)
    cls = ERRORS_BY_CODE.get(str(err.get("code")), LaminaError)
    exc = cls(str(err.get("message", f"upstream error (HTTP {status})")), param=err.get("param"))
    exc.details = dict(err.get("details") or {})
    return exc
