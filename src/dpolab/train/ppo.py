"""PPO for language models against a KL-penalised reward (RLHF; docs/rlhf-ppo.md).

Each PPO step: sample one response per prompt (``dpolab.generation``), score it with a reward
model or a Python function, build per-token rewards

    R_t = −β · kl_t            on every response token (kl_t = k1 or k3 of log π_old vs log π_ref)
    R_T += r(x, y)             on the last real token (EOS, or the last token of a truncated response)

(Ziegler et al. 2019, arXiv 1909.08593, eq. 2; Ouyang et al. 2022), estimate advantages with the
same GAE as the Gymnasium PPO (``dpolab.rl.advantages.gae``, one episode per row), then run
``ppo_epochs`` passes of clipped policy and value losses (``dpolab.losses.ppo``) over shuffled
minibatches. Dropout is off throughout (the model stays in eval mode), so the first minibatch's
probability ratio is exactly 1.
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from dpolab.config import opt, parse_config
from dpolab.errors import ConfigError
from dpolab.rl.advantages import whiten
from dpolab.rlhf import (
    explained_variance,
    masked_mean,
    per_token_rewards,
    shape_scores,
    token_advantages,
)
from dpolab.rundir import RunDir, seed_everything
from dpolab.train.options import LoraOptions, ModelOptions, OptimizerOptions, RunOptions

DESCRIPTION = """Fine-tune a causal LM with PPO against a reward model or a Python reward function.

Prompts: JSONL/JSON/Parquet/CSV rows with a `prompt` string or chat `messages` (rendered with the
chat template and a generation prompt). Reward: --reward-model DIR (a trained `dpolab rm` model) or
--reward module:function with f(prompts: list[str], completions: list[str]) -> list[float].

example:
  dpolab ppo --model runs/sft/final --reward-model runs/rm/final --data prompts.jsonl \\
      --kl-coef 0.05 --output-dir runs/ppo
