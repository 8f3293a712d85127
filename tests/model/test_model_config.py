"""ModelConfig (model/model_config.py): the LoRA modules' shapes and the fused linears' columns."""

from loraplex.lora.modules import DOWN_PROJ, K_PROJ, O_PROJ, Q_PROJ, UP_PROJ
from loraplex.model.model_config import ModelConfig

# SmolLM2-135M's shape: 9 query heads and 3 KV heads of 64, MLP 1536.
SMOLLM2 = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                      num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5,
                      rope_theta=1e5, max_position_embeddings=8192, tie_word_embeddings=True)


def test_module_shapes_follow_the_heads_and_the_mlp():
    shapes = SMOLLM2.module_shapes()
    assert shapes[Q_PROJ] == (576, 576) and shapes[K_PROJ] == (576, 192)
    assert shapes[O_PROJ] == (576, 576)
    assert shapes[UP_PROJ] == (576, 1536) and shapes[DOWN_PROJ] == (1536, 576)


def test_a_fused_linear_holds_its_modules_columns_in_order():
    assert SMOLLM2.fused_out_features("self_attn.qkv_proj") == [576, 192, 192]
    assert SMOLLM2.fused_out_features("mlp.gate_up_proj") == [1536, 1536]
    assert SMOLLM2.fused_out_features("mlp.down_proj") == [576]
