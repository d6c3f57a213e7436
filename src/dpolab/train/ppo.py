"""PPO (Schulman et al. 2017, arXiv 1707.06347) for language models against a KL-penalised reward
(RLHF, Ziegler et al. 2019, arXiv 1909.08593; docs/rlhf-ppo.md), on the shared engine.

Each step: sample one response per prompt (``dpolab.lm.generation``), score it, build per-token
rewards ``R_t = −β·kl_t`` plus the score on the last real token (Ziegler et al. 2019, arXiv
1909.08593, eq. 2; :mod:`dpolab.lm.token_rewards`), advantages by the same GAE as the Gymnasium PPO,
then ``ppo_epochs`` passes of clipped policy and value losses (:mod:`dpolab.losses.ppo`) over
shuffled mini-batches, each mini-batch one optimizer step of ``--grad-accum`` exact micro-batches.
Dropout is off throughout (the model stays in eval mode), so the first mini-batch's ratio is 1.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dpolab.config import opt
from dpolab.errors import ConfigError
from dpolab.train.command import cli
from dpolab.train.on_policy import ActorCritic
from dpolab.train.options import OnPolicyOptions, require_positive, validate_on_policy

if TYPE_CHECKING:
    import torch

    from dpolab.train.engine import Engine

DESCRIPTION = """Fine-tune a causal LM with PPO against a reward model or a Python reward function.

Prompts: JSONL/JSON/Parquet/CSV rows with a `prompt` string or chat `messages` (rendered with the
chat template and a generation prompt). Reward: --reward-model DIR (a trained `dpolab rm` model) and/or
--reward module:function with f(prompts: list[str], completions: list[str]) -> list[float]; several
(comma separated) are summed with --reward-weights.

example:
  dpolab ppo --model runs/sft/final --reward-model runs/rm/final --data prompts.jsonl \\
      --kl-coef 0.05 --output-dir runs/ppo
