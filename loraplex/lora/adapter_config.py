"""An adapter's adapter_config.json: parsed, and refused unless it asks for plain LoRA whose
math we implement (rank and alpha, rsLoRA, PEFT's rank/alpha patterns). A tenant's upload, so
every field is checked for its type and range, and a pattern must be safe to match.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path

from loraplex.lora.modules import TARGET_MODULES

CONFIG_FILE = "adapter_config.json"


class AdapterError(ValueError):
    """A LoRA adapter that cannot be used; the message names the file and the reason."""


def _error(path: Path, reason: str) -> AdapterError:
    return AdapterError(f"adapter {path}: {reason}")


# Config options that change the adapter's math; serving them as plain LoRA would be silently wrong.
_UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA adapters are not supported",
    "use_qalora": "QA-LoRA adapters are not supported",
    "lora_bias": "LoRA bias terms are not supported",
    "fan_in_fan_out": "transposed (Conv1D-style) weights are not supported",
    "modules_to_save": "adapters that replace whole modules are not supported",
    "trainable_token_indices": "trainable token embeddings are not supported",
    "alora_invocation_tokens": "activated LoRA (aLoRA) is not supported",
    "layer_replication": "layer replication is not supported",
    "target_parameters": "LoRA on raw parameters is not supported",
}


# rank_pattern / alpha_pattern keys are regexes (as in PEFT). Backtracking over nested or many
# quantifiers can take forever on a module path, so a tenant's key may hold at most this many
# quantifiers, none on a group, and this many characters.
MAX_PATTERN_QUANTIFIERS = 1


MAX_PATTERN_KEY_CHARS = 256


def read_config(path: Path, files: Mapping[str, bytes] | None) -> dict:
    """The parsed adapter_config.json, refused if it asks for anything but plain LoRA."""
    if files is None:
        if not path.is_dir():
            raise _error(path, "is not a directory" if path.exists()
                         else "directory does not exist")
        if not (path / CONFIG_FILE).is_file():
            raise _error(path, f"{CONFIG_FILE} is missing")
    elif CONFIG_FILE not in files:
        raise _error(path, f"{CONFIG_FILE} is missing")
    try:
        text = (path / CONFIG_FILE).read_bytes() if files is None else files[CONFIG_FILE]
        config = json.loads(text.decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _error(path, f"{CONFIG_FILE} is not valid JSON ({e})") from e
    except RecursionError:  # json's parser recurses once per nesting level
        raise _error(path, f"{CONFIG_FILE} is nested too deeply") from None
    if not isinstance(config, dict):
        raise _error(path, f"{CONFIG_FILE} must hold a JSON object")
    if config.get("peft_type") != "LORA":
        raise _error(
            path,
            f"{CONFIG_FILE} has peft_type {config.get('peft_type')!r}; "
            "only LORA adapters are supported",
        )
    for option, why in _UNSUPPORTED_OPTIONS.items():
        if config.get(option):
            raise _error(path, f"{CONFIG_FILE} sets {option}={config[option]!r}: {why}")
    if config.get("bias", "none") != "none":
        raise _error(path, f"{CONFIG_FILE} sets bias={config['bias']!r}: only 'none' is supported")
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise _error(path, f"{CONFIG_FILE} has an invalid target_modules: {targets!r} (a "
                           "module name, a regex or a list of names)")
    for target in targets:
        if "embed_tokens" in target or "lm_head" in target:
            raise _error(
                path,
                f"{CONFIG_FILE} targets {target!r}: LoRA on embed_tokens or lm_head "
                f"is not supported, only on {', '.join(TARGET_MODULES)}",
            )
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not _is_number(r) or not _is_number(alpha) or r <= 0:
        raise _error(
            path,
            f"{CONFIG_FILE} needs a positive r and a numeric lora_alpha, got "
            f"r={r!r}, lora_alpha={alpha!r}",
        )
    use_rslora = config.get("use_rslora", False)
    if not isinstance(use_rslora, bool | None):  # a string "false" is truthy: refuse, not guess
        raise _error(path, f"{CONFIG_FILE} has use_rslora={use_rslora!r}: true or false")
    return {
        "r": r,
        "lora_alpha": alpha,
        "use_rslora": bool(use_rslora),
        "rank_pattern": _compile_pattern(path, "rank_pattern", config.get("rank_pattern")),
        "alpha_pattern": _compile_pattern(path, "alpha_pattern", config.get("alpha_pattern")),
    }


def _is_number(value: object) -> bool:
    """A finite int or float (Python's json reads NaN and Infinity)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _compile_pattern(path: Path, field: str, pattern: object) -> list[tuple[re.Pattern, float]]:
    """rank_pattern / alpha_pattern as (regex, value), matched the way PEFT matches them."""
    if not pattern:
        return []
    if not isinstance(pattern, dict) or not all(_is_number(v) for v in pattern.values()):
        raise _error(path, f"{CONFIG_FILE} has an invalid {field}: {pattern!r}")
    for key in pattern:
        if len(key) > MAX_PATTERN_KEY_CHARS or not _has_few_quantifiers(key):
            raise _error(path, f"{CONFIG_FILE} has a {field} key too complex to match safely: "
                               f"{key[:80]!r} (at most {MAX_PATTERN_QUANTIFIERS} quantifier, "
                               f"none on a group, up to {MAX_PATTERN_KEY_CHARS} characters)")
    try:
        # PEFT (peft.utils.other.get_pattern_key): a key matches the end of the module path.
        return [(re.compile(rf"(.*\.)?({key})$"), value) for key, value in pattern.items()]
    except re.error as e:
        raise _error(path, f"{CONFIG_FILE} has an invalid {field} key ({e})") from e


def _has_few_quantifiers(key: str) -> bool:
    """At most MAX_PATTERN_QUANTIFIERS unescaped *, +, ? or {, none right after a group's ")".
    A "?" opening a group's options ("(?:", "(?P<") is no quantifier."""
    quantifiers, i = 0, 0
    while i < len(key):
        if key[i] == "\\":
            i += 2
            continue
        if key[i] in "*+?{" and not (key[i] == "?" and i > 0 and key[i - 1] == "("):
            if i > 0 and key[i - 1] == ")":
                return False
            quantifiers += 1
        i += 1
    return quantifiers <= MAX_PATTERN_QUANTIFIERS


def pattern_value(
    pattern: list[tuple[re.Pattern, float]], module_key: str, default: float
) -> float:
    """The first matching pattern's value wins, as in PEFT."""
    for regex, value in pattern:
        if regex.match(module_key):
            return value
    return default
