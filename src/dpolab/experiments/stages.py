"""The stages of `dpolab demo` (docs/demo.md): the base model, the prompts, the preference pairs, and
the points of the reward-vs-KL frontier: a sweep of each method's knob with every checkpoint
evaluated on held-out prompts, and the best-of-N baseline. ``dpolab.experiments.sentiment`` runs
them in order and writes the report."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TYPE_CHECKING

from dpolab.errors import ConfigError, DpolabError
from dpolab.experiments.report import best_of_n_kl_bound

if TYPE_CHECKING:
    from dpolab.experiments.sentiment import DemoConfig

# Every evaluation samples with seed --seed + EVAL_SEED (the same draws for every checkpoint).
EVAL_SEED = 101

# The trained series: method -> (its knob, run-directory prefix), one table for training,
# evaluation and samples.md alike.
SERIES = {"DPO": ("beta", "dpo-beta"), "PPO": ("kl_coef", "ppo-kl"), "GRPO": ("beta", "grpo-beta"),
          "RLOO": ("beta", "rloo-beta")}



def build_base_model(cfg: DemoConfig, work: Path, say) -> tuple[str, list[str]]:
    """Pretrain a tiny Llama on grammar reviews (or take --model). Returns (model path, held-out reviews)."""
    from dpolab.experiments.grammar import generate_reviews

    reviews = generate_reviews(cfg.corpus_size + 2 * (cfg.train_prompts + cfg.eval_prompts), seed=cfg.seed)
    corpus, held_out = reviews[:cfg.corpus_size], reviews[cfg.corpus_size:]
    if cfg.model:
        return cfg.model, held_out
    from dpolab.lm.tiny import tiny_llama, train_tokenizer
    from dpolab.train.sft import SFTConfig
    from dpolab.train.sft import train as sft_train

    say(f"pretraining a tiny Llama on {len(corpus)} generated reviews")
    init = work / "init"
    tokenizer = train_tokenizer(corpus, vocab_size=512)
    model = tiny_llama(len(tokenizer), hidden_size=cfg.hidden_size, layers=cfg.layers, heads=4,
                       max_positions=128, seed=cfg.seed, tokenizer=tokenizer)
    model.save_pretrained(init)
    tokenizer.save_pretrained(init)
    write_jsonl(work / "corpus.jsonl", [{"text": r} for r in corpus])
    finished(sft_train(SFTConfig(model=str(init), data=str(work / "corpus.jsonl"), output_dir=str(work / "pretrain"),
                                 loss_on="full", max_length=96, learning_rate=3e-3, warmup_steps=20,
                                 lr_scheduler="cosine", batch_size=32, max_steps=cfg.pretrain_steps,
                                 eval_fraction=0.02, logging_steps=25, seed=cfg.seed, progress=cfg.progress,
                                 report_to=cfg.report_to)), "pretraining", work)
    return str(work / "pretrain" / "final"), held_out


def read_prompts(cfg: DemoConfig) -> tuple[list[str], list[str]] | None:
    """--prompts read, checked and split 80/20 into (train prompts, eval prompts); None without it.
    Called before any stage: a bad file would otherwise be found after pretraining, and the work/
    folder left behind would refuse the rerun."""
    if not cfg.prompts:
        return None
    from dpolab.data.loading import load_records, record_error
    from dpolab.data.prompts import render_prompt

    tokenizer, texts = None, []
    for rec in load_records(cfg.prompts):  # load_prompts' checks, without tokenising (done later)
        if not isinstance(rec.data, dict):
            raise record_error(rec, "expected a JSON object")
        if tokenizer is None and rec.data.get("messages") is not None:  # only a chat template needs one
            tokenizer = _chat_tokenizer(cfg)
        texts.append(render_prompt(rec.data, tokenizer, record=rec)[0])
    if len(texts) < 4:
        raise ConfigError(f"--prompts {cfg.prompts}: need at least 4 prompts, found {len(texts)}")
    rng = random.Random(cfg.seed)
    rng.shuffle(texts)
    n_eval = max(1, min(cfg.eval_prompts, len(texts) // 5))
    return texts[n_eval:][:cfg.train_prompts], texts[:n_eval]


def _chat_tokenizer(cfg: DemoConfig):
    """A tokenizer that renders `messages` rows as the base model's will, before that model exists."""
    if cfg.model:
        from dpolab.lm.loading import load_tokenizer

        return load_tokenizer(cfg.model)
    # The built-in tokenizer is trained in stage 1, but a rendered prompt depends only on its chat
    # template and special tokens, which train_tokenizer sets alike for any corpus.
    from dpolab.lm.tiny import train_tokenizer

    return train_tokenizer([""])


