"""Benchmark: dpolab's DPO step against Hugging Face TRL's DPOTrainer, side by side in one run (CPU, fp32).

Both sides get the same Llama-style models (``small``: hidden 192, 4 layers; ``medium``: hidden 512,
7 layers; random weights from ``dpolab.lm.tiny``), the same tokenizer (trained here and asked for
4096 entries, it reaches 1,421 on the default 256 pairs' text: BPE runs out of merges; the models'
untied embedding and head have as many rows, so ``small`` has 2.32M parameters and ``medium`` 23.6M,
of which 1.77M and 22.1M in the transformer blocks), the same generated preference data (prompts and
responses of varied length, never truncated), the same batch size, max length, AdamW with the same
learning rate and clipping, and the same thread count. TRL lives in its own environment
(``.venv-bench``), which also holds dpolab (editable), so one interpreter runs everything::

    python3 -m venv .venv-bench && .venv-bench/bin/pip install torch==2.13.0 \\
        && .venv-bench/bin/pip install -e . trl==1.16.0 transformers==5.24.0 \\
        accelerate==1.15.0 datasets   # or: make .venv-bench/.installed
    .venv-bench/bin/python bench/dpo_vs_trl.py            # 2 rounds (~13 min on 2 cores; make bench: 3, ~19 min)
    .venv-bench/bin/python bench/dpo_vs_trl.py --quick    # small model only

Sides (each run in a FRESH subprocess, alternating ours/TRL after one warm-up run of each):

* ``ours-default``: ``dpolab.train.dpo.train`` with its defaults: prefix sharing (checked exact on
  the model first), length-bucketed steps, forward passes within the size-based token budget,
  reference log-probs precomputed for the pairs the run visits;
* ``trl-default``: ``trl.DPOTrainer`` with its defaults (live reference copy of the model, gradient
  checkpointing on);
* ``ours-best``: the same trainer with ``micro_batch_tokens=0`` (each micro-batch in one pass: more
  activation memory, fewer and larger matrix products);
* ``trl-best``: ``trl.DPOTrainer`` with ``precompute_ref_log_probs=True`` and
  ``gradient_checkpointing=False`` (its length-grouped sampler needs an ``input_ids`` column, which
  TRL 1.16's DPO dataset does not have).

Measures, per run: the wall time of every optimizer step (a global optimizer step hook, the same
instrument for both), the pair tokens of every step (``2·|prompt| + |chosen| + |rejected|`` of its
pairs: the same work unit for both, whatever layout a side uses), and the peak resident memory
(the kernel's peak-RSS mark is reset after imports and tokenizer load, before the data and any
model; peak = the process's high-water mark ``VmHWM`` at the last optimizer step minus the resident
memory at that reset, the baseline; the end-of-run model save is not counted; ``ru_maxrss`` is not
used, as it also carries the parent's peak over the spawn). The baseline is recorded too, and
baseline + peak is the whole process's peak. The first ``--warmup-steps`` steps of each run are not timed;
the reference precompute of both sides runs before the first step. Against TRL's defaults, which run
a live reference inside every step, ours is charged its precompute: the timed steps' share of the
precompute time is added to them (and its 2N FLOPs per token to the MFU). Reported: median over
runs of tokens/s and of the median step time, the median peak memory (over the baseline, and of the
whole process), the ratios with the min–max of the per-round ratios (the runs of a round are
alternated, ours then TRL's), and model-FLOP
utilisation (MFU) against a float32 matmul peak measured in the same run with the same threads. MFU
counts ``6N`` FLOPs per token the policy processes and ``2N`` per token a reference processes
(live, or precomputed and charged), ``N`` = non-embedding parameters (transformer blocks only;
input embedding and lm_head excluded, attention score FLOPs ignored), on the tokens each side's
layout actually runs (prefix sharing runs fewer, so its MFU is not inflated by the saving).

Correctness check first: on a batch of ``--batch-size`` pairs and a reference model that differs
from the policy (so the loss is not ln 2 by construction), TRL's loss and ours (plain and
prefix-shared) must agree to 1e-4, and both tokenisations must give identical token ids.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = {  # name: (hidden, layers, heads, intermediate)
    "small": (192, 4, 6, 512),
    "medium": (512, 7, 8, 1376),
}
VOCAB = 4096
LR = 1e-5


# -- setup: data, tokenizer, models ---------------------------------------------------------------
def make_data(n: int, seed: int) -> list[dict]:
    """Synthetic prompts/responses of varied length over a made-up lexicon (no network)."""
    rng = random.Random(seed)
    syll = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "ze", "po", "da", "fe", "gu", "hi", "jo", "ba"]
    lexicon = ["".join(rng.choice(syll) for _ in range(rng.randint(1, 3))) for _ in range(3000)]

    def words(k: int) -> str:
        return " ".join(rng.choice(lexicon) for _ in range(k))

    rows = []
    for _ in range(n):
        # the prompt ends on a word and each response starts with a space: no BPE merge crosses the
        # boundary, so tokenising prompt and response together (TRL) or apart (dpolab) agrees
        rows.append({"prompt": "Q: " + words(rng.randint(6, 70)),
                     "chosen": " " + words(rng.randint(3, 75)),
                     "rejected": " " + words(rng.randint(3, 75))})
    return rows


def setup(workdir: Path, n_pairs: int, models: list[str]) -> None:
    from dpolab.lm.tiny import tiny_llama, train_tokenizer

    rows = make_data(n_pairs, seed=0)
    (workdir / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = train_tokenizer([r["prompt"] + r["chosen"] + r["rejected"] for r in rows], vocab_size=VOCAB)
    for name in models:
        h, layers, heads, inter = MODELS[name]
        for role, seed in (("policy", 0), ("ref", 1)):  # ref differs: only for the loss check
            d = workdir / f"{name}-{role}"
            m = tiny_llama(len(tok), hidden_size=h, layers=layers, heads=heads, intermediate_size=inter,
                           max_positions=1024, seed=seed, tokenizer=tok)
            m.save_pretrained(d)
            tok.save_pretrained(d)


def non_embedding_params(model_dir: str) -> int:
    """Transformer-block parameters of a Llama config: per layer 4h² (attention, heads = kv heads),
    3·h·inter (gated MLP), 2h (norms); plus the final norm h."""
    c = json.loads((Path(model_dir) / "config.json").read_text())
    h, inter = c["hidden_size"], c["intermediate_size"]
    return c["num_hidden_layers"] * (4 * h * h + 3 * h * inter + 2 * h) + h


# -- instrumentation ------------------------------------------------------------------------------
class StepClock:
    """Wall time at the end of every optimizer step, via torch's global step hook."""

    def __init__(self, on_step=None) -> None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.times: list[float] = [time.perf_counter()]
        self.maxrss_kb = 0

        def hook(opt, args, kwargs) -> None:
            self.times.append(time.perf_counter())
            self.maxrss_kb = peak_rss_kb()
            if on_step is not None:
                on_step()

        self.handle = register_optimizer_step_post_hook(hook)

    def result(self, pair_tokens: list[int], model_tokens: list[float], warmup: int, baseline_kb: int) -> dict:
        self.handle.remove()
        steps = len(self.times) - 1
        dts = [b - a for a, b in zip(self.times, self.times[1:])][warmup:]
        return {"steps": steps, "step_times": dts, "pair_tokens": sum(pair_tokens[warmup:steps]),
                "model_flop_tokens": sum(model_tokens[warmup:steps]), "seconds": sum(dts),
                "peak_mb": (self.maxrss_kb - baseline_kb) / 1024, "baseline_mb": baseline_kb / 1024}


