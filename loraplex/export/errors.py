"""The one error type of the export package."""


class ExportError(ValueError):
    """An export that cannot be done; the message says what is wrong and how to fix it."""
