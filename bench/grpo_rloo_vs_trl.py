"""Benchmark: dpolab's GRPO and RLOO trainers against TRL's GRPOTrainer and RLOOTrainer (CPU, fp32, no vLLM).

The protocol of ``bench/dpo_vs_trl.py`` for the two critic-free on-policy trainers. Both sides get the
same Llama-style model (the DPO benchmark's ``small`` by default, random weights from
``dpolab.lm.tiny``, saved once to a temporary folder and loaded by both with ``from_pretrained``),
the same locally trained tokenizer (asked for 4096 entries, it reaches 1,438 on its text: BPE runs
out of merges; so ``small`` has 2.32M parameters, 1.77M of them in the transformer blocks), the same prompts (the built-in ``reverse`` task,
``dpolab.rewards.tasks``, e.g. ``"reverse: 3 1 4 ="``), the same reward (:func:`reward`, a cheap
Python function of the completions: the share of digit characters plus exact match with the
answer, so that groups have a spread and advantages are not all zero), the same group size G, the
same prompts per step, the same number of optimizer steps, the same AdamW (fused, lr 1e-6 constant,
clipping 1.0, no weight decay), fp32 and the same thread count. One command::

    .venv-bench/bin/python bench/grpo_rloo_vs_trl.py --trl-best --json bench/grpo_rloo_vs_trl_results.json
    .venv-bench/bin/python bench/grpo_rloo_vs_trl.py --quick      # one repeat, fewer steps, no warm-up run

Every completion has exactly ``--completion-length`` tokens on both sides, so both sides generate
and train on the same number of tokens: TRL gets ``generation_kwargs={"min_new_tokens": L}`` (EOS
suppressed until L tokens; generation stops at ``max_completion_length = L``); dpolab's sampler is
built with ``eos_token_id=[]`` (its documented "never stop early"; the trainers expose no option for
it, so the worker sets it on ``dpolab.lm.sampling.LocalSampler``). The worker checks it (every
completion length seen is printed) along with the prompts per step, G and the optimizer steps.

Sides (each run in a FRESH subprocess; per algorithm one warm-up run of each side, then ``--repeats``
rounds running every side once, in turn, so noise hits all sides alike):

* ``ours-grpo``: ``dpolab.train.grpo.train`` (its Python API) with its defaults except what must
  match: β = 0 (both defaults), ``loss_aggregation="token"`` (TRL's default ``loss_type="dapo"``;
  with equal-length completions it equals our default ``sequence``), one micro-batch per step
  (``micro_batch_size`` = the step's completions, as TRL's ``per_device_train_batch_size``), which
  our default token budget (``micro_batch_tokens``, sized by the model, not set here) may split into
  several forward/backward passes (its size on ``small`` and the passes it gave in a run:
  docs/performance.md, "GRPO and RLOO against TRL"); no evaluation, no logged samples;
* ``trl-grpo``: ``trl.GRPOTrainer`` defaults (gradient checkpointing on, ``loss_type="dapo"``,
  β = 0: no reference model) with ``per_device_train_batch_size`` = prompts per step × G;
* ``ours-rloo``: ``dpolab.train.rloo.train`` defaults (β = 0.05 folded into the reward with a frozen
  reference; REINFORCE on the sequence log-prob, which at one optimizer step per batch has TRL's
  gradient: the ratio is 1);
* ``trl-rloo``: ``trl.RLOOTrainer`` defaults (gradient checkpointing on, β = 0.05, reference model);
* with ``--trl-best`` also ``trl-grpo-nogc`` and ``trl-rloo-nogc``: the same with gradient
  checkpointing off (TRL's faster setting on this model);
* with ``--ours-gc`` also ``ours-grpo-gc`` and ``ours-rloo-gc``: ours with ``gradient_checkpointing``
  (the eval-mode policy's layers checkpointed, one training pass: no token budget; no prefix sharing).

``--instruction-words N`` puts the same N-word instruction before every prompt, for both sides: long
prompts, where ours runs each prompt once per pass for its G completions (``prefix_sharing``, its
default) and TRL runs it G times.

The forward passes per step: GRPO, on both sides, a generation and one training forward/backward
(the old log-probs are the detached current ones); RLOO a generation, a no-grad pass of the
reference and one training forward/backward, and on TRL's side also a no-grad pass of the policy
for the old log-probs of the KL, which ours takes from its sampler (the log-probs it drew with).

Measures, per run: the wall time of every optimizer step (torch's global optimizer-step hook, the
same clock for both; a step holds its generation, reward, log-prob passes, backward and update), the
tokens of every step (prompt tokens without padding plus completion tokens of each sampled
sequence: each sequence is generated once and trained on once, so this one count is the unit of
"generated plus trained" tokens, the same on both sides), the time inside generation and inside
no-grad log-prob passes (wrappers around each side's own functions: the profile), and memory: the
**peak over the baseline** (the process's resident high-water mark ``VmHWM``, read at the last
optimizer step by ``dpo_vs_trl.StepClock``, after the kernel's peak mark was reset to the resident
memory once the side imported its trainer and loaded the tokenizer, before any model; not
``ru_maxrss``, which carries the parent's peak over the spawn), the **baseline** itself and the **whole-process peak** (their sum). The parent also times each whole subprocess
(interpreter start, imports, model load, training, dpolab's end-of-run checkpoint and ``final/``
folder): the "whole process" column. The first ``--warmup-steps`` steps of each run are not timed.
Each step's CPU time (``time.process_time``, all of the process's threads) is recorded too: on a
shared machine, with ``--threads 1``, tokens per CPU second are much less sensitive to the other
load than tokens per wall second (both are reported, and the load average of every run).

Threads: on a 2-core machine that other jobs keep busy, 2 torch threads make every small operation
wait for a descheduled OpenMP thread (measured here: steps 5-10× slower than with 1 thread, and
erratic); run ``--threads 1`` there. On an idle machine use all cores (the default).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


dvt = _load("dpo_vs_trl")     # the DPO benchmark's models, lexicon generator, step clock and memory baseline
srt = _load("sft_rm_vs_trl")  # versions and load average, as the other benchmarks record them

MODELS, VOCAB = dvt.MODELS, dvt.VOCAB
LR = 1e-6  # the default of all four trainers
BETA = {"grpo": 0.0, "rloo": 0.05}  # the defaults of both sides (checked in the worker)
N_PROMPTS = 512


# -- the reward both sides use ----------------------------------------------------------------------
def reward(prompts, completions, **columns):
    """Share of digit characters in the completion, plus 1 for an exact match with the row's answer.

    Both trainers call it with the prompt rows' other fields as keyword arguments (``answer``)."""
    answers = columns.get("answer") or [None] * len(completions)
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) + float(a is not None and c.strip() == str(a).strip())
            for c, a in zip(completions, answers)]


