"""What the console's routes share: the server's own objects (the same registry, vault, queues
and engine the HTTP API uses), the sessions, and rendering a template."""

from dataclasses import dataclass
from pathlib import Path

from fastapi import Request
from fastapi.templating import Jinja2Templates

from loraplex.export.jobs import ExportJobs
from loraplex.registry import Registry
from loraplex.server.auth import Authenticator
from loraplex.server.console.sessions import SessionStore
from loraplex.server.routes.chat import Chat
from loraplex.server.serving import Serving
from loraplex.train.jobs import TrainingJobs
from loraplex.vault import Vault
from loraplex.vault.artifacts import ArtifactSealer

HERE = Path(__file__).parent
PREFIX = "/console"
# Jinja's autoescape is on for .html: every name, dataset line and model output is text.
templates = Jinja2Templates(directory=HERE / "templates")


@dataclass
class Console:
    registry: Registry
    vault: Vault
    jobs: TrainingJobs
    exports: ExportJobs
    sealer: ArtifactSealer
    engine: object  # AsyncEngine, or the Ray gateway's RemoteEngine
    ledger: object  # the server's LedgerWriter
    serving: Serving
    auth: Authenticator
    chat: Chat
    sessions: SessionStore
    validate: object = None  # the server's adapter validator (validation.py)

    @property
    def base_model_name(self) -> str:
        return self.serving.settings.base_model_name


def render(request: Request, name: str, status_code: int = 200, **context):
    """The template with the request's session (for the navigation and the CSRF token)."""
    session = getattr(request.state, "session", None)
    return templates.TemplateResponse(request, name, {"session": session, **context},
                                      status_code=status_code)
