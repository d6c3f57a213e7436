"""dpolab: reinforcement learning to PPO to RLHF to DPO, as small, tested pieces.

Layout (docs/architecture.md has every file and the path of one DPO and one PPO step):
    dpolab.losses       pure loss functions over tensors (DPO family, KTO, Bradley-Terry, PPO, GRPO/RLOO)
    dpolab.rl           tabular RL (MDPs, evaluation, planning, approximation) and the Gymnasium PPO/A2C loops
    dpolab.lm           language-model blocks: log-probs, prefix sharing, sampling, value heads, reward models
    dpolab.data         preference / SFT / prompt / unpaired data: formats, tokenization, collators, batch orders
    dpolab.rewards      reward functions, verifiable tasks and policy evaluation against a reward
    dpolab.runs         the run directory, checkpoints, signals, seeding, trackers, model cards
    dpolab.train        one engine and one short file per algorithm (sft, rm, dpo, kto, ppo, grpo, rloo, online dpo)
    dpolab.commands     generate, eval, task
    dpolab.experiments  the DPO paper's controlled-sentiment experiment (``dpolab demo``)
    dpolab.cli          the thin command line on top
"""

__version__ = "0.1.0"
