"""`dpolab demo`: the DPO paper's controlled-sentiment experiment at laptop scale (docs/demo.md).

Rafailov et al. 2023 (arXiv 2305.18290, §6.1, Figure 2 left): prompts are prefixes of movie reviews,
the policy must produce positive completions, and each method is judged by the frontier of mean
ground-truth reward against sequence-level KL(π‖π_ref). Here, with no network:

1. a corpus from our review grammar (dpolab.experiments.grammar) → a byte-level BPE tokenizer → a
   small Llama-style LM pretrained on it with ``dpolab sft`` (or ``--model NAME_OR_PATH``);
2. the ground-truth reward is VADER's compound sentiment of the completion (``--reward`` swaps it);
3. preference pairs: several completions per training prefix sampled from the base model, ranked by
   the ground-truth reward and paired best with worst, second best with second worst, ... (the
   paper makes every pair of its 4 samples per prefix, App. C.1);
4. DPO for several β, and PPO for several KL coefficients against a reward model trained on the same
   pairs (``dpolab rm``); GRPO (several β of its KL term) and RLOO (several β of its KL-shaped
   reward) on the ground-truth reward itself; every checkpoint is evaluated on held-out prefixes
   (mean reward, KL);
5. the best-of-N baseline: N base-model completions per held-out prefix, the best by the reward kept,
   at the analytic KL bound log N − (N−1)/N;
6. the finite-response check of the theory (dpolab.experiments.bandit);
7. frontier.png, curves.png, samples.md, results.csv/json and report.md in the output directory, with
   a verdict over every method's frontier.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from dpolab.config import opt, parse_config
from dpolab.errors import ConfigError, DpolabError
from dpolab.experiments.report import frontier_verdict, print_table, write_outputs
from dpolab.experiments.stages import (
    EVAL_SEED,
    SERIES,
    best_of_n,
    build_base_model,
    build_preferences,
    evaluate_run,
    finished,
    make_prompts,
    read_prompts,
    sweep,
    write_jsonl,
)

DESCRIPTION = """Run the DPO paper's controlled-sentiment experiment end to end (no network needed).

example:
  dpolab demo --quick                       # under 4 minutes on 2 CPU cores
  dpolab demo --output-dir runs/demo        # the default size, under 15 minutes on 2 CPU cores
  dpolab demo --model gpt2 --prompts prompts.jsonl   # your own base model and prompts
"""

# Sizes of the two presets; any of them can be set explicitly. GRPO and RLOO: 8 prefixes × 8
# completions per step (docs/demo.md has how these were chosen).
PRESETS = {
    "quick": dict(corpus_size=3000, pretrain_steps=300, hidden_size=64, layers=2, train_prompts=192,
                  samples_per_prompt=4, eval_prompts=64, max_new_tokens=16, dpo_betas=[0.1, 0.5],
                  dpo_steps=40, ppo_kl_coefs=[0.05, 0.2], ppo_steps=10, rm_steps=60, eval_every=10,
                  grpo_betas=[0.0, 0.2], grpo_steps=20, rloo_betas=[0.01, 0.1], rloo_steps=20,
                  num_generations=8, prompts_per_step=8, best_of_n=[1, 2, 4, 8, 16]),
    "full": dict(corpus_size=8000, pretrain_steps=800, hidden_size=96, layers=3, train_prompts=512,
                 samples_per_prompt=4, eval_prompts=128, max_new_tokens=20, dpo_betas=[0.05, 0.1, 0.25, 0.5, 1.0],
                 dpo_steps=120, ppo_kl_coefs=[0.02, 0.05, 0.1, 0.2, 0.5], ppo_steps=30, rm_steps=200,
                 eval_every=20, grpo_betas=[0.0, 0.2, 1.0], grpo_steps=40, rloo_betas=[0.01, 0.03, 0.1],
                 rloo_steps=40, num_generations=8, prompts_per_step=8, best_of_n=[1, 2, 4, 8, 16]),
}


def _preset(name: str, help: str) -> str:
    """A size's help text with both presets' values: the field's own default, None, only means "the
    preset's", which the generic "(default: None)" would hide."""
    def text(value) -> str:
        return ",".join(f"{v:g}" for v in value) if isinstance(value, list) else str(value)

    return f"{help} (default: {text(PRESETS['full'][name])}; --quick: {text(PRESETS['quick'][name])})"


