"""Language-model building blocks: sequence log-probs (``logps``), prefix sharing (``prefix``),
sampling (``generation``), value heads (``value_head``), reward models (``reward_model``), RLHF
token rewards (``token_rewards``), loading (``loading``) and tiny local models (``tiny``)."""
