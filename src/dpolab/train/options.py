"""Option groups shared by the language-model trainers, and the checks they share.

Each trainer's config dataclass inherits the groups it implements and declares its own fields; a
field redeclared in a subclass (e.g. a different default learning rate) replaces the group's.
``dpolab.config`` lists a command's own options first in ``--help``, then the groups.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from dpolab.config import opt
from dpolab.errors import ConfigError


@dataclass
class OptimizerOptions:
    learning_rate: float = opt(1e-5, "peak learning rate")
    optimizer: str = opt("adamw", "optimizer", choices=("adamw", "rmsprop", "sgd"))
    weight_decay: float = opt(0.0, "weight decay")
    lr_scheduler: str = opt("linear", "learning-rate schedule after warmup", choices=("constant", "linear", "cosine"))
    warmup_steps: int = opt(0, "linear warmup, in optimizer steps")
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0 disables)")
    max_steps: int = opt(-1, "optimizer steps (overrides --epochs when > 0)")
    epochs: float = opt(1.0, "passes over the training data")

    READ_ONLY_WITH = {"epochs": (lambda cfg: cfg.max_steps <= 0, "--max-steps unset")}


# what --micro-batch-tokens does, offline and on-policy (dpolab.train.memory)
_TOKEN_BUDGET_HELP = ("(same gradient, less activation memory); unset: activations about the size of the "
                      "transformer blocks' weights, at least 32 MiB, none with --gradient-checkpointing; "
                      "0: never split")


@dataclass
class BatchOptions:
    batch_size: int = opt(8, "examples (preference pairs, or packed rows) per micro-batch, per process")
    eval_batch_size: int | None = opt(None, "examples per evaluation batch (default: --batch-size)")
    grad_accum: int = opt(1, "micro-batches per optimizer step (the loss is averaged over all of them)")
    group_by_length: bool = opt(True, "length-bucketed optimizer steps (seeded, resumable): less padding, still "
                                "shuffled; --no-group-by-length for uniformly random steps")
    micro_batch_tokens: int | None = opt(None, "split each micro-batch into forward/backward passes of at most this "
                                         "many padded tokens " + _TOKEN_BUDGET_HELP)


@dataclass
class LoraOptions:
    lora: bool = opt(False, "train LoRA adapters (peft) instead of all weights; final/ holds the merged model")
    lora_r: int = opt(16, "LoRA rank")
    lora_alpha: int = opt(32, "LoRA alpha")
    lora_dropout: float = opt(0.0, "LoRA dropout")
    lora_target_modules: str = opt("all-linear", "comma-separated module names, or all-linear", items=True)

    READ_ONLY_WITH = {name: (lambda cfg: cfg.lora, "--lora")
                      for name in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")}


@dataclass
class ModelOptions:
    dtype: str = opt("auto", "weight dtype when loading", choices=("auto", "float32", "bfloat16", "float16"))
    mixed_precision: str | None = opt(None, "accelerate mixed precision (unset: what accelerate launch was given, "
                                      "by --mixed_precision or its config file, else no)", choices=("no", "bf16", "fp16"))
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
    report_to: str = opt("none", "also log to experiment trackers: tensorboard, wandb, mlflow, a comma-separated "
                         "list, or none (pip install 'dpolab[tracking]')", items=True)


@dataclass
class SplitOptions:
    """Which split of a hub dataset or ``save_to_disk`` DatasetDict to read (a file has only one)."""

    data_split: str = opt("train", "split of --data to read when it is a hub dataset or a save_to_disk DatasetDict "
                          "(e.g. train_prefs)")
    eval_split: str | None = opt(None, "split of --eval-data to read when it is a hub dataset, a DatasetDict or a "
                                 "folder of split files (default: test); given without --eval-data, --data's "
                                 "split of that name is the evaluation data")


def resolve_eval_split(cfg) -> None:
    """``--eval-split`` alone names a split of ``--data`` (it was ignored silently: the evaluation
    held out ``--eval-fraction`` of the training split); unset, ``--eval-data``'s split is ``test``
    (:func:`eval_split_of`). A file's ``test`` is let be: the config.yaml of runs before this wrote it.
    A ``--data-split`` other than ``train`` for a file is refused (it trained on the whole file)."""
    data_is_file = Path(cfg.data).expanduser().is_file()
    if cfg.data_split != "train" and data_is_file:
        raise ConfigError(f"--data-split {cfg.data_split}: --data {cfg.data} is a file, which has no splits; "
                          "give the file of that split as --data")
    if cfg.eval_split is not None and not cfg.eval_data:
        if cfg.eval_split == cfg.data_split:
            raise ConfigError(f"--eval-split {cfg.eval_split} is the training split (--data-split): give another "
                              "split, or --eval-data")
        if data_is_file:
            if cfg.eval_split == "test":  # the config.yaml of runs before the default was unset wrote it
                if os.environ.get("RANK", "0") == "0":
                    print(f"note: --eval-split test: --data {cfg.data} is a file, which has no splits; the "
                          "evaluation holds out --eval-fraction of its rows (--eval-data FILE names others)",
                          file=sys.stderr)
                return
            raise ConfigError(f"--eval-split {cfg.eval_split}: --data {cfg.data} is a file, which has no splits; "
                              "give the evaluation rows as --eval-data FILE")
        cfg.eval_data = cfg.data  # resolved here: config.yaml and the reference cache key see it


def eval_split_of(cfg) -> str:
    """The split of ``--eval-data`` to read."""
    return cfg.eval_split or "test"


@dataclass
class TrainerOptions(RunOptions, ModelOptions, LoraOptions, BatchOptions, OptimizerOptions, SplitOptions):
    """Every option group of an offline LM trainer (SFT, DPO, KTO): run, model, LoRA, batch, optimizer,
    data splits."""


@dataclass
class PreferenceLossOptions:
    """The DPO family's loss and its options (``dpolab dpo``, ``dpolab online-dpo``)."""

    loss: str = opt("sigmoid", "preference loss (docs/dpo.md lists them: sigmoid = DPO, ipo, hinge, robust, simpo, "
                    "orpo, cpo, exo_pair, nca_pair, bco_pair, sppo_hard, aot, apo_zero, discopop, ...), or a "
                    "comma-separated combination 'a,b' summed with --loss-weights")
    loss_weights: list[float] | None = opt(None, "weights of a --loss combination, comma separated (default: all 1)")
    beta: float | None = opt(None, "β: strength of the KL constraint / implicit-reward scale (unset: the loss's "
                             "own default, 0.1 for most; SimPO 2.0, DiscoPOP 0.05)")
    label_smoothing: float | None = opt(None, "ε: assumed label-noise rate (cDPO for sigmoid, robust DPO, AOT, EXO; "
                                        "unset: the loss's default, 0 or EXO's 1e-3)")
    simpo_gamma: float | None = opt(None, "SimPO target reward margin γ (unset: SimPO's default, 1.0)")
    discopop_tau: float | None = opt(None, "DiscoPOP temperature τ (unset: the paper's 0.05)")
    orpo_lambda: float | None = opt(None, "ORPO's weight λ of the odds-ratio term (unset: 0.1)")
    cpo_alpha: float | None = opt(None, "CPO's weight α of the NLL term (unset: 1.0)")
    rpo_alpha: float | None = opt(None, "weight of an NLL term on chosen responses (RPO); off when unset")
    wpo: bool = opt(False, "weight each pair by WPO's on-policy probability of its responses (arXiv 2406.11827)")

    @property
    def losses(self) -> list[str]:
        return [n.strip() for n in self.loss.split(",") if n.strip()]


