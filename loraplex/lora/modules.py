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
