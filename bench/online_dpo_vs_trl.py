"""Benchmark: dpolab's online DPO against TRL's experimental OnlineDPOTrainer (CPU, fp32), whole processes.

The protocol of ``bench/grpo_rloo_vs_trl.py`` (same 2.32M-parameter model, tokenizer, built-in ``reverse`` prompts,
reward, instrumentation and driver pieces) for online DPO (Guo et al. 2024, arXiv 2402.04792): each
step samples 2 completions of each of 8 prompts from the current policy, scores them, and takes one
DPO step (sigmoid loss, β 0.1) on the (best, worst) pair against the reference. One command::

    .venv-bench/bin/python bench/online_dpo_vs_trl.py --threads 1           # make bench-online-dpo
    .venv-bench/bin/python bench/online_dpo_vs_trl.py --quick --threads 1   # one round, fewer steps

Sides (fresh processes, one warm-up run of each, then ``--repeats`` rounds alternating):

* ``ours``: ``dpolab.train.online_dpo.train`` with its defaults (a live frozen reference, the direct
  decoder, each pair one prefix-shared row when exact);
* ``trl``: ``trl.experimental.online_dpo.OnlineDPOTrainer`` with its defaults (gradient
  checkpointing on, under which its ``model.generate`` runs with ``use_cache=False``: every
  sampled token reruns the whole sequence);
* ``trl-nogc``: the same with gradient checkpointing off (generation with the KV cache).

Both: every completion exactly ``--completion-length`` tokens (TRL: ``min_new_tokens``; ours: a
sampler that never stops early), AdamW lr 5e-7 (both defaults), clipping 1.0, 10 optimizer steps (2
untimed), fp32, no vLLM. Tokens: prompt plus completion tokens of every sampled sequence; memory:
the peak over the baseline after imports, and the whole process. The setups are checked equal
(prompts and sequences per step, full-length completions, steps) before any number.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

_spec = importlib.util.spec_from_file_location("grpo_rloo_vs_trl", Path(__file__).with_name("grpo_rloo_vs_trl.py"))
grb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(grb)  # model, prompts, reward, Record, spawn, compare, setup check

LR, BETA, SAMPLES = 5e-7, 0.1, 2  # the defaults of both sides (checked in the worker)


def run_ours(a: argparse.Namespace) -> dict:
    """``dpolab.train.online_dpo.train`` through its Python API, defaults except what must match."""
    import accelerate  # noqa: F401  (what the trainer imports, before the baseline)
    import safetensors.torch  # noqa: F401
    import tqdm.auto  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    import dpolab.lm.sampling as sampling
    import dpolab.train.reference as reference
    import dpolab.train.rollouts as rollouts
    from dpolab.config import make_config
    from dpolab.lm.loading import load_tokenizer
    from dpolab.train.online_dpo import OnlineDPOConfig, train

    load_tokenizer(a.model_dir)
    rec = grb.Record(grb.dvt.baseline_kb())
    rec.full_length_sampler(sampling)
    reference.Reference.pair_logps = rec.timed("nograd_logps", reference.Reference.pair_logps)
    rec.count_samples(rollouts)
    with tempfile.TemporaryDirectory() as out:
        cfg = make_config(OnlineDPOConfig, dict(
            model=a.model_dir, data=a.data, output_dir=out, reward=[f"{Path(grb.__file__).resolve()}:reward"],
            num_samples=SAMPLES, prompts_per_step=a.prompts_per_step, max_new_tokens=a.completion_length,
            max_prompt_length=512 - a.completion_length, max_steps=a.steps, eval_prompts=0, log_samples=0,
            logging_steps=10**6, progress=False, seed=0))
        assert (cfg.beta, cfg.learning_rate) == (BETA, LR), (cfg.beta, cfg.learning_rate)
        summary = train(cfg)
    res = rec.result(a.warmup_steps)
    res["beta"], res["prefix_sharing"] = cfg.beta, summary.get("prefix_sharing")
    return res


def run_trl(a: argparse.Namespace, gradient_checkpointing: bool | None) -> dict:
    """``OnlineDPOTrainer`` with its defaults except what must match."""
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    tok = AutoTokenizer.from_pretrained(a.model_dir)
    rec = grb.Record(grb.dvt.baseline_kb())
    rows = [json.loads(x) for x in Path(a.data).read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32)
    generate = rec.timed("generate", OnlineDPOTrainer._generate)

    class Counting(OnlineDPOTrainer):
        def _generate(self, model, prompts, images=None):
            out = generate(self, model, prompts, images)
            rec.add_batch(list(prompts) * SAMPLES, out[1], out[3])  # its prompt rows repeat the batch twice
            return out

    Counting._forward = rec.timed("nograd_logps", OnlineDPOTrainer._forward, only_without_grad=True)
    extra = {} if gradient_checkpointing is None else {"gradient_checkpointing": gradient_checkpointing}
    L = a.completion_length
    with tempfile.TemporaryDirectory() as out:
        args = OnlineDPOConfig(output_dir=out, per_device_train_batch_size=a.prompts_per_step, max_new_tokens=L,
                               generation_kwargs={"min_new_tokens": L}, max_steps=a.steps, logging_steps=10**6,
                               save_strategy="no", report_to="none", use_cpu=True, bf16=False,
                               dataloader_num_workers=0, seed=0, disable_tqdm=True, max_grad_norm=1.0,
                               lr_scheduler_type="constant", **extra)
        assert (list(args.beta) if isinstance(args.beta, list) else [args.beta]) == [BETA] and args.learning_rate == LR
        trainer = Counting(model=model, reward_funcs=[grb.reward], args=args, train_dataset=Dataset.from_list(rows),
                           processing_class=tok)
        trainer.train()
        gc = bool(trainer.args.gradient_checkpointing)
    res = rec.result(a.warmup_steps)
    res["beta"], res["gradient_checkpointing"] = BETA, gc
    return res


SIDES = {"ours": run_ours, "trl": lambda a: run_trl(a, None), "trl-nogc": lambda a: run_trl(a, False)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", choices=sorted(SIDES), help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--num-generations", type=int, default=SAMPLES, help=argparse.SUPPRESS)  # from the shared spawn
    ap.add_argument("--quick", action="store_true", help="defaults for a short run: one round, no warm-up runs, 5 "
                    "steps (options given explicitly still apply)")
    ap.add_argument("--prompts-per-step", type=int, default=8)
    ap.add_argument("--completion-length", type=int, default=32, help="tokens of every completion (EOS off)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 10, quick 5)")
    ap.add_argument("--warmup-steps", type=int, default=2, help="untimed first steps (at least 1)")
    ap.add_argument("--repeats", type=int, default=3, help="measured rounds (after one warm-up run of each side)")
    ap.add_argument("--instruction-words", type=int, default=0,
                    help="put a fixed instruction of this many words before every prompt (long prompts)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="also write the results here")
    a = grb.srt.parse_args_with_quick(ap, {"repeats": 1})
    a.num_generations, a.model = SAMPLES, "small"  # what grpo_rloo_vs_trl's checks read
    if a.warmup_steps < 1:
        ap.error("--warmup-steps must be >= 1 (the first step's interval holds the trainer's set-up)")
    if a.worker:
        grb.srt.run_worker(a, SIDES)
        return
    a.steps = a.steps or (5 if a.quick else 10)
    grb.dvt.check_timed_steps(ap, a.warmup_steps, {"a run (--steps)": a.steps})
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # the driver saves the model too
    repeats, warm_runs = a.repeats, 0 if a.quick else 1
    results: dict = {"date": datetime.date.today().isoformat(), "versions": grb.srt.versions(), "threads": a.threads,
                     "model_shape": dict(zip(("hidden", "layers", "heads", "intermediate"), grb.MODELS["small"])),
                     "instruction_words": a.instruction_words, "samples_per_prompt": SAMPLES,
                     "prompts_per_step": a.prompts_per_step, "completion_length": a.completion_length,
                     "steps": a.steps, "warmup_steps": a.warmup_steps, "repeats": repeats, "learning_rate": LR,
                     "beta": BETA, "load_avg_start": grb.srt.load_average(),
                     "command": " ".join([Path(sys.executable).name, *sys.argv]), "rows": {}}
    t0 = time.time()
    with tempfile.TemporaryDirectory() as d:
        workdir = Path(d)
        grb.setup(workdir, ["small"], a.instruction_words)
        for _ in range(warm_runs):
            for side in SIDES:
                grb.spawn(side, a, "small", workdir, script=__file__)
        runs: dict[str, list[dict]] = {s: [] for s in SIDES}
        for _ in range(repeats):
            for side in SIDES:
                runs[side].append(grb.spawn(side, a, "small", workdir, script=__file__))
    for side, rs in runs.items():
        print(grb.setup_line(side, rs[0]))
    if not grb.check_setup(a, {f"{s}#{i}": r for s, rs in runs.items() for i, r in enumerate(rs)}):  # every run
        raise SystemExit("the sides did not run the same shapes (see the lines above): no comparison")
    for theirs in ("trl", "trl-nogc"):
        row = grb.compare(runs["ours"], runs[theirs])
        results["rows"][theirs] = row
        print(f"online DPO vs {theirs}: speed x{row['speedup']:.2f} ({row['speedup_rounds']['min']:.2f}-"
              f"{row['speedup_rounds']['max']:.2f}), memory over the baseline x{row['memory_ratio']:.2f}, "
              f"whole process x{row['process_memory_ratio']:.2f}; ours {row['ours']['tokens_per_s']['median']:.0f} "
              f"tok/s, {row['ours']['median_step_s']['median']:.2f} s/step, {row['ours']['peak_mb']['median']:.0f} MB; "
              f"TRL {row['trl']['tokens_per_s']['median']:.0f} tok/s, {row['trl']['median_step_s']['median']:.2f} "
              f"s/step, {row['trl']['peak_mb']['median']:.0f} MB", flush=True)
    results["runs"], results["wall_s"] = runs, time.time() - t0
    results["load_avg_end"] = grb.srt.load_average()
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