def check_loss_options(cfg) -> None:
    """``--loss`` (one name or a combination ``a,b`` with ``--loss-weights``) against the registry, and
    the options the chosen losses read: an unknown name names the closest one; an option no chosen
    loss reads is refused rather than silently ignored; ``beta`` is resolved to the (first) loss's
    own default when one loss is given, so the saved config says what ran."""
    from dpolab.losses.dpo import LOSS_OPTIONS, LOSS_REGISTRY, loss_defaults

    names = cfg.losses
    if not names:
        raise ConfigError("--loss needs at least one loss name")
    for name in names:
        if name not in LOSS_REGISTRY:
            from dpolab.config import suggest

            raise ConfigError(f"--loss: unknown loss '{name}'{suggest(name, list(LOSS_REGISTRY))}; choose from "
                              f"{', '.join(LOSS_REGISTRY)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"--loss names a loss twice: {cfg.loss}")
    weights = cfg.loss_weights
    if weights is not None and (len(weights) != len(names) or any(w < 0 for w in weights)):
        raise ConfigError(f"--loss-weights needs one weight >= 0 per loss of --loss ({len(names)}), got {weights}")
    reads = {k for n in names for k in LOSS_REGISTRY[n].options}
    for key in LOSS_OPTIONS:
        if getattr(cfg, key, None) is not None and key not in reads:
            raise ConfigError(f"--{key.replace('_', '-')} is not read by --loss {cfg.loss}")
    if cfg.beta is None and len(names) == 1 and "beta" in reads:  # a combination: each term its own default
        cfg.beta = loss_defaults(names[0])["beta"]
    if cfg.beta is not None and cfg.beta <= 0:
        raise ConfigError("--beta must be > 0")
    _probe_loss(cfg)


def check_unused_reference(cfg) -> None:
    """``dpolab dpo``: a reference option with losses that read no reference is refused, not ignored
    (online DPO keeps its reference for ``eval/kl`` whatever the loss)."""
    from dpolab.losses.dpo import needs_reference

    if not any(needs_reference(n) for n in cfg.losses):
        for flag in ("ref_model", "ref_update_steps", "ref_cache_dir"):  # (--ref-update-alpha: in DPOConfig)
            if getattr(cfg, flag, None):
                raise ConfigError(f"--{flag.replace('_', '-')} is not used by --loss {cfg.loss}, which needs no "
                                  "reference model")


def model_positions(model: str, trust_remote_code: bool) -> int | None:
    """``max_position_embeddings`` of ``model``'s config, read before any weights load; None where it
    has none or the config cannot be read (the model load reports that)."""
    from transformers import AutoConfig

    try:
        return getattr(AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code),
                       "max_position_embeddings", None)
    except (OSError, ValueError):
        return None


