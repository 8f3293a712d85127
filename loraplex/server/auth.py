"""Reading the caller's key from `Authorization: Bearer <key>`."""

from fastapi import Request

from loraplex.server.protocol import OpenAIError


def bearer_key(request: Request) -> str:
    """The bearer token, or "" when the header is missing or malformed (authenticates no one)."""
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    return key.strip() if scheme.lower() == "bearer" else ""


def require_admin(registry, request: Request):
    """The admin principal behind the request's key, or a 401."""
    principal = registry.authenticate(bearer_key(request))
    if principal is None or principal.role != "admin":
        raise OpenAIError(401, "an admin key is required", "authentication_error",
                          code="invalid_api_key")
    return principal