def make_prompts(cfg: DemoConfig, held_out: list[str],
                 given: tuple[list[str], list[str]] | None = None) -> tuple[list[str], list[str]]:
    """(train prompts, eval prompts): ``given`` (the --prompts split by ``read_prompts``), else review
    prefixes of the held-out reviews."""
    if given is not None:
        return given
    from dpolab.experiments.grammar import review_prefix

    rng = random.Random(cfg.seed + 1)
    prefixes = [review_prefix(r, rng) for r in held_out]
    return prefixes[:cfg.train_prompts], prefixes[cfg.train_prompts:cfg.train_prompts + cfg.eval_prompts]


def build_preferences(cfg: DemoConfig, model, tokenizer, prompts: list[str], reward_fn, path: Path) -> dict:
    """Sample k = ``samples_per_prompt`` completions per prompt from the base model; rank them by
    ground-truth reward and pair the i-th best with the i-th worst, i = 1..k//2. A pair with tied
    rewards or an empty completion is skipped, and counted in ``ties_skipped``."""
    from dpolab.lm.generation import sample_completions
    from dpolab.rewards.functions import compute_rewards

    k = cfg.samples_per_prompt
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    texts, _ = sample_completions(model, tokenizer, [x for x in ids for _ in range(k)],
                                  max_new_tokens=cfg.max_new_tokens, seed=cfg.seed + 11, batch_size=64)
    rewards = compute_rewards(reward_fn, [p for p in prompts for _ in range(k)], texts).tolist()
    rows, ties = [], 0
    for i, prompt in enumerate(prompts):
        group = sorted(zip(rewards[i * k:(i + 1) * k], texts[i * k:(i + 1) * k]), key=lambda t: -t[0])
        for j in range(k // 2 if k >= 4 else 1):
            (r_w, y_w), (r_l, y_l) = group[j], group[-1 - j]
            if r_w - r_l < 1e-6 or not y_w.strip() or not y_l.strip():
                ties += 1
                continue
            rows.append({"prompt": prompt, "chosen": y_w, "rejected": y_l, "chosen_reward": r_w,
                         "rejected_reward": r_l})
    if len(rows) < 8:
        raise ConfigError(f"only {len(rows)} preference pairs had distinct rewards; use more prompts or samples")
    write_jsonl(path, rows)
    return {"pairs": len(rows), "ties_skipped": ties, "base_sample_reward": sum(rewards) / len(rewards)}


def best_of_n(cfg: DemoConfig, base, tokenizer, prompts: list[str], reward_fn) -> tuple[list[dict], list]:
    """The best-of-N baseline (DPO paper §6; Stiennon et al. 2020): max(N) completions of each held-out
    prompt from the base model; for each N the first N of them, the best by the reward kept. Draw 0
    of each prompt is the base model's evaluation sample (same seed), so best-of-1 is the base point.
    Its KL is the analytic bound (``best_of_n_kl_bound``): measuring it would need best-of-N's own
    probabilities, a sum over every set of N draws. Returns (one row per N; the (text, reward) of the
    best of all max(N) completions of each prompt, for samples.md)."""
    import torch

    from dpolab.lm.generation import sample_completions
    from dpolab.rewards.functions import compute_rewards

    k = max(cfg.best_of_n)
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    draws = [sample_completions(base, tokenizer, ids, max_new_tokens=cfg.max_new_tokens,
                                seed=cfg.seed + EVAL_SEED + 1000 * j, batch_size=64) for j in range(k)]
    texts = [draws[j][0][i] for i in range(len(prompts)) for j in range(k)]  # prompt-major: (P·k,)
    rewards = compute_rewards(reward_fn, [p for p in prompts for _ in range(k)], texts,
                              dtype=torch.float64).view(-1, k)
    lengths = torch.stack([torch.cat([g.response_lengths for g in gens]) for _, gens in draws], 1).double()
    finished = torch.stack([torch.cat([g.finished for g in gens]) for _, gens in draws], 1).double()
    rows = []
    for n in cfg.best_of_n:
        best, at = rewards[:, :n].max(1)
        rows.append({"method": "best-of-N", "param": "N", "value": n, "step": 0, "reward": float(best.mean()),
                     "reward_std": float(best.std()) if best.numel() > 1 else 0.0, "kl": best_of_n_kl_bound(n),
                     "kl_kind": "bound", "response_length": float(lengths.gather(1, at[:, None]).mean()),
                     "eos_fraction": float(finished.gather(1, at[:, None]).mean())})
    top = rewards.argmax(1).tolist()
    return rows, [(texts[i * k + j], float(rewards[i, j])) for i, j in enumerate(top)]


def finished(summary: dict, stage: str, work: Path) -> dict:
    """A stage's summary; a stage stopped by SIGINT/SIGTERM (its trainer checkpointed and returned
    ``{"stopped": True}``) stops the demo too, where it went on to the next stage, which failed on
    the missing model."""
    if summary.get("stopped"):
        raise DpolabError(f"stopped by a signal during the {stage} stage (at its step {summary.get('steps')}); the "
                          f"demo does not resume: remove {work.parent} (or choose another --output-dir) and run it again")
    return summary


def sweep(method: str, values: list[float], train_one, evaluate, work: Path) -> list[dict]:
    """Train one run per value of the method's knob (``train_one(value, run_dir)``) and evaluate
    every checkpoint of each (``evaluate(run_dir)``): the rows of one series."""
    param, prefix = SERIES[method]
    rows = []
    for value in values:
        run = work / f"{prefix}{value:g}"
        finished(train_one(value, run), f"{method} {param} = {value:g}", work)
        rows += [{"method": method, "param": param, "value": value, **r, "kl_kind": "sampled"} for r in evaluate(run)]
    return rows


def evaluate_run(run_dir: Path, base_path: str, tokenizer, prompts: list[str], reward_fn, cfg: DemoConfig,
                 ref_model) -> list[dict]:
    """Mean ground-truth reward and KL(π‖π_ref) of every checkpoint of a run (step 0 is the base)."""
    import torch
    from safetensors.torch import load_file

    from dpolab.lm.loading import load_causal_lm
    from dpolab.rewards.evaluation import evaluate_policy

    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    policy = load_causal_lm(base_path)
    ckpts = sorted((p for p in (run_dir / "checkpoints").glob("step-*") if p.is_dir()),
                   key=lambda p: int(p.name.split("-")[1]))
    rows = []
    for ckpt in ckpts:
        state = load_file(str(ckpt / "model.safetensors"))
        missing = policy.load_state_dict(state, strict=False).missing_keys
        if len(missing) == len(policy.state_dict()):
            raise RuntimeError(f"{ckpt}: checkpoint weights do not match the base model")
        with torch.no_grad():
            res = evaluate_policy(policy, tokenizer, prompts, ids, reward_fn, ref_model=ref_model,
                                  max_new_tokens=cfg.max_new_tokens, seed=cfg.seed + EVAL_SEED, batch_size=64)
        rows.append({"step": int(ckpt.name.split("-")[1]), **res})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