def check_positions(cfg, longest: int) -> None:
    """Rows of up to ``longest`` tokens within ``--model``'s positions (:func:`model_positions`): an
    IndexError deep in the forward at step 1 otherwise."""
    limit = model_positions(cfg.model, cfg.trust_remote_code)
    if limit is not None and longest > limit:
        raise ConfigError(f"rows of up to {longest} tokens (--max-length {cfg.max_length}) exceed the {limit} positions "
                          f"of {cfg.model}: give --max-length {limit} or less")


def check_pair_positions(cfg, data) -> None:
    """:func:`check_positions` for the longest pair (prompt and the longer response) of ``data``."""
    from dpolab.data.batching import pair_lengths

    check_positions(cfg, max(pair_lengths([*data.train, *data.eval])))


def check_ref_cache_dir(cfg) -> None:
    """``--ref-cache-dir`` is read by the precompute only: refused, not ignored, with a live reference."""
    if cfg.ref_cache_dir and not cfg.precompute_ref:
        raise ConfigError("--ref-cache-dir is read only when reference log-probs are precomputed; "
                          "--no-precompute-ref runs a live reference and caches nothing: drop one of them")


def _probe_loss(cfg) -> None:
    """Each loss checks its own options' ranges (EXO's ε in (0, 0.5], robust DPO's in [0, 0.5), λ, τ,
    α ...) when it runs: checked here, so that a bad value is a ConfigError naming the flag before
    anything loads, not a traceback at the first step."""
    import re

    from dpolab.losses.dpo import LOSS_OPTIONS, validate_loss_options

    try:
        validate_loss_options(cfg.losses, rpo_alpha=cfg.rpo_alpha,
                              **{k: getattr(cfg, k) for k in LOSS_OPTIONS if k != "bco_delta"})
    except ValueError as err:
        flags = "|".join((*LOSS_OPTIONS, "rpo_alpha"))
        text = re.sub(rf"\b({flags})\b", lambda m: "--" + m.group(1).replace("_", "-"), str(err))
        raise ConfigError(f"--loss {cfg.loss}: {text}") from None