# -- setup: prompts, tokenizer, model ------------------------------------------------------------------
INSTRUCTION = ("read the symbols after the colon and write them again in the opposite order with the same "
               "spacing and nothing else before or after them").split()


def instruction(words: int) -> str:
    """A fixed instruction of ``words`` words put before every prompt (0: none): long prompts, as
    in tasks whose prompts carry a system text or a problem statement."""
    return " ".join(INSTRUCTION[i % len(INSTRUCTION)] for i in range(words)) + " " if words else ""


def setup(workdir: Path, models: list[str], instruction_words: int = 0) -> None:
    from dpolab.lm.tiny import tiny_llama, train_tokenizer
    from dpolab.rewards.tasks import make_examples

    head = instruction(instruction_words)
    rows = [{"prompt": head + p, "answer": a} for p, a in make_examples("reverse", N_PROMPTS, seed=0)]
    (workdir / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # the vocabulary: the lexicon text of the DPO benchmark and the prompts (asked for 4096 entries, BPE
    # runs out of merges at 1,438 on this text)
    texts = [r["prompt"] + r["chosen"] + r["rejected"] for r in dvt.make_data(256, seed=0)]
    texts += [r["prompt"] + " " + r["answer"] for r in rows]
    tok = train_tokenizer(texts, vocab_size=VOCAB)
    for name in models:
        h, layers, heads, inter = MODELS[name]
        m = tiny_llama(len(tok), hidden_size=h, layers=layers, heads=heads, intermediate_size=inter,
                       max_positions=1024, seed=0, tokenizer=tok)
        m.save_pretrained(workdir / name)
        tok.save_pretrained(workdir / name)


# -- instrumentation -------------------------------------------------------------------------------
class Record:
    """What a side reports per run: step times, tokens and shapes per step, profile, memory."""

    def __init__(self, base_kb: int) -> None:
        self.base_kb = base_kb
        self.steps: list[dict] = []  # one per sampled batch: tokens, prompts, G, completion lengths
        self.phase = {"generate": [0.0], "nograd_logps": [0.0]}  # seconds per optimizer step
        self.cpu = [time.process_time()]  # CPU time of the process at each step's end (all its threads)
        self.clock = dvt.StepClock(on_step=self.next_step)

    def next_step(self) -> None:
        self.cpu.append(time.process_time())
        for v in self.phase.values():
            v.append(0.0)

    def add_batch(self, prompts: list, prompt_mask, completion_mask) -> None:
        lengths = completion_mask.sum(1).tolist()
        unique = len(set(prompts))  # prompt texts (TRL) or dataset rows (dpolab), one per sequence
        self.steps.append({"prompt_tokens": int(prompt_mask.sum()), "completion_tokens": int(sum(lengths)),
                           "sequences": len(lengths), "prompts": unique,
                           "completion_lengths": sorted(set(int(x) for x in lengths)),
                           "prompt_lengths": [int(prompt_mask.sum(1).min()), int(prompt_mask.sum(1).max())]})

    def full_length_sampler(self, sampling) -> None:
        """Our sampler made to never stop early (every completion ``max_new_tokens`` long), its
        ``sample`` timed as the generation phase."""
        class FullLength(sampling.LocalSampler):
            def __init__(self, model, tokenizer, *, eos_token_id=None, **kw):
                super().__init__(model, tokenizer, eos_token_id=[], **kw)

            sample = self.timed("generate", sampling.LocalSampler.sample)

        sampling.LocalSampler = FullLength

    def count_samples(self, rollouts) -> None:
        """Our trainers' sampling step (``dpolab.train.rollouts.sample_step``) records each batch."""
        sample_step = rollouts.sample_step

        def counting(*args, **kwargs):
            s = sample_step(*args, **kwargs)
            self.add_batch(list(s.rows), s.gen.prompt_mask, s.gen.response_mask)
            return s

        rollouts.sample_step = counting

    def timed(self, phase: str, fn, *, only_without_grad: bool = False):
        import torch

        def wrapper(*args, **kwargs):
            if only_without_grad and torch.is_grad_enabled():
                return fn(*args, **kwargs)  # the training forward: part of the rest of the step
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.phase[phase][-1] += time.perf_counter() - t0

        return wrapper

    def result(self, warmup: int) -> dict:
        clock = self.clock
        clock.handle.remove()
        n = len(clock.times) - 1
        dts = [b - a for a, b in zip(clock.times, clock.times[1:])][warmup:]
        cpu = [b - a for a, b in zip(self.cpu, self.cpu[1:])][warmup:]
        timed = self.steps[warmup:n]
        seen = sorted({x for s in self.steps for x in s["completion_lengths"]})
        return {"optimizer_steps": n, "sampled_batches": len(self.steps), "step_times": dts, "seconds": sum(dts),
                "cpu_step_times": cpu, "cpu_seconds": sum(cpu),
                "tokens": sum(s["prompt_tokens"] + s["completion_tokens"] for s in timed),
                "completion_tokens": sum(s["completion_tokens"] for s in timed),
                "prompts_per_step": sorted({s["prompts"] for s in self.steps}),
                "sequences_per_step": sorted({s["sequences"] for s in self.steps}),
                "completion_lengths": seen,
                "prompt_lengths": [min(s["prompt_lengths"][0] for s in self.steps),
                                   max(s["prompt_lengths"][1] for s in self.steps)],
                "generate_s": sum(self.phase["generate"][warmup:n]),
                "nograd_logps_s": sum(self.phase["nograd_logps"][warmup:n]),
                "peak_mb": (clock.maxrss_kb - self.base_kb) / 1024, "baseline_mb": self.base_kb / 1024}


# -- the sides (each runs in its own subprocess) -----------------------------------------------------
def run_ours(a: argparse.Namespace, algo: str, gradient_checkpointing: bool = False) -> dict:
    """``dpolab.train.{grpo,rloo}.train`` through its Python API, defaults except what must match."""
    import accelerate  # noqa: F401  (what the trainer imports, before the baseline)
    import safetensors.torch  # noqa: F401
    import tqdm.auto  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    import dpolab.lm.sampling as sampling
    import dpolab.train.rollouts as rollouts
    from dpolab.config import make_config
    from dpolab.lm.loading import load_tokenizer

    if algo == "grpo":
        from dpolab.train.grpo import GRPOConfig as Config
        from dpolab.train.grpo import train
    else:
        from dpolab.train.rloo import RLOOConfig as Config
        from dpolab.train.rloo import train
    load_tokenizer(a.model_dir)
    rec = Record(dvt.baseline_kb())
    rec.full_length_sampler(sampling)
    rollouts.rollout_token_logps = rec.timed("nograd_logps", rollouts.rollout_token_logps)  # old and reference
    rec.count_samples(rollouts)
    n = a.prompts_per_step * a.num_generations
    extra = {"loss_aggregation": "token"} if algo == "grpo" else {}
    with tempfile.TemporaryDirectory() as out:
        cfg = make_config(Config, dict(
            model=a.model_dir, data=a.data, output_dir=out, reward=[f"{Path(__file__).resolve()}:reward"],
            num_generations=a.num_generations, prompts_per_step=a.prompts_per_step, micro_batch_size=n,
            max_new_tokens=a.completion_length, max_prompt_length=1024 - a.completion_length, learning_rate=LR,
            max_steps=a.steps,
            eval_prompts=0, log_samples=0, logging_steps=10**6, progress=False, seed=0,
            gradient_checkpointing=gradient_checkpointing, **extra))
        assert cfg.beta == BETA[algo], (cfg.beta, BETA[algo])
        train(cfg)
    res = rec.result(a.warmup_steps)
    res["beta"] = cfg.beta
    return res


def run_trl(a: argparse.Namespace, algo: str, gradient_checkpointing: bool | None) -> dict:
    """``trl.GRPOTrainer`` / ``trl.RLOOTrainer`` with their defaults except what must match."""
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if algo == "grpo":
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as Trainer
    else:
        from trl import RLOOConfig as Config
        from trl import RLOOTrainer as Trainer
    tok = AutoTokenizer.from_pretrained(a.model_dir)
    rec = Record(dvt.baseline_kb())
    rows = [json.loads(x) for x in Path(a.data).read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32)

    class Counting(Trainer):
        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            rec.add_batch([x["prompt"] for x in inputs], out["prompt_mask"], out["completion_mask"])
            return out

    Counting._generate_single_turn = rec.timed("generate", Trainer._generate_single_turn)
    Counting._get_per_token_logps_and_entropies = rec.timed(
        "nograd_logps", Trainer._get_per_token_logps_and_entropies, only_without_grad=True)
    extra = {} if gradient_checkpointing is None else {"gradient_checkpointing": gradient_checkpointing}
    n = a.prompts_per_step * a.num_generations
    L = a.completion_length
    with tempfile.TemporaryDirectory() as out:
        args = Config(output_dir=out, per_device_train_batch_size=n, num_generations=a.num_generations,
                      max_completion_length=L, generation_kwargs={"min_new_tokens": L}, learning_rate=LR,
                      lr_scheduler_type="constant", max_steps=a.steps, logging_steps=10**6, save_strategy="no",
                      report_to="none", use_cpu=True, bf16=False, dataloader_num_workers=0, seed=0,
                      disable_tqdm=True, max_grad_norm=1.0, **extra)
        assert args.beta == BETA[algo], (args.beta, BETA[algo])
        trainer = Counting(model=model, reward_funcs=[reward], args=args, train_dataset=Dataset.from_list(rows),
                           processing_class=tok)
        trainer.train()
        gc = bool(trainer.args.gradient_checkpointing)
    res = rec.result(a.warmup_steps)
    res["beta"], res["gradient_checkpointing"] = args.beta, gc
    return res


SIDES = {"ours-grpo": lambda a: run_ours(a, "grpo"), "trl-grpo": lambda a: run_trl(a, "grpo", None),
         "ours-grpo-gc": lambda a: run_ours(a, "grpo", True), "ours-rloo-gc": lambda a: run_ours(a, "rloo", True),
         "trl-grpo-nogc": lambda a: run_trl(a, "grpo", False),
         "ours-rloo": lambda a: run_ours(a, "rloo"), "trl-rloo": lambda a: run_trl(a, "rloo", None),
         "trl-rloo-nogc": lambda a: run_trl(a, "rloo", False)}


# -- driver ---------------------------------------------------------------------------------------
def spawn(side: str, a: argparse.Namespace, model: str, workdir: Path, script: str = __file__) -> dict:
    cmd = [sys.executable, script, "--worker", side, "--model-dir", str(workdir / model),
           "--data", str(workdir / "prompts.jsonl"), "--steps", str(a.steps), "--warmup-steps", str(a.warmup_steps),
           "--threads", str(a.threads), "--num-generations", str(a.num_generations),
           "--prompts-per-step", str(a.prompts_per_step), "--completion-length", str(a.completion_length)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error",
           "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "OMP_NUM_THREADS": str(a.threads), "PYTHONWARNINGS": "ignore"}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{side} on {model} failed:\n{p.stderr[-4000:]}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["process_s"], res["load_avg"] = wall, srt.load_average()
    return res


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarise(runs: list[dict]) -> dict:
    return {"tokens_per_s": spread([r["tokens"] / r["seconds"] for r in runs]),
            "completion_tokens_per_s": spread([r["completion_tokens"] / r["seconds"] for r in runs]),
            "tokens_per_cpu_s": spread([r["tokens"] / r["cpu_seconds"] for r in runs]),
            "median_step_s": spread([statistics.median(r["step_times"]) for r in runs]),
            "peak_mb": spread([r["peak_mb"] for r in runs]), "baseline_mb": spread([r["baseline_mb"] for r in runs]),
            "process_s": spread([r["process_s"] for r in runs]),
            "generate_share": spread([r["generate_s"] / r["seconds"] for r in runs]),
            "nograd_logps_share": spread([r["nograd_logps_s"] / r["seconds"] for r in runs])}


def compare(o_runs: list[dict], t_runs: list[dict]) -> dict:
    """Ratios of the medians, and the spread of the per-round ratios (ours run i against TRL run i)."""
    o, t = summarise(o_runs), summarise(t_runs)
    return {"ours": o, "trl": t,
            "speedup": o["tokens_per_s"]["median"] / t["tokens_per_s"]["median"],
            "speedup_rounds": spread([(x["tokens"] / x["seconds"]) / (y["tokens"] / y["seconds"])
                                      for x, y in zip(o_runs, t_runs)]),
            "cpu_speedup": o["tokens_per_cpu_s"]["median"] / t["tokens_per_cpu_s"]["median"],
            "cpu_speedup_rounds": spread([(x["tokens"] / x["cpu_seconds"]) / (y["tokens"] / y["cpu_seconds"])
                                          for x, y in zip(o_runs, t_runs)]),
            "memory_ratio": o["peak_mb"]["median"] / t["peak_mb"]["median"],
            "memory_ratio_rounds": spread([x["peak_mb"] / y["peak_mb"] for x, y in zip(o_runs, t_runs)]),
            "process_memory_ratio": (o["peak_mb"]["median"] + o["baseline_mb"]["median"])
            / (t["peak_mb"]["median"] + t["baseline_mb"]["median"])}


def setup_line(side: str, r: dict) -> str:
    return (f"  {side:14s} prompts/step {r['prompts_per_step']} sequences/step {r['sequences_per_step']} "
            f"completion lengths {r['completion_lengths']} prompt tokens {r['prompt_lengths'][0]}-"
            f"{r['prompt_lengths'][1]} optimizer steps {r['optimizer_steps']} sampled batches "
            f"{r['sampled_batches']} beta {r['beta']}")


def check_setup(a: argparse.Namespace, runs: dict[str, dict]) -> bool:
    """The sides ran the same shapes: prompts and sequences per step, full-length completions, steps."""
    n = a.prompts_per_step * a.num_generations
    return all(r["prompts_per_step"] == [a.prompts_per_step] and r["sequences_per_step"] == [n]
               and r["completion_lengths"] == [a.completion_length] and r["optimizer_steps"] == a.steps
               and r["sampled_batches"] == a.steps for r in runs.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", choices=sorted(SIDES), help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="defaults for a short run: one measured run, no warm-up "
                    "runs, 5 steps (options given explicitly still apply)")
    ap.add_argument("--model", default="small", choices=sorted(MODELS))
    ap.add_argument("--algos", default="grpo,rloo", type=dvt.name_list(("grpo", "rloo")),
                    help="comma-separated, of grpo, rloo (default: grpo,rloo)")
    ap.add_argument("--num-generations", type=int, default=4, help="G: completions per prompt")
    ap.add_argument("--prompts-per-step", type=int, default=4)
    ap.add_argument("--completion-length", type=int, default=32, help="tokens of every completion (EOS off)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 10, quick 5)")
    ap.add_argument("--warmup-steps", type=int, default=2, help="untimed first steps (at least 1)")
    ap.add_argument("--repeats", type=int, default=3, help="measured runs per side (after one warm-up run)")
    ap.add_argument("--trl-best", action="store_true", help="also TRL with gradient checkpointing off")
    ap.add_argument("--ours-gc", action="store_true", help="also ours with gradient checkpointing")
    ap.add_argument("--instruction-words", type=int, default=0,
                    help="put a fixed instruction of this many words before every prompt (long prompts)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", help="also write the results here")
    a = srt.parse_args_with_quick(ap, {"repeats": 1})
    if a.warmup_steps < 1:
        ap.error("--warmup-steps must be >= 1 (the first step's interval holds the trainer's set-up)")
    if a.worker:
        srt.run_worker(a, SIDES)
        return

    a.steps = a.steps or (5 if a.quick else 10)
    dvt.check_timed_steps(ap, a.warmup_steps, {"a run (--steps)": a.steps})
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # the driver saves the model too
    repeats, warm_runs = a.repeats, 0 if a.quick else 1
    t_start = time.time()
    results: dict = {"date": datetime.date.today().isoformat(), "versions": srt.versions(), "threads": a.threads,
                     "model": a.model, "model_shape": dict(zip(("hidden", "layers", "heads", "intermediate"),
                                                               MODELS[a.model])),
                     "vocab": VOCAB, "instruction_words": a.instruction_words, "num_generations": a.num_generations, "prompts_per_step": a.prompts_per_step,
                     "completion_length": a.completion_length, "steps": a.steps, "warmup_steps": a.warmup_steps,
                     "repeats": repeats, "learning_rate": LR, "load_avg_start": srt.load_average(),
                     "command": " ".join([Path(sys.executable).name, *sys.argv])}
    print(f"load average {results['load_avg_start']} on {os.cpu_count()} CPUs", flush=True)
    with tempfile.TemporaryDirectory() as d:
        workdir = Path(d)
        setup(workdir, [a.model], a.instruction_words)
        for algo in a.algos.split(","):
            trls = [f"trl-{algo}"] + ([f"trl-{algo}-nogc"] if a.trl_best else [])
            ours = [f"ours-{algo}"] + ([f"ours-{algo}-gc"] if a.ours_gc else [])
            sides = [*ours, *trls]
            for _ in range(warm_runs):
                for side in sides:
                    spawn(side, a, a.model, workdir)  # warm-up runs, discarded
            runs: dict[str, list[dict]] = {s: [] for s in sides}
            for _ in range(repeats):
                for side in sides:
                    runs[side].append(spawn(side, a, a.model, workdir))
            print(f"{algo}: setup as run (first run of each side)")
            for side in sides:
                print(setup_line(side, runs[side][0]))
            ok = check_setup(a, {f"{s}#{i}": r for s in sides for i, r in enumerate(runs[s])})
            print(f"  same setup on every run: {ok}", flush=True)
            if not ok:
                raise SystemExit("setup check FAILED: the sides did not run the same shapes")
            for our in ours:
                for trl in trls:
                    row = {**compare(runs[our], runs[trl]), "ours_side": our, "trl_side": trl, "setup_ok": ok}
                    key = algo + ("+gc" if our.endswith("-gc") else "")  # "grpo/trl-grpo", "grpo+gc/trl-grpo"
                    results[f"{key}/{trl}"] = row
                    print(line(key, trl, row), flush=True)
            results[f"{algo}/runs"] = runs
    results["load_avg_end"] = srt.load_average()
    results["wall_s"] = time.time() - t_start
    print(f"load average at the end {results['load_avg_end']}; wall {results['wall_s']:.0f} s")
    print(markdown_table(results))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


def line(algo: str, trl: str, r: dict) -> str:
    o, t = r["ours"], r["trl"]
    return (f"{algo} vs {trl}: ours {o['tokens_per_s']['median']:.0f} tok/s {o['median_step_s']['median']:.2f} s/step "
            f"{o['peak_mb']['median']:.0f} MB | TRL {t['tokens_per_s']['median']:.0f} tok/s "
            f"{t['median_step_s']['median']:.2f} s/step {t['peak_mb']['median']:.0f} MB | speed x{r['speedup']:.2f} "
            f"[{r['speedup_rounds']['min']:.2f}-{r['speedup_rounds']['max']:.2f}] memory x{r['memory_ratio']:.2f} "
            f"[{r['memory_ratio_rounds']['min']:.2f}-{r['memory_ratio_rounds']['max']:.2f}] | per CPU second "
            f"x{r['cpu_speedup']:.2f} | generation share "
            f"ours {o['generate_share']['median']:.0%} TRL {t['generate_share']['median']:.0%}")


def markdown_table(results: dict) -> str:
    lines = ["| algorithm | TRL side | ours tok/s | TRL tok/s | speed ratio (min-max) | ratio per CPU second | "
             "ours s/step | TRL s/step | ours peak MB | TRL peak MB | memory ratio (min-max) | "
             "whole-process peak MB, ours / TRL (ratio) | whole process s, ours / TRL |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    profile = ["| side | step s | generation | no-grad log-probs | rest (training forward, backward, update, reward) |",
               "|---|---|---|---|---|"]
    seen = set()
    for key, r in results.items():
        if "/" not in key or key.endswith("/runs"):
            continue
        algo, trl = key.split("/")
        o, t = r["ours"], r["trl"]
        sr, mr, cr = r["speedup_rounds"], r["memory_ratio_rounds"], r["cpu_speedup_rounds"]
        label = algo.upper().replace("+GC", ", ours with gradient checkpointing")
        lines.append(f"| {label} | {trl} | {o['tokens_per_s']['median']:.0f} | {t['tokens_per_s']['median']:.0f} "
                     f"| {r['speedup']:.2f}× ({sr['min']:.2f}-{sr['max']:.2f}) | {r['cpu_speedup']:.2f}× "
                     f"({cr['min']:.2f}-{cr['max']:.2f}) | {o['median_step_s']['median']:.2f} | "
                     f"{t['median_step_s']['median']:.2f} | {o['peak_mb']['median']:.0f} | {t['peak_mb']['median']:.0f} "
                     f"| {r['memory_ratio']:.2f}× ({mr['min']:.2f}-{mr['max']:.2f}) | "
                     f"{o['peak_mb']['median'] + o['baseline_mb']['median']:.0f} / "
                     f"{t['peak_mb']['median'] + t['baseline_mb']['median']:.0f} ({r['process_memory_ratio']:.2f}×) | "
                     f"{o['process_s']['median']:.1f} / {t['process_s']['median']:.1f} |")
        for side, x in ((r["ours_side"], o), (r["trl_side"], t)):
            if side in seen:
                continue
            seen.add(side)
            g, n = x["generate_share"]["median"], x["nograd_logps_share"]["median"]
            profile.append(f"| {side} | {x['median_step_s']['median']:.2f} | {g:.0%} | {n:.0%} | {1 - g - n:.0%} |")
    return "\n".join(lines + ["", *profile])


if __name__ == "__main__":
    main()
