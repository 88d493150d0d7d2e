"""Every failure the server reports, as OpenAI's ``{"error": {...}}`` body with a fitting status.

A route raises :class:`APIError`; FastAPI's own validation errors and Starlette's 404/405 are
rewritten into the same shape, so a client sees one error format whatever went wrong: 400 for a
request that cannot be served (malformed JSON, a prompt beyond the context), 401 without the API
key, 404 for an unknown model, file or job, 413 for an oversized body, 422 for a body that breaks
the schema (wrong types, out-of-range values), 429 with ``Retry-After`` when the queue is full.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from harli_jax.serve.protocol import ErrorDetail, ErrorResponse

_TYPES = {401: "authentication_error", 429: "rate_limit_error"}
_TYPE_TAGS = {"str", "int", "float", "bool"}


class APIError(Exception):
    """An error response: raise it from a route."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers

    def response(self) -> JSONResponse:
        detail = ErrorDetail(
            message=self.message,
            type=_TYPES.get(self.status, "invalid_request_error"),
            param=self.param,
            code=self.code,
        )
        return JSONResponse(
            ErrorResponse(error=detail).model_dump(), status_code=self.status, headers=self.headers
        )


def from_validation_error(err: RequestValidationError) -> APIError:
    """422 naming the first offending field; 400 for a body that is not JSON at all."""
    first = err.errors()[0]
    if first["type"] == "json_invalid":
        reason = first.get("ctx", {}).get("error", "")
        return APIError(400, f"the body is not valid JSON: {reason}", code="invalid_json")
    # loc is ("body", field, ...); a union adds a tag per member it tried ("str", "list[int]").
    path = [str(p) for p in first["loc"][1:] if isinstance(p, int) or _is_field_name(p)]
    param = ".".join(path) or None
    where = f"'{param}'" if param else "the body"
    return APIError(422, f"invalid value for {where}: {first['msg']}", param=param)


def _is_field_name(part: str) -> bool:
    return part.isidentifier() and part.islower() and part not in _TYPE_TAGS


# The statuses the routes document in the OpenAPI schema besides success (422 replaces FastAPI's).
ERROR_RESPONSES = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "a request that cannot be served",
        401: "a missing or wrong API key",
        404: "an unknown model, file or job",
        413: "a body over the size limit",
        422: "a body that breaks the schema (wrong types, out-of-range values)",
        429: "the queue is full; retry after Retry-After seconds",
    }.items()
}


def install(app: FastAPI) -> None:
    """Routes every error the app can raise through :meth:`APIError.response`."""

    async def api_error(_: Request, err: APIError) -> JSONResponse:
        return err.response()

    async def validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
        return from_validation_error(err).response()

    async def http_error(_: Request, err: HTTPException) -> JSONResponse:
        return APIError(err.status_code, str(err.detail), headers=err.headers).response()

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
