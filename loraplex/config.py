"""EngineConfig: every knob of the engine in one validated dataclass."""

from dataclasses import dataclass

import torch

from loraplex.lora.pages import DEFAULT_PAGE_RANK, pages_for

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LORA_DTYPES = ("auto", "int8")
SCHEDULING = ("fair", "fcfs")

# The server's failed-authentication throttle (ServerSettings, `serve` options; server/auth.py):
# failures one client address may make per window before they get 429s, and how many addresses
# are remembered at once (~100 bytes each).
MAX_AUTH_FAILURES = 20
AUTH_FAILURE_WINDOW_S = 60.0
MAX_AUTH_FAILURE_ADDRESSES = 100_000


class ConfigError(ValueError):
    """An invalid engine setting; the message names the field."""


@dataclass
class EngineConfig:
    model: str = "smollm2-135m"
    """A default model name (see `loraplex pull`) or a Hugging Face checkpoint directory."""
    dtype: str = "float32"
    """Weights and activations: float32, bfloat16 or float16."""
    device: str = "auto"
    """'cpu', 'cuda', 'cuda:N' or 'auto' (CUDA when present)."""
    max_loras: int = 8
    """Device slots: how many distinct adapters may be resident and share one batch (their
    memory is max_lora_pages)."""
    max_lora_rank: int = 16
    """The largest adapter rank accepted."""
    max_lora_pages: int | None = None
    """Device memory for adapter weights, in pages of lora_page_rank rank rows of every module
    at every layer: an adapter takes ceil(rank / lora_page_rank) pages, so a rank-8 adapter
    takes an eighth of what a rank-64 one does (loraplex/lora/pages.py). Default: max_loras
    adapters of max_lora_rank, the memory of slots sized for the largest rank; raise max_loras
    as well to keep more small adapters resident in the same memory (`loraplex plan`)."""
    lora_page_rank: int = DEFAULT_PAGE_RANK
    """Rank rows per page: a rank that is not a multiple of it rounds up to the next one."""
    lora_dtype: str = "auto"
    """Adapter weights in slots: 'auto' (the model's dtype) or 'int8' (half the bytes of
    bfloat16, a scale per rank row: decode steps with many adapters run faster; see
    loraplex/lora/quantize.py for the rounding it adds)."""
    max_cpu_loras: int = 64
    """Adapters kept loaded in host memory (LRU), besides those in slots: an adapter in a slot
    serves from there, so on CPU, where slots are host memory too, this may be below
    max_loras."""
    adapter_cache: bool = True
    """Keep each loaded adapter in ready-to-serve form under <home>/cache/adapters, so that
    loading it again is one read (see loraplex/lora/packed.py)."""
    max_num_seqs: int = 64
    """Sequences in one batch (seats): fewer make each step shorter, so a tenant that is
    admitted streams faster, at the cost of total throughput when many are busy."""
    scheduling: str = "fair"
    """'fair': tenants (the fairness key of each request) get service in proportion to their
    weights, by virtual token counters (engine/fairness.py); 'fcfs': first come, first served."""
    fairness_input_cost: float = 1.0
    """What one prompt token computed costs a tenant's virtual token counter."""
    fairness_output_cost: float = 2.0
    """What one generated token costs a tenant's virtual token counter."""
    max_num_batched_tokens: int = 512
    """Tokens computed in one step; long prompts are prefilled in chunks of at most this."""
    return_window_ms: float = 50.0
    """After a step that finished requests, wait up to this long (and at most a quarter of that
    step) for their clients' next requests before the next step, so that a client that answers
    at once over a network joins the next step instead of waiting behind it; only while most
    recent clients did answer that fast (engine/return_window.py). 0 turns it off."""
    max_model_len: int | None = None
    """Longest prompt + output; default: the model's context (capped at 4096 to bound memory)."""
    block_size: int = 16
    """Tokens per KV cache block."""
    enable_prefix_caching: bool = True
    """Reuse the KV blocks of a prompt's beginning that the same tenant, on the same adapter
    version, sent before (a chat's earlier turns, a shared system prompt): they are not computed
    again. Never across tenants or versions (engine/prefix_cache.py)."""
    kv_cache_bytes: int | None = None
    """KV cache budget in bytes; when None, kv_cache_fraction of the device's memory."""
    kv_cache_fraction: float = 0.1
    """Fraction of total device (or host) memory for the KV cache when kv_cache_bytes is None."""

    def __post_init__(self):
        def positive(name):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")

        for name in ("max_loras", "max_lora_rank", "max_cpu_loras", "max_num_seqs",
                     "max_num_batched_tokens", "block_size", "lora_page_rank"):
            positive(name)
        if self.max_lora_pages is not None:
            positive("max_lora_pages")
            if self.max_lora_pages < pages_for(self.max_lora_rank, self.lora_page_rank):
                raise ConfigError(
                    f"max_lora_pages={self.max_lora_pages} cannot hold one adapter of "
                    f"max_lora_rank={self.max_lora_rank} (it takes "
                    f"{pages_for(self.max_lora_rank, self.lora_page_rank)} pages of "
                    f"lora_page_rank={self.lora_page_rank})")
        if not isinstance(self.enable_prefix_caching, bool):
            raise ConfigError(f"enable_prefix_caching must be true or false, got "
                              f"{self.enable_prefix_caching!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.lora_dtype not in LORA_DTYPES:
            raise ConfigError(f"lora_dtype must be one of {', '.join(LORA_DTYPES)}, "
                              f"got {self.lora_dtype!r}")
        if self.scheduling not in SCHEDULING:
            raise ConfigError(f"scheduling must be one of {', '.join(SCHEDULING)}, "
                              f"got {self.scheduling!r}")
        for name in ("fairness_input_cost", "fairness_output_cost"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ConfigError(f"{name} must be a positive number, got {value!r}")
        if (isinstance(self.return_window_ms, bool)
                or not isinstance(self.return_window_ms, int | float)
                or not 0 <= self.return_window_ms <= 1000):
            raise ConfigError(f"return_window_ms must be a number of milliseconds from 0 to "
                              f"1000, got {self.return_window_ms!r}")
        if self.max_model_len is not None:
            positive("max_model_len")
        if self.kv_cache_bytes is not None:
            positive("kv_cache_bytes")
        if not 0 < self.kv_cache_fraction <= 0.95:
            raise ConfigError(
                f"kv_cache_fraction must be in (0, 0.95], got {self.kv_cache_fraction}"
            )
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device {self.device!r} requested but CUDA is not available")

    @property
    def num_lora_pages(self) -> int:
        """max_lora_pages, or its default."""
        if self.max_lora_pages is not None:
            return self.max_lora_pages
        return self.max_loras * pages_for(self.max_lora_rank, self.lora_page_rank)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)
