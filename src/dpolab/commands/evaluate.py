"""`dpolab eval`: several models on one prompt set, scored by one reward (or a weighted sum of several,
`--reward-weights`), against one reference.

For each model, ``--num-samples`` completions per prompt, completion ``j`` of prompt ``i`` drawn with
the seed ``row_seed(seed, i, j)`` that every model shares (``dpolab.commands.generate``); then:

- reward: mean, std over completions, standard error and a bootstrap 90% interval (both over
  prompts: the samples of one prompt are not independent, so prompts are the resampled unit);
- sequence KL to the reference: the k1 estimator, mean over completions of
  Σ_t log π(y_t|x, y_<t) − log π_ref(y_t|x, y_<t) (``dpolab.lm.logps.sequence_kl``), same spread;
- response length (tokens, EOS included) and the fraction of completions that ended with EOS;
- win rate against the baseline: completion j of prompt i against the baseline's completion j of
  prompt i (same seed), 1 for a higher reward, ½ for a tie; mean, standard error, 90% interval.

The bootstrap draws the same prompt resamples for every statistic and model (one seed), so the
intervals of different models are paired like their samples.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from dpolab.commands.generate import (
    RuntimeOptions,
    check_counts,
    check_output_file,
    iter_samples,
    json_line,
    jsonable,
    load_model,
    note_truncated,
    parse_command,
    progress_bar,
    read_prompt_rows,
    render_prompts,
    row_seed,
)
from dpolab.config import opt
from dpolab.errors import ConfigError
from dpolab.train.options import RewardOptions, SamplingOptions, validate_rewards

DESCRIPTION = """Evaluate models on a prompt set: reward, sequence KL to a reference, length, EOS rate and
win rate against a baseline, with standard errors and bootstrap 90% intervals.

Every model samples with the same per-(prompt, sample) seeds, so win rates compare like with like
(a model against itself: exactly 0.5). Results go to --output as JSON (or stdout), a table to
stderr, and optionally a reward-vs-KL plot (--plot) and every completion (--samples-output).

examples:
  dpolab eval --models runs/sft/final runs/dpo/final runs/ppo/final --data prompts.jsonl \\
      --reward-model runs/rm/final --num-samples 4 --output results.json --plot frontier.png
  dpolab eval --models base tuned --reward mymodule:score --data prompts.jsonl --baseline base
