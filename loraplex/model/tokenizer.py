"""A checkpoint's tokenizer (tokenizer.json) and chat template, without transformers."""

import json
from pathlib import Path

import jinja2
import jinja2.sandbox
from tokenizers import Tokenizer as HFTokenizer


class TokenizerError(ValueError):
    """A tokenizer or chat template we cannot use."""


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _token_text(value) -> str | None:
    """tokenizer_config.json stores special tokens as a string or as {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"{model_dir}: no tokenizer.json")
        self._tok = HFTokenizer.from_file(str(path))
        config = _read_json(model_dir / "tokenizer_config.json")
        template_file = model_dir / "chat_template.jinja"  # where transformers 5 saves it
        self.chat_template: str | None = (
            template_file.read_text() if template_file.is_file() else config.get("chat_template")
        )
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        # Generation stops at any of these: the tokenizer's eos and generation_config's list.
        eos_ids = set()
        for source in (_read_json(model_dir / "generation_config.json"),
                       _read_json(model_dir / "config.json")):
            value = source.get("eos_token_id")
            eos_ids.update(value if isinstance(value, list) else [] if value is None else [value])
        if self.eos_token is not None and self._tok.token_to_id(self.eos_token) is not None:
            eos_ids.add(self._tok.token_to_id(self.eos_token))
        self.eos_token_ids: frozenset[int] = frozenset(eos_ids)

    @property
    def eos_token_id(self) -> int | None:
        """The tokenizer's own end-of-sequence token (generation stops at all eos_token_ids)."""
        return None if self.eos_token is None else self._tok.token_to_id(self.eos_token)

    def special_token_ids(self) -> set[int]:
        return {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}

    def to_json(self) -> str:
        """The tokenizer as tokenizer.json text (what grammar libraries build their tables from)."""
        return self._tok.to_str()

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # JSON's \ud800-style escapes can spell half a character
            raise TokenizerError("the text holds a lone surrogate escape (\\ud800-\\udfff), "
                                 "not text") from None
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str:
        """Render the conversation with the checkpoint's own chat template (sandboxed Jinja);
        `tools` (OpenAI's shape) for a template that reads them."""
        if not self.chat_template:
            raise TokenizerError("this model has no chat template; send a plain prompt instead")

        def raise_exception(message):
            raise TokenizerError(f"chat template: {message}")

        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(self.chat_template).render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                tools=tools,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except jinja2.TemplateError as e:
            raise TokenizerError(f"chat template failed: {e}") from None

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        # The template writes any BOS itself, so the tokenizer must not add another.
        return self.encode(self.apply_chat_template(messages, tools=tools),
                           add_special_tokens=False)
