"""Running the LM trainers on several processes through Hugging Face accelerate (docs/scaling.md).

dpolab has no distributed layer of its own: ``accelerate launch`` (or ``torchrun``) starts the
processes and :class:`accelerate.Accelerator` wraps the model (DDP, FSDP, DeepSpeed). This module
holds the few decisions every trainer makes the same way:

* :func:`make_accelerator` builds the ``Accelerator`` and refuses set-ups that would silently run
  something else than asked (several processes that do not see each other; one process where
  several were asked; FSDP/DeepSpeed that accelerate ignored on CPU).
* Exact data parallelism: process ``r`` of ``W`` receives its slice of each global micro-batch
  (:class:`dpolab.data.batching.BatchOrder`); DDP *averages* gradients over the ``W`` processes, so a
  process backpropagates ``W * sum(local losses) / N`` with ``N`` the step's GLOBAL count of loss
  units. Then the averaged gradient is ``(1/W) * sum_r W * grad(sum_r) / N = grad(sum of all) / N``,
  the single-process gradient, also when the shards are uneven. A process whose slice is empty still
  runs forward and backward (on a stand-in row with weight 0): DDP's gradient all-reduce needs every
  process.
* Metrics are weighted sums reduced across processes (:func:`reduce_weighted`), so logged values are
  means over all examples of the step, not over one process's share.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any

import torch

from dpolab.errors import ConfigError


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


FSDP_ON_CPU = ("FSDP is not available on CPU processes: accelerate (1.15, 1.16) builds its FSDP plugin only for a "
               "GPU or other accelerator device. Use DDP on CPU (examples/accelerate/ddp_cpu.yaml), FSDP on GPUs.")


ALONE_BY_MISTAKE = ("accelerate launch was asked for several CPU processes but started ONE (accelerate starts CPU "
                    "processes only through mpirun), which would train alone with the per-process batch: launch "
                    "with --config_file examples/accelerate/ddp_cpu.yaml or torchrun --nproc_per_node N -m dpolab ...")


def single_by_mistake() -> bool:
    """``accelerate launch --cpu --num_processes N`` (N > 1) without mpirun runs one process: its
    simple launcher then sets ``MASTER_ADDR`` (done only for several processes) but no rank or
    world size, and no MPI launcher is around."""
    env = os.environ
    mpi = any(k in env for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS"))
    return (env.get("ACCELERATE_USE_CPU", "").lower() == "true" and "MASTER_ADDR" in env and "WORLD_SIZE" not in env
            and "RANK" not in env and not mpi)


def _has_accelerator_device() -> bool:
    """A GPU or another device torch knows as an accelerator (torch >= 2.6), else CUDA alone."""
    acc = getattr(torch, "accelerator", None)
    return bool(acc.is_available()) if acc is not None and hasattr(acc, "is_available") else torch.cuda.is_available()


def make_accelerator(mixed_precision: str | None = "no"):
    """An :class:`accelerate.Accelerator` for the process group the launcher started.

    ``torchrun``/``accelerate launch`` on a machine without a GPU set ``WORLD_SIZE`` > 1, but
    accelerate 1.x only forms a CPU (gloo) group when told to use the CPU; without it every process
    would train alone and they would overwrite each other's run directory. So with several
    processes and no CUDA device the CPU is selected here. Raises :class:`ConfigError` when the
    launcher asked for several processes, FSDP or DeepSpeed and accelerate did not set it up.
    ``mixed_precision=None``: the launcher's (``accelerate launch --mixed_precision`` or its config
    file set ``ACCELERATE_MIXED_PRECISION``), else "no"."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if single_by_mistake():
        raise ConfigError(ALONE_BY_MISTAKE)
    cpu = world > 1 and not torch.cuda.is_available()
    if cpu and not _env_flag("ACCELERATE_USE_CPU") and os.environ.get("RANK", "0") == "0":
        # e.g. a GPU config (examples/accelerate/ddp_gpu.yaml) on a machine without one: said, not silent
        print(f"note: no GPU found: the {world} processes run on the CPU (gloo)", file=sys.stderr)
    if _env_flag("ACCELERATE_USE_DEEPSPEED"):
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:  # accelerate's ImportError would be a traceback
            raise ConfigError("DeepSpeed was requested (ACCELERATE_USE_DEEPSPEED) but the `deepspeed` package is "
                              "not installed (it needs GPUs too); pip install deepspeed, or launch without it")
    if _env_flag("ACCELERATE_USE_FSDP") and not _has_accelerator_device():  # one process too (bench/gpu.sh's form)
        # Without a CUDA/XPU/MLU/NPU/MUSA/HPU device accelerate 1.15's FullyShardedDataParallelPlugin
        # raises "There are currently no available devices found" and 1.16's refuses
        # sync_module_states on CPU; in both the state switches to FSDP only from a multi-device
        # type, never from MULTI_CPU (checked on 1.16 with sync_module_states off: it stays MULTI_CPU).
        raise ConfigError(FSDP_ON_CPU)
    from accelerate.state import AcceleratorState

    if mixed_precision is None:
        mixed_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower() or "no"
    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != mixed_precision:
        # a second run in one process (a sweep, a notebook) with another precision: accelerate keeps
        # its state process-wide and would refuse; the process group (PartialState) is kept
        AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=cpu)
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        # accelerate runs fp16 autocast only on accelerators: on the CPU the flag silently changed nothing
        raise ConfigError("--mixed-precision fp16 needs a GPU (on the CPU it would do nothing); use bf16 or no")
    kind = accelerator.distributed_type
    if world > 1 and accelerator.num_processes != world:
        raise ConfigError(f"the launcher started {world} processes but accelerate set up {accelerator.num_processes} "
                          f"({kind}); each would train alone. Launch with `accelerate launch` or `torchrun`.")
    if _env_flag("ACCELERATE_USE_FSDP") and kind != DistributedType.FSDP:
        raise ConfigError(f"FSDP was requested but accelerate set up {kind.value}. " + FSDP_ON_CPU)
    if _env_flag("ACCELERATE_USE_DEEPSPEED") and kind != DistributedType.DEEPSPEED:
        raise ConfigError(f"DeepSpeed was requested but accelerate set up {kind.value} (DeepSpeed needs GPUs and the "
                          "`deepspeed` package).")
    return accelerator