"""

PLOT_FORMATS = (".png", ".pdf", ".svg")


@dataclass
class EvalConfig(RewardOptions, SamplingOptions, RuntimeOptions):
    models: list[str] | None = opt(None, "models to evaluate (hub names or local folders): --models A B C, or "
                                   "--models A --models B (required)")
    labels: list[str] | None = opt(None, "names for the models in the table, JSON and plot, one per --models "
                                   "(None: the model names)")
    data: str = opt("", "prompt file (JSONL, JSON, Parquet, CSV), save_to_disk folder or hub name; rows with "
                    "'prompt' or 'messages' (required)")
    split: str = opt("train", "split of a DatasetDict folder or hub dataset")
    max_prompts: int = opt(0, "evaluate on the first N prompts only (0: all)")
    max_prompt_length: int | None = opt(None, "truncate longer prompts to this many tokens, keeping their end "
                                        "(None: no limit)")
    num_samples: int = opt(1, "completions per prompt and model")
    baseline: str | None = opt(None, "the model win rates are against (None: the first of --models; evaluated "
                               "too if not among them)")
    ref_model: str | None = opt(None, "reference model of the sequence KL (None: --baseline)")
    kl: bool = opt(True, "compute the sequence KL to --ref-model (--no-kl skips it, e.g. for models whose "
                   "vocabulary differs from the reference's)")
    bootstrap: int = opt(1000, "bootstrap resamples of the prompts for the 90% intervals, drawn with --seed (0: none)")
    output: str | None = opt(None, "results JSON file, written atomically (None: stdout)")
    plot: str | None = opt(None, "reward-vs-KL plot (.png, .pdf or .svg): one point per model with 90% "
                           "intervals (needs --kl)")
    samples_output: str | None = opt(None, "also write every completion with its reward and KL to this JSONL file")
    temperature: float = opt(1.0, "sampling temperature; 0 is greedy (the KL then compares the log-probs of the "
                             "greedy responses, it is no longer an estimate of KL(π‖π_ref))")

    @property
    def rollout_batch_size(self) -> int:
        """What ``train.on_policy.reward_function`` batches a reward model's scoring by."""
        return self.batch_size

    def check(self) -> None:
        for name in ("models", "labels"):  # EvalConfig(models="m") in Python: one model, not its characters
            if isinstance(getattr(self, name), str):
                setattr(self, name, [getattr(self, name)])
        if not self.models:
            raise ConfigError("--models is required (one or more hub names or local folders)")
        if not self.data:
            raise ConfigError("--data is required (prompts with a 'prompt' or 'messages' field)")
        validate_rewards(self)
        if self.baseline is not None and self.baseline not in self.models:  # runs/m/ is runs/m, evaluated once
            spelled = [m for m in self.models if os.path.normpath(m) == os.path.normpath(self.baseline)]
            self.baseline = spelled[0] if spelled else self.baseline
        if self.labels is not None and len(self.labels) != len(self.models):
            raise ConfigError(f"--labels: {len(self.labels)} labels for {len(self.models)} models; give one per model")
        if self.labels is None:  # one folder spelt two ways (./m, m, m/): sampled and scored twice, two rows
            where: dict[str, str] = {}
            for m in self.models:
                real = os.path.realpath(os.path.expanduser(m)) if os.path.exists(os.path.expanduser(m)) else None
                if real is not None and real in where and where[real] != m:
                    raise ConfigError(f"--models: {where[real]!r} and {m!r} are the same folder; give it once "
                                      "(or give --labels to evaluate it twice)")
                if real is not None:
                    where.setdefault(real, m)
        names = list(self.labels or self.models)  # they key the results' table, JSON and plot
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            flag = "--labels" if self.labels else "--models (give --labels to tell them apart)"
            raise ConfigError(f"{flag}: {', '.join(map(repr, twice))} given more than once; each model needs its own name")
        if self.baseline is not None and self.baseline not in self.models and self.baseline in names:
            # run_eval adds it under its own name, which would then key two rows
            raise ConfigError(f"--baseline {self.baseline}: not among --models, so it is evaluated under its own "
                              f"name, which --labels gives to another model; rename that model or add the "
                              f"baseline to --models with a label of its own")
        check_counts(self)
        if self.bootstrap < 0 or self.max_prompts < 0:
            raise ConfigError("--bootstrap and --max-prompts must be >= 0")
        if self.plot is not None:
            if Path(self.plot).suffix.lower() not in PLOT_FORMATS:
                raise ConfigError(f"--plot {self.plot}: give a file name ending in {', '.join(PLOT_FORMATS)}")
            if not self.kl:
                raise ConfigError("--plot draws reward against KL; it needs the KL (drop --no-kl)")
        outputs = [("--output", self.output), ("--plot", self.plot), ("--samples-output", self.samples_output)]
        seen: dict[str, str] = {}
        for flag, path in outputs:
            check_output_file(flag, path)
            if path is None or (Path(path).exists() and not Path(path).is_file()):  # /dev/null takes every output
                continue
            resolved = os.path.realpath(path)  # written in turn at the end: a shared file keeps only the last
            if resolved in seen:
                raise ConfigError(f"{seen[resolved]} and {flag} both name {path}; give each output its own file")
            seen[resolved] = flag


