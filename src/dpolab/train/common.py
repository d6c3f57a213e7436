"""Pieces every language-model trainer shares: loading models and tokenizers, optimisers and
schedules, the seeded batch order, checkpoints, signal handling and the non-finite guard.

Kept free of algorithm logic: each ``train/<algo>.py`` reads top to bottom as its own loop.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dpolab.errors import DpolabError, NonFiniteError
from dpolab.rundir import RunDir, rng_state, set_rng_state

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# -- models and tokenizers ----------------------------------------------------------------------
def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False):
    """``AutoTokenizer.from_pretrained``; a missing pad token falls back to EOS."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise DpolabError(f"cannot load tokenizer '{name_or_path}': {_first_line(err)}") from None
    if tok.eos_token is None:
        raise DpolabError(f"tokenizer '{name_or_path}' has no EOS token; responses need one")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(name_or_path: str, *, dtype: str = "auto", trust_remote_code: bool = False):
    """``AutoModelForCausalLM.from_pretrained`` with safetensors weights only (no pickle)."""
    from transformers import AutoModelForCausalLM

    return _load(AutoModelForCausalLM, name_or_path, dtype=dtype, trust_remote_code=trust_remote_code)


def _load(auto_cls, name_or_path: str, *, dtype: str, trust_remote_code: bool, **kwargs):
    import transformers

    if dtype not in DTYPES:
        raise DpolabError(f"unknown dtype '{dtype}'; choose from {list(DTYPES)}")
    major = int(transformers.__version__.split(".")[0])
    dtype_kw = "dtype" if major >= 5 else "torch_dtype"
    if DTYPES[dtype] is not None:
        kwargs[dtype_kw] = DTYPES[dtype]
    try:
        return auto_cls.from_pretrained(name_or_path, trust_remote_code=trust_remote_code,
                                        use_safetensors=_has_safetensors(name_or_path), **kwargs)
    except (OSError, ValueError) as err:
        raise DpolabError(f"cannot load model '{name_or_path}': {_first_line(err)}") from None


def _has_safetensors(name_or_path: str) -> bool | None:
    """Local folders must hold safetensors weights (never unpickle a .bin); hub names: prefer them."""
    path = Path(name_or_path)
    if path.is_dir():
        if any(path.glob("*.safetensors")):
            return True
        if any(path.glob("*.bin")):
            raise DpolabError(f"{path}: only pickle (.bin) weights found; dpolab loads safetensors only. "
                              "Convert with `model.save_pretrained(dir, safe_serialization=True)`.")
    return None


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def model_fingerprint(name_or_path: str) -> str:
    """A cheap identity of a model for cache keys: weight-file names, sizes and mtimes, or the name."""
    import hashlib

    h = hashlib.sha256(str(name_or_path).encode())
    path = Path(name_or_path)
    if path.is_dir():
        for f in sorted(path.glob("*")):
            if f.is_file() and f.suffix in (".safetensors", ".json"):
                st = f.stat()
                h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def load_trainable_lm(cfg):
    """The policy a trainer fine-tunes: ``--model`` loaded, gradient checkpointing and LoRA applied as
    configured (``cfg`` has the model and LoRA option groups of ``dpolab.train.options``)."""
    model = load_causal_lm(cfg.model, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if cfg.lora:
        model = apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                           target_modules=cfg.lora_target_modules)
    return model


def dry_run_report(cfg, report: dict) -> dict:
    """``--dry-run``: print the data report and resolved config; return the summary a run returns
    instead of training (numeric report entries as ``data/...``)."""
    print(json.dumps({"data": report, "config": vars(cfg)}, indent=2))
    return {"dry_run": True, **{f"data/{k}": v for k, v in report.items() if isinstance(v, (int, float))}}


def apply_lora(model, *, r: int, alpha: int, dropout: float, target_modules: str):
    """Wrap ``model`` with LoRA adapters (peft). The reference is then the base with adapters off."""
    from peft import LoraConfig, get_peft_model

    targets: Any = target_modules if target_modules == "all-linear" else [
        t.strip() for t in target_modules.split(",") if t.strip()]
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