def peak_rss_kb() -> int:
    """The process's resident high-water mark (``VmHWM``, reset by :func:`baseline_kb`). Not
    ``ru_maxrss``: that also carries the parent's peak over a fork + exec, so a worker spawned by a
    driver that has built models would read at least the driver's peak."""
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
    except (OSError, StopIteration):  # not Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def baseline_kb() -> int:
    """Resident memory now, taken after the side's imports and tokenizer load, before its data and
    models; the kernel's peak-RSS mark is reset to it (``/proc/self/clear_refs``), so the
    :func:`peak_rss_kb` read at each step is the peak since this point, not an import-time peak."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
    except (OSError, StopIteration):  # not Linux: the peak so far is the best baseline there is
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


# -- the four sides (each runs in its own subprocess) ---------------------------------------------
def run_ours(a: argparse.Namespace, best: bool) -> dict:
    """``dpolab.train.dpo.train`` as shipped (its defaults), or with ``best`` its speed-first setting
    (``micro_batch_tokens=0``: each micro-batch in one forward/backward pass, more activation memory).

    The pair tokens and forward tokens of every step are counted where the trainer collates its
    batches. The reference log-probs are precomputed (the default) before the first step, for the rows
    of all planned steps. Against TRL's defaults (a live reference inside every step) the timed steps
    are charged their share of that time and of its FLOPs (2N per forward token); against TRL's best,
    which precomputes before its first step too, neither side's precompute is timed."""
    import accelerate  # noqa: F401  (imports the trainer makes, before the baseline)
    import datasets  # noqa: F401
    import safetensors.torch  # noqa: F401
    import tqdm.auto  # noqa: F401

    from dpolab.config import make_config
    from dpolab.lm.loading import load_tokenizer
    from dpolab.train import pair_layout
    from dpolab.train.dpo import DPOConfig, train

    load_tokenizer(a.model_dir)
    base = baseline_kb()
    pair_tokens: list[int] = [0]
    fwd_tokens: list[int] = [0]
    clock = StepClock(on_step=lambda: (pair_tokens.append(0), fwd_tokens.append(0)))
    collate = pair_layout.collate_pairs

    def counting_collate(prefix, pairs, pad_id):
        batch = collate(prefix, pairs, pad_id)
        pair_tokens[-1] += sum(p.num_tokens for p in pairs)
        fwd_tokens[-1] += pair_layout.batch_tokens(batch)
        return batch

    pair_layout.collate_pairs = counting_collate
    extra = {"micro_batch_tokens": 0} if best else {}
    with tempfile.TemporaryDirectory() as out:
        cfg = make_config(DPOConfig, dict(model=a.model_dir, data=a.data, eval_fraction=0.0, output_dir=out,
                                          batch_size=a.batch_size, max_length=a.max_length,
                                          max_prompt_length=a.max_length - 1, learning_rate=LR,
                                          max_steps=a.steps, logging_steps=10**6, progress=False, seed=0, **extra))
        summary = train(cfg)
    n = non_embedding_params(a.model_dir)
    # step 1's counts also hold the precompute pass (it runs before the first step): never timed
    res = clock.result(pair_tokens, [t * (6 if best else 8) * n for t in fwd_tokens], a.warmup_steps, base)
    timed = len(res["step_times"])
    res["ref_precompute_s"] = summary["ref_precompute_seconds"]
    if not best:  # TRL's default runs a live reference inside its steps; TRL's best precomputes untimed too
        res["seconds"] += summary["ref_precompute_seconds"] * timed / a.steps
    res["prefix_sharing"], res["micro_batch_tokens"] = summary["prefix_sharing"], summary["micro_batch_tokens"]
    return res