def validate_common(cfg, *, data_what: str = "a data file, folder or hub name") -> None:
    """The checks every LM trainer's options share: ``--model`` and ``--data`` given, counts >= 1,
    fractions in range, the prompt shorter than the whole. Each trainer's ``validate`` calls it first."""
    if not cfg.model:
        raise ConfigError("--model is required (a Hugging Face name or a local folder)")
    if not cfg.data:
        raise ConfigError(f"--data is required ({data_what})")
    resolve_eval_split(cfg)
    for name in ("batch_size", "grad_accum", "logging_steps", "save_total_limit", "max_length",
                 "max_prompt_length", "eval_batch_size"):
        value = getattr(cfg, name, None)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
    if getattr(cfg, "max_length", None) and hasattr(cfg, "max_prompt_length") and cfg.max_prompt_length is None:
        cfg.max_prompt_length = max(cfg.max_length // 2, 1)  # resolved here: config.yaml and cache keys see it
    max_prompt, max_len = getattr(cfg, "max_prompt_length", None), getattr(cfg, "max_length", None)
    if max_prompt is not None and max_len is not None and max_prompt >= max_len:
        raise ConfigError("--max-prompt-length must be smaller than --max-length")
    if not 0 <= getattr(cfg, "eval_fraction", 0.0) < 1:
        raise ConfigError("--eval-fraction must be in [0, 1)")
    validate_run_numbers(cfg)
    check_model_folders(cfg)


def check_model_folders(cfg) -> None:
    """The model options other than ``--model`` (whose tokenizer loads first, in a dry run too) that
    name a local path: an existing model folder, said before any work (also by ``--dry-run``; torch is
    not imported for it, so a bad option value is answered as fast as --help)."""
    from dpolab.hub import check_local_folder

    for name in ("ref_model", "value_model", "reward_model"):
        value = getattr(cfg, name, None)
        for path in ([value] if isinstance(value, str) else value or []):
            check_local_folder(path, f"--{name.replace('_', '-')}", ("config.json", "adapter_config.json"))


def validate_run_numbers(cfg) -> None:
    """The optimizer, schedule, checkpoint, token-budget and LoRA numbers every LM trainer has, each
    in its range (caught here with the option's name rather than by torch or peft mid-start)."""
    import math

    if (getattr(cfg, "micro_batch_tokens", None) or 0) < 0:
        raise ConfigError("--micro-batch-tokens must be >= 0 (0: never split a micro-batch)")

    for name in ("learning_rate", "weight_decay", "max_grad_norm", "warmup_steps", "eval_steps", "save_steps"):
        value = getattr(cfg, name, None)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
    epochs = getattr(cfg, "epochs", None)
    if epochs is not None and (getattr(cfg, "max_steps", 0) or 0) <= 0 and not (math.isfinite(epochs) and epochs > 0):
        raise ConfigError(f"--epochs must be > 0 (or give --max-steps N), got {epochs}")
    if getattr(cfg, "lora", False):
        if cfg.lora_r < 1 or cfg.lora_alpha <= 0:
            raise ConfigError(f"--lora-r must be >= 1 and --lora-alpha > 0, got {cfg.lora_r} and {cfg.lora_alpha}")
        if not 0 <= cfg.lora_dropout < 1:
            raise ConfigError(f"--lora-dropout must be in [0, 1), got {cfg.lora_dropout}")


def validate_sampling(cfg, *, greedy: bool) -> None:
    """--temperature, --top-p and --top-k, each named with its value (NaN included). ``greedy``: a
    temperature of 0 is allowed (generate and eval); a trainer samples from its policy, so it needs > 0."""
    import math

    t = cfg.temperature
    if not math.isfinite(t) or t < 0 or (t == 0 and not greedy):
        need = ">= 0 (0: greedy)" if greedy else "> 0 (the trainer samples from its policy)"
        raise ConfigError(f"--temperature must be a finite number {need}, got {t}")
    if not 0 < cfg.top_p <= 1:  # NaN fails this too
        raise ConfigError(f"--top-p must be in (0, 1], got {cfg.top_p}")
    if cfg.top_k < 0:
        raise ConfigError(f"--top-k must be >= 0 (0: off), got {cfg.top_k}")


# -- on-policy trainers (ppo; grpo, rloo and online dpo share them) ----------------------------------
@dataclass
class PromptOptions(SplitOptions):
    data: str = opt("", "prompt data: file, save_to_disk folder or hub name (required)")
    eval_data: str | None = opt(None, "evaluation prompts (default: --eval-prompts of the training prompts)")
    eval_prompts: int = opt(64, "how many prompts to evaluate on (0: skip evaluation)")
    max_prompt_length: int = opt(128, "maximum prompt tokens (longer prompts keep their end)")
    log_samples: int = opt(4, "completions per logging step written to samples.jsonl (and 2 printed)")

    READ_ONLY_WITH = {name: (lambda cfg: cfg.eval_prompts > 0, "--eval-prompts above 0")
                      for name in ("eval_data", "eval_steps")}


@dataclass
class SamplingOptions:
    max_new_tokens: int = opt(32, "maximum response tokens (a response without EOS is truncated)")
    # online DPO redeclares it: its loss reads untempered log-probs
    temperature: float = opt(1.0, "sampling temperature (the log-probs of the update, of the KL to the reference "
                             "and of eval/kl use the same tempered logits)")
    top_k: int = opt(0, "sample from the k most likely tokens only (0: off)")
    top_p: float = opt(1.0, "nucleus sampling mass (1: off)")
    direct_decoder: bool = opt(True, "sample through dpolab's KV-cache decoder where it computes the model exactly "
                               "(Llama, Mistral, Qwen2, Qwen3; others use the model's forward anyway); "
                               "--no-direct-decoder: always the model's own forward")


@dataclass
class RewardOptions:
    reward_model: list[str] | None = opt(None, "reward model folder(s) (dpolab rm output) scoring (prompt, completion), "
                                         "comma separated or the option repeated")
    reward: list[str] | None = opt(None, "Python reward(s) 'module:function' or 'file.py:function', comma separated or "
                                   "the option repeated: f(prompts, completions, [column, ...]) -> list[float]; a "
                                   "parameter named like a field of the prompt rows (e.g. answer) receives that field")
    reward_weights: list[float] | None = opt(None, "weights of the rewards, --reward ones first, then --reward-model "
                                             "(default: all 1); the score is their weighted sum")


@dataclass
class OnPolicyOptions(RunOptions, PromptOptions, SamplingOptions, RewardOptions, ModelOptions, LoraOptions,
                      OptimizerOptions):
    """Every option group of an on-policy trainer (PPO, GRPO, RLOO, online DPO), with the defaults they
    share: a constant learning rate, and metrics (with sample completions) at every step."""

    max_steps: int = opt(-1, "steps, each sampling completions then training on them (with one optimizer step or "
                         "more); overrides --epochs when > 0")
    epochs: float = opt(1.0, "passes over the prompts")
    lr_scheduler: str = opt("constant", "learning-rate schedule after warmup", choices=("constant", "linear", "cosine"))
    logging_steps: int = opt(1, "log metrics (and sample completions) every N steps")
    gradient_checkpointing: bool = opt(False, "trade compute for memory")
    # the policy stays in eval mode (OnPolicy.train_mode): no dropout runs, whatever the options say
    lora_dropout: float = opt(0.0, "LoRA dropout: no effect here, the on-policy trainers keep the policy in eval mode "
                              "(dropout off throughout)")
    seed: int = opt(0, "random seed (prompt order, sampling and a step's other draws, the evaluation prompts and "
                    "their draws, new heads)")
    micro_batch_tokens: int | None = opt(None, "split each training pass further into passes of at most this many "
                                         "padded tokens " + _TOKEN_BUDGET_HELP)


def validate_rewards(cfg) -> None:
    """``--reward``/``--reward-model`` given (as lists; several are summed) and ``--reward-weights``
    one per reward."""
    for name in ("reward", "reward_model"):
        if isinstance(getattr(cfg, name), str):  # a config built in Python with one string
            setattr(cfg, name, [getattr(cfg, name)])
    given = len(cfg.reward or []) + len(cfg.reward_model or [])
    if given == 0:
        raise ConfigError("give --reward module:function and/or --reward-model DIR (several: comma separated)")
    if cfg.reward_weights is not None and len(cfg.reward_weights) != given:
        raise ConfigError(f"--reward-weights: {len(cfg.reward_weights)} weights for {given} rewards")


def validate_on_policy(cfg) -> None:
    """Checks of the prompt, sampling and reward options (an on-policy trainer's ``validate`` calls it)."""
    if not cfg.model:
        raise ConfigError("--model is required (a Hugging Face name or a local folder)")
    if not cfg.data:
        raise ConfigError("--data is required (prompts with a 'prompt' or 'messages' field)")
    resolve_eval_split(cfg)
    validate_rewards(cfg)
    for name in ("max_prompt_length", "max_new_tokens", "logging_steps", "save_total_limit"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
    validate_sampling(cfg, greedy=False)
    if cfg.eval_prompts < 0 or cfg.log_samples < 0:
        raise ConfigError("--eval-prompts and --log-samples must be >= 0")
    validate_run_numbers(cfg)
    check_model_folders(cfg)


@dataclass
class GroupOptions:
    """Sampling ``k`` completions per prompt and optimizing over them (GRPO, RLOO, online DPO)."""

    prompts_per_step: int = opt(8, "prompts per step, per process (each sampled --num-generations times)")
    num_generations: int = opt(8, "completions sampled per prompt (the group)")
    num_iterations: int = opt(1, "μ: optimization passes over each step's completions")
    mini_batches: int = opt(1, "optimizer steps per pass (the completions split into this many mini-batches)")
    micro_batch_size: int = opt(16, "completions per forward/backward pass (same gradient, less memory)")
    mask_truncated_completions: bool = opt(False, "leave completions cut at --max-new-tokens (no EOS) out of the loss")
    missing_eos_penalty: float | None = opt(None, "subtract this from the score of completions without EOS")


@dataclass
class PromptSharingOptions:
    """Running each group's prompt once in the log-prob passes (GRPO, RLOO)."""

    prefix_sharing: bool | None = opt(None, "run each prompt once in the log-prob passes, its key/value cache shared "
                                      "by its completions; unset: on when a check at the start shows the model "
                                      "gives the same log-probs that way (off with --gradient-checkpointing)")


def require_positive(cfg, *names: str) -> None:
    """Each option ``names`` must be >= 1."""
    for name in names:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")


def validate_groups(cfg) -> None:
    require_positive(cfg, "prompts_per_step", "num_generations", "num_iterations", "mini_batches", "micro_batch_size")
    completions = cfg.prompts_per_step * cfg.num_generations
    if cfg.mini_batches > completions:  # the extra optimizer steps were empty, advancing the schedule only
        raise ConfigError(f"--mini-batches {cfg.mini_batches} is more than a step's {completions} completions per "
                          "process (--prompts-per-step × --num-generations): some optimizer steps would be empty")
