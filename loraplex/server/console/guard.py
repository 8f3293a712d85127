"""Who may do what in the console, and what a refusal looks like.

- `signed_in(console)`: a FastAPI dependency, the request's live session or a redirect to the
  sign-in page.
- `checked_form(request, session)`: a change's form, refused (403) without the session's CSRF
  token (a form field or, from htmx and fetch, the X-CSRF-Token header).
- `tenant_scope(console, session, tenant)`: the same object-level check as the HTTP API's
  tenant routes: the admin acts on every tenant, a tenant's session only on its own (403).
- `ConsoleRoute`: every console route's errors become a page with the right status, never a
  traceback: the typed errors of the registry, the vault, the queues and the API.
"""

import hmac

from fastapi import Request
from fastapi.responses import RedirectResponse, Response
from fastapi.routing import APIRoute

from loraplex.export.errors import ExportError
from loraplex.export.jobs import ExportNotFound
from loraplex.registry import AlreadyExists, InvalidInput, NotFound, RegistryError
from loraplex.server.console.context import PREFIX, Console, render
from loraplex.server.console.sessions import COOKIE, Session, key_is_usable
from loraplex.server.protocol import OpenAIError
from loraplex.train.jobs import JobNotFound
from loraplex.vault import DatasetNotFound, MasterKeyError, VaultError

CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf"
# No inline script or style anywhere: injected markup could not run even if it got through.
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' data:; "
                               "frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",  # pages show keys once, and a tenant's data
}


class SignedOut(Exception):
    """No session, an expired one, or one whose key was revoked: sign in again."""


class Forbidden(Exception):
    """A 403: another tenant's objects, an operator-only page, a missing CSRF token."""


class FormError(ValueError):
    """A form field that is missing or malformed; the message names it."""


def status_of(error: Exception) -> int | None:
    """The HTTP status of an error the console shows as a page; None for a bug."""
    if isinstance(error, OpenAIError):
        return error.status
    if isinstance(error, Forbidden):
        return 403
    if isinstance(error, NotFound | DatasetNotFound | JobNotFound | ExportNotFound):
        return 404
    if isinstance(error, AlreadyExists):
        return 409
    if isinstance(error, MasterKeyError):
        return 500
    if isinstance(error, RegistryError | InvalidInput | VaultError | ExportError | FormError):
        return 400
    return None


def _message(error: Exception) -> str:
    if isinstance(error, OpenAIError):
        return error.body()["error"]["message"]
    return str(error).strip("'\"") if isinstance(error, LookupError) else str(error)


class ConsoleRoute(APIRoute):
    """Turns the console's typed errors into pages and adds the security headers."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                response = await handler(request)
            except SignedOut:
                if request.headers.get("hx-request"):  # htmx follows this header, not a 303
                    response = Response(status_code=204,
                                        headers={"hx-redirect": f"{PREFIX}/signin"})
                else:
                    response = RedirectResponse(f"{PREFIX}/signin", status_code=303)
            except Exception as error:
                status = status_of(error)
                if status is None:
                    raise
                template = "partials/error.html" if request.headers.get("hx-request") \
                    else "error.html"
                response = render(request, template, status, status=status,
                                  message=_message(error))
            response.headers.update(SECURITY_HEADERS)
            return response

        return handle


def signed_in(console: Console):
    """A dependency: the request's live session (kept in request.state for the templates)."""
    def dependency(request: Request) -> Session:
        session = console.sessions.get(request.cookies.get(COOKIE, ""))
        if session is None:
            raise SignedOut()
        if not key_is_usable(console.registry, session.principal):
            console.sessions.drop(session.id)
            raise SignedOut()
        request.state.session = session
        return session

    return dependency


def check_csrf(request: Request, session: Session, form=None) -> None:
    sent = request.headers.get(CSRF_HEADER) or (form.get(CSRF_FIELD) if form else None)
    if not isinstance(sent, str) or not hmac.compare_digest(sent, session.csrf):
        raise Forbidden("this change was refused: its CSRF token is missing or wrong "
                        "(reload the page and try again)")


async def checked_form(request: Request, session: Session):
    """The change's form, once its CSRF token is checked."""
    form = await request.form()
    check_csrf(request, session, form)
    return form


def tenant_scope(console: Console, session: Session, tenant: str) -> None:
    """Refuse another tenant's objects to a tenant session; 404 for an unknown tenant."""
    if not session.is_admin and session.principal.tenant_name != tenant:
        raise Forbidden("this session may only see its own tenant")
    console.registry.get_tenant(tenant)


def operator_only(session: Session) -> None:
    if not session.is_admin:
        raise Forbidden("this page is the operator's (sign in with the admin key)")
