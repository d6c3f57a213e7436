"""Benchmark: dpolab's SFT and reward-model trainers against TRL's SFTTrainer and RewardTrainer (CPU, fp32).

The protocol of ``bench/dpo_vs_trl.py``, for the two other offline trainers. Both sides get the same
Llama-style models (the DPO benchmark's ``small`` and ``medium`` shapes, random weights from
``dpolab.lm.tiny``; the reward model is the same backbone with a seeded scalar head, saved once and
loaded by both), the same locally trained tokenizer (asked for 4096 entries, it reaches 2,119 on this
data: BPE runs out of merges; so ``small`` has 2.58M parameters and ``medium`` 24.3M, of which 1.77M
and 22.1M in the transformer blocks), the same generated data, the same
batch (8 examples or pairs), steps, AdamW learning rate, clipping (1.0), max length (512, never
reached, so neither side truncates) and threads. One command::

    .venv-bench/bin/python bench/sft_rm_vs_trl.py              # both tasks, both models (make bench-sft-rm)
    .venv-bench/bin/python bench/sft_rm_vs_trl.py --quick      # small model, one repeat

Data: generated rows over a made-up lexicon (``dpo_vs_trl.make_data``): SFT prompt/completion rows
(prompts 6-70 words, completions 3-75 words) and preference pairs of the same shape. Generated
rather than HH-RLHF because the benchmark must run on every checkout (the HH file lives outside
the repository), and because every row then ends its prompt on a word and starts its response with
a space: tokenising prompt and response apart (dpolab) or together (TRL) gives identical ids, and
no row is truncated, so both sides train on exactly the same tokens (checked first).

Sides (each run in a FRESH subprocess; per model and task one warm-up run of each side, then
``--repeats`` rounds running every side once, in turn, so noise hits all sides alike):

* SFT ``ours-default``: ``dpolab.train.sft.train`` as shipped (completion-only loss, length-bucketed
  steps); ``ours-best``: the same with ``packing=True`` (rows of up to 512 tokens, block-diagonal
  attention, exact loss);
* SFT ``trl-default``: ``trl.SFTTrainer`` defaults (gradient checkpointing on, completion-only loss
  for prompt/completion data, padded batches in random order); ``trl-best``: gradient checkpointing
  off and length-grouped batches (``train_sampling_strategy="group_by_length"``). Of TRL's speed
  options (also ``packing=True``, which TRL runs padding-free: each batch one flattened row with a
  block mask; and ``padding_free=True`` alone) this was the fastest on this data in a one-off
  comparison (docs/performance.md); ``--trl-sft-best`` selects another;
* RM ``ours-default``: ``dpolab.train.rm.train`` as shipped (each pair one prefix-shared row
  ``[prompt | chosen | rejected]``, the prompt computed once, as its check finds the model exact;
  length-bucketed steps). It has no faster switch, so its runs also stand against TRL's best. Its
  tokens are counted as pairs' tokens ``2·|prompt| + |chosen| + |rejected|``, the real tokens of
  TRL's two rows per pair, so both sides count the same work (and our MFU is the effective one:
  the model runs the shared prompt once);
* RM ``trl-default``: ``trl.RewardTrainer`` defaults (gradient checkpointing on); ``trl-best``:
  gradient checkpointing off.

Rows reported: ``defaults`` (each trainer as shipped); ``best`` (TRL's best against our fastest
setting as measured in the same rounds: for SFT the defaults or ``--packing``, whichever was
faster); ``packing`` (SFT ``--packing`` against TRL's best, when packing was not our fastest).

Both sides run in float32 (TRL's configs default to ``bf16=True``; it is turned off so the two
sides run the same precision, as in ``dpo_vs_trl.py``). ``--threads`` sets both sides' torch
threads; on a machine whose cores other jobs also use, one thread per process measures the
trainers rather than the scheduler (with two OpenMP threads on two busy cores every parallel
region waits for a descheduled thread: the same run measured 8x slower).

``--gpu``: the preset of ``bench/gpu.sh``: SFT only, a Qwen2-0.5B-shaped model (random weights,
Qwen's 151,936-row vocabulary) in bfloat16 (bf16 weights and autocast on both sides, TRL's
``bf16=True`` default), CUDA, SDPA attention, peak GPU memory (``torch.cuda.max_memory_allocated``)
besides the resident memory, no loss check (it is made in float32 on the CPU), 2 rounds.

Measures, per run: the wall time of every optimizer step (torch's global optimizer-step hook, the
same clock for both), the real (unpadded) tokens of every step (counted where each side collates
or enters its training step), and memory three ways: the **baseline** (resident memory once the
side has imported what its trainer imports and loaded the tokenizer: the interpreter and its
libraries, before any data or model), the **whole-process peak** (the kernel's resident high-water
mark, reset to the baseline at that point, read at the last optimizer step: baseline included) and
the **peak over the baseline** (their difference). The first ``--warmup-steps`` steps are not timed.
MFU counts the model FLOPs of the real tokens (``6N`` per token for forward and backward; ``N`` the
transformer-block parameters; the recomputation of gradient checkpointing is not useful work and
is not counted) against a float32 matmul peak measured in the same run with the same threads.

Correctness check first, per task, on the small model: SFT: the completion-only NLL per target
token of one batch of 8 rows (TRL's ``compute_loss``; ours padded and packed) and the token ids and
target masks of both tokenisations must agree (1e-4, identical); RM: the Bradley-Terry loss of one
batch of 8 pairs and the token ids of chosen and rejected sequences.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_spec = importlib.util.spec_from_file_location("dpo_vs_trl", Path(__file__).with_name("dpo_vs_trl.py"))
dvt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dvt)  # the DPO benchmark's models, data generator, FLOP count and matmul peak

MODELS, VOCAB, LR = dvt.MODELS, dvt.VOCAB, dvt.LR
parse_args_with_quick = dvt.parse_args_with_quick
SFT_ROWS, RM_PAIRS = 1536, 256
STEPS = {  # (task, packed): optimizer steps per run, per model; packed SFT steps hold ~5x the tokens
    ("sft", False): {"small": 24, "medium": 10},
    ("sft", True): {"small": 10, "medium": 6},
    ("rm", False): {"small": 20, "medium": 8},
}
TRL_SFT_BEST = {  # candidates for TRL's fastest SFT setting (all with gradient checkpointing off)
    "packing": dict(packing=True),
    "padding_free": dict(padding_free=True, max_length=None),  # TRL refuses max_length without packing
    "group_by_length": dict(train_sampling_strategy="group_by_length"),
    "nogc": {},
}


# -- setup: data, tokenizer, models ---------------------------------------------------------------
def make_sft_rows(n: int, seed: int) -> list[dict]:
    """Prompt/completion rows: the prompt and the chosen response of generated pairs."""
    return [{"prompt": r["prompt"], "completion": r["chosen"]} for r in dvt.make_data(n, seed)]


# A Qwen2-0.5B-shaped model (the GPU preset): 24 layers, hidden 896, GQA 14/2 heads, tied embeddings,
# Qwen's 151,936-row vocabulary (the tokenizer is trained locally and smaller: the rows past it are unused,
# but the LM head has Qwen's size, which is what its memory depends on). ≈494M parameters.
QWEN_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=2048)


def qwen_config(tok=None):
    from transformers import Qwen2Config

    specials = {} if tok is None else dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                           eos_token_id=tok.eos_token_id)
    return Qwen2Config(**QWEN_05B, **specials)


def build_qwen(path: Path, tok, device: str) -> None:
    """Random weights (seeded), built on ``device`` and saved in bfloat16 with the tokenizer."""
    import torch
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(qwen_config(tok))
    model.to(torch.bfloat16).save_pretrained(path)
    tok.save_pretrained(path)
    del model


def block_params(model_dir: str) -> int:
    """Parameters outside the embeddings and the LM head, counted on the meta device from config.json
    (exact for any architecture: grouped-query attention, biases)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)


