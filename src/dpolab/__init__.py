"""dpolab: reinforcement learning to PPO to RLHF to DPO, as small, tested pieces.

Layout (see docs/architecture.md):
    dpolab.rl        tabular RL (MDPs, evaluation, planning, approximation) and Gymnasium PPO/A2C
    dpolab.losses    pure loss functions over tensors (DPO family, Bradley-Terry, PPO)
    dpolab.data      preference / SFT / prompt data: formats, tokenization, collators
    dpolab.lm.logps        sequence log-probs, value heads, generation for causal LMs
    dpolab.train     one explicit training loop per algorithm (dpo, sft, reward, ppo)
    dpolab.cli       the thin command line on top
"""

__version__ = "0.1.0"
