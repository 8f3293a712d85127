"""Fuzz targets: the GGUF export's arguments, on both roads in: `loraplex export gguf`'s
command line (in-process, on the fuzz app's home) and the console's export form.

Arguments start valid (t00's bot at v1, v2 or its serving version, merged or adapter-only,
each dtype) and may get mutations: a tenant, adapter or version spec of any text, a dtype of
any text, --base with an adapter, --adapter-only with --base, an output name that is empty,
a directory or an existing file without --force. Property: the CLI exits 0 having written a
GGUF, or exits non-zero with a message and no traceback; the form is a 303 to the exports page
or a 4xx page; a valid set of arguments works.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from hypothesis import strategies as st

from loraplex.faults.fuzz import ACCEPTED, REFUSED, Fault, Target
from loraplex.faults.fuzz_requests import FuzzApp

DTYPES = ("f32", "f16", "bf16", "q8_0")
SPECS = ("bot", "bot@v1", "bot@v2", "bot@2", "bot@v9", "bot@", "bot@vv1", "@v1", "nobot",
         "bot@v1@v2", "../bot", "bot@v-1", "bot@v٣")  # ٣: a digit to isdigit(), not to int()?
ARG_TEXT = st.text(max_size=12).filter(lambda s: not s.startswith("-"))
CSRF_RE = re.compile(r'name="csrf" value="([^"]+)"')


@st.composite
def cli_args(draw) -> tuple[list[str], bool]:
    """(the arguments after `export gguf`, whether they are valid); --out is a fresh name in
    a temp dir, which the check fills in for "{out}"."""
    valid = True
    if draw(st.integers(0, 9)) == 0:
        args = ["--base"]
    else:
        args = ["t00", draw(st.sampled_from(("bot", "bot@v1", "bot@v2")))]
        if draw(st.booleans()):
            args.append("--adapter-only")
    args += ["--out", "{out}", "--dtype", draw(st.sampled_from(DTYPES)), "--force"]
    for _ in range(draw(st.integers(0, 2))):
        valid = False
        kind = draw(st.sampled_from(("tenant", "spec", "dtype", "flag", "out", "drop")))
        if kind == "tenant" and args[0] != "--base":
            args[0] = draw(st.sampled_from(("t01", "nobody", "T00", "")) | ARG_TEXT)
        elif kind == "spec" and args[0] != "--base":
            args[1] = draw(st.sampled_from(SPECS) | ARG_TEXT)
        elif kind == "dtype":
            args[args.index("--dtype") + 1] = draw(st.sampled_from(("F16", "q4_0", "")) | ARG_TEXT)
        elif kind == "flag":
            args.append(draw(st.sampled_from(("--base", "--adapter-only", "--base-gguf=x.gguf",
                                              "--bogus"))))
        elif kind == "out":
            args[args.index("--out") + 1] = draw(st.sampled_from(("{dir}", "{dir}/no/such/x",
                                                                  "{out}.gguf", "{out}")))
        elif "--force" in args:
            args.remove("--force")
            args[args.index("--out") + 1] = "{existing}"
    return args, valid


def cli_target(app: FuzzApp) -> Target:
    from typer.testing import CliRunner

    from loraplex.cli import app as cli_app  # the whole CLI: `export gguf` as a user types it
    from loraplex.home import HOME_ENV

    runner = CliRunner()
    model = str(app.home.model_dir)

    def check(drawn: tuple[list[str], bool]) -> str:
        args, valid = drawn
        with tempfile.TemporaryDirectory(prefix="loraplex-fuzz-export-") as tmp:
            existing = Path(tmp) / "existing.gguf"
            existing.write_bytes(b"not yours")
            names = {"{out}": f"{tmp}/x.gguf", "{dir}": tmp, "{existing}": str(existing)}
            filled = [names.get(a, a.replace("{dir}", tmp).replace("{out}", f"{tmp}/x"))
                      for a in args]
            result = runner.invoke(cli_app, ["export", "gguf", *filled, "--model", model],
                                   env={HOME_ENV: str(app.home.home)})
            if result.exception is not None and not isinstance(result.exception, SystemExit):
                raise result.exception
            if result.exit_code == 0:
                out = Path(filled[filled.index("--out") + 1])
                if out.read_bytes()[:4] != b"GGUF":
                    raise Fault(f"exit 0 but {out.name} is no GGUF")
                return ACCEPTED
        if "Traceback" in result.output or not result.output.strip():
            raise Fault(f"exit {result.exit_code} without a clear message: {result.output!r}")
        if valid:
            raise Fault(f"valid arguments failed: {result.output[-500:]!r}")
        return REFUSED

    return Target("export_cli", cli_args(), check)


FORM_FIELDS = {"version": st.sampled_from(("bot@v1", "bot@v2")),
               "kind": st.sampled_from(("merged", "adapter-only")),
               "dtype": st.sampled_from(DTYPES)}


@st.composite
def forms(draw) -> tuple[dict, bool]:
    form, valid = dict(draw(st.fixed_dictionaries(FORM_FIELDS))), True
    for _ in range(draw(st.integers(0, 2))):
        valid = False
        name = draw(st.sampled_from(sorted(FORM_FIELDS)))
        if draw(st.booleans()):
            form.pop(name, None)  # a second mutation may drop the same field again
        else:
            form[name] = draw(st.sampled_from(SPECS) | st.text(max_size=12))
    return form, valid


def console_target(app: FuzzApp) -> Target:
    client = app.client
    signed = client.post("/console/signin", data={"key": app.home.admin_key},
                         follow_redirects=True)
    csrf = CSRF_RE.search(signed.text).group(1)

    def check(drawn: tuple[dict, bool]) -> str:
        form, valid = drawn
        response = client.post("/console/tenants/t00/exports", data=form | {"csrf": csrf},
                               follow_redirects=False)
        if response.status_code == 303:
            return ACCEPTED
        if not 400 <= response.status_code < 500 or "Traceback" in response.text:
            raise Fault(f"{response.status_code}: {response.text[:300]!r}")
        if valid:
            raise Fault(f"a valid export was refused: {response.status_code}")
        return REFUSED

    return Target("export_console", forms(), check)


def export_targets(app: FuzzApp) -> list[Target]:
    return [cli_target(app), console_target(app)]