# The sweep options and the series whose run folders (work/<prefix><value:g>) their values name.
SWEEPS = {"dpo_betas": "DPO", "ppo_kl_coefs": "PPO", "grpo_betas": "GRPO", "rloo_betas": "RLOO"}


@dataclass
class DemoConfig:
    output_dir: str | None = opt(None, "where results go (default: runs/demo-<timestamp>)")
    quick: bool = opt(False, "the small preset: under 4 minutes on 2 CPU cores")
    seed: int = opt(0, "random seed for every stage")
    model: str | None = opt(None, "base model (HF name or folder) (default: pretrain a tiny Llama on our review grammar)")
    prompts: str | None = opt(None, "prompt file (JSONL with 'prompt' or 'messages') (default: review prefixes)")
    reward: str = opt("dpolab.experiments.sentiment_reward:vader_sentiment", "ground-truth reward 'module:function'")
    dpo_betas: list[float] | None = opt(None, _preset("dpo_betas", "DPO β values (comma-separated)"))
    ppo_kl_coefs: list[float] | None = opt(None, _preset("ppo_kl_coefs", "PPO KL coefficients (comma-separated)"))
    grpo_betas: list[float] | None = opt(None, _preset("grpo_betas", "GRPO β values of its KL term (comma-separated; "
                                                         "0: no KL term)"))
    rloo_betas: list[float] | None = opt(None, _preset("rloo_betas", "RLOO β values of its KL-shaped reward r − β·KL "
                                                         "(comma-separated)"))
    best_of_n: list[int] | None = opt(None, _preset("best_of_n", "N values of the best-of-N baseline (comma-separated)"))
    corpus_size: int | None = opt(None, _preset("corpus_size", "reviews generated for pretraining"))
    pretrain_steps: int | None = opt(None, _preset("pretrain_steps", "pretraining steps of the tiny base model"))
    hidden_size: int | None = opt(None, _preset("hidden_size", "hidden size of the tiny base model (a multiple of 4)"))
    layers: int | None = opt(None, _preset("layers", "layers of the tiny base model"))
    train_prompts: int | None = opt(None, _preset("train_prompts", "prefixes used for preference pairs and "
                                                  "PPO/GRPO/RLOO rollouts (with --prompts: at most this many, from "
                                                  "what the held-out ones leave)"))
    samples_per_prompt: int | None = opt(None, _preset("samples_per_prompt", "completions sampled per prefix to build "
                                                       "pairs"))
    eval_prompts: int | None = opt(None, _preset("eval_prompts", "held-out prefixes for evaluation (with --prompts: "
                                                 "at most a fifth of the file)"))
    max_new_tokens: int | None = opt(None, _preset("max_new_tokens", "completion length cap"))
    dpo_steps: int | None = opt(None, _preset("dpo_steps", "DPO optimizer steps per β"))
    ppo_steps: int | None = opt(None, _preset("ppo_steps", "PPO steps (rollout + update) per KL coefficient"))
    rm_steps: int | None = opt(None, _preset("rm_steps", "reward-model training steps"))
    grpo_steps: int | None = opt(None, _preset("grpo_steps", "GRPO steps (sample + update) per β"))
    rloo_steps: int | None = opt(None, _preset("rloo_steps", "RLOO steps (sample + update) per β"))
    num_generations: int | None = opt(None, _preset("num_generations", "GRPO/RLOO: completions sampled per prefix in "
                                                    "a step (the group)"))
    prompts_per_step: int | None = opt(None, _preset("prompts_per_step", "GRPO/RLOO: prefixes per step"))
    eval_every: int | None = opt(None, _preset("eval_every", "evaluate a checkpoint every N DPO steps (PPO, GRPO, "
                                               "RLOO: every N/4 steps)"))
    progress: bool = opt(True, "show progress bars")
    report_to: str = opt("none", "also log every stage's run, and the demo's frontier and samples as tables, to "
                         "experiment trackers: tensorboard, wandb, mlflow, a comma-separated list, or none", items=True)

    def resolved(self) -> DemoConfig:
        preset = PRESETS["quick" if self.quick else "full"]
        values = asdict(self)
        for key, default in preset.items():
            if values[key] is None:
                values[key] = default
        if values["output_dir"] is None:
            values["output_dir"] = f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}"
        return DemoConfig(**values)

    def validate(self) -> None:
        for name, low, what in (("dpo_betas", 0, "positive values"), ("ppo_kl_coefs", 0, "positive values"),
                                ("grpo_betas", None, "values >= 0"), ("rloo_betas", None, "values >= 0"),
                                ("best_of_n", 0, "values >= 1")):
            vals = getattr(self, name)  # low: the bound values must exceed (None: >= 0 suffices)
            if vals is not None and (not vals or any(v < 0 if low is None else v <= low for v in vals)):
                raise ConfigError(f"--{name.replace('_', '-')} needs {what}")
        for name in (*SWEEPS, "best_of_n"):
            _check_distinct(name, getattr(self, name))
        for name in ("corpus_size", "pretrain_steps", "hidden_size", "layers", "train_prompts", "eval_prompts",
                     "max_new_tokens", "dpo_steps", "ppo_steps", "rm_steps", "grpo_steps", "rloo_steps",
                     "prompts_per_step", "eval_every"):
            value = getattr(self, name)  # checked here: a bad size would otherwise fail stages later
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.hidden_size is not None and self.hidden_size % 4:  # the tiny base model has 4 heads
            raise ConfigError(f"--hidden-size must be a multiple of 4 (the base model's attention heads), "
                              f"got {self.hidden_size}")
        if self.seed < 0:
            raise ConfigError(f"--seed must be >= 0, got {self.seed}")
        if self.prompts is not None:
            from dpolab.data.loading import FILE_EXTENSIONS

            path = Path(self.prompts).expanduser()
            local = self.prompts.lower().endswith(FILE_EXTENSIONS) or self.prompts.startswith(("/", ".", "~"))
            if local and not path.exists():  # its rows: read_prompts, before any stage
                raise ConfigError(f"--prompts {self.prompts}: file not found")
        if self.samples_per_prompt is not None and self.samples_per_prompt < 2:
            raise ConfigError("--samples-per-prompt must be >= 2 to form pairs")
        if self.num_generations is not None and self.num_generations < 2:
            raise ConfigError("--num-generations must be >= 2: GRPO and RLOO compare each completion with its group")
        from dpolab.runs.trackers import parse_report_to

        parse_report_to(self.report_to)  # a tracker that is not installed fails before any stage runs


