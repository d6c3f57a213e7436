"""One explicit training loop per algorithm (dpo, sft, reward, ppo); shared pieces in ``common``."""
