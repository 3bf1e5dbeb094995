"""OpenAI's error envelope: ``{"error": {"message", "type", "param", "code"}}``."""

from fastapi.responses import JSONResponse

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_exceeded",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error answered with its status and the envelope (raised before a stream starts)."""

    def __init__(self, status, message, type=None, param=None, code=None, headers=None):
        super().__init__(message)
        self.status, self.message = status, message
        self.type = type or TYPES.get(status, "server_error")
        self.param, self.code, self.headers = param, code, headers

    def body(self):
        return error_body(self.message, self.type, self.param, self.code)

    def response(self):
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(message, type, param=None, code=None):
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def validation_error(exc):
    """A FastAPI `RequestValidationError` -> `APIError`: 400 for a body that is not JSON,
    422 for JSON whose fields are wrong (naming the first wrong field and why)."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    not_json = tuple(first.get("loc", ())) == ("body",) and isinstance(first.get("input"), bytes)
    if first.get("type") == "json_invalid" or not_json:
        return APIError(400, f"The request body is not valid JSON: {first.get('msg')}",
                        code="invalid_json")  # fmt: skip
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = loc[0] if loc else None  # the top-level field
    received = first.get("input")
    message = f"Invalid value for `{param or 'body'}`: {first.get('msg')}."
    if received is not None and not isinstance(received, dict):
        message += f" Received: {str(received)[:200]!s}"
    return APIError(422, message, param=param, code="invalid_value")
