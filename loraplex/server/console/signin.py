"""Signing in with a key (the admin key or a tenant's), and out."""

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse

from loraplex.server.console.context import PREFIX, Console, render
from loraplex.server.console.forms import text
from loraplex.server.console.guard import (
    ConsoleRoute,
    Forbidden,
    SignedOut,
    checked_form,
    signed_in,
)
from loraplex.server.console.sessions import COOKIE, COOKIE_PATH, Session


def home_of(session: Session) -> str:
    """Where a session lands: the operator's tenant list, or the tenant's own page."""
    if session.is_admin:
        return f"{PREFIX}/tenants"
    return f"{PREFIX}/tenants/{session.principal.tenant_name}"


def _same_origin(request: Request) -> None:
    """A sign-in posted from another site is refused (login CSRF): the browser's Origin header,
    when it sends one, must be this server's."""
    origin = request.headers.get("origin")
    expected = f"{request.url.scheme}://{request.url.netloc}"
    if origin is not None and origin != expected:
        raise Forbidden("a sign-in from another site was refused")


def signin_routes(console: Console) -> APIRouter:
    router = APIRouter(prefix=PREFIX, route_class=ConsoleRoute)
    Signed = Annotated[Session, Depends(signed_in(console))]

    @router.get("")
    @router.get("/")
    async def index(request: Request):
        try:
            session = signed_in(console)(request)
        except SignedOut:
            return RedirectResponse(f"{PREFIX}/signin", status_code=303)
        return RedirectResponse(home_of(session), status_code=303)

    @router.get("/signin")
    async def signin_page(request: Request):
        return render(request, "signin.html")

    @router.post("/signin")
    async def signin(request: Request):
        _same_origin(request)
        form = await request.form()
        principal = console.auth.principal_of(text(form, "key", required=False), request)
        if principal is None:
            return render(request, "signin.html", 401,
                          error="That key is not valid (or it was revoked).")
        session = console.sessions.create(principal)
        response = RedirectResponse(home_of(session), status_code=303)
        response.set_cookie(COOKIE, session.id, max_age=int(console.sessions.lifetime_s),
                            path=COOKIE_PATH, httponly=True, samesite="strict",
                            secure=request.url.scheme == "https")
        return response

    @router.post("/signout")
    async def signout(request: Request, session: Signed):
        await checked_form(request, session)
        console.sessions.drop(session.id)
        response = RedirectResponse(f"{PREFIX}/signin", status_code=303)
        response.delete_cookie(COOKIE, path=COOKIE_PATH, httponly=True, samesite="strict",
                               secure=request.url.scheme == "https")
        return response

    return router
