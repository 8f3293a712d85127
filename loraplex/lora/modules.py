"""Names of the linear layers a LoRA adapter may target (shared by model and adapter loader)."""

Q_PROJ = "q_proj"
K_PROJ = "k_proj"
V_PROJ = "v_proj"
O_PROJ = "o_proj"
GATE_PROJ = "gate_proj"
UP_PROJ = "up_proj"
DOWN_PROJ = "down_proj"

ATTENTION_MODULES = (Q_PROJ, K_PROJ, V_PROJ, O_PROJ)
MLP_MODULES = (GATE_PROJ, UP_PROJ, DOWN_PROJ)
TARGET_MODULES = ATTENTION_MODULES + MLP_MODULES

# The model runs modules that read the same input as one matmul: q/k/v and gate/up. Each entry is
# a fused linear of the model (its path inside a decoder layer) and the modules it holds, in the
# order of its output columns. Checkpoints and adapters still name the separate modules.
FUSED_LINEARS = {
    "self_attn.qkv_proj": (Q_PROJ, K_PROJ, V_PROJ),
    "self_attn.o_proj": (O_PROJ,),
    "mlp.gate_up_proj": (GATE_PROJ, UP_PROJ),
    "mlp.down_proj": (DOWN_PROJ,),
}

# Checkpoints that store q/k/v and gate/up fused (Phi-3, Phi-4) have PEFT adapters on those fused
# modules: one A [r, in] and one B [sum of outs, r]. Each maps exactly onto the modules it holds:
# the same A for each, B split by rows (x A^T B^T, column block i, is module i's delta).
FUSED_ADAPTER_MODULES = {
    "qkv_proj": (Q_PROJ, K_PROJ, V_PROJ),
    "gate_up_proj": (GATE_PROJ, UP_PROJ),
}
