"""PPO for language models against a KL-penalised reward (RLHF; docs/rlhf-ppo.md), on the shared engine.

Each step: sample one response per prompt (``dpolab.lm.generation``), score it, build per-token
rewards ``R_t = −β·kl_t`` plus the score on the last real token (Ziegler et al. 2019, arXiv
1909.08593, eq. 2; :mod:`dpolab.lm.token_rewards`), advantages by the same GAE as the Gymnasium PPO,
then ``ppo_epochs`` passes of clipped policy and value losses (:mod:`dpolab.losses.ppo`) over
shuffled mini-batches, each mini-batch one optimizer step of ``--grad-accum`` exact micro-batches.
Dropout is off throughout (the model stays in eval mode), so the first mini-batch's ratio is 1.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from dpolab.config import opt
from dpolab.errors import ConfigError
from dpolab.train.engine import Algorithm, Engine, Pass, cli
from dpolab.train.options import (
    LoraOptions,
    ModelOptions,
    OptimizerOptions,
    PromptOptions,
    RewardOptions,
    RunOptions,
    SamplingOptions,
    validate_on_policy,
)

DESCRIPTION = """Fine-tune a causal LM with PPO against a reward model or a Python reward function.

Prompts: JSONL/JSON/Parquet/CSV rows with a `prompt` string or chat `messages` (rendered with the
chat template and a generation prompt). Reward: --reward-model DIR (a trained `dpolab rm` model) or
--reward module:function with f(prompts: list[str], completions: list[str]) -> list[float].

example:
  dpolab ppo --model runs/sft/final --reward-model runs/rm/final --data prompts.jsonl \\
      --kl-coef 0.05 --output-dir runs/ppo
