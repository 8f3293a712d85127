"""Shapes of popular base models, from their published config.json files, so that `loraplex plan`
can size a deployment of any of them without downloading anything.

Each entry is ModelConfig keyword arguments (the values read_config derives from that
config.json). No torch here: plan.py imports this.
"""

LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
LLAMA3 = {"vocab_size": 128256, "head_dim": 128, "num_kv_heads": 8, "rms_norm_eps": 1e-5,
          "rope_theta": 500000.0, "max_position_embeddings": 131072}
LLAMA3_1 = {**LLAMA3, "tie_word_embeddings": False, "rope_scaling": {**LLAMA3_ROPE, "factor": 8.0}}
LLAMA3_2 = {**LLAMA3, "tie_word_embeddings": True, "rope_scaling": {**LLAMA3_ROPE, "factor": 32.0}}
QWEN = {"head_dim": 128, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "tie_word_embeddings": False}
QWEN2_5 = {**QWEN, "vocab_size": 152064, "max_position_embeddings": 32768, "qkv_bias": True}
QWEN3 = {**QWEN, "vocab_size": 151936, "max_position_embeddings": 40960, "num_kv_heads": 8,
         "qk_norm": True}


def gemma3(num_layers: int, **shape) -> dict:
    """A Gemma 3 text model: five sliding-window layers, then one global layer, repeated."""
    layer_types = tuple("full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                        for i in range(num_layers))
    return {
        "vocab_size": 262208, "num_layers": num_layers, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "max_position_embeddings": 131072, "tie_word_embeddings": True,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "sliding_window": 1024,
        "qk_norm": True, "hidden_act": "gelu_tanh", "scale_embeddings": True,
        "norm_unit_offset": True, "sandwich_norms": True, "layer_types": layer_types,
        "rope_local_theta": 10000.0, **shape,
    }


KNOWN_MODEL_SHAPES: dict[str, dict] = {
    "smollm2-135m": {  # HuggingFaceTB/SmolLM2-135M-Instruct, the default model
        "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_layers": 30,
        "num_heads": 9, "num_kv_heads": 3, "head_dim": 64, "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0, "max_position_embeddings": 8192, "tie_word_embeddings": True,
    },
    "llama-3.1-8b": {**LLAMA3_1, "hidden_size": 4096, "intermediate_size": 14336,
                     "num_layers": 32, "num_heads": 32},
    "llama-3.1-70b": {**LLAMA3_1, "hidden_size": 8192, "intermediate_size": 28672,
                      "num_layers": 80, "num_heads": 64},
    # Llama 3.2's small models tie the LM head to the embeddings.
    "llama-3.2-1b": {**LLAMA3_2, "hidden_size": 2048, "intermediate_size": 8192,
                     "num_layers": 16, "num_heads": 32, "head_dim": 64},
    "llama-3.2-3b": {**LLAMA3_2, "hidden_size": 3072, "intermediate_size": 8192,
                     "num_layers": 28, "num_heads": 24},
    "mistral-7b": {  # Mistral-7B-Instruct-v0.3 (no sliding window, unlike v0.1)
        "vocab_size": 32768, "hidden_size": 4096, "intermediate_size": 14336, "num_layers": 32,
        "num_heads": 32, "num_kv_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-5,
        "rope_theta": 1000000.0, "max_position_embeddings": 32768, "tie_word_embeddings": False,
    },
    "qwen2.5-7b": {**QWEN2_5, "hidden_size": 3584, "intermediate_size": 18944, "num_layers": 28,
                   "num_heads": 28, "num_kv_heads": 4},
    "qwen2.5-14b": {**QWEN2_5, "hidden_size": 5120, "intermediate_size": 13824, "num_layers": 48,
                    "num_heads": 40, "num_kv_heads": 8},
    "qwen2.5-32b": {**QWEN2_5, "hidden_size": 5120, "intermediate_size": 27648, "num_layers": 64,
                    "num_heads": 40, "num_kv_heads": 8},
    "qwen3-8b": {**QWEN3, "hidden_size": 4096, "intermediate_size": 12288, "num_layers": 36,
                 "num_heads": 32},
    "qwen3-14b": {**QWEN3, "hidden_size": 5120, "intermediate_size": 17408, "num_layers": 40,
                  "num_heads": 40},
    "qwen3-32b": {**QWEN3, "hidden_size": 5120, "intermediate_size": 25600, "num_layers": 64,
                  "num_heads": 64},
    # Gemma 3's text models (the language_model of the multimodal checkpoints).
    "gemma-3-4b": gemma3(34, hidden_size=2560, intermediate_size=10240, num_heads=8,
                         num_kv_heads=4, head_dim=256, query_pre_attn_scalar=256),
    "gemma-3-12b": gemma3(48, hidden_size=3840, intermediate_size=15360, num_heads=16,
                          num_kv_heads=8, head_dim=256, query_pre_attn_scalar=256),
    "gemma-3-27b": gemma3(62, hidden_size=5376, intermediate_size=21504, num_heads=32,
                          num_kv_heads=16, head_dim=128, query_pre_attn_scalar=168),
    "phi-4": {  # microsoft/phi-4 (model_type phi3)
        "vocab_size": 100352, "hidden_size": 5120, "intermediate_size": 17920, "num_layers": 40,
        "num_heads": 40, "num_kv_heads": 10, "head_dim": 128, "rms_norm_eps": 1e-5,
        "rope_theta": 250000.0, "max_position_embeddings": 16384, "tie_word_embeddings": False,
        "checkpoint_fused": True,
    },
}