def is_main_process() -> bool:
    """Whether this is the main process of the group the trainer ran in (True without one)."""
    from accelerate import PartialState

    return PartialState().is_main_process


def is_sharded(accelerator) -> bool:
    """True when parameters are split across processes (FSDP, DeepSpeed): gathering the weights
    and running a forward pass are then collective operations every process must join."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def prepare_reference(accelerator, ref_model: torch.nn.Module) -> torch.nn.Module:
    """A frozen reference model ready for inference in the current mode.

    Plain and DDP runs: a full copy on this process's device (no DDP wrapper: it receives no
    gradients, so there is nothing to all-reduce). FSDP/DeepSpeed: ``prepare_model(...,
    evaluation_mode=True)`` shards it like the policy, so it does not need a full copy per device.
    Under mixed precision ``prepare_model(..., evaluation_mode=True)`` too, for the policy's autocast
    forward (float32 outputs): a reference loaded apart then scores as the policy-as-reference does
    (a resume that recomputed the cache, or --ref-model, scored in float32 under one "bf16" cache key)."""
    ref_model.requires_grad_(False).eval()
    if is_sharded(accelerator) or accelerator.mixed_precision != "no":
        ref_model = accelerator.prepare_model(ref_model, evaluation_mode=True)
        ref_model.eval()
        return ref_model
    return ref_model.to(accelerator.device)


def global_sum(accelerator, values: list[float]) -> list[float]:
    """Element-wise sum of ``values`` over all processes (one all-reduce; a copy with one process)."""
    t = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes > 1:
        t = accelerator.reduce(t, reduction="sum")
    return t.cpu().tolist()


def gather_rows(accelerator, rows: list) -> list:
    """Every process's ``rows`` (picklable objects), concatenated in process order, on every process."""
    if accelerator.num_processes <= 1:
        return list(rows)
    from accelerate.utils import gather_object

    return gather_object(list(rows))


def global_max(accelerator, value: int) -> int:
    """The largest ``value`` over all processes (one all-reduce; ``value`` itself with one process)."""
    if accelerator.num_processes <= 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=accelerator.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


