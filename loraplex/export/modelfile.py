"""An Ollama Modelfile for an exported GGUF, written beside it as `<out stem>.Modelfile`.

Ollama formats prompts with Go templates, not Jinja, so the chat template cannot be copied over.
We translate the one format we can recognise for sure, ChatML (`<|im_start|>role\\n...
<|im_end|>\\n`, used by SmolLM2 and Qwen), by rendering the model's own template and comparing;
for any other template the Modelfile sets none and Ollama picks one from the GGUF's
tokenizer.chat_template itself.
"""

import re
from pathlib import Path

from loraplex.model.tokenizer import Tokenizer, TokenizerError

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
CHATML_TEMPLATE = (
    "{{- range .Messages }}" + IM_START + "{{ .Role }}\n{{ .Content }}" + IM_END + "\n"
    "{{ end }}" + IM_START + "assistant\n"
)


def modelfile_path(gguf_path: Path) -> Path:
    """bot.gguf -> bot.Modelfile in the same folder (so several exports can share a folder)."""
    return gguf_path.with_suffix(".Modelfile")


def modelfile_text(base: str, tokenizer: Tokenizer, adapter: str | None = None) -> str:
    """`base` and `adapter` as Ollama should read them: paths relative to the Modelfile's
    folder (./file.gguf) or, for base, the name of a model Ollama already has."""
    lines = [
        "# Written by `loraplex export gguf`. Create the model with:",
        "#   ollama create NAME -f THIS_FILE",
        f"FROM {base}",
    ]
    if adapter is not None:
        lines.append(f"ADAPTER {adapter}")
    system = chatml_default_system(tokenizer)
    if system is not None:
        lines.append(f'TEMPLATE """{CHATML_TEMPLATE}"""')
        if system:
            # The template adds this when a conversation has no system message; Ollama's
            # SYSTEM does the same.
            lines.append(f'SYSTEM """{system}"""')
        lines += [f'PARAMETER stop "{IM_START}"', f'PARAMETER stop "{IM_END}"']
    return "\n".join(lines) + "\n"


def chatml_default_system(tokenizer: Tokenizer) -> str | None:
    """If the chat template is ChatML: the system prompt it adds when a conversation has none
    ("" if it adds none). None if the template is anything else."""
    if not tokenizer.chat_template:
        return None

    def turn(role: str, content: str) -> str:
        return f"{IM_START}{role}\n{content}{IM_END}\n"

    user, reply = turn("user", "U"), f"{IM_START}assistant\n"
    try:
        with_system = tokenizer.apply_chat_template(
            [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
        )
        without = tokenizer.apply_chat_template([{"role": "user", "content": "U"}])
    except TokenizerError:  # e.g. a template that refuses a system message
        return None
    if with_system != turn("system", "S") + user + reply or not without.endswith(user + reply):
        return None
    added = without.removesuffix(user + reply)
    if not added:
        return ""
    match = re.fullmatch(rf"{re.escape(IM_START)}system\n(.*){re.escape(IM_END)}\n", added, re.S)
    return match[1] if match else None
