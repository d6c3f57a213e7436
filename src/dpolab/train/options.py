"""Option groups shared by the language-model trainers (dpo, sft, rm, ppo).

Each trainer's config dataclass inherits the groups it implements and declares its own fields; a
field redeclared in a subclass (e.g. a different default learning rate) replaces the group's.
``dpolab.config`` lists a command's own options first in ``--help``, then the groups.
"""

from __future__ import annotations

from dataclasses import dataclass

from dpolab.config import opt


@dataclass
class OptimizerOptions:
    learning_rate: float = opt(1e-5, "peak learning rate")
    optimizer: str = opt("adamw", "optimizer", choices=("adamw", "rmsprop", "sgd"))
    weight_decay: float = opt(0.0, "weight decay")
    lr_scheduler: str = opt("linear", "learning-rate schedule after warmup", choices=("constant", "linear", "cosine"))
    warmup_steps: int = opt(0, "linear warmup steps")
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0 disables)")
    max_steps: int = opt(-1, "optimizer steps (overrides --epochs when > 0)")
    epochs: float = opt(1.0, "passes over the training data")


@dataclass
class BatchOptions:
    batch_size: int = opt(8, "examples (preference pairs, or packed rows) per micro-batch, per process")
    eval_batch_size: int | None = opt(None, "examples per evaluation batch (default: --batch-size)")
    grad_accum: int = opt(1, "micro-batches per optimizer step (the loss is averaged over all of them)")
    group_by_length: bool = opt(True, "length-bucketed optimizer steps (seeded, resumable): less padding, still "
                                "shuffled; --no-group-by-length for uniformly random batches")


@dataclass
class LoraOptions:
    lora: bool = opt(False, "train LoRA adapters (peft) instead of all weights; final/ holds the merged model")
    lora_r: int = opt(16, "LoRA rank")
    lora_alpha: int = opt(32, "LoRA alpha")
    lora_dropout: float = opt(0.0, "LoRA dropout")
    lora_target_modules: str = opt("all-linear", "comma-separated module names, or all-linear")


@dataclass
class ModelOptions:
    dtype: str = opt("auto", "weight dtype when loading", choices=("auto", "float32", "bfloat16", "float16"))
    mixed_precision: str = opt("no", "accelerate mixed precision", choices=("no", "bf16", "fp16"))
    trust_remote_code: bool = opt(False, "allow model code from the hub (off unless you trust it)")


@dataclass
class RunOptions:
    logging_steps: int = opt(10, "log metrics every N optimizer steps")
    eval_steps: int = opt(0, "evaluate every N steps (0: only at the end)")
    save_steps: int = opt(0, "checkpoint every N steps (0: only at the end)")
    save_total_limit: int = opt(2, "keep the newest N checkpoints")
    seed: int = opt(0, "random seed (data split and order, sampling, dropout, new heads)")
    resume: str | None = opt(None, "continue from a checkpoint: a path or 'latest' (in --output-dir)")
    skip_nonfinite: bool = opt(False, "skip steps whose loss or gradient is NaN/inf (counted) instead of stopping")
    dry_run: bool = opt(False, "validate data and config, print a summary, do not train")
    progress: bool = opt(True, "show a progress bar")