def reduce_weighted(accelerator, rows: list[dict[str, float]], weights: list[float],
                    sums: dict[str, float] | None = None) -> tuple[dict[str, float], float, dict[str, float]]:
    """Example-weighted means of metric rows over all processes, with extra plain sums.

    ``rows[i]`` (same keys on every process: a stand-in row with weight 0 provides them where a
    process had no data) weighs ``weights[i]`` examples. Returns ``(means, total_weight, sums)``
    where ``means[k] = sum_{procs, i} w_i * rows[i][k] / sum w_i`` (empty when the total weight is
    0) and ``sums`` holds each extra value summed over processes. One all-reduce."""
    sums = dict(sums or {})
    keys = list(rows[0]) if rows else []
    vec = [sum(w * r[k] for r, w in zip(rows, weights) if w) for k in keys]
    vec += [float(sum(weights))] + [float(v) for v in sums.values()]
    out = global_sum(accelerator, vec)
    total = out[len(keys)]
    means = {k: out[i] / total for i, k in enumerate(keys)} if total > 0 else {}
    return means, total, dict(zip(sums, out[len(keys) + 1:]))


def eval_shards(n: int, batch_size: int, accelerator) -> list[list[int]]:
    """This process's evaluation batches over rows ``0..n-1``.

    Process ``r`` takes the contiguous block ``[r*ceil(n/W), (r+1)*ceil(n/W))``; every process gets
    the SAME number of batches (empty lists where its block ran out), because under FSDP/DeepSpeed
    each forward pass is collective. Callers run an empty batch on a stand-in row with weight 0."""
    world, rank = accelerator.num_processes, accelerator.process_index
    per = math.ceil(n / world) if n else 0
    mine = list(range(min(n, rank * per), min(n, (rank + 1) * per)))
    n_batches = math.ceil(per / batch_size) if per else 0
    return [mine[i * batch_size:(i + 1) * batch_size] for i in range(n_batches)]


def model_state_dict(accelerator, model) -> dict[str, Any]:
    """The full (unsharded) state dict of a prepared model. Under FSDP/DeepSpeed this gathers the
    shards, a collective operation: EVERY process must call it, even though only the main process
    writes the result."""
    if is_sharded(accelerator):
        return accelerator.get_state_dict(model)
    return accelerator.unwrap_model(model).state_dict()


class NullContext:
    """``contextlib.nullcontext`` look-alike used where DDP's ``no_sync`` is not needed."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def accumulation_context(accelerator, model, sync: bool):
    """``no_sync`` for micro-batches before the last of a step (skip DDP's all-reduce; the last
    one reduces the accumulated sum), a no-op otherwise."""
    if not sync and accelerator.num_processes > 1:
        return accelerator.no_sync(model)
    return NullContext()


def hide_library_bars(progress: bool) -> None:
    """``progress=False`` in Python: no loading bars of transformers or the Hub either (the command
    line hides them already, by environment variables set before the libraries load)."""
    if progress:
        return
    import huggingface_hub.utils
    import transformers

    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()


def start_run(cfg: Any, command: str) -> tuple[Any, Any]:
    """The opening every LM trainer shares: the output folder and ``--resume`` checkpoint checked
    (by every process before the process group forms, so before any process writes), its Accelerator
    (LoRA refused under FSDP/DeepSpeed, where the final merge would need the whole model on one
    process), seeded RNGs, and the tokenizer. ``command``: the trainer, as its checkpoints name it."""
    from dpolab.lm.loading import load_tokenizer
    from dpolab.runs.checkpoint import check_checkpoint_files, check_resumable, read_trainer_state
    from dpolab.runs.rundir import RunDir
    from dpolab.runs.seeding import seed_everything
    from dpolab.runs.trackers import parse_report_to

    parse_report_to(getattr(cfg, "report_to", None))  # a tracker that is not installed fails before any work
    hide_library_bars(getattr(cfg, "progress", True))
    run = RunDir(cfg.output_dir)
    run.check_new_run(cfg.resume)
    trainer_state = None
    if cfg.resume:
        ckpt = run.resolve_checkpoint(cfg.resume)
        check_checkpoint_files(ckpt)
        trainer_state = read_trainer_state(ckpt, command=command)
    accelerator = make_accelerator(cfg.mixed_precision)
    if trainer_state is not None:  # before the model loads and any reference is precomputed
        check_resumable(cfg, ckpt, trainer_state, accelerator.num_processes)
    cfg.mixed_precision = accelerator.mixed_precision  # resolved: config.yaml, the reference cache key
    if getattr(cfg, "lora", False) and is_sharded(accelerator):
        raise ConfigError("--lora with FSDP/DeepSpeed is not supported (the final merge needs the whole model on "
                          "one process); use DDP for LoRA runs (docs/scaling.md)")
    seed_everything(cfg.seed)
    return accelerator, load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
