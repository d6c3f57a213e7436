"""Checkpoints of the language-model trainers: weights (safetensors), optimizer, scheduler and RNG
states (``torch.load(weights_only=True)``: tensors and plain data, never code), the JSON trainer
state, and Hugging Face folders written atomically. The folder itself is made atomic by
:meth:`dpolab.runs.rundir.RunDir.save_checkpoint`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from dpolab.errors import ConfigError, DpolabError
from dpolab.runs.rundir import free_space, write_failure
from dpolab.runs.seeding import rng_state, set_rng_state


def write_training_state(directory: Path, *, optimizer, scheduler, state: dict[str, Any]) -> None:
    """Optimizer, scheduler, RNG states (torch tensors and plain data, loadable with
    ``torch.load(weights_only=True)``) and the JSON trainer state (counters, data position)."""
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": rng_state()}, directory / "training_state.pt")
    (directory / "trainer_state.json").write_text(json.dumps(state, indent=2), encoding="utf-8")


CHECKPOINT_FILES = ("model.safetensors", "training_state.pt", "trainer_state.json")


def check_checkpoint_files(directory: Path) -> None:
    """The files every LM trainer's checkpoint has (a :class:`DpolabError` naming the missing one)."""
    for name in CHECKPOINT_FILES:
        if not (Path(directory) / name).is_file():
            raise DpolabError(f"cannot resume from {directory}: it has no {name} (not a checkpoint of this trainer)")


def read_trainer_state(directory: Path, *, command: str | None = None) -> dict[str, Any]:
    """``trainer_state.json`` of a checkpoint, checked: the counters are integers, the logging window a
    list of metric rows and, when the checkpoint names the command that wrote it, that it is
    ``command`` (another trainer's optimizer and data position mean nothing here)."""
    path = Path(directory) / "trainer_state.json"
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DpolabError(f"cannot read checkpoint {path}: {_first_line(err)}") from None
    problem = None
    if not isinstance(state, dict):
        problem = f"a JSON object was expected, found {type(state).__name__}"
    else:
        for key in ("step", "micro_batch", "skipped_steps", "tokens"):
            if not isinstance(state.get(key), int) or isinstance(state.get(key), bool):
                problem = f"'{key}' missing or not an integer"
                break
        else:
            window = state.get("window", [])
            if not isinstance(window, list) or not all(isinstance(row, dict) for row in window):
                problem = "'window' is not a list of metric rows"
            elif not isinstance(state.get("tokens_window", 0), int):
                problem = "'tokens_window' is not an integer"
    if problem:
        raise DpolabError(f"cannot read checkpoint {path}: {problem}")
    written = state.get("trainer")
    if command is not None and written is not None and written != command:
        raise DpolabError(f"cannot resume from {directory}: it is a checkpoint of `dpolab {written}`, not of "
                          f"`dpolab {command}`")
    return state


def read_training_state(directory: Path, *, optimizer, scheduler, command: str | None = None) -> dict[str, Any]:
    """Restore optimizer, scheduler and RNG states from a checkpoint; return the JSON trainer state
    (:func:`read_trainer_state`).

    Only tensors and plain data are unpickled (``weights_only=True``); a damaged or foreign
    checkpoint is a :class:`DpolabError` naming the file, never a traceback."""
    import pickle

    directory = Path(directory)
    check_checkpoint_files(directory)
    state = read_trainer_state(directory, command=command)
    path = directory / "training_state.pt"
    try:
        blob = torch.load(path, weights_only=True)
        optimizer.load_state_dict(blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
        set_rng_state(blob["rng"])
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, IndexError, EOFError, AttributeError,
            pickle.UnpicklingError) as err:
        raise DpolabError(unreadable_state(path, err)) from None
    return state