def setup(workdir: Path, models: list[str], tasks: list[str], device: str = "cpu") -> None:
    import torch
    from transformers import AutoModelForSequenceClassification

    from dpolab.lm.tiny import tiny_llama, train_tokenizer

    sft, pairs = make_sft_rows(SFT_ROWS, seed=1), dvt.make_data(RM_PAIRS, seed=2)
    (workdir / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    (workdir / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    tok = train_tokenizer([r["prompt"] + r["completion"] for r in sft]
                          + [r["prompt"] + r["chosen"] + r["rejected"] for r in pairs], vocab_size=VOCAB)
    for name in models:
        if name == "qwen0.5b":
            build_qwen(workdir / f"{name}-lm", tok, device)
            continue
        h, layers, heads, inter = MODELS[name]
        lm_dir, rm_dir = workdir / f"{name}-lm", workdir / f"{name}-rm"
        m = tiny_llama(len(tok), hidden_size=h, layers=layers, heads=heads, intermediate_size=inter,
                       max_positions=1024, seed=0, tokenizer=tok)
        m.save_pretrained(lm_dir)
        tok.save_pretrained(lm_dir)
        if "rm" in tasks:  # the backbone above plus a seeded head, saved: both sides load the same weights
            torch.manual_seed(0)
            rm = AutoModelForSequenceClassification.from_pretrained(lm_dir, num_labels=1)
            rm.save_pretrained(rm_dir)
            tok.save_pretrained(rm_dir)


# -- instrumentation (also used by dpo_vocab.py) --------------------------------------------------
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))


