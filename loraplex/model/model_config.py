"""ModelConfig: the shape of a llama-family model and its family switches, which model/llama.py
acts on (read from a checkpoint's config.json by model/loader.py)."""

from dataclasses import dataclass

from loraplex.lora.modules import (
    DOWN_PROJ,
    FUSED_LINEARS,
    GATE_PROJ,
    K_PROJ,
    O_PROJ,
    Q_PROJ,
    UP_PROJ,
    V_PROJ,
)


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a llama-family model (read from a checkpoint's config.json by the loader)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool = False  # Qwen2 has biases on q, k and v
    # RoPE frequency scaling: None, {"rope_type": "linear", "factor"} or the llama3 parameters.
    rope_scaling: dict | None = None
    # Mistral/Qwen2/Phi-3 sliding-window attention span (Gemma 3: of its sliding layers); the
    # engine caps max_model_len to it, so full attention stays exact.
    sliding_window: int | None = None
    # Qwen3, Gemma 3: an RMSNorm over each head's query and key, before RoPE.
    qk_norm: bool = False
    # Phi-3/Phi-4 checkpoints store q/k/v as one qkv_proj and gate/up as one gate_up_proj.
    checkpoint_fused: bool = False
    # Gemma 3 (all four below): GeGLU, embeddings times sqrt(hidden_size), norms that scale by
    # (1 + weight), and a second norm after attention and after the MLP ("sandwich" norms).
    hidden_act: str = "silu"  # "silu" or "gelu_tanh"
    scale_embeddings: bool = False
    norm_unit_offset: bool = False
    sandwich_norms: bool = False
    # Gemma 3: attention scores scale by query_pre_attn_scalar ** -0.5, not head_dim ** -0.5.
    query_pre_attn_scalar: float | None = None
    # Gemma 3: "sliding_attention" or "full_attention" per layer; sliding layers use RoPE base
    # rope_local_theta without scaling (under the engine's cap both attend to every key).
    layer_types: tuple[str, ...] | None = None
    rope_local_theta: float | None = None

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of every LoRA-targetable linear layer."""
        q_out = self.num_heads * self.head_dim
        kv_out = self.num_kv_heads * self.head_dim
        return {
            Q_PROJ: (self.hidden_size, q_out),
            K_PROJ: (self.hidden_size, kv_out),
            V_PROJ: (self.hidden_size, kv_out),
            O_PROJ: (q_out, self.hidden_size),
            GATE_PROJ: (self.hidden_size, self.intermediate_size),
            UP_PROJ: (self.hidden_size, self.intermediate_size),
            DOWN_PROJ: (self.intermediate_size, self.hidden_size),
        }

    def fused_out_features(self, path: str) -> list[int]:
        """Output sizes of the modules a fused linear (a FUSED_LINEARS path) holds, in order."""
        shapes = self.module_shapes()
        return [shapes[module][1] for module in FUSED_LINEARS[path]]