def load_checkpoint_weights(module: torch.nn.Module, directory: Path, *, partial: bool = False,
                            file: str = "model.safetensors") -> None:
    """Load ``model.safetensors`` (or ``file``) of a checkpoint into ``module``.

    Every stored tensor must match a parameter or buffer of ``module``; unless ``partial`` (a
    checkpoint of trainable weights only, e.g. LoRA adapters), every entry of ``module`` must be
    stored too. A checkpoint of another model is an error, never a silently half-loaded model."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(directory) / file
    try:
        weights = load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise DpolabError(f"cannot read {path}: {_first_line(err)}") from None
    try:
        result = module.load_state_dict(weights, strict=False)
    except RuntimeError as err:  # shape mismatches: the first one named (torch lists them below its header)
        detail = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), _first_line(err))
        raise DpolabError(f"{path} does not fit this model ({detail}); was it written by a run of another model "
                          "or with other --lora settings?") from None
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


# options naming local files or folders (others may be Hub ids, which exist nowhere on disk)
PATH_OPTIONS = ("model", "ref_model", "tokenizer", "value_model", "reward_model", "reward", "data", "eval_data",
                "ref_cache_dir")


def check_relative_paths(options: dict, saved_cwd, ckpt) -> None:
    """A resume from another working directory: a relative path of the run (as typed, and so in
    config.yaml, the command a stopped run prints) names a file of the folder the run was started in;
    resolved here it may be another file, silently (another data set) or not found. Refused then."""
    if not isinstance(saved_cwd, str) or os.path.realpath(saved_cwd) == os.path.realpath(os.getcwd()):
        return
    moved = []
    for name in PATH_OPTIONS:
        values = options.get(name)
        for value in values if isinstance(values, (list, tuple)) else [values]:
            if not isinstance(value, str) or not value:
                continue
            path = value.rsplit(":", 1)[0] if name == "reward" else value  # 'file.py:function'
            if os.path.isabs(path) or not os.path.exists(os.path.join(saved_cwd, path)):
                continue
            if os.path.realpath(os.path.join(saved_cwd, path)) != os.path.realpath(path):
                moved.append(f"--{name.replace('_', '-')} {value}")
    if moved:
        raise ConfigError(f"--resume: checkpoint {ckpt} was written by a run started in {saved_cwd}, and its relative "
                          f"path{'s' if len(moved) > 1 else ''} ({', '.join(moved)}) name files there, not here: resume "
                          f"from {saved_cwd}, or give {'them' if len(moved) > 1 else 'it'} as absolute paths")


def check_resumable(cfg, ckpt, trainer_state: dict, processes: int) -> None:
    """What makes checkpoint ``ckpt`` (its ``trainer_state``) one this run cannot continue, said before
    any model loads or reference log-probs are computed (and before the folder changes): another
    process count (the data position and global batch are counted in its units), relative paths
    that name other files from this working directory, another optimizer (its state cannot be
    loaded: a KeyError after the metrics were cut back), a ``--max-steps`` behind the checkpoint (a
    run "finished" behind it; an ``--epochs`` count is checked once the steps are planned)."""
    saved = trainer_state.get("processes")
    if saved is not None and saved != processes:
        raise DpolabError(f"--resume: checkpoint {ckpt} was written by a run of {saved} process"
                          f"{'es' if saved != 1 else ''}, and this one has {processes}: resume it with {saved} (its "
                          "position in the data and its global batch are counted for that many)")
    config = trainer_state.get("config") if isinstance(trainer_state.get("config"), dict) else {}
    check_relative_paths(vars(cfg), trainer_state.get("cwd"), ckpt)
    if config.get("optimizer", cfg.optimizer) != cfg.optimizer:
        raise ConfigError(f"--resume: checkpoint {ckpt} was trained with --optimizer {config['optimizer']}, "
                          f"whose state cannot continue {cfg.optimizer}: resume with --optimizer "
                          f"{config['optimizer']}")
    if getattr(cfg, "max_steps", 0) > 0:
        check_steps_left(ckpt, trainer_state, cfg.max_steps)


def check_steps_left(ckpt, trainer_state: dict, steps: int) -> None:
    if trainer_state["step"] > steps:
        raise ConfigError(f"--resume: checkpoint {ckpt} is at step {trainer_state['step']}, past the "
                          f"{steps} steps of this run: give a --max-steps (or --epochs) beyond it, or "
                          "resume an earlier checkpoint")


def warn_config_changes(saved: dict[str, Any], now: dict[str, Any]) -> None:
    changes = compare_resume_config(saved, now)
    if changes:
        print("warning: resuming with options that differ from the checkpoint's; the run will not equal an "
              "uninterrupted one:\n  " + "\n  ".join(changes), file=sys.stderr)


def save_pretrained_atomic(model, tokenizer, target: Path, state_dict: dict | None = None, *,
                           also=None) -> None:
    """Write a Hugging Face model folder under a temporary name, then rename it into place.

    An earlier ``target`` is moved aside before the rename and removed after it, so a stop at any
    point leaves either it or the new folder whole (a temporary folder a stop leaves is removed by
    the next save). ``state_dict``: the full weights when ``model``'s own are sharded (FSDP/DeepSpeed,
    gathered by :func:`dpolab.train.distributed.model_state_dict`). ``also(folder)`` writes more files
    into the folder before the rename (LM PPO's value head), so they arrive with it."""
    import shutil

    for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by a stopped or killed save
        shutil.rmtree(stale, ignore_errors=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    try:
        if state_dict is not None:
            model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if also is not None:
            also(tmp)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if why := write_failure(err):
            raise DpolabError(f"cannot write {target}: {why}{free_space(target.parent)}") from err
        raise
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    for done in target.parent.glob(f".{target.name}.old-*"):
        shutil.rmtree(done, ignore_errors=True)


def untied(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors for safetensors, which refuses tensors sharing storage (tied
    embeddings): a tensor whose storage was already seen is cloned."""
    seen: set[int] = set()
    out = {}
    for k, v in weights.items():
        v = v.detach()
        out[k] = v.clone().contiguous().cpu() if v.data_ptr() in seen else v.contiguous().cpu()
        seen.add(v.data_ptr())
    return out


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def unreadable_state(path, err: BaseException) -> str:
    """Why a checkpoint's torch file would not load, without torch's advice to load it with
    ``weights_only=False`` (which runs whatever a pickle holds: never done here)."""
    if "weights_only" in str(err):
        return (f"cannot read checkpoint {path}: it is damaged or not a checkpoint of this trainer (only tensors "
                "and plain data are read from it, never code); resume from an earlier checkpoint")
    return f"cannot read checkpoint {path}: {_first_line(err)}"