def start_memory() -> dict:
    """Resident memory now (the baseline), the high-water mark so far (imports), and the kernel's
    peak mark reset to now (``/proc/self/clear_refs``), so later high-water reads are the training
    peak of the whole process, baseline included. Read from ``/proc/self/status`` rather than
    ``ru_maxrss``: the latter also carries the parent's peak over a vfork+exec."""
    hwm = _status_kb("VmHWM")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return {"baseline_kb": _status_kb("VmRSS"), "import_hwm_kb": hwm,
            "modules": {m.split(".")[0] for m in sys.modules}}


class StepClock:
    """Wall time and the resident high-water mark at the end of every optimizer step (torch's
    global optimizer step hook: the same instrument for both sides)."""

    def __init__(self, on_step=None) -> None:
        import torch
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.times: list[float] = [time.perf_counter()]
        self.hwm_kb = 0
        self.gpu_peak = None

        def hook(opt, args, kwargs) -> None:
            if torch.cuda.is_initialized():  # the step's kernels finish before the clock reads
                torch.cuda.synchronize()
                self.gpu_peak = torch.cuda.max_memory_allocated()
            self.times.append(time.perf_counter())
            self.hwm_kb = _status_kb("VmHWM")
            if on_step is not None:
                on_step()

        self.handle = register_optimizer_step_post_hook(hook)

    def result(self, tokens: list[int], flops_per_token: float, warmup: int, mem: dict) -> dict:
        self.handle.remove()
        steps = len(self.times) - 1
        dts = [b - a for a, b in zip(self.times, self.times[1:])][warmup:]
        timed = sum(tokens[warmup:steps])
        late = sorted({m.split(".")[0] for m in sys.modules} - mem["modules"])
        return {"steps": steps, "step_times": dts, "tokens": timed, "model_flops": timed * flops_per_token,
                "seconds": sum(dts), "baseline_mb": mem["baseline_kb"] / 1024,
                "peak_rss_mb": self.hwm_kb / 1024, "peak_mb": (self.hwm_kb - mem["baseline_kb"]) / 1024,
                "import_peak_mb": mem["import_hwm_kb"] / 1024, "imported_after_baseline": late,
                "gpu_peak_mb": None if self.gpu_peak is None else self.gpu_peak / 2**20}


def preimport(names: list[str]) -> None:
    """Import what a side's run imports anyway, so its baseline holds its libraries (checked: each
    result lists the top-level packages first imported after the baseline)."""
    for name in names:
        importlib.import_module(name)


OURS_IMPORTS = ["accelerate", "safetensors.torch", "dpolab.data", "dpolab.lm.loading", "dpolab.lm.logps",
                "dpolab.runs.rundir"]
TRL_IMPORTS = ["datasets"]


def modeling_module(model_dir: str) -> str:
    """The transformers modeling module of a saved model (imported before the baseline by both sides)."""
    kind = json.loads((Path(model_dir) / "config.json").read_text())["model_type"]
    return f"transformers.models.{kind}.modeling_{kind}"


def ours_config(a: argparse.Namespace, best: bool, out: str):
    """(config, train function) of our side: the trainer's defaults, plus the benchmark's shared settings."""
    from dpolab.config import make_config

    common = dict(model=a.model_dir, data=a.data, eval_fraction=0.0, batch_size=a.batch_size, output_dir=out,
                  max_length=a.max_length, learning_rate=LR, max_grad_norm=1.0, max_steps=a.steps,
                  logging_steps=10**6, progress=False, seed=0)
    if a.precision == "bf16":  # bf16 weights and autocast, as TRL's default bf16=True on a bf16 checkpoint
        common.update(dtype="bfloat16", mixed_precision="bf16")
    if a.task == "sft":
        from dpolab.train.sft import SFTConfig, train

        return make_config(SFTConfig, dict(common, packing=best)), train
    from dpolab.train.rm import RewardConfig, train

    return make_config(RewardConfig, dict(common, max_prompt_length=a.max_length - 1)), train