"""


@dataclass
class PPOConfig(RunOptions, PromptOptions, SamplingOptions, RewardOptions, ModelOptions, LoraOptions, OptimizerOptions):
    model: str = opt("", "policy to train (and default reference): a Hugging Face name or local folder (required)")
    ref_model: str | None = opt(None, "reference model (default: a frozen copy of --model; with --lora, the base with adapters off)")
    output_dir: str = opt("runs/ppo", "run directory")
    rollout_batch_size: int = opt(16, "prompts (one response each) per PPO step")
    mini_batch_size: int = opt(4, "responses per gradient step")
    grad_accum: int = opt(1, "micro-batches each mini-batch is split into (same gradient, less memory)")
    ppo_epochs: int = opt(4, "passes over each rollout batch")
    kl_coef: float = opt(0.05, "β: KL penalty coefficient (initial value with --adaptive-kl)")
    adaptive_kl: bool = opt(False, "adapt β toward --target-kl (PPO paper §4: halve/double)")
    target_kl: float = opt(6.0, "target sequence KL (nats) for --adaptive-kl")
    kl_estimator: str = opt("k1", "per-token KL estimator in the reward", choices=("k1", "k3"))
    gamma: float = opt(1.0, "discount γ over response tokens")
    lam: float = opt(0.95, "GAE λ")
    cliprange: float = opt(0.2, "policy ratio clip ε")
    cliprange_value: float = opt(0.2, "value clip ε (around the rollout's values)")
    vf_coef: float = opt(0.1, "value-loss weight (loss = policy + vf_coef · value)")
    whiten_rewards: bool = opt(False, "rescale per-token rewards to unit variance over the batch (mean kept)")
    whiten_advantages: bool = opt(True, "normalise advantages over the batch's response tokens")
    reward_clip: float = opt(0.0, "clip scores to [-C, C] (0: off)")
    missing_eos_penalty: float | None = opt(None, "subtract this from the score of responses without EOS")
    value_model: str | None = opt(None, "separate value network (a causal LM folder/name); default: a head on the policy")
    lr_scheduler: str = opt("constant", "learning-rate schedule after warmup", choices=("constant", "linear", "cosine"))
    warmup_steps: int = opt(0, "linear warmup, in gradient steps")
    max_steps: int = opt(-1, "PPO steps (rollout + update); overrides --epochs when > 0")
    epochs: float = opt(1.0, "passes over the prompts")
    logging_steps: int = opt(1, "log metrics (and sample completions) every N PPO steps")

    def validate(self) -> None:
        validate_on_policy(self, several_rewards=False)
        for name in ("rollout_batch_size", "mini_batch_size", "grad_accum", "ppo_epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        if self.mini_batch_size > self.rollout_batch_size:
            raise ConfigError("--mini-batch-size must not exceed --rollout-batch-size")
        if self.kl_coef < 0 or self.target_kl <= 0:
            raise ConfigError("--kl-coef must be >= 0 and --target-kl > 0")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ConfigError("--gamma and --lam must be in [0, 1]")
        if self.cliprange <= 0 or self.cliprange_value <= 0:
            raise ConfigError("--cliprange and --cliprange-value must be > 0")
        if self.reward_clip < 0:
            raise ConfigError("--reward-clip must be >= 0")


@dataclass
class Rollout:
    """One PPO step's experience on the training device: ``B`` responses of ``R`` tokens.

    gen: the :class:`dpolab.lm.generation.Generation`. raw_scores (B,) as the reward returned them;
    scores (B,) after penalty and clipping. logps, ref_logps, values, kl, advantages, returns: (B, R),
    zero after EOS. entropy: mean per-token entropy of the rollout policy."""

    gen: object
    prompts: list[str]
    completions: list[str]
    raw_scores: torch.Tensor
    scores: torch.Tensor
    logps: torch.Tensor
    ref_logps: torch.Tensor
    values: torch.Tensor
    kl: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    entropy: float


class PPO(Algorithm):
    name = "ppo"
    train_mode = False  # dropout off for rollouts and updates alike
    bar_keys = ("objective/scores", "objective/kl")
    summary_keys = ("steps", "eval/reward", "eval/kl", "objective/scores", "objective/kl", "wall_seconds")

    def __init__(self, cfg: PPOConfig, engine: Engine, prompts, eval_set, reward_fn, ref_model):
        from dpolab.losses.ppo import AdaptiveKLController, FixedKLController

        self.cfg, self.engine, self.prompts, self.eval_set = cfg, engine, prompts, eval_set
        self.reward_fn, self.ref_model, self.lora = reward_fn, ref_model, cfg.lora
        self.kl_ctl = AdaptiveKLController(cfg.kl_coef, cfg.target_kl) if cfg.adaptive_kl else FixedKLController(cfg.kl_coef)
        self.samples: list[dict] = []

    @property
    def core(self):
        return self.engine.unwrapped

    def forward(self, g) -> tuple[torch.Tensor, torch.Tensor]:
        """Response-aligned (logits / temperature (B, R, V), values (B, R)) for a Generation."""
        logits, values = self.engine.model(g.input_ids, g.attention_mask, g.position_ids, prompt_length=g.prompt_length)
        if self.cfg.temperature != 1.0:
            logits = logits / self.cfg.temperature
        return logits, values.float()

    @torch.no_grad()
    def collect(self, idx: list[int], step: int) -> Rollout:
        from dpolab.lm.generation import decode_responses, generate
        from dpolab.lm.logps import gather_token_logps, response_token_logps
        from dpolab.lm.token_rewards import masked_mean, per_token_rewards, shape_scores, token_advantages
        from dpolab.losses.ppo import entropy_from_logits
        from dpolab.rl.advantages import whiten
        from dpolab.train.on_policy import step_seed

        cfg, core, device = self.cfg, self.core, self.engine.device
        gen = generate(core.policy, self.engine.tokenizer, [self.prompts.ids[i] for i in idx],
                       max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                       top_p=cfg.top_p, generator=torch.Generator(device=device).manual_seed(step_seed(cfg.seed, step)))
        texts, completions = [self.prompts.texts[i] for i in idx], decode_responses(self.engine.tokenizer, gen)
        raw = self.reward_fn.score(texts, completions, self.prompts.columns(idx))[0].to(device)
        scores = shape_scores(raw, gen.finished, missing_eos_penalty=cfg.missing_eos_penalty, reward_clip=cfg.reward_clip)
        mask = gen.response_mask
        logits, values = self.forward(gen)
        logps = gather_token_logps(logits, gen.response_ids).float() * mask
        entropy = float(masked_mean(entropy_from_logits(logits.float()), mask))
        ref = self.ref_model if self.ref_model is not None else core.policy
        with (core.policy.disable_adapter() if self.ref_model is None else nullcontext()):
            ref_logps = response_token_logps(ref, gen, temperature=cfg.temperature)
        values = values * mask
        rewards, kl = per_token_rewards(scores, logps, ref_logps, mask, kl_coef=self.kl_ctl.beta,
                                        kl_estimator=cfg.kl_estimator)
        if cfg.whiten_rewards:
            rewards = whiten(rewards, mask, shift_mean=False)
        adv, ret = token_advantages(rewards, values, mask, gamma=cfg.gamma, lam=cfg.lam)
        if cfg.whiten_advantages:
            adv = whiten(adv, mask)
        return Rollout(gen, texts, completions, raw, scores, logps, ref_logps, values, kl, adv, ret, entropy)

    def minibatch_loss(self, ro: Rollout, rows: torch.Tensor):
        """Summed clipped policy + vf_coef · value losses over the response tokens of ``rows``."""
        from dpolab.lm.logps import gather_token_logps
        from dpolab.lm.token_rewards import masked_mean
        from dpolab.losses.ppo import clipped_value_loss, ppo_clip_loss

        g = ro.gen.select(rows)
        m = g.response_mask
        logits, values = self.forward(g)
        logp = gather_token_logps(logits, g.response_ids).float()
        pg, pstats = ppo_clip_loss(logp, ro.logps[rows], ro.advantages[rows], self.cfg.cliprange)
        vf, vstats = clipped_value_loss(values, ro.values[rows], ro.returns[rows], self.cfg.cliprange_value)
        mf = m.to(pg.dtype)
        loss_sum = (pg * mf).sum() + self.cfg.vf_coef * (vf * mf).sum()
        return loss_sum, {"losses/policy": float(masked_mean(pg.detach(), m)),
                          "losses/value": float(masked_mean(vf.detach(), m)),
                          "losses/clipfrac": float(masked_mean(pstats["clipfrac"], m)),
                          "losses/approx_kl": float(masked_mean(pstats["approx_kl"], m)),
                          "losses/vf_clipfrac": float(masked_mean(vstats["vf_clipfrac"], m)),
                          "policy/ratio": float(masked_mean(pstats["ratio"], m))}

    def update(self, engine: Engine, ro: Rollout) -> dict[str, float]:
        """``ppo_epochs`` passes over shuffled mini-batches; the mean of their metrics."""
        cfg, B = self.cfg, ro.scores.shape[0]
        from dpolab.train.on_policy import step_seed

        perm_rng = torch.Generator().manual_seed(step_seed(cfg.seed, engine.step) + 1)
        rows_out = []
        for _ in range(cfg.ppo_epochs):
            perm = torch.randperm(B, generator=perm_rng)
            for start in range(0, B, cfg.mini_batch_size):
                rows = perm[start:start + cfg.mini_batch_size].to(engine.device)
                per = -(-len(rows) // cfg.grad_accum)
                passes = [Pass(part, int(ro.gen.response_mask[part].sum()), 0, f"mini-batch rows {part.tolist()[:8]}")
                          for part in rows.split(per)]
                out = engine.optimizer_step(passes, lambda part: self.minibatch_loss(ro, part),
                                            where=f"mini-batch rows {rows.tolist()[:8]}")
                if out is not None:
                    rows_out.append(out)
        return {k: sum(r[k] for r in rows_out) / len(rows_out) for k in rows_out[0]} if rows_out else {}

    def step(self, engine, group):
        from dpolab.lm.token_rewards import explained_variance

        ((k, idx),) = group
        t0 = time.time()
        ro = self.collect(idx, engine.step)
        beta = self.kl_ctl.beta
        stats = self.update(engine, ro)
        mask, seq_kl = ro.gen.response_mask, ro.kl.sum(1)
        engine.tokens_window += int(mask.sum())
        self.kl_ctl.update(float(seq_kl.mean()))
        self.samples = [{"prompt": ro.prompts[i], "completion": ro.completions[i], "score": float(ro.raw_scores[i]),
                         "kl": float(seq_kl[i])} for i in range(len(ro.prompts))]
        return {
            "objective/kl": float(seq_kl.mean()), "objective/kl_coef": beta, "objective/entropy": ro.entropy,
            "objective/scores": float(ro.raw_scores.mean()),
            "objective/scores_std": float(ro.raw_scores.std()) if len(idx) > 1 else 0.0,
            "objective/non_score_reward": float(-beta * seq_kl.mean()),
            "objective/rlhf_reward": float(ro.scores.mean() - beta * seq_kl.mean()), **stats,
            "losses/explained_variance": explained_variance(ro.values, ro.returns, mask),
            "val/response_length": float(ro.gen.response_lengths.float().mean()),
            "val/eos_fraction": float(ro.gen.finished.float().mean()), "seconds_per_step": time.time() - t0,
        }

    def evaluate(self):
        from dpolab.train.on_policy import evaluate_samples

        return evaluate_samples(self.cfg, self.core.policy, self.engine.tokenizer, self.eval_set, self.reward_fn,
                                self.ref_model, self.cfg.rollout_batch_size)

    def checkpoint_files(self, state_dict):
        policy = {k[len("policy."):]: v for k, v in state_dict.items() if k.startswith("policy.")}
        return {"model.safetensors": {k: v for k, v in policy.items() if not self.lora or "lora_" in k},
                "critic.safetensors": {k: v for k, v in state_dict.items() if not k.startswith("policy.")}}

    def load_checkpoint(self, engine, directory):
        from dpolab.lm.value_head import load_critic
        from dpolab.runs.checkpoint import load_checkpoint_weights

        load_checkpoint_weights(self.core.policy, directory, partial=self.lora)
        load_critic(self.core, directory / "critic.safetensors")

    def state_dict(self):
        return {"kl_coef": self.kl_ctl.beta}

    def load_state_dict(self, state):
        self.kl_ctl.beta = float(state.get("kl_coef", self.cfg.kl_coef))

    def on_log(self, engine, step, logged):
        from dpolab.train.on_policy import log_samples

        if engine.is_main:
            log_samples(engine.run_dir, step, self.samples, self.cfg.log_samples)

    def on_resume(self, engine, step):
        from dpolab.train.on_policy import truncate_samples

        truncate_samples(engine.run_dir, step)

    def save_final(self, engine, path: Path, state_dict) -> None:
        from dpolab.lm.value_head import VALUE_MODEL_DIR, save_value_head
        from dpolab.runs.checkpoint import save_pretrained_atomic

        core = self.core
        save_pretrained_atomic(core.policy.merge_and_unload() if self.lora else core.policy, self.engine.tokenizer, path)
        save_value_head(core.value_head, path)
        if core.value_model is not None:
            core.value_model.save_pretrained(path / VALUE_MODEL_DIR, safe_serialization=True)

    def summary(self, engine):
        return {"data/prompts": len(self.prompts), "data/truncated_prompts": self.prompts.truncated}


def train(cfg: PPOConfig) -> dict:
    """Run PPO as configured; returns the summary (also written to OUTPUT_DIR/summary.json)."""
    import json

    from dpolab.data.batching import BatchOrder
    from dpolab.data.prompts import load_prompts
    from dpolab.lm.loading import apply_lora, load_causal_lm
    from dpolab.lm.value_head import PolicyWithValue, ValueHead, hidden_size_of
    from dpolab.rewards.functions import compute_rewards
    from dpolab.train import distributed, on_policy

    accelerator, tokenizer = distributed.start_run(cfg)
    if accelerator.num_processes > 1:  # a known limit (docs/scaling.md)
        raise ConfigError("dpolab ppo runs in a single process (one device); launch it without a "
                          "multi-process accelerate config (docs/scaling.md)")
    prompts = load_prompts(cfg.data, tokenizer, max_prompt_length=cfg.max_prompt_length)
    eval_set = on_policy.eval_prompt_set(cfg, prompts, tokenizer)
    reward_fn = on_policy.reward_function(cfg, accelerator.device)
    report = {**prompts.report(), "eval_prompts": len(eval_set[0]) if eval_set is not None else 0}
    if cfg.dry_run:
        rows = list(range(min(2, len(prompts))))
        probe = compute_rewards(reward_fn, [prompts.texts[i] for i in rows], [""] * len(rows), prompts.columns(rows))
        print(json.dumps({"data": report, "reward_probe_on_empty_completions": probe.tolist(),
                          "config": vars(cfg)}, indent=2))
        return {"dry_run": True, "data/prompts": len(prompts), "data/truncated_prompts": prompts.truncated}

    policy = load_causal_lm(cfg.model, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
    if cfg.lora:
        policy = apply_lora(policy, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                            target_modules=cfg.lora_target_modules)
    ref_model = on_policy.reference_model(cfg, accelerator.device)
    value_model = load_causal_lm(cfg.value_model, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code) \
        if cfg.value_model else None
    model = PolicyWithValue(policy, ValueHead(hidden_size_of(value_model or policy)), value_model)
    engine = Engine(cfg, accelerator, model, tokenizer=tokenizer, report=report)
    minibatches = -(-cfg.rollout_batch_size // cfg.mini_batch_size)
    engine.plan(BatchOrder(len(prompts), cfg.rollout_batch_size, cfg.seed),
                optimizer_steps_per_step=cfg.ppo_epochs * minibatches)
    return engine.run(PPO(cfg, engine, prompts, eval_set, reward_fn, ref_model))


def cli_main(argv: list[str], prog: str) -> int:
    return cli(PPOConfig, train, argv, prog, DESCRIPTION)