def _check_distinct(name: str, values: list | None) -> None:
    """Each value of a sweep once: two runs of one value (or of values written alike in their run
    folder's name, ``{value:g}``) would meet at the second run's folder, after the first has trained."""
    flag = "--" + name.replace("_", "-")
    for i, v in enumerate(values or []):
        for u in values[:i]:
            if u == v:
                raise ConfigError(f"{flag} gives the value {u:g} twice; give each value once")
            if name in SWEEPS and f"{u:g}" == f"{v:g}":
                prefix = SERIES[SWEEPS[name]][1]
                raise ConfigError(f"{flag}: {u!r} and {v!r} would share the run folder work/{prefix}{v:g} (named "
                                  "with 6 significant digits); give values that differ there")


class Stages:
    """A plain progress display: numbered stages with elapsed time (trainers draw their own bars),
    and each timed stage's seconds in ``timings``."""

    def __init__(self, total: int):
        self.total, self.n, self.t0 = total, 0, time.time()
        self.timings: dict[str, float] = {}

    def __call__(self, text: str) -> None:
        self.n += 1
        _STAGE[0] = f"{self.n}/{self.total}"
        print(f"[{self.n}/{self.total} {time.time() - self.t0:6.1f}s] {text}", file=sys.stderr, flush=True)

    @contextmanager
    def timed(self, key: str, text: str | None = None):
        if text is not None:
            self(text)
        t = time.time()
        yield
        self.timings[key] = time.time() - t


_STAGE = ["start-up"]  # the stage that runs, for the line a signal outside a trainer ends the demo with


@contextmanager
def _stop_on_signal(out: str):
    """SIGINT/SIGTERM outside a trainer (which checkpoints and returns, :func:`finished`) end the
    demo with one line naming the stage; the default SIGTERM ended it silently."""
    import signal

    def handle(signum, frame):
        raise DpolabError(f"stopped by {signal.Signals(signum).name} during stage {_STAGE[0]}; the demo does not "
                          f"resume: remove {out} (or choose another --output-dir) and run it again")

    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            old[sig] = signal.signal(sig, handle)
        except ValueError:  # not the main thread
            pass
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def run_demo(cfg: DemoConfig) -> dict:
    """Run every stage; returns the results dict also written to results.json."""
    _STAGE[0] = "start-up"
    from dpolab.train.distributed import hide_library_bars

    hide_library_bars(cfg.progress)
    with _stop_on_signal(cfg.output_dir):
        return _run_demo(cfg)