# -- the sides (each runs in its own subprocess) --------------------------------------------------
def run_ours(a: argparse.Namespace, best: bool) -> dict:
    """``dpolab.train.sft.train`` / ``dpolab.train.rm.train`` with their defaults (``best``: SFT with
    packing). Real tokens are counted where the trainer collates its batches."""
    preimport(OURS_IMPORTS + [modeling_module(a.model_dir), f"dpolab.train.{a.task}"])
    from dpolab.lm.loading import load_tokenizer

    load_tokenizer(a.model_dir)
    mem = start_memory()
    tokens: list[int] = [0]
    clock = StepClock(on_step=lambda: tokens.append(0))
    if a.task == "sft":
        import dpolab.data.sft as module
        name = "collate_sft"
        collate = module.collate_sft

        def counting(rows, pad_id, **kw):
            batch = collate(rows, pad_id, **kw)
            tokens[-1] += int(batch.attention_mask.sum())
            return batch
    else:
        import dpolab.train.pair_layout as module
        name = "collate_pairs"
        collate = module.collate_pairs

        def counting(prefix, pairs, pad_id):  # either layout: the pairs' tokens, TRL's unit
            tokens[-1] += sum(p.num_tokens for p in pairs)
            return collate(prefix, pairs, pad_id)

    setattr(module, name, counting)  # the trainers import it at call time: they get the counting one
    with tempfile.TemporaryDirectory() as out:
        cfg, train = ours_config(a, best, out)
        train(cfg)
    return clock.result(tokens, 6 * block_params(a.model_dir), a.warmup_steps, mem)


def trl_extra(a: argparse.Namespace, best: bool) -> dict:
    """TRL's options beyond the shared settings: none for its defaults; its fastest ones for 'best'."""
    if not best:
        return {}
    return dict(gradient_checkpointing=False, **(TRL_SFT_BEST[a.trl_sft_best] if a.task == "sft" else {}))


def side_config(a: argparse.Namespace, best: bool):
    """The config a side's worker builds (the dry run checks that each builds). Without a GPU here,
    TRL's is built with ``use_cpu=True``: transformers refuses bf16 otherwise, before any training."""
    import torch

    with tempfile.TemporaryDirectory() as out:
        if a.worker.startswith("ours"):
            return ours_config(a, best, out)[0]
        if a.device == "cuda" and not torch.cuda.is_available():
            a = argparse.Namespace(**{**vars(a), "device": "cpu"})
        return trl_config(a, out, a.task, trl_extra(a, best))


def trl_config(a: argparse.Namespace, out: str, task: str, extra: dict):
    from trl import RewardConfig, SFTConfig

    cls = SFTConfig if task == "sft" else RewardConfig
    kw = dict(output_dir=out, per_device_train_batch_size=a.batch_size, max_length=a.max_length,
              learning_rate=LR, max_steps=a.steps, logging_steps=10**6, save_strategy="no", report_to="none",
              use_cpu=a.device == "cpu", bf16=a.precision == "bf16", dataloader_num_workers=0, seed=0,
              disable_tqdm=True, max_grad_norm=1.0)
    return cls(**{**kw, **extra})


def torch_dtype(a: argparse.Namespace):
    import torch

    return torch.bfloat16 if a.precision == "bf16" else torch.float32


def trl_start(a: argparse.Namespace, model_class=None):
    """A TRL side up to its trainer: its imports, the tokenizer, the memory baseline, then the data
    rows and the model (``model_class``, default ``AutoModelForCausalLM``) in the run's dtype.
    Returns ``(tokenizer, memory, rows, model)`` (also used by dpo_vocab.py and kto_vs_trl.py)."""
    preimport(TRL_IMPORTS + [modeling_module(a.model_dir)])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.model_dir)
    mem = start_memory()
    rows = [json.loads(x) for x in Path(a.data).read_text().splitlines()]
    model = (model_class or AutoModelForCausalLM).from_pretrained(a.model_dir, dtype=torch_dtype(a))
    return tok, mem, rows, model