"""


@dataclass
class PPOConfig(OnPolicyOptions):
    model: str = opt("", "policy to train (and default reference): a Hugging Face name or local folder (required)")
    ref_model: str | None = opt(None, "reference model (default: a frozen copy of --model; with --lora, the base with adapters off)")
    output_dir: str = opt("runs/ppo", "run directory")
    rollout_batch_size: int = opt(16, "prompts per PPO step, per process")
    num_samples: int = opt(1, "responses sampled per prompt (each is one episode)")
    mini_batch_size: int = opt(4, "responses per gradient step, per process, at most (the step's responses are "
                               "cut into equal mini-batches)")
    grad_accum: int = opt(1, "micro-batches each mini-batch is split into, at most (same gradient, less memory)")
    ppo_epochs: int = opt(4, "passes over each rollout batch")
    kl_coef: float = opt(0.05, "β: KL penalty coefficient (initial value with --adaptive-kl)")
    adaptive_kl: bool = opt(False, "adapt β toward --target-kl (PPO paper §4: halve/double)")
    target_kl: float = opt(6.0, "target sequence KL (nats) for --adaptive-kl")
    kl_estimator: str = opt("k1", "per-token KL estimator in the reward", choices=("k1", "k3"))
    gamma: float = opt(1.0, "discount γ over response tokens")
    lam: float = opt(0.95, "GAE λ")
    cliprange: float = opt(0.2, "policy ratio clip ε")
    cliprange_value: float = opt(0.2, "value clip ε (around the rollout's values)")
    READ_ONLY_WITH = {"target_kl": (lambda cfg: cfg.adaptive_kl, "--adaptive-kl"),
                      "cliprange_value": (lambda cfg: cfg.vf_coef > 0, "--vf-coef above 0")}
    vf_coef: float = opt(0.1, "value-loss weight (loss = policy + vf_coef · value)")
    whiten_rewards: bool = opt(False, "rescale per-token rewards to unit variance over the batch (mean kept)")
    whiten_advantages: bool = opt(True, "normalise advantages over the batch's response tokens")
    reward_clip: float = opt(0.0, "clip scores to [-C, C] (0: off)")
    missing_eos_penalty: float | None = opt(None, "subtract this from the score of responses without EOS")
    value_model: str | None = opt(None, "separate value network (a causal LM folder/name); default: a head on the policy")
    warmup_steps: int = opt(0, "linear warmup, in gradient steps")
    max_steps: int = opt(-1, "PPO steps (rollout + update); overrides --epochs when > 0")
    epochs: float = opt(1.0, "passes over the prompts")

    def validate(self) -> None:
        validate_on_policy(self)
        require_positive(self, "rollout_batch_size", "num_samples", "mini_batch_size", "grad_accum", "ppo_epochs")
        checks = {"--mini-batch-size must not exceed --rollout-batch-size × --num-samples":
                  self.mini_batch_size <= self.rollout_batch_size * self.num_samples,
                  "--kl-coef must be >= 0 and --target-kl > 0": self.kl_coef >= 0 and self.target_kl > 0,
                  "--gamma and --lam must be in [0, 1]": 0 <= self.gamma <= 1 and 0 <= self.lam <= 1,
                  "--cliprange and --cliprange-value must be > 0": self.cliprange > 0 and self.cliprange_value > 0,
                  # 1 − ε <= 0: the ratio's lower clip never binds (a typo: 2 for 0.2)
                  "--cliprange must be < 1 (the ratio's lower clip is 1 − ε)": self.cliprange < 1,
                  "--reward-clip must be >= 0": self.reward_clip >= 0,
                  "--vf-coef must be >= 0": self.vf_coef >= 0,
                  # halving or doubling a zero β leaves it zero: the adaptation would never start
                  "--adaptive-kl needs --kl-coef > 0 (its starting β)": not self.adaptive_kl or self.kl_coef > 0}
        for message, ok in checks.items():
            if not ok:
                raise ConfigError(message)


@dataclass
class Rollout:
    """One PPO step's experience on this process: the :class:`dpolab.train.rollouts.Samples`, the
    scores (n,) after penalty and clipping, and (n, R) tensors, zero after EOS."""

    samples: object
    scores: torch.Tensor
    logps: torch.Tensor
    ref_logps: torch.Tensor
    values: torch.Tensor
    kl: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor


class PPO(ActorCritic):
    name = "ppo"
    bar_keys = ("objective/scores", "objective/kl")
    summary_keys = ("steps", "eval/reward", "eval/kl", "objective/scores", "objective/kl", "wall_seconds")

    def __init__(self, cfg: PPOConfig, engine: Engine, *args):
        from dpolab.losses.ppo import AdaptiveKLController, FixedKLController

        super().__init__(cfg, engine, *args)
        self.kl_ctl = AdaptiveKLController(cfg.kl_coef, cfg.target_kl) if cfg.adaptive_kl else FixedKLController(cfg.kl_coef)

    def collect(self, idx: list[int], micro: int, step: int) -> tuple[Rollout, float]:
        """Sample, score, and compute per-token rewards and GAE advantages (call without gradient);
        whitening is over the global batch. Returns the rollout and the mean per-token entropy (all
        processes)."""
        from dpolab.lm.token_rewards import per_token_rewards, shape_scores, token_advantages
        from dpolab.lm.value_head import rollout_values
        from dpolab.train import distributed
        from dpolab.train.on_policy import step_seed
        from dpolab.train.rollouts import global_whiten, reference_token_logps, sample_step

        cfg, core, acc = self.cfg, self.core, self.engine.accelerator
        s = sample_step(self.engine, cfg, self.prompts, idx, cfg.num_samples, self.rewards, self.sampler,
                        seed=step_seed(cfg.seed, step), micro=micro)
        gen, mask = s.gen, s.gen.response_mask
        scores = shape_scores(s.scores, gen.finished, missing_eos_penalty=cfg.missing_eos_penalty,
                              reward_clip=cfg.reward_clip)
        logps, values, ent = rollout_values(self.engine.model, gen, cfg.temperature, cfg.mini_batch_size)
        ref_logps = reference_token_logps(core.policy, self.ref_model, gen, cfg.temperature, cfg.mini_batch_size,
                                          accelerator=acc)
        rewards, kl = per_token_rewards(scores, logps, ref_logps, mask, kl_coef=self.kl_ctl.beta,
                                        kl_estimator=cfg.kl_estimator)
        if cfg.whiten_rewards:
            rewards = global_whiten(acc, rewards, mask, s.real, shift_mean=False)
        adv, ret = token_advantages(rewards, values, mask, gamma=cfg.gamma, lam=cfg.lam)
        if cfg.whiten_advantages:
            adv = global_whiten(acc, adv, mask, s.real)
        ent_sum, tokens = distributed.global_sum(acc, [ent * s.real, float(mask.sum()) * s.real])
        return Rollout(s, scores, logps, ref_logps, values, kl, adv, ret), ent_sum / max(tokens, 1)

    def minibatch_loss(self, ro: Rollout, rows: torch.Tensor):
        """Summed clipped policy + vf_coef · value losses over the response tokens of ``rows``."""
        from dpolab.losses.ppo import clipped_value_loss, ppo_clip_loss

        g = ro.samples.gen.select(rows)
        m = g.response_mask
        logp, values, _ = self.engine.model(g.input_ids, g.attention_mask, g.position_ids, prompt_length=g.prompt_length,
                                            response_ids=g.response_ids, response_mask=m,
                                            temperature=self.cfg.temperature)
        pg, pstats = ppo_clip_loss(logp, ro.logps[rows], ro.advantages[rows], self.cfg.cliprange)
        vf, vstats = clipped_value_loss(values, ro.values[rows], ro.returns[rows], self.cfg.cliprange_value)
        mf = m.to(pg.dtype)
        loss_sum = (pg * mf).sum() + self.cfg.vf_coef * (vf * mf).sum()
        n = float(mf.sum())
        pair = lambda x: (float((x.detach() * mf).sum()), n)  # noqa: E731  (per-token means, exact over passes)
        return loss_sum, {"losses/policy": pair(pg), "losses/value": pair(vf), "losses/clipfrac": pair(pstats["clipfrac"]),
                          "losses/approx_kl": pair(pstats["approx_kl"]), "losses/vf_clipfrac": pair(vstats["vf_clipfrac"]),
                          "policy/ratio": pair(pstats["ratio"])}

    def update(self, engine: Engine, ro: Rollout) -> dict[str, float]:
        """``ppo_epochs`` passes over mini-batches of a shared permutation of the global batch."""
        from dpolab.train.engine import combine_steps
        from dpolab.train.on_policy import step_seed
        from dpolab.train.rollouts import minibatch_rows, row_passes

        cfg, s = self.cfg, ro.samples
        n_minibatches = -(-cfg.rollout_batch_size * cfg.num_samples // cfg.mini_batch_size)
        micro = -(-cfg.mini_batch_size // cfg.grad_accum)
        mask = s.gen.response_mask
        outs = []
        for epoch in range(cfg.ppo_epochs):
            for m, rows in enumerate(minibatch_rows(s, n_minibatches, step_seed(cfg.seed, engine.step) + 1 + epoch)):
                where = f"epoch {epoch + 1}, mini-batch {m + 1}"
                passes = row_passes(engine, rows, micro, lambda r: int(mask[r].sum()), where,
                                    width=s.gen.width, budget=self.pass_tokens)
                out = engine.optimizer_step(passes, lambda r: self.minibatch_loss(ro, r), where=where)
                if out is not None:
                    outs.append((out, dict(engine.stat_counts)))
        return combine_steps(outs)

    def step(self, engine, group):
        import torch

        from dpolab.train.rollouts import global_explained_variance, global_means, reward_term_metrics

        ((k, idx),) = group
        t0 = time.time()
        with torch.no_grad():
            ro, entropy = self.collect(idx, k, engine.step)
        s, acc, beta = ro.samples, engine.accelerator, self.kl_ctl.beta
        stats = self.update(engine, ro)
        self.sampler.sync_weights(self.core.policy)
        mask, seq_kl = s.gen.response_mask, ro.kl.sum(1)
        g = global_means(acc, s.real, kl=seq_kl, scores=s.scores, shaped=ro.scores, tokens=mask.sum(1).float(),
                         eos=s.gen.finished.float())
        # several rewards: each one's mean and std too (objective/scores is their weighted sum)
        terms = reward_term_metrics(acc, s, total=False) if len(s.terms) > 1 else {}
        kl_mean = g["kl"][0]
        engine.tokens_window += int(round(g["tokens"][0] * s.n_global))
        self.kl_ctl.update(kl_mean)
        self.samples = [{"prompt": s.prompts[i], "completion": s.completions[i], "score": float(s.scores[i]),
                         "kl": float(seq_kl[i])} for i in range(s.n)] if s.real else []
        return {
            "objective/kl": kl_mean, "objective/kl_coef": beta, "objective/entropy": entropy,
            "objective/scores": g["scores"][0], "objective/scores_std": g["scores"][1],
            "objective/non_score_reward": -beta * kl_mean, "objective/rlhf_reward": g["shaped"][0] - beta * kl_mean,
            **stats, "losses/explained_variance": global_explained_variance(acc, ro.values, ro.returns, mask, s.real),
            "val/response_length": g["tokens"][0], "val/eos_fraction": g["eos"][0], "seconds_per_step": time.time() - t0,
            **terms,
        }

    def state_dict(self):
        return {"kl_coef": self.kl_ctl.beta, "adaptive_kl": self.cfg.adaptive_kl}

    def load_state_dict(self, state):
        # Only an adaptive controller carries β on; a fixed --kl-coef given at resume takes effect,
        # and a run switched to --adaptive-kl starts from its --kl-coef.
        if self.cfg.adaptive_kl and state.get("adaptive_kl", True):
            self.kl_ctl.beta = float(state.get("kl_coef", self.cfg.kl_coef))


def train(cfg: PPOConfig) -> dict:
    """Run PPO as configured; returns the summary (also written to OUTPUT_DIR/summary.json)."""
    from dpolab.config import check_config
    from dpolab.lm.loading import load_causal_lm, load_trainable_lm
    from dpolab.lm.value_head import PolicyWithValue, ValueHead, hidden_size_of
    from dpolab.train import on_policy
    from dpolab.train.engine import Engine

    cfg = check_config(cfg)  # a config built in Python: converted and checked as the command line's
    opened = on_policy.open_run(cfg, "ppo")
    if isinstance(opened, dict):
        return opened
    accelerator, tokenizer, prompts, eval_set, rewards, report = opened
    policy = load_trainable_lm(cfg)
    ref_model = on_policy.reference_model(cfg, accelerator, tokenizer)
    value_model = load_causal_lm(cfg.value_model, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code,
                                 head=False) \
        if cfg.value_model else None
    model = PolicyWithValue(policy, ValueHead(hidden_size_of(value_model or policy)), value_model)
    engine = Engine(cfg, accelerator, model, tokenizer=tokenizer, report=report)
    minibatches = -(-cfg.rollout_batch_size * cfg.num_samples // cfg.mini_batch_size)
    engine.plan(on_policy.prompt_order(cfg, prompts, accelerator, cfg.rollout_batch_size),
                optimizer_steps_per_step=cfg.ppo_epochs * minibatches)
    return engine.run(PPO(cfg, engine, prompts, eval_set, rewards, ref_model))


def cli_main(argv: list[str], prog: str) -> int:
    return cli(PPOConfig, train, argv, prog, DESCRIPTION)
