"""Benchmark: dpolab's KTO trainer against TRL's KTOTrainer (CPU, fp32), whole processes.

The protocol of ``bench/sft_rm_vs_trl.py`` for KTO (Ethayarajh et al. 2024, arXiv 2402.01306). One
command::

    .venv-bench/bin/python bench/kto_vs_trl.py              # small and medium models (make bench-kto)
    .venv-bench/bin/python bench/kto_vs_trl.py --quick      # small model, one round

Data: the generated preference pairs of ``dpo_vs_trl.make_data`` (256 pairs), each split into a
desirable example (prompt, chosen, ``label: true``) and an undesirable one (prompt, rejected,
``label: false``): 512 unpaired rows that both sides read from one JSONL file. Every row ends its
prompt on a word and starts its completion with a space, so the two tokenisations agree and no row
is truncated (checked first).

Models: the DPO benchmark's Llama-style ``small`` and ``medium``, random weights, and its tokenizer
(asked for 4096 entries, it reaches 1,421 on these pairs: BPE runs out of merges), so 2.32M and
23.6M parameters (1.77M and 22.1M in the transformer blocks); the same files for both sides.

Sides (each run in a FRESH subprocess; per model one warm-up run of each side, then ``--repeats``
rounds running every side once, in turn):

* ``ours``: ``dpolab.train.kto.train`` as shipped: the reference's log-probs of every row's
  completion and of its mismatched completion computed once before training (its time is charged to
  the timed steps, pro rata, since TRL runs its reference inside each step), z0 from a no-grad pass
  over the step's mismatched rows, length-bucketed steps, the token budget;
* ``trl-default``: ``trl.KTOTrainer`` with its defaults (a live reference copy, gradient
  checkpointing, sequential batches whose mismatched completions are the batch's own, cycled);
* ``trl-best``: the same with gradient checkpointing off.

Both in float32 (TRL's ``bf16`` default off), batch 8 examples, AdamW lr 1e-5, clipping 1.0, β 0.1,
max length 512. Tokens: the matched rows' ``|prompt| + |completion|`` of the timed steps (the unit
both sides share; each also runs the mismatched rows, about as many tokens again). MFU: ``12·N``
FLOPs per token (``N`` the block parameters): the policy's forward and backward on the matched row
(``6N``), its forward on the mismatched row (``2N``) and the reference's forwards on both (``4N``).
Memory: the baseline after the side's imports and tokenizer, the whole-process resident peak
(baseline included) and the peak over the baseline, as in ``sft_rm_vs_trl.py``.

Correctness check first (small model, the first 8 rows): TRL's ``compute_loss`` on its first batch,
with a reference that differs from the policy (another seed; with equal models every KTO loss is
exactly 0.5 and the check could not fail), against ours (``dpolab.losses.kto.kto_loss`` on our own
tokenisation and log-probs, with TRL's pairing of each prompt with the previous row's completion),
and the same token ids on both sides.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


dvt = _load("dpo_vs_trl")      # models, data generator, ref model for the check
srt = _load("sft_rm_vs_trl")  # instrumentation, spawning, summaries

PAIRS, LR, BETA = 256, dvt.LR, 0.1
STEPS = {"small": 20, "medium": 8}


# -- setup -------------------------------------------------------------------------------------------
def unpaired_rows(pairs: list[dict]) -> list[dict]:
    """Each pair as a desirable and an undesirable example, in file order."""
    out = []
    for p in pairs:
        out.append({"prompt": p["prompt"], "completion": p["chosen"], "label": True})
        out.append({"prompt": p["prompt"], "completion": p["rejected"], "label": False})
    return out


def setup(workdir: Path, models: list[str]) -> None:
    dvt.setup(workdir, PAIRS, models)  # data.jsonl (pairs), {model}-policy and {model}-ref
    pairs = [json.loads(x) for x in (workdir / "data.jsonl").read_text().splitlines()]
    (workdir / "kto.jsonl").write_text("".join(json.dumps(r) + "\n" for r in unpaired_rows(pairs)))


# -- the sides (each runs in its own subprocess) -----------------------------------------------------
def ours_config(a: argparse.Namespace, out: str):
    from dpolab.config import make_config
    from dpolab.train.kto import KTOConfig

    return make_config(KTOConfig, dict(model=a.model_dir, data=a.data, eval_fraction=0.0, output_dir=out,
                                       batch_size=a.batch_size, max_length=a.max_length,
                                       max_prompt_length=a.max_length - 1, learning_rate=LR, beta=BETA,
                                       max_grad_norm=1.0, max_steps=a.steps, logging_steps=10**6, progress=False,
                                       seed=0))


def trl_config(a: argparse.Namespace, out: str, gradient_checkpointing: bool | None = None):
    from trl import KTOConfig

    extra = {} if gradient_checkpointing is None else {"gradient_checkpointing": gradient_checkpointing}
    return KTOConfig(output_dir=out, per_device_train_batch_size=a.batch_size, max_length=a.max_length,
                     learning_rate=LR, beta=BETA, max_steps=a.steps, logging_steps=10**6, save_strategy="no",
                     report_to="none", use_cpu=True, bf16=False, dataloader_num_workers=0, seed=0,
                     disable_tqdm=True, max_grad_norm=1.0, **extra)


def run_ours(a: argparse.Namespace) -> dict:
    """``dpolab.train.kto.train`` as shipped; matched-row tokens counted where it collates batches."""
    srt.preimport(srt.OURS_IMPORTS + [srt.modeling_module(a.model_dir), "dpolab.train.kto"])
    from dpolab.lm.loading import load_tokenizer
    from dpolab.train import pair_layout
    from dpolab.train.kto import train

    load_tokenizer(a.model_dir)
    mem = srt.start_memory()
    tokens = [0]
    clock = srt.StepClock(on_step=lambda: tokens.append(0))
    collate = pair_layout.collate_pairs

    def counting(prefix, rows, pad_id):  # the reference precompute falls in step 1, never timed
        tokens[-1] += sum(len(r.prompt_ids) + len(r.completion_ids) for r in rows)
        return collate(prefix, rows, pad_id)

    pair_layout.collate_pairs = counting  # the trainer imports it at call time
    with tempfile.TemporaryDirectory() as out:
        summary = train(ours_config(a, out))
    res = clock.result(tokens, 12 * srt.block_params(a.model_dir), a.warmup_steps, mem)
    res["ref_precompute_s"] = summary["ref_precompute_seconds"]
    res["seconds"] += summary["ref_precompute_seconds"] * len(res["step_times"]) / a.steps  # charged pro rata
    res["micro_batch_tokens"] = summary["micro_batch_tokens"]
    return res


def run_trl(a: argparse.Namespace, gradient_checkpointing: bool | None) -> dict:
    from datasets import Dataset
    from trl import KTOTrainer

    tok, mem, rows, model = srt.trl_start(a)
    tokens: list[int] = []

    class Counting(KTOTrainer):
        def training_step(self, model, inputs, *args, **kwargs):
            tokens.append(int(inputs["attention_mask"].sum()))  # the matched rows (KL rows apart)
            return super().training_step(model, inputs, *args, **kwargs)

    with tempfile.TemporaryDirectory() as out:
        args = trl_config(a, out, gradient_checkpointing)
        trainer = Counting(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
        clock = srt.StepClock()
        trainer.train()
        gc = bool(trainer.args.gradient_checkpointing)
    res = clock.result(tokens, 12 * srt.block_params(a.model_dir), a.warmup_steps, mem)
    res["gradient_checkpointing"] = gc
    return res


def run_check(a: argparse.Namespace) -> dict:
    """TRL's KTO loss of its first batch equals ours on the same rows and pairing, with a reference
    that differs from the policy; the same token ids."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import KTOTrainer

    from dpolab.data.unpaired import load_unpaired_data
    from dpolab.losses.kto import kto_loss, kto_reference_point
    from dpolab.train.kto import half_logps
    from dpolab.train.pair_layout import collate_pairs

    rows = [json.loads(x) for x in Path(a.data).read_text().splitlines()][:a.batch_size]
    with tempfile.TemporaryDirectory() as d:
        sub = Path(d) / "batch.jsonl"
        sub.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tok = AutoTokenizer.from_pretrained(a.model_dir)
        trainer = KTOTrainer(model=AutoModelForCausalLM.from_pretrained(a.model_dir),
                             ref_model=AutoModelForCausalLM.from_pretrained(a.ref_dir),
                             args=trl_config(a, d + "/trl"), train_dataset=Dataset.from_list(rows),
                             processing_class=tok)
        batch = next(iter(trainer.get_train_dataloader()))
        trainer.model.train()
        with torch.no_grad():
            trl_loss = float(trainer.compute_loss(trainer.model, batch))
        trl_ids = [(list(r["prompt_ids"]), list(r["completion_ids"])) for r in trainer.train_dataset]
        data = load_unpaired_data(str(sub), tok, max_length=a.max_length, max_prompt_length=a.max_length - 1,
                                  eval_fraction=0.0)
    ours = {(tuple(r.prompt_ids), tuple(r.completion_ids)): r for r in data.train}
    ours_ids = sorted((list(p), list(c)) for p, c in ours)
    same_ids = ours_ids == sorted(trl_ids)
    if not same_ids:
        return {"trl_loss": trl_loss, "ours_loss": float("nan"), "same_token_ids": False, "rows": len(rows)}
    # TRL's pairing: row i's prompt with row i-1's completion (its batch order is the file order)
    ordered = [ours[(tuple(p), tuple(c))] for p, c in trl_ids]
    paired = [dataclasses.replace(r, rejected_ids=ordered[i - 1].completion_ids) for i, r in enumerate(ordered)]
    b = collate_pairs(False, paired, tok.pad_token_id)
    policy = AutoModelForCausalLM.from_pretrained(a.model_dir)  # fresh copies: TRL patched its own
    ref = AutoModelForCausalLM.from_pretrained(a.ref_dir)
    policy.train()
    with torch.no_grad():
        lp, lr = half_logps(policy, b), half_logps(ref, b)
        z0 = kto_reference_point(half_logps(policy, b, mismatched=True), half_logps(ref, b, mismatched=True))
        desirable = torch.tensor([r.desirable for r in ordered])
        losses = kto_loss(lp, lr, desirable, z0, beta=BETA)[0]
    return {"trl_loss": trl_loss, "ours_loss": float(losses.mean()), "z0": float(z0), "same_token_ids": same_ids,
            "rows": len(rows)}