def run_trl(a: argparse.Namespace, best: bool) -> dict:
    """``trl.SFTTrainer`` / ``trl.RewardTrainer`` with their defaults, or their fastest setting.
    Real tokens are counted as each micro-batch enters ``training_step``."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardTrainer, SFTTrainer

    tok, mem, rows, model = trl_start(a, None if a.task == "sft" else AutoModelForSequenceClassification)
    base = SFTTrainer if a.task == "sft" else RewardTrainer
    tokens: list[int] = []

    class Counting(base):
        def training_step(self, model, inputs, *args, **kwargs):
            # padding-free batches have no attention mask: one flattened row of real tokens
            mask = inputs.get("attention_mask")
            tokens.append(int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel()))
            return super().training_step(model, inputs, *args, **kwargs)

    with tempfile.TemporaryDirectory() as out:
        trainer = Counting(model=model, args=trl_config(a, out, a.task, trl_extra(a, best)),
                           train_dataset=Dataset.from_list(rows), processing_class=tok)
        clock = StepClock()
        trainer.train()
    return clock.result(tokens, 6 * block_params(a.model_dir), a.warmup_steps, mem)


def run_check(a: argparse.Namespace) -> dict:
    """One batch, both sides: the same loss and the same token ids (SFT: targets too)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardTrainer, SFTTrainer

    rows = [json.loads(x) for x in Path(a.data).read_text().splitlines()][:a.batch_size]
    tok = AutoTokenizer.from_pretrained(a.model_dir)
    with tempfile.TemporaryDirectory() as d:
        sub = Path(d) / "batch.jsonl"
        sub.write_text("".join(json.dumps(r) + "\n" for r in rows))
        if a.task == "sft":
            model, base = AutoModelForCausalLM.from_pretrained(a.model_dir), SFTTrainer
        else:
            model, base = AutoModelForSequenceClassification.from_pretrained(a.model_dir), RewardTrainer
        trainer = base(model=model, args=trl_config(a, d + "/trl", a.task, {}), train_dataset=Dataset.from_list(rows),
                       processing_class=tok)
        batch = next(iter(trainer.get_train_dataloader()))
        trainer.model.train()
        with torch.no_grad():
            trl_loss = float(trainer.compute_loss(trainer.model, batch))
        if a.task == "sft":
            from dpolab.data.sft import collate_sft, load_sft_data, pack_examples
            from dpolab.train.sft import batch_nll

            trl_ids = sorted((r["input_ids"], [int(x != -100) for x in r["labels"]]) for r in trainer.train_dataset)
            data = load_sft_data(str(sub), tok, max_length=a.max_length, eval_fraction=0.0)
            ours_ids = sorted((e.input_ids, [int(x) for x in e.loss_mask]) for e in data.train)
            model = AutoModelForCausalLM.from_pretrained(a.model_dir)  # fresh: TRL patched its own
            with torch.no_grad():
                nll, n = batch_nll(model, collate_sft(data.train, tok.pad_token_id))
                pnll, pn = batch_nll(model, collate_sft(pack_examples(data.train, a.max_length), tok.pad_token_id))
            ours, ours_alt = float(nll / n), float(pnll / pn)
        else:
            from dpolab.data import collate_preference, load_preference_data
            from dpolab.lm.reward_model import RewardModel, load_reward_model
            from dpolab.losses.bradley_terry import bradley_terry_loss

            trl_ids = sorted((r["chosen_ids"], r["rejected_ids"]) for r in trainer.train_dataset)
            data = load_preference_data(str(sub), tok, max_length=a.max_length, max_prompt_length=a.max_length - 1,
                                        eval_fraction=0.0)
            ours_ids = sorted((p.prompt_ids + p.chosen_ids, p.prompt_ids + p.rejected_ids) for p in data.train)
            rm = RewardModel(load_reward_model(a.model_dir, tok))
            B = len(data.train)
            with torch.no_grad():
                r = rm(*(lambda b: (b.input_ids, b.attention_mask, b.position_ids))(
                    collate_preference(data.train, tok.pad_token_id)))
                ours = float(bradley_terry_loss(r[:B], r[B:], None).mean())
                # TRL's own head path (the model's pooling at the last non-pad token) on our batch
                b = collate_preference(data.train, tok.pad_token_id)
                logits = AutoModelForSequenceClassification.from_pretrained(a.model_dir)(
                    input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, 0]
                ours_alt = float(bradley_terry_loss(logits[:B], logits[B:], None).mean())
    return {"trl_loss": trl_loss, "ours_loss": ours, "ours_alt_loss": ours_alt, "same_token_ids": trl_ids == ours_ids,
            "rows": len(rows)}


SIDES = {"ours-default": lambda a: run_ours(a, False), "ours-best": lambda a: run_ours(a, True),
         "trl-default": lambda a: run_trl(a, False), "trl-best": lambda a: run_trl(a, True), "check": run_check}


# -- driver ---------------------------------------------------------------------------------------
def run_worker(a: argparse.Namespace, sides: dict) -> None:
    """In a worker subprocess: run side ``a.worker`` on ``a.threads`` threads and print its result as
    the one JSON line :func:`spawn` reads."""
    import torch

    torch.set_num_threads(a.threads)
    print(json.dumps(sides[a.worker](a)))


def worker_env(threads: int) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "TRANSFORMERS_VERBOSITY": "error", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1", "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}