# -- optimisation -------------------------------------------------------------------------------
def make_optimizer(params, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if name == "adamw":
        # The fused kernel does the whole update in one pass (3.3 ms vs 15.6 ms per step on the
        # benchmark's 3M model, docs/performance.md); builds or devices without it use the default.
        try:
            return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
        except (RuntimeError, TypeError, ValueError):
            return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    raise DpolabError(f"unknown optimizer '{name}'; choose from adamw, rmsprop, sgd")


def make_scheduler(optimizer, name: str, warmup_steps: int, total_steps: int):
    """Linear warmup to the base rate, then constant, linear decay to 0, or cosine decay to 0."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if name == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        if name == "linear":
            return 1.0 - progress
        if name == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        raise DpolabError(f"unknown lr scheduler '{name}'; choose from constant, linear, cosine")

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# -- data order ---------------------------------------------------------------------------------
@dataclass
class BatchOrder:
    """A seeded, resumable order of micro-batches over epochs.

    Epoch ``e`` shuffles ``n`` rows with ``seed + e``; micro-batch ``k`` of the whole run is the
    ``k``-th chunk of ``batch_size * world_size`` rows, and process ``rank`` takes its slice, so the
    order depends only on (seed, k): resuming at micro-batch k reproduces the rest of the run exactly.
    The last chunk of an epoch may be smaller (never dropped).
    """

    n: int
    batch_size: int
    seed: int
    shuffle: bool = True
    world_size: int = 1
    rank: int = 0

    @property
    def per_epoch(self) -> int:
        return max(1, math.ceil(self.n / (self.batch_size * self.world_size)))

    def epoch_perm(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def global_size(self, k: int) -> int:
        """Rows in micro-batch ``k`` summed over all processes (the loss normaliser of an exact
        multi-process step; needs no communication)."""
        j = k % self.per_epoch
        global_bs = self.batch_size * self.world_size
        return max(0, min(global_bs, self.n - j * global_bs))

    def global_rows(self, k: int) -> list[int]:
        """The rows of micro-batch ``k`` over all processes (rank ``r`` takes its ``r``-th slice)."""
        epoch, j = divmod(k, self.per_epoch)
        global_bs = self.batch_size * self.world_size
        return self.epoch_perm(epoch)[j * global_bs:(j + 1) * global_bs]

    def iterate(self, start: int = 0) -> Iterator[tuple[int, list[int]]]:
        """Yield (micro_batch_number, row indices) forever, starting at micro-batch ``start``."""
        k = start
        while True:
            chunk = self.global_rows(k)
            per = math.ceil(len(chunk) / self.world_size)
            yield k, chunk[self.rank * per:(self.rank + 1) * per]
            k += 1


def total_steps(max_steps: int, epochs: float, micro_batches_per_epoch: int, grad_accum: int) -> int:
    if max_steps > 0:
        return max_steps
    return max(1, math.ceil(epochs * micro_batches_per_epoch / grad_accum))


# -- guards -------------------------------------------------------------------------------------
def check_finite(value: torch.Tensor, what: str, step: int, detail: str = "") -> bool:
    """True if finite. Otherwise the caller decides: skip (with --skip-nonfinite) or raise."""
    return bool(torch.isfinite(value).all())


def nonfinite_error(what: str, step: int, detail: str) -> NonFiniteError:
    return NonFiniteError(f"non-finite {what} at step {step} ({detail}); the run stops without saving "
                          "NaN weights. Re-run with --skip-nonfinite to skip such steps, or lower the "
                          "learning rate.")


def weights_finite(model) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


class StopSignal:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, checkpoints and exits cleanly."""

    def __init__(self):
        self.received: str | None = None
        self._old: dict = {}

    def __enter__(self) -> StopSignal:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.received is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        print(f"\n{self.received} received: finishing this step, then saving a checkpoint...", file=sys.stderr)

    def agreed(self, accelerator=None) -> str | None:
        """The signal name if any process received one (all processes must stop at the same step,
        or the next collective operation would hang); ``None`` to go on."""
        if accelerator is None or accelerator.num_processes <= 1:
            return self.received
        flag = torch.tensor([1.0 if self.received else 0.0], device=accelerator.device)
        if float(accelerator.reduce(flag, reduction="sum").item()) > 0:
            return self.received or "a signal to another process"
        return None

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


# -- checkpoints --------------------------------------------------------------------------------
def write_training_state(directory: Path, *, optimizer, scheduler, state: dict[str, Any]) -> None:
    """Optimizer, scheduler, RNG states (torch tensors and plain data, loadable with
    ``torch.load(weights_only=True)``) and the JSON trainer state (counters, data position)."""
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": rng_state()}, directory / "training_state.pt")
    (directory / "trainer_state.json").write_text(json.dumps(state, indent=2), encoding="utf-8")


def read_training_state(directory: Path, *, optimizer, scheduler) -> dict[str, Any]:
    """Restore optimizer, scheduler and RNG states from a checkpoint; return the JSON trainer state.

    Only tensors and plain data are unpickled (``weights_only=True``); a damaged or foreign
    checkpoint is a :class:`DpolabError` naming the folder, never a traceback."""
    import pickle

    directory = Path(directory)
    for name in ("training_state.pt", "trainer_state.json", "model.safetensors"):
        if not (directory / name).is_file():
            raise DpolabError(f"cannot resume from {directory}: it has no {name} (not a checkpoint of this trainer)")
    try:
        blob = torch.load(directory / "training_state.pt", weights_only=True)
        state = json.loads((directory / "trainer_state.json").read_text(encoding="utf-8"))
        optimizer.load_state_dict(blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
        set_rng_state(blob["rng"])
        for key in ("step", "micro_batch", "skipped_steps", "tokens"):
            if not isinstance(state.get(key), int):
                raise ValueError(f"trainer_state.json: '{key}' missing or not an integer")
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, IndexError, EOFError,
            pickle.UnpicklingError) as err:
        raise DpolabError(f"cannot read checkpoint {directory}: {_first_line(err)}") from None
    return state


def load_checkpoint_weights(module: torch.nn.Module, directory: Path, *, partial: bool = False) -> None:
    """Load ``model.safetensors`` of a checkpoint into ``module``.

    Every stored tensor must match a parameter or buffer of ``module``; unless ``partial`` (a
    checkpoint of trainable weights only, e.g. LoRA adapters), every entry of ``module`` must be
    stored too. A checkpoint of another model is an error, never a silently half-loaded model."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(directory) / "model.safetensors"
    try:
        weights = load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise DpolabError(f"cannot read {path}: {_first_line(err)}") from None
    try:
        result = module.load_state_dict(weights, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise DpolabError(f"{path} does not fit this model: {_first_line(err)}") from None
    missing = [] if partial else _untied(module, result.missing_keys)
    if result.unexpected_keys or missing:
        bad = (result.unexpected_keys or missing)[:3]
        raise DpolabError(f"{path} does not fit this model ({'unexpected' if result.unexpected_keys else 'missing'}"
                          f" weights {bad}); was it written by a run of another model or with other --lora settings?")


def _untied(module: torch.nn.Module, missing: list[str]) -> list[str]:
    """Missing keys other than tied duplicates (a tied weight is stored once under another name)."""
    sd = module.state_dict()
    present = {sd[k].data_ptr() for k in sd if k not in missing}
    return [k for k in missing if sd[k].data_ptr() not in present]


def compare_resume_config(saved: dict[str, Any], now: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """Options that differ between a checkpoint's config and the resuming run's, as
    ``name: old -> new`` lines (options that do not change the trajectory are ignored)."""
    harmless = {"resume", "output_dir", "progress", "dry_run", "logging_steps", "eval_steps", "save_steps",
                "save_total_limit", "ref_cache_dir", *ignore}
    return [f"{k}: {saved[k]!r} -> {now.get(k)!r}" for k in sorted(saved)
            if k not in harmless and k in now and saved[k] != now[k]]


def warn_config_changes(saved: dict[str, Any], now: dict[str, Any]) -> None:
    changes = compare_resume_config(saved, now)
    if changes:
        print("warning: resuming with options that differ from the checkpoint's; the run will not equal an "
              "uninterrupted one:\n  " + "\n  ".join(changes), file=sys.stderr)


def grad_norm_(parameters, max_norm: float, accelerator=None) -> torch.Tensor:
    """The global L2 norm of the gradients, clipping them to ``max_norm`` when ``max_norm > 0``.

    Always computed (also with clipping off) so the non-finite guard sees every gradient."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.tensor(0.0)
    limit = max_norm if max_norm > 0 else float("inf")
    if accelerator is not None:
        return torch.as_tensor(accelerator.clip_grad_norm_(params, limit))
    return torch.nn.utils.clip_grad_norm_(params, limit)


def resume_hint(command: str, run: RunDir, signame: str, step: int, steps: int) -> str:
    return (f"stopped by {signame} at step {step}/{steps}; checkpoint saved. Resume with:\n"
            f"  dpolab {command} --config {run.path / 'config.yaml'} --resume latest")


def save_pretrained_atomic(model, tokenizer, target: Path, state_dict: dict | None = None) -> None:
    """Write a Hugging Face model folder under a temporary name, then rename it into place.

    ``state_dict``: the full weights when ``model``'s own are sharded (FSDP/DeepSpeed, gathered by
    :func:`dpolab.train.distributed.model_state_dict`)."""
    import shutil

    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    if state_dict is not None:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    else:
        model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def resume_run(run: RunDir, spec: str | None) -> Path | None:
    return run.resolve_checkpoint(spec) if spec else None


def mean_metrics(rows: list[dict[str, float]], weights: list[int]) -> dict[str, float]:
    """Weighted mean of metric dicts (weights = examples per row)."""
    total = sum(weights)
    keys = rows[0].keys() if rows else []
    return {k: sum(r[k] * w for r, w in zip(rows, weights)) / total for k in keys}
