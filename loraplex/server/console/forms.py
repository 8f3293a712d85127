"""Reading a submitted form's fields: each missing or malformed one is a FormError naming it."""

from starlette.datastructures import UploadFile

from loraplex.server.console.guard import FormError


def text(form, name: str, *, required: bool = True, default: str = "") -> str:
    value = form.get(name)
    if isinstance(value, UploadFile):
        raise FormError(f"{name}: expected text, got a file")
    value = (value or "").strip()
    if required and not value:
        raise FormError(f"{name}: required")
    return value or default


def integer(form, name: str, *, default: int | None = None) -> int | None:
    """An integer field; blank gives `default` (None: the field may be left empty)."""
    return _parsed(form, name, int, "a whole number", default)


def number(form, name: str, *, default: float | None = None) -> float | None:
    return _parsed(form, name, float, "a number", default)


def _parsed(form, name: str, parse, what: str, default):
    value = text(form, name, required=False)
    if not value:
        return default
    try:
        return parse(value)
    except ValueError:
        raise FormError(f"{name}: expected {what}, got {value!r}") from None


def checkbox(form, name: str) -> bool:
    return form.get(name) in ("on", "true", "1")


def files(form, name: str) -> list[UploadFile]:
    """The uploads under `name` (a multiple file input), empty ones left out."""
    return [f for f in form.getlist(name) if isinstance(f, UploadFile) and f.filename]


def version_number(value: str) -> int:
    """"v3" or "3" -> 3."""
    digits = value.strip().removeprefix("v")
    if not digits.isdigit() or int(digits) < 1:
        raise FormError(f"version: expected v1, v2, ..., got {value!r}")
    return int(digits)