def spawn(script: str, side: str, args: list[str], threads: int) -> dict:
    p = subprocess.run([sys.executable, script, "--worker", side, *args], capture_output=True, text=True,
                       env=worker_env(threads))
    if p.returncode != 0:
        raise SystemExit(f"{side} {' '.join(args)} failed:\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarise(runs: list[dict], peak_gflops: float) -> dict:
    return {"tokens_per_s": spread([r["tokens"] / r["seconds"] for r in runs]),
            "step_s": spread([statistics.median(r["step_times"]) for r in runs]),
            "peak_rss_mb": spread([r["peak_rss_mb"] for r in runs]),
            "peak_mb": spread([r["peak_mb"] for r in runs]),
            "baseline_mb": spread([r["baseline_mb"] for r in runs]),
            "mfu": spread([r["model_flops"] / r["seconds"] / 1e9 / peak_gflops for r in runs])}


def compare(o_runs: list[dict], t_runs: list[dict], peak: float) -> dict:
    """Ratios of medians, and the spread of the per-round ratios (ours run i against TRL run i)."""
    o, t = summarise(o_runs, peak), summarise(t_runs, peak)
    paired = [(x["tokens"] / x["seconds"]) / (y["tokens"] / y["seconds"]) for x, y in zip(o_runs, t_runs)]
    return {"ours": o, "trl": t,
            "speedup": o["tokens_per_s"]["median"] / t["tokens_per_s"]["median"],
            "speedup_rounds": spread(paired),
            "memory_ratio": o["peak_rss_mb"]["median"] / t["peak_rss_mb"]["median"],
            "memory_ratio_rounds": spread([x["peak_rss_mb"] / y["peak_rss_mb"] for x, y in zip(o_runs, t_runs)]),
            "over_baseline_ratio": o["peak_mb"]["median"] / t["peak_mb"]["median"]}


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def versions() -> dict:
    out = {"python": platform.python_version(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}
    for name in ("torch", "transformers", "trl", "accelerate", "datasets"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    return out


def source_state() -> dict:
    """The code measured: the commit and a digest of the uncommitted changes under src/ (the trainers
    change while others work; the digest tells two runs of different code apart)."""
    import hashlib

    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
        diff = subprocess.run(["git", "diff", "HEAD", "--", "src"], cwd=root, capture_output=True).stdout
    except OSError:
        return {}
    return {"commit": head, "src_uncommitted_sha1": hashlib.sha1(diff).hexdigest() if diff else None}


def fmt(s: dict, f: str = "{:.0f}") -> str:
    return f"{f.format(s['median'])} ({f.format(s['min'])}–{f.format(s['max'])})"


def print_row(key: str, row: dict) -> None:
    o, t = row["ours"], row["trl"]
    print(f"{key:22s} ours {fmt(o['tokens_per_s'])} tok/s, {o['peak_rss_mb']['median']:.0f} MB "
          f"(+{o['peak_mb']['median']:.0f}) | TRL {fmt(t['tokens_per_s'])} tok/s, {t['peak_rss_mb']['median']:.0f} MB "
          f"(+{t['peak_mb']['median']:.0f}) | speed x{row['speedup']:.2f} memory x{row['memory_ratio']:.2f}", flush=True)


def markdown_table(results: dict, first: str = "task") -> str:
    lines = [f"| {first} | model | comparison | ours tok/s | TRL tok/s | speed ratio | ours peak RSS MB | TRL peak RSS MB "
             "| memory ratio | ours over baseline MB | TRL over baseline MB | baselines MB (ours / TRL) | ours MFU | TRL MFU |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in results["rows"].items():
        task, model, label = key.split("/")
        o, t = r["ours"], r["trl"]
        lines.append(
            f"| {task} | {model} | {label} | {fmt(o['tokens_per_s'])} | {fmt(t['tokens_per_s'])} | "
            f"{r['speedup']:.2f}× ({r['speedup_rounds']['min']:.2f}–{r['speedup_rounds']['max']:.2f}) | "
            f"{fmt(o['peak_rss_mb'])} | {fmt(t['peak_rss_mb'])} | {r['memory_ratio']:.2f}× | "
            f"{fmt(o['peak_mb'])} | {fmt(t['peak_mb'])} | {o['baseline_mb']['median']:.0f} / "
            f"{t['baseline_mb']['median']:.0f} | {o['mfu']['median']:.1%} | {t['mfu']['median']:.1%} |")
    return "\n".join(lines)


def matmul_peak(threads: int, device: str = "cpu", precision: str = "fp32") -> float:
    """Best observed GFLOP/s of a square matmul in the run's precision: float32 2048² on the CPU (the
    DPO benchmark's measure), bfloat16 8192² on a GPU."""
    if device == "cpu" and precision == "fp32":
        return dvt.matmul_peak(threads)
    import torch

    n = 8192 if device == "cuda" else 2048
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    x, y = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(8):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        x @ y
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def add_common_args(ap: argparse.ArgumentParser, gpu_preset: bool = True,
                    dry_run_help: str | None = None) -> None:
    """Options the driver and its workers share (also used by dpo_vocab.py and kto_vs_trl.py).
    ``gpu_preset=False``: a CPU-only benchmark; ``--gpu`` is not offered and ``--device`` /
    ``--precision`` are hidden and take only ``cpu`` / ``fp32`` (its workers still receive them)."""
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--warmup-steps", type=int, default=2, help="untimed first steps of every run (fewer than "
                    "its steps)")
    ap.add_argument("--repeats", type=int, default=3, help="measured rounds (after the warm-up runs)")
    ap.add_argument("--warmup-runs", type=int, default=1, help="discarded runs of each side before the rounds")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    if gpu_preset:
        ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
        ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
        ap.add_argument("--gpu", action="store_true", help="the GPU preset (bench/gpu.sh): a Qwen2-0.5B-shaped "
                        "model, bf16, CUDA, 2 rounds, no warm-up runs")
    else:
        ap.add_argument("--device", choices=("cpu",), default="cpu", help=argparse.SUPPRESS)
        ap.add_argument("--precision", choices=("fp32",), default="fp32", help=argparse.SUPPRESS)
        ap.set_defaults(gpu=False)
    ap.add_argument("--dry-run", action="store_true", help=dry_run_help or "build the data, the tokenizer and "
                    "every side's config (with --gpu also the model config, on the meta device), print the "
                    "worker commands, run nothing")
    ap.add_argument("--workdir", help="keep the generated data and models here (default: a temporary folder)")
    ap.add_argument("--json", help="also write the results here")


def worker_args(a: argparse.Namespace) -> list[str]:
    return ["--batch-size", str(a.batch_size), "--max-length", str(a.max_length), "--warmup-steps",
            str(a.warmup_steps), "--threads", str(a.threads), "--device", a.device, "--precision", a.precision]


def gpu_dry_run_checks(a: argparse.Namespace, workdir: Path, configs) -> None:
    """What the GPU preset builds, checked on any machine: the model config instantiated on the meta
    device (parameter count), and every side's trainer config."""
    import torch
    from transformers import Qwen2ForCausalLM

    if a.gpu:  # the CPU presets' models are the small and medium Llamas the run builds
        with torch.device("meta"):
            model = Qwen2ForCausalLM(qwen_config())
        n = sum(p.numel() for p in model.parameters())
        print(f"dry run: Qwen2-0.5B-shaped model config instantiates on the meta device: {n / 1e6:.1f}M parameters")
    for name, build in configs:
        build()
        print(f"dry run: {name} config builds")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", choices=sorted(SIDES), help=argparse.SUPPRESS)
    ap.add_argument("--task", choices=("sft", "rm"), help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="defaults for a short run: small model only, one round "
                    "(options given explicitly still apply)")
    ap.add_argument("--tasks", default="sft,rm", type=dvt.name_list(("sft", "rm")), help="comma-separated, of "
                    "sft, rm (default: sft,rm)")
    ap.add_argument("--models", default="small,medium", type=dvt.name_list(MODELS),
                    help=f"comma-separated, of {', '.join(MODELS)} (default: small,medium; --gpu: its own model)")
    ap.add_argument("--trl-sft-best", choices=sorted(TRL_SFT_BEST), default="group_by_length",
                    help="which TRL speed option its 'best' SFT side uses (all with gradient checkpointing off)")
    add_common_args(ap)
    a = parse_args_with_quick(ap, {"models": "small", "repeats": 1})
    if a.worker:
        run_worker(a, SIDES)
        return
    os.environ.update({k: v for k, v in worker_env(a.threads).items() if k.startswith(("HF_", "TRANSFORMERS", "TOK"))})
    if a.gpu:
        a.tasks, a.models, a.device, a.precision = "sft", "qwen0.5b", "cuda", "bf16"
        a.repeats, a.warmup_runs, a.warmup_steps = min(a.repeats, 2), 0, 5
        STEPS.update({("sft", False): {"qwen0.5b": 30}, ("sft", True): {"qwen0.5b": 15}})
    models = a.models.split(",")
    tasks = a.tasks.split(",")
    dvt.check_timed_steps(ap, a.warmup_steps, {f"{task}{' packed' if packed else ''} {m}": n
                                               for (task, packed), per_model in STEPS.items() if task in tasks
                                               for m, n in per_model.items() if m in models})
    repeats = a.repeats
    results: dict = {"date": datetime.date.today().isoformat(), "versions": versions(), "source": source_state(),
                     "threads": a.threads,
                     "device": a.device, "precision": a.precision, "batch_size": a.batch_size,
                     "max_length": a.max_length, "repeats": repeats, "trl_sft_best": a.trl_sft_best,
                     "load_average": {"start": load_average()}, "rows": {}}
    with tempfile.TemporaryDirectory() as d:
        workdir = Path(a.workdir or d)
        workdir.mkdir(parents=True, exist_ok=True)
        setup(workdir, [] if a.dry_run else models, tasks, a.device)

        def args_for(task: str, model: str, side: str) -> list[str]:
            packed = task == "sft" and (side == "ours-best" or side == "trl-best" and a.trl_sft_best == "packing")
            data = workdir / ("sft.jsonl" if task == "sft" else "pairs.jsonl")
            return ["--task", task, "--model-dir", str(workdir / f"{model}-{'lm' if task == 'sft' else 'rm'}"),
                    "--data", str(data), "--steps", str(STEPS[(task, packed)][model]), *worker_args(a),
                    "--trl-sft-best", a.trl_sft_best]

        def sides_of(task: str) -> list[str]:
            return ["ours-default", "trl-default", "ours-best", "trl-best"] if task == "sft" else \
                ["ours-default", "trl-default", "trl-best"]

        if a.dry_run:
            configs = []
            for task in tasks:
                for side in sides_of(task):
                    ns = ap.parse_args(["--worker", side, *args_for(task, models[0], side)])
                    configs.append((f"{task} {side}", lambda ns=ns, side=side: side_config(ns, side.endswith("best"))))
                    print("would run:", sys.executable, __file__, "--worker", side, *args_for(task, models[0], side))
            gpu_dry_run_checks(a, workdir, configs)
            return

        results["checks"] = {}
        for task in tasks if a.device == "cpu" and a.precision == "fp32" else []:
            c = spawn(__file__, "check", args_for(task, models[0], "check"), a.threads)
            ok = (abs(c["trl_loss"] - c["ours_loss"]) <= 1e-4 and abs(c["trl_loss"] - c["ours_alt_loss"]) <= 1e-4
                  and c["same_token_ids"])
            results["checks"][task] = {**c, "ok": ok}
            alt = "packed" if task == "sft" else "HF pooling"
            print(f"{task} first-batch loss: TRL {c['trl_loss']:.6f}  ours {c['ours_loss']:.6f}  ours {alt} "
                  f"{c['ours_alt_loss']:.6f}  same token ids: {c['same_token_ids']}", flush=True)
            if not ok:
                raise SystemExit(f"{task} loss check FAILED: the two sides do not compute the same thing")
        peak = matmul_peak(a.threads, a.device, a.precision)
        print(f"{a.precision} matmul peak: {peak:.1f} GFLOP/s ({a.device}, {a.threads} threads)", flush=True)
        raw: dict = {}
        for task in tasks:
            sides = sides_of(task)
            for model in models:
                for _ in range(a.warmup_runs):  # warm-up runs, discarded
                    for side in sides:
                        spawn(__file__, side, args_for(task, model, side), a.threads)
                runs: dict[str, list[dict]] = {s: [] for s in sides}
                for _ in range(repeats):
                    for side in sides:
                        runs[side].append(spawn(__file__, side, args_for(task, model, side), a.threads))
                peak = max(peak, matmul_peak(a.threads, a.device, a.precision))
                raw[f"{task}/{model}"] = runs
                # "best": each side's fastest setting as measured in these rounds (ours: defaults or
                # packing, whichever was faster); "packing": ours with --packing, whatever it measured
                speed = {s: statistics.median(r["tokens"] / r["seconds"] for r in runs[s]) for s in sides}
                best_ours = max(("ours-default", "ours-best") if task == "sft" else ("ours-default",), key=speed.get)
                rows = [("defaults", "ours-default", "trl-default"), ("best", best_ours, "trl-best")]
                if task == "sft" and best_ours != "ours-best":
                    rows.append(("packing", "ours-best", "trl-best"))
                for label, ours, theirs in rows:
                    row = compare(runs[ours], runs[theirs], peak)
                    row.update(ours_side=ours, trl_side=theirs)
                    results["rows"][f"{task}/{model}/{label}"] = row
                    print_row(f"{task}/{model}/{label}", row)
                results["load_average"][f"{task}/{model}"] = load_average()
    for key, row in results["rows"].items():  # every MFU against the best peak of the whole run
        runs = raw["/".join(key.split("/")[:2])]
        row.update(compare(runs[row["ours_side"]], runs[row["trl_side"]], peak))
    results["matmul_peak_gflops"] = peak
    results["runs"] = raw
    finish(a, results, peak, markdown_table(results))


def finish(a: argparse.Namespace, results: dict, peak: float, table: str) -> None:
    """The run's closing lines: the matmul peak, the load average, the table; the JSON where asked."""
    results["load_average"]["end"] = load_average()
    print(f"{a.precision} matmul peak (best of the run): {peak:.1f} GFLOP/s; load average {results['load_average']}")
    print(table)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