# -- statistics ----------------------------------------------------------------------------------
def bootstrap_interval(per_prompt, resamples: int, seed: int) -> list[float] | None:
    """Percentile 90% interval of the mean of ``per_prompt`` (n,) over ``resamples`` resamples of the
    prompts with replacement. The generator is seeded afresh each call, so every statistic and model
    sees the same resamples (paired intervals). None when there is nothing to resample."""
    import torch

    n = per_prompt.numel()
    if resamples == 0 or n < 2:
        return None
    gen = torch.Generator().manual_seed(seed)
    chunk = max(1, min(resamples, (1 << 22) // n))  # bounds the (chunk, n) index tensor
    means = []
    for start in range(0, resamples, chunk):
        idx = torch.randint(n, (min(chunk, resamples - start), n), generator=gen)
        means.append(per_prompt[idx].mean(dim=1))
    q = torch.quantile(torch.cat(means), torch.tensor([0.05, 0.95], dtype=torch.float64))
    return [float(q[0]), float(q[1])]


def describe(values, name: str, cfg) -> dict:
    """``name``, ``name_std`` (over completions), ``name_sem`` and ``name_ci90`` (over prompts) of
    ``values`` (n prompts, k samples) float64."""
    flat = values.reshape(-1)
    per_prompt = values.mean(dim=1)
    n = per_prompt.numel()
    return {name: float(flat.mean()),
            f"{name}_std": float(flat.std()) if flat.numel() > 1 else None,
            f"{name}_sem": float(per_prompt.std() / n ** 0.5) if n > 1 else None,
            f"{name}_ci90": bootstrap_interval(per_prompt, cfg.bootstrap, cfg.seed)}


def win_stats(rewards, baseline_rewards, cfg) -> dict:
    """Win rate of (n, k) rewards over the baseline's, paired by (prompt, sample); ties count half."""
    wins, ties = rewards > baseline_rewards, rewards == baseline_rewards
    score = wins.double() + 0.5 * ties.double()                      # (n, k)
    out = describe(score, "win_rate", cfg)
    out.pop("win_rate_std")  # the spread of 0/½/1 outcomes says little; sem and interval do
    out.update(wins=int(wins.sum()), ties=int(ties.sum()), losses=int(score.numel() - wins.sum() - ties.sum()))
    return out


# -- running the models --------------------------------------------------------------------------
def check_vocabulary(name: str, tokenizer, ref_name: str, ref_tokenizer) -> None:
    """The k1 KL compares log π and log π_ref of the same token ids: both need one vocabulary."""
    if tokenizer.get_vocab() != ref_tokenizer.get_vocab():
        size, ref_size = len(tokenizer), len(ref_tokenizer)
        how = f"{size} vs {ref_size} tokens" if size != ref_size else f"{size} tokens each, with different ids"
        raise ConfigError(f"model {name} has a different vocabulary from the reference model {ref_name} ({how}); "
                          f"the sequence KL compares token log-probs and needs one tokenizer: give --ref-model a "
                          f"model with the same tokenizer, or --no-kl")


def _sample_and_score(model, tokenizer, texts, ids, ref_model, reward_fn, cfg, label: str,
                      rows_data) -> dict:
    """Sample every (prompt, sample) row of one model; rewards, KLs, lengths, EOS flags and texts.
    ``rows_data``: the prompt rows' :class:`PromptData`, whose other fields a reward may name."""
    import torch

    from dpolab.lm.generation import decode_responses
    from dpolab.lm.logps import sequence_kl
    from dpolab.rewards.functions import compute_rewards

    n, k = len(ids), cfg.num_samples
    rows_ids = [ids[i] for i in range(n) for _ in range(k)]
    seeds = [row_seed(cfg.seed, i, j) for i in range(n) for j in range(k)]
    rewards, kls, lengths, finished, completions = [], [], [], [], []
    with progress_bar(n * k, label, cfg.progress) as bar:
        for start, gen in iter_samples(model, tokenizer, rows_ids, seeds, cfg):
            texts_b = decode_responses(tokenizer, gen)
            rows = [(start + b) // k for b in range(len(texts_b))]
            rewards.append(compute_rewards(reward_fn, [texts[i] for i in rows], texts_b,
                                           rows_data.columns(rows), dtype=torch.float64))
            if ref_model is model:  # the reference itself: log π − log π_ref is 0 token by token
                kls.append(torch.zeros(len(texts_b), dtype=torch.float64))
            elif ref_model is not None:
                kls.append(sequence_kl(model, ref_model, gen, temperature=cfg.temperature).double().cpu())
            lengths.append(gen.response_lengths.double().cpu())
            finished.append(gen.finished.double().cpu())
            completions.extend(texts_b)
            bar.update(len(texts_b))
    return {"rewards": torch.cat(rewards).view(n, k), "kl": torch.cat(kls).view(n, k) if kls else None,
            "lengths": torch.cat(lengths).view(n, k), "finished": torch.cat(finished).view(n, k),
            "completions": completions, "prompts": texts}


def reward_label(cfg: EvalConfig) -> str:
    """The reward as the results name it: its spec, or the weighted sum of several (``2*a + 0.5*b``);
    one reward weighted other than 1 keeps its weight (``2*a``), as its values carry it."""
    specs = [*(cfg.reward or []), *(cfg.reward_model or [])]
    weights = cfg.reward_weights or [1.0] * len(specs)
    if len(specs) == 1 and weights[0] == 1:
        return specs[0]
    return " + ".join(f"{w:g}*{spec}" for w, spec in zip(weights, specs))


def run_eval(cfg: EvalConfig) -> tuple[dict, list[dict]]:
    """Evaluate every model of ``cfg``. Returns (results, per-completion sample rows), and writes
    ``cfg.output`` (the results as JSON), ``cfg.samples_output`` and ``cfg.plot`` where they are set.
    The values are converted and checked as the command line's are (``config.check_config``)."""
    import torch

    from dpolab.commands.generate import resolve_device
    from dpolab.config import check_config
    from dpolab.data.prompts import extra_fields
    from dpolab.hub import check_local_folder
    from dpolab.lm.loading import load_tokenizer
    from dpolab.train.on_policy import check_room, reward_function

    cfg = check_config(cfg)
    cfg.check()
    from dpolab.train.distributed import hide_library_bars

    hide_library_bars(cfg.progress)
    records = read_prompt_rows(cfg.data, cfg.split)
    if cfg.max_prompts:
        records = records[:cfg.max_prompts]
    device = resolve_device(cfg.device)
    reward_fn = reward_function(cfg, device)

    labels = list(cfg.labels or cfg.models)
    baseline = cfg.baseline or cfg.models[0]
    entries = list(zip(cfg.models, labels))
    if baseline not in cfg.models:
        entries.insert(0, (baseline, baseline))
    reference = (cfg.ref_model or baseline) if cfg.kl else None

    # Every tokenizer and prompt rendering before any weights load: bad input fails in seconds.
    names = list(dict.fromkeys([name for name, _ in entries] + ([reference] if reference else [])))
    tokenizers = {name: load_tokenizer(name, trust_remote_code=cfg.trust_remote_code) for name in names}
    if reference is not None:
        for name, _ in entries:
            check_vocabulary(name, tokenizers[name], reference, tokenizers[reference])
    for name in names:  # a folder without weights, found as its weights load: after the models before it
        check_local_folder(name, "model", ("config.json", "adapter_config.json"))
    prompts = {name: render_prompts(records, tokenizers[name], cfg.max_prompt_length) for name, _ in entries}
    for name, (_, ids, cut) in prompts.items():
        check_room(cfg, max(map(len, ids)), model=name)
        note_truncated(cut, len(ids), cfg.max_prompt_length, model=name if len(prompts) > 1 else "")
    if reference is not None:  # the reference scores every model's completions
        check_room(cfg, max(len(x) for _, ids, _ in prompts.values() for x in ids), model=reference)
    from dpolab.data.prompts import PromptData
    from dpolab.train.on_policy import check_reward_fields

    rows_data = PromptData(*prompts[entries[0][0]][:2], cfg.data, 0, [rec.where for rec in records],
                           [extra_fields(rec.data) for rec in records])
    if reward_fn is not None:  # a field a reward needs, missing from a row, fails before sampling
        check_reward_fields(reward_fn, rows_data)

    ref_model = load_model(reference, cfg, device) if reference is not None else None
    if ref_model is not None:  # before any sampling: a model with ids beyond the reference's rows fails late
        from dpolab.lm.loading import check_reference_vocabulary

        for name, _ in entries:
            if name != reference:
                check_reference_vocabulary(ref_model, name, ref_name=reference, policy_name=name,
                                           trust_remote_code=cfg.trust_remote_code,
                                           flag="--ref-model" if cfg.ref_model else "--baseline (the KL's reference)")
    raw = []
    for name, label in entries:
        model = ref_model if name == reference else load_model(name, cfg, device)
        texts, ids, _ = prompts[name]
        raw.append(_sample_and_score(model, tokenizers[name], texts, ids, ref_model, reward_fn, cfg, label, rows_data))
        if model is not ref_model:
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()

    base = raw[next(i for i, (name, _) in enumerate(entries) if name == baseline)]
    models = []
    for (name, label), r in zip(entries, raw):
        row = {"model": name, "label": label, **describe(r["rewards"], "reward", cfg)}
        row.update(describe(r["kl"], "kl", cfg) if r["kl"] is not None else
                   {"kl": None, "kl_std": None, "kl_sem": None, "kl_ci90": None})
        row.update(response_length=float(r["lengths"].mean()), eos_fraction=float(r["finished"].mean()),
                   truncated_prompts=prompts[name][2])
        row.update(win_stats(r["rewards"], base["rewards"], cfg))
        models.append(row)
    n, k = len(records), cfg.num_samples
    results = {"data": cfg.data, "prompts": n, "num_samples": k, "completions": n * k,
               "reward": reward_label(cfg), "baseline": baseline, "reference": reference,
               "models": models, "config": asdict(cfg)}
    samples = [{"model": label, "prompt_index": i, "sample": j, "prompt": r["prompts"][i],
                "completion": r["completions"][i * k + j], "reward": float(r["rewards"][i, j]),
                "kl": float(r["kl"][i, j]) if r["kl"] is not None else None,
                "response_tokens": int(r["lengths"][i, j]), "finished": bool(r["finished"][i, j])}
               for (_, label), r in zip(entries, raw) for i in range(n) for j in range(k)]
    _write_outputs(cfg, results, samples)
    return results, samples


# -- outputs -------------------------------------------------------------------------------------
def _fmt(x, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def _interval(ci) -> str:
    return "-" if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def format_table(results: dict) -> str:
    """The readable summary printed to stderr: one line per model."""
    header = ["model", "reward", "± sem", "90% interval", "KL", "± sem", "length", "EOS", "win rate", "90% interval"]
    lines = []
    for m in results["models"]:
        lines.append([m["label"], _fmt(m["reward"]), _fmt(m["reward_sem"]), _interval(m["reward_ci90"]),
                      _fmt(m.get("kl")), _fmt(m.get("kl_sem")), _fmt(m["response_length"], ".1f"),
                      _fmt(m["eos_fraction"], ".0%"), _fmt(m["win_rate"]), _interval(m["win_rate_ci90"])])
    widths = [max(len(r[c]) for r in [header, *lines]) for c in range(len(header))]
    render = lambda row: "  ".join(v.ljust(w) if c == 0 else v.rjust(w)  # noqa: E731
                                   for c, (v, w) in enumerate(zip(row, widths)))
    label = {m["model"]: m["label"] for m in results["models"]}  # the rows' names (--labels), not paths
    base, ref = results["baseline"], results["reference"]
    title = (f"{results['prompts']} prompts x {results['num_samples']} samples; reward {results['reward']}; "
             f"win rate vs {label.get(base, base)} (ties count half); KL to {label.get(ref, ref) if ref else '-'}")
    return "\n".join([title, render(header), *map(render, lines)])


def _errorbar(value: float, ci, sem):
    """Asymmetric error-bar lengths from the 90% interval, else ± the standard error, else none."""
    if ci is not None:
        return [[max(value - ci[0], 0.0)], [max(ci[1] - value, 0.0)]]
    return None if sem is None else [[sem], [sem]]


def write_plot(path: str, results: dict) -> None:
    """Reward against KL, one labelled point per model with its 90% intervals on both axes, and the
    upper-left frontier of the points (``dpolab.experiments.report.pareto``); written atomically."""
    # a Figure of its own: pyplot's global backend (a notebook's) is left as the user set it
    from matplotlib.figure import Figure

    from dpolab.experiments.report import pareto

    models = results["models"]
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.subplots()
    for i, m in enumerate(models):
        ax.errorbar([m["kl"]], [m["reward"]], xerr=_errorbar(m["kl"], m["kl_ci90"], m["kl_sem"]),
                    yerr=_errorbar(m["reward"], m["reward_ci90"], m["reward_sem"]), fmt="o", capsize=3,
                    color=f"C{i % 10}", label=m["label"])
        ax.annotate(m["label"], (m["kl"], m["reward"]), textcoords="offset points", xytext=(6, 6), fontsize=8)
    front = pareto([(m["kl"], m["reward"]) for m in models])
    if len(front) > 1:
        ax.plot(*zip(*front), ls="--", lw=1, color="gray", label="frontier")
    ax.set_xlabel(f"sequence KL(π ‖ π_ref) (nats), π_ref = {results['reference']}")
    ax.set_ylabel("mean reward")
    ax.set_title(f"Reward vs KL ({results['prompts']} prompts x {results['num_samples']} samples, 90% intervals)",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    import io

    from dpolab.runs.rundir import atomic_write_text

    image = io.BytesIO()
    fig.savefig(image, format=Path(path).suffix.lower().lstrip("."), dpi=130)
    atomic_write_text(Path(path), image.getvalue())


def cli_main(argv: list[str], prog: str) -> int:
    cfg = parse_command(EvalConfig, argv, prog, DESCRIPTION, multi=("models", "labels"))
    results, _ = run_eval(cfg)
    if cfg.output is None:
        sys.stdout.write(_results_json(results))
        sys.stdout.flush()
    print(format_table(results), file=sys.stderr)
    return 0


def _results_json(results: dict) -> str:
    return json.dumps(results, indent=2, ensure_ascii=False, default=jsonable) + "\n"


def _write_outputs(cfg: EvalConfig, results: dict, samples: list[dict]) -> None:
    from dpolab.runs.rundir import atomic_write_text

    if cfg.samples_output is not None:
        atomic_write_text(cfg.samples_output, "".join(map(json_line, samples)))
    if cfg.plot is not None:
        write_plot(cfg.plot, results)
    if cfg.output is not None:
        atomic_write_text(cfg.output, _results_json(results))