def _run_demo(cfg: DemoConfig) -> dict:
    import torch

    from dpolab.experiments.bandit import run_bandit_check
    from dpolab.lm.loading import load_causal_lm, load_tokenizer
    from dpolab.rewards.evaluation import evaluate_policy
    from dpolab.rewards.functions import load_reward_function
    from dpolab.runs.rundir import check_writable
    from dpolab.train.dpo import DPOConfig
    from dpolab.train.dpo import train as dpo_train
    from dpolab.train.grpo import GRPOConfig
    from dpolab.train.grpo import train as grpo_train
    from dpolab.train.ppo import PPOConfig
    from dpolab.train.ppo import train as ppo_train
    from dpolab.train.rloo import RLOOConfig
    from dpolab.train.rloo import train as rloo_train
    from dpolab.train.rm import RewardConfig
    from dpolab.train.rm import train as rm_train

    cfg = cfg.resolved()
    if not cfg.model:
        # The built-in model is tiny: its matmuls gain nothing from intra-op threads, which only
        # contend (measured 5x slower per step with 2 threads on a busy 2-core machine).
        torch.set_num_threads(1)
    out = Path(cfg.output_dir)
    check_writable("--output-dir", out, folder=True)
    if (out / "results.json").exists():
        raise ConfigError(f"{out} already holds a finished demo; choose another --output-dir")
    if (out / "work").exists():  # an interrupted demo: its trainers' folders would refuse a new run
        raise ConfigError(f"{out} holds an unfinished demo ({out / 'work'}); remove it or choose another --output-dir")
    if cfg.model:  # before work/ exists: a rerun would be refused as an unfinished demo
        from dpolab.hub import check_local_folder

        check_local_folder(cfg.model, "--model", ("config.json",))
    reward_fn = load_reward_function(cfg.reward)
    # probed before work/ exists: a wrong count, a NaN or text found after pretraining left a folder
    # the rerun refused
    from dpolab.rewards.functions import compute_rewards

    compute_rewards(reward_fn, ["The movie was", "I thought it"], [" good.", " a bore."])
    given = read_prompts(cfg)
    if given is not None:  # a small file gives fewer than asked: record (and report) the counts used
        cfg = replace(cfg, train_prompts=len(given[0]), eval_prompts=len(given[1]))
    work = out / "work"
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # /proc/x, a read-only mount: check_writable cannot foresee every file system
        raise ConfigError(f"--output-dir {out}: cannot create {work}: {err.strerror or err}") from None
    torch.manual_seed(cfg.seed)
    say = Stages(9 if not cfg.model else 8)

    with say.timed("base_model"):
        base_path, held_out = build_base_model(cfg, work, say)
    tokenizer = load_tokenizer(base_path)
    base = load_causal_lm(base_path).eval()
    base.requires_grad_(False)
    train_prompts, eval_prompts = make_prompts(cfg, held_out, given)

    with say.timed("preferences", f"sampling {cfg.samples_per_prompt} completions for each of {len(train_prompts)} "
                   "prefixes; labelling pairs with the ground-truth reward"):
        prefs = work / "preferences.jsonl"
        pref_stats = build_preferences(cfg, base, tokenizer, train_prompts, reward_fn, prefs)
        write_jsonl(work / "prompts.jsonl", [{"prompt": p} for p in train_prompts])
        write_jsonl(work / "eval_prompts.jsonl", [{"prompt": p} for p in eval_prompts])
    eval_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in eval_prompts]
    base_eval = evaluate_policy(base, tokenizer, eval_prompts, eval_ids, reward_fn, compute_kl=False,
                                max_new_tokens=cfg.max_new_tokens, seed=cfg.seed + EVAL_SEED, batch_size=64)
    base_eval["kl"] = 0.0

    def evaluate(run):
        return evaluate_run(run, base_path, tokenizer, eval_prompts, reward_fn, cfg, base)

    rows: list[dict] = []
    common = dict(max_length=cfg.max_new_tokens + 48, max_prompt_length=48, seed=cfg.seed, progress=cfg.progress,
                  report_to=cfg.report_to)
    with say.timed("dpo", f"DPO for β in {cfg.dpo_betas} ({cfg.dpo_steps} steps each)"):
        rows += sweep("DPO", cfg.dpo_betas, lambda beta, run: dpo_train(DPOConfig(
            model=base_path, data=str(prefs), output_dir=str(run), beta=beta, learning_rate=1e-3, batch_size=16,
            max_steps=cfg.dpo_steps, eval_fraction=0.05, warmup_steps=5, lr_scheduler="constant",
            save_steps=cfg.eval_every, save_total_limit=1000, logging_steps=5, precompute_ref=True, **common)),
            evaluate, work)

    # PPO, GRPO and RLOO: one rollout and update per step, a checkpoint every `online_every` steps
    online_every = max(1, cfg.eval_every // 4)
    with say.timed("rm_ppo", f"reward model on the same {pref_stats['pairs']} pairs, then PPO for KL coefficients "
                   f"{cfg.ppo_kl_coefs}"):
        rm_summary = finished(rm_train(RewardConfig(model=base_path, data=str(prefs), output_dir=str(work / "rm"),
                                                    learning_rate=1e-3, batch_size=16, max_steps=cfg.rm_steps,
                                                    eval_fraction=0.1, logging_steps=10, **common)), "reward model", work)
        rows += sweep("PPO", cfg.ppo_kl_coefs, lambda coef, run: ppo_train(PPOConfig(
            model=base_path, reward_model=str(work / "rm" / "final"), data=str(work / "prompts.jsonl"),
            output_dir=str(run), kl_coef=coef, learning_rate=3e-4, rollout_batch_size=32, mini_batch_size=8,
            ppo_epochs=4, max_new_tokens=cfg.max_new_tokens, max_prompt_length=48, max_steps=cfg.ppo_steps,
            eval_prompts=0, save_steps=online_every, save_total_limit=1000, logging_steps=online_every,
            seed=cfg.seed, progress=cfg.progress, report_to=cfg.report_to)), evaluate, work)

    # GRPO and RLOO score their samples with the ground-truth reward itself (no reward model), one
    # pass per step (on-policy: no old log-probs to keep); lr 1e-3 as for DPO: the trainers' 1e-6
    # default is for large models and does not move this one. Evaluated by the demo (eval_prompts=0).
    group = dict(model=base_path, data=str(work / "prompts.jsonl"), reward=[cfg.reward],
                 num_generations=cfg.num_generations, prompts_per_step=cfg.prompts_per_step,
                 micro_batch_size=cfg.num_generations * cfg.prompts_per_step, learning_rate=1e-3,
                 max_new_tokens=cfg.max_new_tokens, max_prompt_length=48, eval_prompts=0, save_steps=online_every,
                 save_total_limit=1000, logging_steps=online_every, seed=cfg.seed, progress=cfg.progress,
                 report_to=cfg.report_to)
    with say.timed("grpo", f"GRPO on the ground-truth reward for β in {cfg.grpo_betas} ({cfg.grpo_steps} steps "
                   f"of {cfg.prompts_per_step} prefixes × {cfg.num_generations} completions)"):
        rows += sweep("GRPO", cfg.grpo_betas, lambda beta, run: grpo_train(GRPOConfig(
            output_dir=str(run), beta=beta, max_steps=cfg.grpo_steps, **group)), evaluate, work)
    with say.timed("rloo", f"RLOO on the ground-truth reward for β in {cfg.rloo_betas} ({cfg.rloo_steps} steps "
                   f"of {cfg.prompts_per_step} prefixes × {cfg.num_generations} completions)"):
        rows += sweep("RLOO", cfg.rloo_betas, lambda beta, run: rloo_train(RLOOConfig(
            output_dir=str(run), beta=beta, max_steps=cfg.rloo_steps, **group)), evaluate, work)

    with say.timed("best_of_n", f"best-of-N baseline for N in {cfg.best_of_n}: {max(cfg.best_of_n)} base-model "
                   f"completions of each of {len(eval_prompts)} held-out prefixes"):
        bon_rows, bon_best = best_of_n(cfg, base, tokenizer, eval_prompts, reward_fn)
        rows += bon_rows

    with say.timed("bandit", "finite-response check of the theory: DPO and PPO against π* = π_ref·exp(r/β)/Z"):
        bandit = run_bandit_check(0.5, seed=cfg.seed, quick=cfg.quick)

    say(f"writing results to {out}")
    samples = _samples(cfg, rows, base, tokenizer, eval_prompts, reward_fn, work,
                       {f"best-of-{max(cfg.best_of_n)}": bon_best})
    verdict = frontier_verdict(rows)
    results = {"config": asdict(cfg), "base": base_eval, "preferences": pref_stats,
               "reward_model": {k: v for k, v in rm_summary.items() if k.startswith("eval/")},
               "rows": rows, "bandit": bandit, "verdict": verdict,
               "timings_seconds": {k: round(v, 1) for k, v in say.timings.items()}}
    results["command"] = reproduce_command(results["config"])
    write_outputs(out, results, samples)
    log_to_trackers(cfg, out, results, samples)
    print_table(results)
    return results


def log_to_trackers(cfg: DemoConfig, out: Path, results: dict, samples: list[dict]) -> None:
    """With ``--report-to``: the demo's own tracker run (in its output folder) gets the base reward,
    each method's best reward as metrics, and the frontier rows and sample completions as tables."""
    from dpolab.runs.trackers import open_trackers

    trackers = open_trackers(cfg.report_to, out, asdict(cfg))
    if not trackers.trackers:
        return
    best = {f"best_reward/{m}": max(r["reward"] for r in results["rows"] if r["method"] == m)
            for m in dict.fromkeys(r["method"] for r in results["rows"])}
    trackers.log({"base/reward": results["base"]["reward"], **best}, step=0)
    keys = ("method", "param", "value", "step", "reward", "kl", "kl_kind")
    trackers.log_samples([{k: r.get(k) for k in keys} for r in results["rows"]], step=0, name="frontier")
    trackers.log_samples([{name: _cell(v) for name, v in row.items()} for row in samples], step=0, name="samples")
    trackers.close()


def _cell(value) -> str:
    """A samples-table cell: a (completion, reward, ...) entry as "completion (+0.123)", text as is."""
    if isinstance(value, (tuple, list)) and len(value) >= 2 and isinstance(value[1], (int, float)):
        return f"{value[0]} ({value[1]:+.3f})"
    return str(value)


# -- outputs ------------------------------------------------------------------------------------
def _samples(cfg, rows, base, tokenizer, prompts, reward_fn, work: Path, extra: dict[str, list]) -> list[dict]:
    """Completions of the base model and of each trained method (the final model of its best-reward
    run) on 8 prefixes, then ``extra``'s (name -> (text, reward) per prefix, e.g. best-of-N's)."""
    from dpolab.lm.generation import sample_completions
    from dpolab.lm.loading import load_causal_lm
    from dpolab.rewards.functions import compute_rewards

    prompts = prompts[:8]
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    out = {"prompt": prompts}
    models = {"base": base}
    for method, (key, prefix) in SERIES.items():
        finals = [r for r in rows if r["method"] == method]
        if finals:
            last = max(r["step"] for r in finals)
            best = max((r for r in finals if r["step"] == last), key=lambda r: r["reward"])
            models[f"{method} ({key}={best['value']:g})"] = load_causal_lm(str(work / f"{prefix}{best['value']:g}" / "final"))
    for name, model in models.items():
        texts, _ = sample_completions(model, tokenizer, ids, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed + 5)
        out[name] = list(zip(texts, compute_rewards(reward_fn, prompts, texts).tolist()))
    out.update({name: pairs[:len(prompts)] for name, pairs in extra.items()})
    names = [*models, *extra]
    return [{"prompt": p, **{name: out[name][i] for name in names}} for i, p in enumerate(prompts)]


def reproduce_command(cfg: dict) -> str:
    """The `dpolab demo` command line that repeats a run: every option that differs from the preset."""
    preset = asdict(DemoConfig(quick=cfg["quick"], output_dir=cfg["output_dir"]).resolved())
    parts = ["dpolab demo"] + (["--quick"] if cfg["quick"] else []) + [f"--seed {cfg['seed']}"]
    for key, value in cfg.items():
        if key in ("output_dir", "progress", "quick", "seed") or value == preset[key]:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, list):
            parts.append(f"{flag} {','.join(f'{v:g}' for v in value)}")
        else:
            parts.append(f"{flag} {value}")
    return " ".join(parts) + f" --output-dir {cfg['output_dir']}"


def cli_main(argv: list[str], prog: str) -> int:
    cfg = parse_config(DemoConfig, argv, prog=prog, description=DESCRIPTION)
    results = run_demo(cfg)
    print(f"done: {results['config']['output_dir']}/report.md")
    return 0