def run_trl(a: argparse.Namespace, best: bool) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(a.model_dir)
    base = baseline_kb()
    rows = [json.loads(x) for x in Path(a.data).read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(a.model_dir)
    n = non_embedding_params(a.model_dir)
    pair_tokens: list[int] = []

    class Counting(DPOTrainer):
        def training_step(self, model, inputs, *args, **kwargs):
            pair_tokens.append(int(inputs["attention_mask"].sum()))
            return super().training_step(model, inputs, *args, **kwargs)

    # length-grouped sampling ("group_by_length") fails on DPO datasets in this TRL/transformers
    # (the sampler wants an 'input_ids' column), so TRL's best here is the precomputed reference
    # TRL's DPOConfig defaults to gradient checkpointing (memory for compute); its fastest setting is off
    extra = dict(precompute_ref_log_probs=True, gradient_checkpointing=False) if best else {}
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(output_dir=out, per_device_train_batch_size=a.batch_size, max_length=a.max_length,
                         learning_rate=LR, max_steps=a.steps, logging_steps=10**6, save_strategy="no",
                         report_to="none", use_cpu=True, bf16=False, dataloader_num_workers=0, seed=0,
                         disable_tqdm=True, max_grad_norm=1.0, **extra)
        trainer = Counting(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
        clock = StepClock()
        trainer.train()
    factor = 6 if best else 8
    return clock.result(pair_tokens, [t * factor * n for t in pair_tokens], a.warmup_steps, base)


def run_check(a: argparse.Namespace) -> dict:
    """TRL's loss on one batch equals ours (plain and prefix-shared), with a differing reference."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from dpolab.data import collate_preference, load_preference_data
    from dpolab.data.collate import collate_prefix_shared
    from dpolab.lm.logps import model_sequence_logps
    from dpolab.lm.prefix import prefix_shared_logps
    from dpolab.losses.dpo import dpo_loss

    rows = [json.loads(x) for x in Path(a.data).read_text().splitlines()][:a.batch_size]
    with tempfile.TemporaryDirectory() as d:
        sub = Path(d) / "batch.jsonl"
        sub.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tok = AutoTokenizer.from_pretrained(a.model_dir)
        policy = AutoModelForCausalLM.from_pretrained(a.model_dir)
        ref = AutoModelForCausalLM.from_pretrained(a.ref_dir)
        args = DPOConfig(output_dir=d + "/trl", per_device_train_batch_size=a.batch_size, max_length=a.max_length,
                         report_to="none", use_cpu=True, bf16=False, dataloader_num_workers=0, disable_tqdm=True)
        trainer = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=tok)
        batch = next(iter(trainer.get_train_dataloader()))
        trainer.model.train()
        with torch.no_grad():
            trl_loss = float(trainer.compute_loss(trainer.model, batch))
        trl_ids = sorted((r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in trainer.train_dataset)
        data = load_preference_data(str(sub), tok, max_length=a.max_length, max_prompt_length=a.max_length - 1,
                                    eval_fraction=0.0)
    pairs = data.train
    ours_ids = sorted((p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in pairs)
    policy = AutoModelForCausalLM.from_pretrained(a.model_dir)  # fresh copies: TRL patched its own
    ref = AutoModelForCausalLM.from_pretrained(a.ref_dir)
    B = len(pairs)
    with torch.no_grad():
        pb = collate_preference(pairs, tok.pad_token_id)
        lp, _ = model_sequence_logps(policy, pb.input_ids, pb.attention_mask, pb.loss_mask, pb.position_ids)
        lr, _ = model_sequence_logps(ref, pb.input_ids, pb.attention_mask, pb.loss_mask, pb.position_ids)
        plain = float(dpo_loss(lp[:B], lp[B:], lr[:B], lr[B:], beta=0.1)[0].mean())
        sb = collate_prefix_shared(pairs, tok.pad_token_id)
        sp, _ = prefix_shared_logps(policy, sb)
        sr, _ = prefix_shared_logps(ref, sb)
        shared = float(dpo_loss(sp[:B], sp[B:], sr[:B], sr[B:], beta=0.1)[0].mean())
    return {"trl_loss": trl_loss, "ours_loss": plain, "ours_prefix_loss": shared,
            "same_token_ids": trl_ids == ours_ids, "pairs": B}


SIDES = {"ours-default": lambda a: run_ours(a, False), "trl-default": lambda a: run_trl(a, False),
         "ours-best": lambda a: run_ours(a, True), "trl-best": lambda a: run_trl(a, True), "check": run_check}


# -- driver ---------------------------------------------------------------------------------------
def matmul_peak(threads: int, n: int = 2048, reps: int = 6) -> float:
    """Best observed float32 GFLOP/s of an n×n @ n×n matmul (2n³ FLOPs) with ``threads`` threads."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def spawn(side: str, a: argparse.Namespace, model: str, workdir: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, "--model-dir", str(workdir / f"{model}-policy"),
           "--ref-dir", str(workdir / f"{model}-ref"), "--data", str(workdir / "data.jsonl"),
           "--batch-size", str(a.batch_size), "--max-length", str(a.max_length), "--steps", str(a.steps[model]),
           "--warmup-steps", str(a.warmup_steps), "--threads", str(a.threads)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error",
           "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "OMP_NUM_THREADS": str(a.threads)}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"{side} on {model} failed:\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def summarise(runs: list[dict], peak_gflops: float) -> dict:
    return {"tokens_per_s": statistics.median(r["pair_tokens"] / r["seconds"] for r in runs),
            "median_step_s": statistics.median(statistics.median(r["step_times"]) for r in runs),
            "peak_mb": statistics.median(r["peak_mb"] for r in runs),
            "process_peak_mb": statistics.median(r["peak_mb"] + r["baseline_mb"] for r in runs),
            "mfu": statistics.median(r["model_flop_tokens"] / r["seconds"] / 1e9 / peak_gflops for r in runs)}


def paired_spread(ours: list[dict], trl: list[dict], value) -> list[float]:
    """Min and max over rounds of value(ours run) / value(TRL run), the two runs of a round paired."""
    ratios = [value(o) / value(t) for o, t in zip(ours, trl)]
    return [min(ratios), max(ratios)]



def _sibling(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def name_list(choices):
    """An argparse ``type`` for a comma-separated list of names out of ``choices``: an unknown name is
    an argument error that names the choices (not a KeyError once the run has started). The value
    stays the string as given."""
    choices = list(choices)

    def parse(value: str) -> str:
        bad = [n for n in value.split(",") if n not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(map(repr, bad))} (choose from "
                                             f"{', '.join(choices)}, comma-separated)")
        return value

    parse.__name__ = "name list"  # argparse names the type in some messages
    return parse


def check_timed_steps(ap: argparse.ArgumentParser, warmup: int, steps: dict) -> None:
    """Refuse, before anything runs, a run whose ``--warmup-steps`` leaves no timed step in a run of
    ``steps[name]`` optimizer steps (it would end, after every side ran, in a division by zero)."""
    short = {k: v for k, v in steps.items() if v <= warmup}
    if short:
        ap.error(f"--warmup-steps {warmup} leaves no timed step: " + ", ".join(f"{k} runs {v} steps" for k, v in
                                                                             short.items())
                 + " (give fewer warm-up steps or more steps)")


def parse_args_with_quick(ap: argparse.ArgumentParser, quick: dict) -> argparse.Namespace:
    """Parse; with ``--quick``, each option of ``quick`` that the command line does not give takes
    the value there (an explicit ``--repeats 3`` still applies), else its usual default."""
    unset = object()
    a = ap.parse_args(namespace=argparse.Namespace(**dict.fromkeys(quick, unset)))  # given ones overwrite
    for key, value in quick.items():
        if getattr(a, key) is unset:
            setattr(a, key, value if a.quick else ap.get_default(key))
    return a

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", choices=sorted(SIDES), help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--ref-dir", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="defaults for a short run: small model only, 8 steps, one "
                    "measured run (options given explicitly still apply)")
    ap.add_argument("--models", default="small,medium", type=name_list(MODELS),
                    help=f"comma-separated, of {', '.join(MODELS)} (default: small,medium)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--pairs", type=int, default=256)
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default per model)")
    ap.add_argument("--warmup-steps", type=int, default=2, help="untimed first steps (at least 1)")
    ap.add_argument("--repeats", type=int, default=2, help="measured runs per side (after one warm-up run)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", help="also write the results here")
    a = parse_args_with_quick(ap, {"models": "small", "repeats": 1})
    if a.warmup_steps < 1:
        ap.error("--warmup-steps must be >= 1 (the first step's counts include the reference precompute)")
    if a.worker:
        import torch

        torch.set_num_threads(a.threads)
        a.steps = int(a.steps)
        print(json.dumps(SIDES[a.worker](a)))
        return

    models = a.models.split(",")
    a.steps = {"small": a.steps or (8 if a.quick else 14), "medium": a.steps or 8}
    check_timed_steps(ap, a.warmup_steps, {m: a.steps[m] for m in models})
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # the driver saves models too (as the workers)
    repeats = a.repeats
    srt = _sibling("sft_rm_vs_trl")  # versions and the measured commit, as the other benchmarks record them
    results: dict = {"date": datetime.date.today().isoformat(), "versions": srt.versions(),
                     "source": srt.source_state(), "threads": a.threads, "batch_size": a.batch_size,
                     "max_length": a.max_length, "repeats": repeats}
    with tempfile.TemporaryDirectory() as d:
        workdir = Path(d)
        setup(workdir, a.pairs, models)
        check = spawn("check", a, models[0], workdir)
        print(f"first-batch loss: TRL {check['trl_loss']:.6f}  ours {check['ours_loss']:.6f}  "
              f"ours prefix-shared {check['ours_prefix_loss']:.6f}  same token ids: {check['same_token_ids']}")
        ok = (abs(check["trl_loss"] - check["ours_loss"]) <= 1e-4
              and abs(check["trl_loss"] - check["ours_prefix_loss"]) <= 1e-4 and check["same_token_ids"])
        results["check"] = {**check, "ok": ok}
        if not ok:
            raise SystemExit("loss check FAILED: the two sides do not compute the same thing")
        peak = matmul_peak(a.threads)  # re-measured between blocks; the best value is the peak
        results["matmul_peak_gflops"] = peak
        print(f"float32 matmul peak: {peak:.1f} GFLOP/s ({a.threads} threads)")
        for model in models:
            for label, ours, theirs in (("defaults", "ours-default", "trl-default"),
                                        ("best", "ours-best", "trl-best")):
                peak = max(peak, matmul_peak(a.threads))
                results["matmul_peak_gflops"] = peak
                spawn(ours, a, model, workdir)  # warm-up runs, discarded
                spawn(theirs, a, model, workdir)
                runs: dict[str, list[dict]] = {ours: [], theirs: []}
                for _ in range(repeats):
                    runs[ours].append(spawn(ours, a, model, workdir))
                    runs[theirs].append(spawn(theirs, a, model, workdir))
                peak = max(peak, matmul_peak(a.threads))
                results["matmul_peak_gflops"] = peak
                o, t = summarise(runs[ours], peak), summarise(runs[theirs], peak)
                tok_s = lambda r: r["pair_tokens"] / r["seconds"]  # noqa: E731
                row = {"ours": o, "trl": t, "speedup": o["tokens_per_s"] / t["tokens_per_s"],
                       "speedup_range": paired_spread(runs[ours], runs[theirs], tok_s),
                       "memory_ratio": o["peak_mb"] / t["peak_mb"],
                       "memory_ratio_range": paired_spread(runs[ours], runs[theirs], lambda r: r["peak_mb"]),
                       "process_memory_ratio": o["process_peak_mb"] / t["process_peak_mb"],
                       "ours_side": ours, "trl_side": theirs, "runs": runs}
                results[f"{model}/{label}"] = row
                print(f"{model:6s} {label:8s} ours {o['tokens_per_s']:8.0f} tok/s {o['median_step_s']:6.2f} s/step "
                      f"{o['peak_mb']:7.0f} MB MFU {o['mfu']:5.1%} | TRL {t['tokens_per_s']:8.0f} tok/s "
                      f"{t['median_step_s']:6.2f} s/step {t['peak_mb']:7.0f} MB MFU {t['mfu']:5.1%} | "
                      f"speed x{row['speedup']:.2f} memory x{row['memory_ratio']:.2f} (whole process "
                      f"x{row['process_memory_ratio']:.2f})", flush=True)
    for key, row in results.items():  # MFU of every row against the best peak seen in the whole run
        if "/" in key:
            row["ours"]["mfu"] = summarise(row["runs"][row["ours_side"]], peak)["mfu"]
            row["trl"]["mfu"] = summarise(row["runs"][row["trl_side"]], peak)["mfu"]
    print(f"float32 matmul peak (best of the run): {peak:.1f} GFLOP/s")
    print(markdown_table(results))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


def markdown_table(results: dict) -> str:
    """The results as a table: medians over runs, in brackets the min–max of the per-round ratios;
    s/step is the median step time without the share of the reference precompute that tok/s is
    charged (so the two ratios differ for ``defaults``)."""
    lines = ["| model | comparison | ours tok/s | TRL tok/s | speed ratio | ours s/step | TRL s/step | "
             "ours peak MB | TRL peak MB | memory ratio | whole process MB, ours / TRL (ratio) | ours MFU | TRL MFU |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def ranged(value: float, span) -> str:
        return f"{value:.2f}× ({span[0]:.2f}–{span[1]:.2f})" if span else f"{value:.2f}×"

    for key, r in results.items():
        if "/" not in key:
            continue
        model, label = key.split("/")
        o, t = r["ours"], r["trl"]
        whole = (f"{o['process_peak_mb']:.0f} / {t['process_peak_mb']:.0f} ({r['process_memory_ratio']:.2f}×)"
                 if "process_peak_mb" in o else "—")
        lines.append(f"| {model} | {label} | {o['tokens_per_s']:.0f} | {t['tokens_per_s']:.0f} | "
                     f"{ranged(r['speedup'], r.get('speedup_range'))} | "
                     f"{o['median_step_s']:.2f} | {t['median_step_s']:.2f} | {o['peak_mb']:.0f} | {t['peak_mb']:.0f} | "
                     f"{ranged(r['memory_ratio'], r.get('memory_ratio_range'))} | {whole} | {o['mfu']:.1%} | "
                     f"{t['mfu']:.1%} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