SIDES = {"ours": run_ours, "trl-default": lambda a: run_trl(a, None), "trl-best": lambda a: run_trl(a, False),
         "check": run_check}


# -- driver ------------------------------------------------------------------------------------------
def markdown_table(results: dict) -> str:
    fmt = srt.fmt
    lines = ["| model | TRL side | ours tok/s | TRL tok/s | speed ratio | ours peak RSS MB | TRL peak RSS MB | memory "
             "ratio | over the baseline, ours / TRL MB (ratio) | ours MFU | TRL MFU |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, r in results["rows"].items():
        model, side = key.split("/")
        o, t = r["ours"], r["trl"]
        lines.append(
            f"| {model} | {side} | {fmt(o['tokens_per_s'])} | {fmt(t['tokens_per_s'])} | {r['speedup']:.2f}× "
            f"({r['speedup_rounds']['min']:.2f}–{r['speedup_rounds']['max']:.2f}) | {fmt(o['peak_rss_mb'])} | "
            f"{fmt(t['peak_rss_mb'])} | {r['memory_ratio']:.2f}× ({r['memory_ratio_rounds']['min']:.2f}–"
            f"{r['memory_ratio_rounds']['max']:.2f}) | {o['peak_mb']['median']:.0f} / {t['peak_mb']['median']:.0f} "
            f"({r['over_baseline_ratio']:.2f}×) | {o['mfu']['median']:.1%} | {t['mfu']['median']:.1%} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", choices=sorted(SIDES), help=argparse.SUPPRESS)
    ap.add_argument("--ref-dir", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="defaults for a short run: small model only, one round, "
                    "no warm-up runs (options given explicitly still apply)")
    ap.add_argument("--models", default="small,medium", type=dvt.name_list(STEPS),
                    help=f"comma-separated, of {', '.join(STEPS)} (default: small,medium)")
    # CPU and float32 only: no --gpu, and --device / --precision hidden (cpu / fp32, for the workers)
    srt.add_common_args(ap, gpu_preset=False, dry_run_help="generate the data, build and save the models (as "
                        "the run does), print the worker commands, run nothing")
    a = srt.parse_args_with_quick(ap, {"models": "small", "repeats": 1, "warmup_runs": 0})
    if a.warmup_steps < 1:
        ap.error("--warmup-steps must be >= 1 (the first step's counts include the reference precompute)")
    if a.worker:
        srt.run_worker(a, SIDES)
        return
    dvt.check_timed_steps(ap, a.warmup_steps, {m: STEPS[m] for m in a.models.split(",")})
    os.environ.update({k: v for k, v in srt.worker_env(a.threads).items() if k.startswith(("HF_", "TRANSFORMERS", "TOK"))})
    models = a.models.split(",")
    repeats, warmup_runs = a.repeats, a.warmup_runs
    sides = ["ours", "trl-default", "trl-best"]
    results: dict = {"date": datetime.date.today().isoformat(), "versions": srt.versions(), "source": srt.source_state(),
                     "threads": a.threads, "batch_size": a.batch_size, "max_length": a.max_length, "beta": BETA,
                     "learning_rate": LR, "repeats": repeats, "steps": {m: STEPS[m] for m in models},
                     "warmup_steps": a.warmup_steps, "load_average": {"start": srt.load_average()}, "rows": {}}
    with tempfile.TemporaryDirectory() as d:
        workdir = Path(a.workdir or d)
        workdir.mkdir(parents=True, exist_ok=True)
        setup(workdir, models)

        def args_for(model: str, steps: int) -> list[str]:
            return ["--model-dir", str(workdir / f"{model}-policy"), "--ref-dir", str(workdir / f"{model}-ref"),
                    "--data", str(workdir / "kto.jsonl"), "--steps", str(steps), *srt.worker_args(a)]

        if a.dry_run:
            for side in sides:
                print("would run:", sys.executable, __file__, "--worker", side, *args_for(models[0], STEPS[models[0]]))
            return
        c = srt.spawn(__file__, "check", args_for(models[0], 1), a.threads)
        ok = c["same_token_ids"] and abs(c["trl_loss"] - c["ours_loss"]) <= 1e-5
        results["check"] = {**c, "ok": ok}
        print(f"first-batch KTO loss: TRL {c['trl_loss']:.6f}  ours {c['ours_loss']:.6f}  (z0 {c.get('z0', 0):.4f})  "
              f"same token ids: {c['same_token_ids']}", flush=True)
        if not ok:
            raise SystemExit("KTO loss check FAILED: the two sides do not compute the same thing")
        peak = srt.matmul_peak(a.threads)
        raw: dict = {}
        for model in models:
            for _ in range(warmup_runs):
                for side in sides:
                    srt.spawn(__file__, side, args_for(model, STEPS[model]), a.threads)
            runs: dict[str, list[dict]] = {s: [] for s in sides}
            for _ in range(repeats):
                for side in sides:
                    runs[side].append(srt.spawn(__file__, side, args_for(model, STEPS[model]), a.threads))
            peak = max(peak, srt.matmul_peak(a.threads))
            raw[model] = runs
            results["load_average"][model] = srt.load_average()
            for theirs in ("trl-default", "trl-best"):
                results["rows"][f"{model}/{theirs}"] = srt.compare(runs["ours"], runs[theirs], peak)
                srt.print_row(f"{model}/{theirs}", results["rows"][f"{model}/{theirs}"])
    for key, row in results["rows"].items():  # every MFU against the best peak of the whole run
        model, theirs = key.split("/")
        row.update(srt.compare(raw[model]["ours"], raw[model][theirs], peak))
    results["matmul_peak_gflops"] = peak
    results["ref_precompute_s"] = {m: statistics.median(r["ref_precompute_s"] for r in raw[m]["ours"]) for m in raw}
    results["runs"] = raw
    srt.finish(a, results, peak, markdown_table(results))


if __name__ == "__main__":
    main()
