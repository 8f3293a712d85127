"""The `loraplex` command line: thin wrappers that parse, call the library, and print."""

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(help="loraplex: one base LLM, many tenants' LoRA adapters.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
err = Console(stderr=True)


def _fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(1)


@app.command()
def pull(name: Annotated[str, typer.Argument(help="A default model, e.g. smollm2-135m")]):
    """Fetch a default model into the loraplex home ($LORAPLEX_HOME, default ~/.loraplex)."""
    from loraplex.model.pull import PullError
    from loraplex.model.pull import pull as pull_model

    try:
        path = pull_model(name)
    except PullError as e:
        _fail(str(e))
    typer.echo(path)


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="The user's message")],
    model: Annotated[str, typer.Option(help="Default model name or checkpoint dir")] = (
        "smollm2-135m"
    ),
    adapter: Annotated[Path | None, typer.Option(help="A PEFT LoRA adapter directory")] = None,
    max_tokens: Annotated[int, typer.Option(help="Most tokens to generate")] = 128,
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = 0.0,
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | float16")] = "float32",
    raw: Annotated[bool, typer.Option(help="Send the prompt as is, without the chat template")] = (
        False
    ),
):
    """Answer one question with the base model or an adapter (applies the chat template)."""
    from loraplex import LLM, SamplingParams
    from loraplex.model.pull import PullError

    try:
        llm = LLM(model, dtype=dtype, max_loras=1, max_cpu_loras=1)
        text = prompt if raw else llm.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}]
        )
        ids = llm.tokenizer.encode(text, add_special_tokens=raw)
        params = SamplingParams(temperature=temperature, max_tokens=max_tokens)
        out = llm.generate(ids, params, adapters=[adapter])[0]
    except (ValueError, OSError, PullError) as e:  # each carries a clear message
        _fail(str(e))
    if out.error:
        _fail(out.error)
    typer.echo(out.text.strip())