"""


@dataclass
class PPOConfig(RunOptions, ModelOptions, LoraOptions, OptimizerOptions):
    model: str = opt("", "policy to train (and default reference): a Hugging Face name or local folder (required)")
    ref_model: str | None = opt(None, "reference model (default: a frozen copy of --model; with --lora, the base with adapters off)")
    reward_model: str | None = opt(None, "reward model folder (dpolab rm output) scoring (prompt, completion)")
    reward: str | None = opt(None, "Python reward 'module:function' or 'file.py:function': f(prompts, completions) -> list[float]")
    data: str = opt("", "prompt data: file, save_to_disk folder or hub name (required)")
    eval_data: str | None = opt(None, "evaluation prompts (default: --eval-prompts of the training prompts)")
    eval_prompts: int = opt(64, "how many prompts to evaluate on (0: skip evaluation)")
    output_dir: str = opt("runs/ppo", "run directory")
    max_prompt_length: int = opt(128, "maximum prompt tokens (longer prompts keep their end)")
    max_new_tokens: int = opt(32, "maximum response tokens (a response without EOS is truncated)")
    temperature: float = opt(1.0, "sampling temperature (log-probs use the same tempered logits)")
    top_k: int = opt(0, "sample from the k most likely tokens only (0: off)")
    top_p: float = opt(1.0, "nucleus sampling mass (1: off)")
    rollout_batch_size: int = opt(16, "prompts (one response each) per PPO step")
    mini_batch_size: int = opt(4, "responses per gradient step")
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
    log_samples: int = opt(4, "completions per logging step written to samples.jsonl (and 2 printed)")

    def validate(self) -> None:
        if not self.model:
            raise ConfigError("--model is required (a Hugging Face name or a local folder)")
        if not self.data:
            raise ConfigError("--data is required (prompts with a 'prompt' or 'messages' field)")
        if (self.reward_model is None) == (self.reward is None):
            raise ConfigError("give exactly one of --reward-model DIR and --reward module:function")
        for name in ("max_prompt_length", "max_new_tokens", "rollout_batch_size", "mini_batch_size",
                     "ppo_epochs", "logging_steps", "save_total_limit"):
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
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ConfigError("need --temperature > 0 (PPO samples from its policy), 0 < --top-p <= 1, --top-k >= 0")
        if self.reward_clip < 0 or self.eval_prompts < 0 or self.log_samples < 0:
            raise ConfigError("--reward-clip, --eval-prompts and --log-samples must be >= 0")


@dataclass
class Rollout:
    """One PPO step's experience, all on the training device. ``B`` responses of ``R`` tokens.

    gen: the :class:`dpolab.generation.Generation`. scores (B,) after penalty and clipping;
    raw_scores (B,) as the reward returned them. logps, ref_logps, values, kl, rewards, advantages,
    returns: (B, R), zero after EOS. entropy: mean per-token entropy of the rollout policy.
    """

    gen: object
    prompts: list[str]
    completions: list[str]
    raw_scores: torch.Tensor
    scores: torch.Tensor
    logps: torch.Tensor
    ref_logps: torch.Tensor
    values: torch.Tensor
    kl: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    entropy: float


# -- the loop -----------------------------------------------------------------------------------------
def train(cfg: PPOConfig) -> dict:
    """Run PPO as configured; returns the summary (also written to OUTPUT_DIR/summary.json)."""
    from tqdm.auto import tqdm

    from dpolab.data.prompts import load_prompts
    from dpolab.evaluation import compute_rewards, evaluate_policy, response_token_logps
    from dpolab.generation import decode_responses, generate
    from dpolab.lm import gather_token_logps
    from dpolab.losses.ppo import (
        AdaptiveKLController,
        FixedKLController,
        clipped_value_loss,
        entropy_from_logits,
        ppo_clip_loss,
    )
    from dpolab.train import common, distributed
    from dpolab.value import PolicyWithValue, ValueHead, hidden_size_of

    accelerator = distributed.make_accelerator(cfg.mixed_precision)
    if accelerator.num_processes > 1:  # a known limit (docs/scaling.md)
        raise ConfigError("dpolab ppo runs in a single process (one device); launch it without a "
                          "multi-process accelerate config (docs/scaling.md)")
    device = accelerator.device
    seed_everything(cfg.seed)
    tokenizer = common.load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    prompts = load_prompts(cfg.data, tokenizer, max_prompt_length=cfg.max_prompt_length)
    eval_set = _eval_prompts(cfg, prompts, tokenizer)
    reward_fn = _reward_function(cfg, device)
    report = {**prompts.report(), "eval_prompts": len(eval_set) if eval_set is not None else 0}
    if cfg.dry_run:
        probe = compute_rewards(reward_fn, prompts.texts[:2], [""] * min(2, len(prompts)))
        print(json.dumps({"data": report, "reward_probe_on_empty_completions": probe.tolist(),
                          "config": vars(cfg)}, indent=2))
        return {"dry_run": True, "data/prompts": len(prompts), "data/truncated_prompts": prompts.truncated}

    policy = common.load_causal_lm(cfg.model, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
    if cfg.lora:
        policy = common.apply_lora(policy, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                                   target_modules=cfg.lora_target_modules)
    ref_model = None  # None: the PEFT policy with its adapters disabled
    if not cfg.lora or cfg.ref_model:
        ref_model = common.load_causal_lm(cfg.ref_model or cfg.model, dtype=cfg.dtype,
                                          trust_remote_code=cfg.trust_remote_code)
        ref_model = ref_model.requires_grad_(False).eval().to(device)
    value_model = None
    if cfg.value_model:
        value_model = common.load_causal_lm(cfg.value_model, dtype=cfg.dtype,
                                            trust_remote_code=cfg.trust_remote_code)
    model = PolicyWithValue(policy, ValueHead(hidden_size_of(value_model or policy)), value_model)
    model.eval()  # dropout off for rollouts and updates alike

    run = RunDir(cfg.output_dir, keep_last=cfg.save_total_limit)
    ckpt = common.resume_run(run, cfg.resume)
    order = common.BatchOrder(len(prompts), cfg.rollout_batch_size, cfg.seed)
    steps = common.total_steps(cfg.max_steps, cfg.epochs, order.per_epoch, 1)
    minibatches = -(-cfg.rollout_batch_size // cfg.mini_batch_size)
    optimizer = common.make_optimizer(model.parameters(), cfg.optimizer, cfg.learning_rate, cfg.weight_decay)
    scheduler = common.make_scheduler(optimizer, cfg.lr_scheduler, cfg.warmup_steps,
                                      steps * cfg.ppo_epochs * minibatches)
    model, optimizer = accelerator.prepare(model, optimizer)
    core = accelerator.unwrap_model(model)
    kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.target_kl) if cfg.adaptive_kl
              else FixedKLController(cfg.kl_coef))

    step, micro, skipped, tokens = 0, 0, 0, 0
    last_logged: dict[str, float] = {}
    if ckpt is not None:
        common.load_checkpoint_weights(core.policy, ckpt, partial=cfg.lora)
        _load_critic(core, ckpt)
        state = common.read_training_state(ckpt, optimizer=optimizer, scheduler=scheduler)
        step, micro, skipped, tokens = state["step"], state["micro_batch"], state["skipped_steps"], state["tokens"]
        kl_ctl.beta = float(state.get("kl_coef", cfg.kl_coef))
        last_logged = dict(state.get("last_logged", {}))
        common.warn_config_changes(state.get("config", {}), vars(cfg))
        run.truncate_metrics(step)
        _truncate_jsonl(run.path / "samples.jsonl", step)
        accelerator.print(f"resumed from {ckpt} at step {step}")

    def forward(g) -> tuple[torch.Tensor, torch.Tensor]:
        """Response-aligned (logits / temperature (B, R, V), values (B, R)) for a Generation."""
        logits, values = model(g.input_ids, g.attention_mask, g.position_ids, prompt_length=g.prompt_length)
        if cfg.temperature > 0 and cfg.temperature != 1.0:
            logits = logits / cfg.temperature
        return logits, values.float()

    def collect(idx: list[int]) -> Rollout:
        gen = generate(core.policy, tokenizer, [prompts.ids[i] for i in idx], max_new_tokens=cfg.max_new_tokens,
                       temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                       generator=torch.Generator(device=device).manual_seed(_step_seed(cfg.seed, step)))
        texts, completions = [prompts.texts[i] for i in idx], decode_responses(tokenizer, gen)
        raw = compute_rewards(reward_fn, texts, completions).to(device)
        scores = shape_scores(raw, gen.finished, missing_eos_penalty=cfg.missing_eos_penalty,
                              reward_clip=cfg.reward_clip)
        mask = gen.response_mask
        with torch.no_grad():
            logits, values = forward(gen)
            logps = gather_token_logps(logits, gen.response_ids).float() * mask
            entropy = float(masked_mean(entropy_from_logits(logits.float()), mask))
            ref = ref_model if ref_model is not None else core.policy
            with (core.policy.disable_adapter() if ref_model is None else nullcontext()):
                ref_logps = response_token_logps(ref, gen, temperature=cfg.temperature)
        values = values * mask
        rewards, kl = per_token_rewards(scores, logps, ref_logps, mask, kl_coef=kl_ctl.beta,
                                        kl_estimator=cfg.kl_estimator)
        if cfg.whiten_rewards:
            rewards = whiten(rewards, mask, shift_mean=False)
        adv, ret = token_advantages(rewards, values, mask, gamma=cfg.gamma, lam=cfg.lam)
        if cfg.whiten_advantages:
            adv = whiten(adv, mask)
        return Rollout(gen, texts, completions, raw, scores, logps, ref_logps, values, kl, rewards, adv, ret,
                       entropy)

    def update(ro: Rollout) -> dict[str, float]:
        """``ppo_epochs`` passes of clipped policy + value losses over shuffled minibatches."""
        nonlocal skipped
        B = ro.scores.shape[0]
        perm_rng = torch.Generator().manual_seed(_step_seed(cfg.seed, step) + 1)
        sums: dict[str, float] = {}
        n = 0
        for _ in range(cfg.ppo_epochs):
            perm = torch.randperm(B, generator=perm_rng)
            for start in range(0, B, cfg.mini_batch_size):
                rows = perm[start:start + cfg.mini_batch_size].to(device)
                g = ro.gen.select(rows)
                m = g.response_mask
                logits, values = forward(g)
                logp = gather_token_logps(logits, g.response_ids).float()
                pg, pstats = ppo_clip_loss(logp, ro.logps[rows], ro.advantages[rows], cfg.cliprange)
                vf, vstats = clipped_value_loss(values, ro.values[rows], ro.returns[rows], cfg.cliprange_value)
                policy_loss, value_loss = masked_mean(pg, m), masked_mean(vf, m)
                loss = policy_loss + cfg.vf_coef * value_loss
                bad = not bool(torch.isfinite(loss))
                if not bad:
                    accelerator.backward(loss)
                    norm = common.grad_norm_(model.parameters(), cfg.max_grad_norm, accelerator)
                    bad = not bool(torch.isfinite(norm).all())
                if bad:
                    if not cfg.skip_nonfinite:
                        raise common.nonfinite_error("loss or gradient", step + 1, f"minibatch rows {rows.tolist()[:8]}")
                    skipped += 1
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                row = {"losses/policy": policy_loss.detach(), "losses/value": value_loss.detach(),
                       "losses/clipfrac": masked_mean(pstats["clipfrac"], m),
                       "losses/approx_kl": masked_mean(pstats["approx_kl"], m),
                       "losses/vf_clipfrac": masked_mean(vstats["vf_clipfrac"], m),
                       "policy/ratio": masked_mean(pstats["ratio"], m)}
                for k, v in row.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                n += 1
        return {k: v / n for k, v in sums.items()}

    def evaluate() -> dict[str, float]:
        if eval_set is None:
            return {}
        texts, ids = eval_set
        res = evaluate_policy(core.policy, tokenizer, texts, ids, reward_fn, ref_model=ref_model,
                              max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                              top_p=cfg.top_p, seed=cfg.seed + 7919, batch_size=cfg.rollout_batch_size)
        return {f"eval/{k}": v for k, v in res.items()}

    def save_checkpoint() -> None:
        if not common.weights_finite(core):
            raise common.nonfinite_error("weights", step, "refusing to write a checkpoint")

        def write(d: Path) -> None:
            from safetensors.torch import save_file

            weights = {k: v for k, v in core.policy.state_dict().items() if not cfg.lora or "lora_" in k}
            save_file(_untie(weights), str(d / "model.safetensors"))
            save_file(_untie(core.critic_state()), str(d / "critic.safetensors"))
            common.write_training_state(d, optimizer=optimizer, scheduler=scheduler, state={
                "step": step, "micro_batch": micro, "skipped_steps": skipped, "tokens": tokens,
                "kl_coef": kl_ctl.beta, "last_logged": last_logged, "config": vars(cfg)})

        run.save_checkpoint(step, write)

    run.create()
    run.write_config(cfg)
    (run.path / "data_report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    batches = order.iterate(start=micro)
    bar = tqdm(total=steps, initial=step, desc="ppo", disable=not cfg.progress, dynamic_ncols=True)
    with common.StopSignal() as stop:
        while step < steps:
            t0 = time.time()
            k, idx = next(batches)
            ro = collect(idx)
            beta = kl_ctl.beta
            stats = update(ro)
            mask = ro.gen.response_mask
            seq_kl = ro.kl.sum(1)
            logged = {
                "objective/kl": float(seq_kl.mean()), "objective/kl_coef": beta,
                "objective/entropy": ro.entropy,
                "objective/scores": float(ro.raw_scores.mean()),
                "objective/scores_std": float(ro.raw_scores.std()) if len(idx) > 1 else 0.0,
                "objective/non_score_reward": float(-beta * seq_kl.mean()),
                "objective/rlhf_reward": float(ro.scores.mean() - beta * seq_kl.mean()),
                **stats,
                "losses/explained_variance": explained_variance(ro.values, ro.returns, mask),
                "val/response_length": float(ro.gen.response_lengths.float().mean()),
                "val/eos_fraction": float(ro.gen.finished.float().mean()),
                "learning_rate": scheduler.get_last_lr()[0], "epoch": (k + 1) / order.per_epoch,
                "skipped_steps": skipped, "seconds_per_step": time.time() - t0,
            }
            kl_ctl.update(float(seq_kl.mean()))
            step, micro = step + 1, k + 1
            tokens += int(mask.sum())
            bar.update(1)
            if step % cfg.logging_steps == 0 or step == steps:
                run.log(step, logged)
                last_logged = logged
                _log_samples(run, step, ro, seq_kl, cfg.log_samples)
                bar.set_postfix(score=f"{logged['objective/scores']:.3f}", kl=f"{logged['objective/kl']:.3f}")
            if cfg.eval_steps > 0 and step % cfg.eval_steps == 0 and step < steps:
                run.log(step, evaluate())
            if cfg.save_steps > 0 and step % cfg.save_steps == 0 and step < steps:
                save_checkpoint()
            if stop.received:
                save_checkpoint()
                bar.close()
                print(common.resume_hint("ppo", run, stop.received, step, steps), file=sys.stderr)
                return {"stopped": True, "steps": step}
    bar.close()

    last_eval = evaluate()
    if last_eval:
        run.log(step, last_eval)
    save_checkpoint()
    final_policy = core.policy.merge_and_unload() if cfg.lora else core.policy
    common.save_pretrained_atomic(final_policy, tokenizer, run.final)
    from dpolab.value import VALUE_MODEL_DIR, save_value_head

    save_value_head(core.value_head, run.final)
    if core.value_model is not None:
        core.value_model.save_pretrained(run.final / VALUE_MODEL_DIR, safe_serialization=True)
    summary = run.write_summary({**last_logged, **last_eval, "skipped_steps": skipped,
                                 "data/prompts": len(prompts), "data/truncated_prompts": prompts.truncated},
                                steps=step)
    _print_summary(summary)
    return summary


# -- helpers --------------------------------------------------------------------------------------------
def _step_seed(seed: int, step: int) -> int:
    """The sampling seed of PPO step ``step``: a resumed run draws exactly what an uninterrupted one does."""
    return (seed * 1_000_003 + step * 7_919) % (2**63 - 1)


def _eval_prompts(cfg: PPOConfig, prompts, tokenizer) -> tuple[list[str], list[list[int]]] | None:
    """(texts, ids) of the evaluation prompts: --eval-data, else a seeded sample of the training prompts."""
    if cfg.eval_prompts == 0:
        return None
    if cfg.eval_data:
        from dpolab.data.prompts import load_prompts

        data = load_prompts(cfg.eval_data, tokenizer, max_prompt_length=cfg.max_prompt_length)
        rows = list(range(min(cfg.eval_prompts, len(data))))
    else:
        data = prompts
        perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(cfg.seed + 1)).tolist()
        rows = perm[:cfg.eval_prompts]
    return [data.texts[i] for i in rows], [data.ids[i] for i in rows]


def _reward_function(cfg: PPOConfig, device):
    from dpolab.evaluation import load_reward_function, reward_model_function

    if cfg.reward is not None:
        return load_reward_function(cfg.reward)
    from dpolab.reward import load_reward_model
    from dpolab.train.common import load_tokenizer

    rm_tokenizer = load_tokenizer(cfg.reward_model, trust_remote_code=cfg.trust_remote_code)
    rm = load_reward_model(cfg.reward_model, rm_tokenizer, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
    rm = rm.requires_grad_(False).eval().to(device)
    return reward_model_function(rm, rm_tokenizer, batch_size=cfg.rollout_batch_size)


def _load_critic(core, ckpt: Path) -> None:
    """Load ``critic.safetensors`` (value head, and the value model if separate); every tensor must fit."""
    from safetensors.torch import load_file

    from dpolab.errors import DpolabError

    path = ckpt / "critic.safetensors"
    try:
        weights = load_file(str(path))
        result = core.load_state_dict(weights, strict=False)
    except (OSError, RuntimeError) as err:
        raise DpolabError(f"cannot load {path}: {str(err).strip().splitlines()[0]}") from None
    missing = [k for k in core.critic_state() if k not in weights]
    if result.unexpected_keys or missing:
        raise DpolabError(f"{path} does not fit this critic (value head / --value-model settings differ)")


def _log_samples(run: RunDir, step: int, ro: Rollout, seq_kl: torch.Tensor, n: int) -> None:
    """Append the first ``n`` (prompt, completion, score, kl) rows to samples.jsonl; print two."""
    if n <= 0:
        return
    rows = [{"step": step, "prompt": ro.prompts[i], "completion": ro.completions[i],
             "score": float(ro.raw_scores[i]), "kl": float(seq_kl[i])} for i in range(min(n, len(ro.prompts)))]
    with open(run.path / "samples.jsonl", "a", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    for r in rows[:2]:
        print(f"[step {step}] score={r['score']:+.3f} kl={r['kl']:+.3f} | {r['prompt'][-40:]!r} -> "
              f"{r['completion'][:60]!r}", file=sys.stderr)


def _truncate_jsonl(path: Path, step: int) -> None:
    if path.is_file():
        from dpolab.rundir import atomic_write_text

        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        atomic_write_text(path, "".join(ln + "\n" for ln in lines if json.loads(ln).get("step", 0) <= step))


def _untie(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous copies for safetensors, which refuses tensors that share storage (tied weights)."""
    seen: set[int] = set()
    out = {}
    for k, v in weights.items():
        v = v.detach()
        out[k] = v.clone().contiguous().cpu() if v.data_ptr() in seen else v.contiguous().cpu()
        seen.add(v.data_ptr())
    return out


def _print_summary(summary: dict) -> None:
    keys = ["steps", "eval/reward", "eval/kl", "objective/scores", "objective/kl", "wall_seconds"]
    for k in (k for k in keys if k in summary):
        v = summary[k]
        print(f"  {k:<18}  {v:.4f}" if isinstance(v, float) else f"  {k:<18}  {v}", file=sys.stderr)


def cli_main(argv: list[str], prog: str) -> int:
    cfg = parse_config(PPOConfig, argv, prog=prog, description=DESCRIPTION)
    summary = train(cfg)
    if not summary.get("dry_run") and not summary.get("stopped"):
        print(f"done: {cfg.output_dir} (final model in {Path(cfg.output_dir) / 'final'})")
    return 0
