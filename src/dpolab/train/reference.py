"""The reference of the pair trainers: log-probs computed once before training and cached on disk
(the default), or a live frozen model, or the PEFT base with its adapters disabled.

DPO needs ``log π_ref(y|x)`` of every response it trains on, and the reference never changes, so
the default computes it once per pair instead of once per visit: a forward pass without gradients,
batched by length, over exactly the pairs the run will visit (all of them from one epoch on; the
rows of the planned micro-batches for a shorter run) plus the evaluation split. The reference weights
are then not needed during training (memory), and a second epoch, a resumed run or another run on
the same data and reference (a β sweep) costs nothing more.

The cache file is keyed by the trainer (its tables' columns), the data (content hashes), the
token ids of every row as tokenized (so a change in how rows become tokens, such as a chat template
edit or a new dpolab version, is a new key), the reference model, the tokenizer, the truncation
settings, the dtype and the mixed precision, so a changed dataset or model never reuses stale values. Rows not computed yet are NaN in the stored
tables; a later run with a wider plan computes only what is missing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from dpolab.errors import ConfigError
from dpolab.runs.rundir import RunDir
from dpolab.train.options import eval_split_of

__all__ = ["Reference", "make_reference", "planned_rows", "precompute_reference"]

Scorer = Callable[[object], torch.Tensor]  # a batch -> (2B,) summed response log-probs


def planned_rows(order, n_micro: int) -> list[int]:
    """Training rows (over all processes) in micro-batches ``0 .. n_micro-1`` of ``order``, and row 0:
    it stands in for an empty micro-batch (``Engine.micro_batch_passes``), whose loss is
    back-propagated with weight 0, and 0 · a NaN reference would still poison the gradients."""
    if n_micro >= order.per_epoch:
        return list(range(order.n))
    return sorted({0, *(i for k in range(n_micro) for i in order.global_rows(k))})


def _ids_digest(rows) -> str:
    """sha256 of every row's prompt, chosen and rejected ids (a KTO row's: its completion and its
    partner's), in order."""
    from array import array

    h = hashlib.sha256()
    for row in rows:
        for ids in (row.prompt_ids, row.chosen_ids, row.rejected_ids):
            h.update(array("q", ids).tobytes() + b"|")
    return h.hexdigest()


def cache_path(cfg, data, run: RunDir) -> Path:
    from dpolab.data import data_fingerprint
    from dpolab.lm.loading import model_fingerprint

    key = hashlib.sha256(json.dumps({
        # the trainer: DPO's (chosen, rejected) and KTO's (matched, mismatched) columns differ
        "trainer": type(cfg).__name__,
        "data": data_fingerprint(cfg.data, split=cfg.data_split),
        "eval": data_fingerprint(cfg.eval_data, split=eval_split_of(cfg)) if cfg.eval_data else None,
        "eval_fraction": cfg.eval_fraction, "seed": cfg.seed, "ref": model_fingerprint(cfg.ref_model or cfg.model),
        "tokenizer": model_fingerprint(cfg.model), "max_length": cfg.max_length,
        "max_prompt_length": cfg.max_prompt_length, "dtype": cfg.dtype, "mixed_precision": cfg.mixed_precision,
        "n": [len(data.train), len(data.eval)], "ids": _ids_digest([*data.train, *data.eval]),
    }, sort_keys=True).encode()).hexdigest()[:20]
    cache_dir = Path(cfg.ref_cache_dir) if cfg.ref_cache_dir else run.path / "cache"
    return cache_dir / f"ref-logps-{key}.safetensors"


def precompute_reference(cfg, data, train_rows: list[int], *, accelerator, run: RunDir, collate: Callable,
                         make_scorer: Callable[[], Scorer]) -> dict[str, torch.Tensor]:
    """Reference log-probs of ``train_rows`` and of every eval pair, from the cache where it has them.

    ``collate(pairs)`` builds a batch on the device; ``make_scorer()`` returns the reference scorer
    (called only if some row is missing, so a full cache hit loads no model). Returns
    ``{"train": (N, 2), "eval": (M, 2)}`` float32 tables, columns (chosen, rejected), indexed by
    ``TokenizedPair.index``; rows outside ``train_rows`` may be NaN. Every process gets the same tables.
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from dpolab.train import distributed

    path = cache_path(cfg, data, run)
    sizes = {"train": len(data.train), "eval": len(data.eval)}
    # The main process reads the cache (its file system is the one written to); its tables reach the
    # others by a sum all-reduce with zeros elsewhere, so no other process reads the file.
    tables = {split: torch.full((n, 2), math.nan) for split, n in sizes.items()}
    if accelerator.is_main_process and path.is_file():
        try:
            stored, digest = _read_cache(path)  # digest None: written before checksums were
            if digest is not None and digest != _tables_digest(stored):  # bytes overwritten, header intact
                raise ValueError("its values do not match their checksum")
        except Exception as err:  # noqa: BLE001 -- a damaged cache (a killed copy, a full disk) is recomputed
            from dpolab.lm.loading import first_line

            print(f"reference log-probs: cannot read the cache {path} ({first_line(err)}); computing them again",
                  file=sys.stderr)
            stored = {}
        if all(stored.get(s) is not None and stored[s].shape == (n, 2) for s, n in sizes.items()):
            tables = {s: stored[s].float() for s in sizes}
    tables = _share_tables(accelerator, tables, main_only=True)
    wanted = {"train": train_rows, "eval": list(range(sizes["eval"]))}
    absent = {s: t[:, 0].isnan().tolist() for s, t in tables.items()}
    missing = {s: [i for i in rows if absent[s][i]] for s, rows in wanted.items()}
    n_missing = sum(map(len, missing.values()))
    if n_missing == 0:
        accelerator.print(f"reference log-probs: cached ({path})")
        return tables

    scorer = make_scorer()
    bs = cfg.eval_batch_size or cfg.batch_size
    computed = {s: torch.zeros(n, 2) for s, n in sizes.items()}
    for split, rows in missing.items():
        if not rows:
            continue
        pairs = getattr(data, split)
        rows = sorted(rows, key=lambda i: pairs[i].num_tokens)  # similar lengths per batch: little padding
        # Process r scores its block of the missing rows; blocks are summed across processes below.
        shards = distributed.eval_shards(len(rows), bs, accelerator)
        for local in tqdm(shards, desc=f"reference log-probs ({split})", dynamic_ncols=True,
                          disable=not (cfg.progress and accelerator.is_main_process)):
            idx = [rows[j] for j in local]
            batch = collate([pairs[i] for i in idx or [rows[0]]])
            with torch.no_grad():
                logps = scorer(batch)
            if not idx:  # a stand-in batch (keeps sharded forward passes aligned); nothing to keep
                continue
            B = batch.batch_size
            where = batch.index.cpu()
            computed[split][where, 0] = logps[:B].float().cpu()
            computed[split][where, 1] = logps[B:].float().cpu()
    computed = _share_tables(accelerator, computed)
    for split, rows in missing.items():
        if rows:
            tables[split][rows] = computed[split][rows]
    if accelerator.is_main_process:
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")  # runs sharing --ref-cache-dir: one each
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            out = {s: t.contiguous() for s, t in tables.items()}
            save_file(out, str(tmp), metadata={"sha256": _tables_digest(out)})
            tmp.replace(path)
        except OSError as err:  # the values are in memory: the run goes on, only the reuse is lost
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            print(f"reference log-probs: cannot write the cache {path} ({err.strerror or err}); going on without it",
                  file=sys.stderr)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return tables


def _tables_digest(tables: dict) -> str:
    """sha256 of the tables' values, split by split (stored in the file's metadata)."""
    h = hashlib.sha256()
    for name in sorted(tables):
        h.update(name.encode() + b"|" + tables[name].float().contiguous().numpy().tobytes())
    return h.hexdigest()


def _read_cache(path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """A cache file's tables and the checksum it was written with (None: a file of a version that
    wrote none), in one read."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {}).get("sha256")


def _share_tables(accelerator, tables: dict[str, torch.Tensor], main_only: bool = False) -> dict[str, torch.Tensor]:
    """Sum each table over processes: rows filled on one process and zero on the others, or with
    ``main_only`` the main process's tables as they are."""
    if accelerator.num_processes <= 1:
        return tables
    out = {}
    for k, v in tables.items():
        if main_only and not accelerator.is_main_process:
            v = torch.zeros_like(v)
        out[k] = accelerator.reduce(v.to(accelerator.device), reduction="sum").cpu().contiguous()
    return out


class Reference:
    """Reference log-probs of a batch of pairs: ``(ref_chosen, ref_rejected)``, each ``(B,)``.

    From precomputed ``tables`` (``{"train": (N, 2), "eval": (M, 2)}``, indexed by the batch's pair
    index), else by a forward pass of ``model`` (a frozen copy), else of the PEFT ``policy`` with its
    adapters disabled. ``seconds``: time spent precomputing."""

    def __init__(self, *, tables=None, model=None, policy=None, accelerator=None, seconds: float = 0.0):
        self.tables, self.model, self.policy, self.accelerator, self.seconds = tables, model, policy, accelerator, seconds

    @torch.no_grad()
    def pair_logps(self, batch, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        from dpolab.train.pair_layout import reference_logps

        if self.tables is not None:
            ref = self.tables[split][batch.index.cpu()]  # (B, 2)
            device = batch.index.device
            return ref[:, 0].to(device), ref[:, 1].to(device)
        B = batch.batch_size
        logps = reference_logps(self.policy, self.model, batch, self.accelerator)
        return logps[:B], logps[B:]


def make_reference(cfg, engine, data, collate: Callable, n_micro: int) -> Reference:
    """The reference ``cfg`` asks for: with ``precompute_ref``, tables for the training pairs of the
    first ``n_micro`` micro-batches of ``engine.order`` and the eval split, computed by the policy
    itself before its first update when it is the reference (a fresh run, no ``--ref-model``: no
    second copy loaded), else by the reference model; otherwise a live frozen model, or with
    ``--lora`` and no ``--ref-model`` the policy's base."""
    import time

    from dpolab.lm.loading import check_reference_vocabulary, load_causal_lm
    from dpolab.train import distributed
    from dpolab.train.pair_layout import batch_logps, reference_logps

    acc, model = engine.accelerator, engine.model

    def load_ref():
        ref = load_causal_lm(cfg.ref_model or cfg.model, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
        if cfg.ref_model:  # before any reference pass: another vocabulary fails, or scores other tokens
            check_reference_vocabulary(ref, engine.unwrapped, ref_name=cfg.ref_model, policy_name=cfg.model,
                                       tokenizer=engine.tokenizer, trust_remote_code=cfg.trust_remote_code)
        return distributed.prepare_reference(acc, ref)

    if not cfg.precompute_ref:
        if cfg.lora and not cfg.ref_model:
            return Reference(policy=model, accelerator=acc)
        return Reference(model=load_ref(), policy=model, accelerator=acc)

    def make_scorer() -> Scorer:
        if engine.ckpt is None and not cfg.ref_model:  # the policy as loaded IS the reference
            model.eval()
            return lambda batch: reference_logps(model, None if cfg.lora else model, batch, acc)
        ref = load_ref()
        return lambda batch: batch_logps(ref, batch)[0]

    t0 = time.time()
    tables = precompute_reference(cfg, data, planned_rows(engine.order, n_micro), accelerator=acc,
                                  run=engine.run_dir, collate=collate, make_scorer=make_scorer)
    return Reference(tables=tables, seconds=time.time() - t0)


def check_reference_updatable(ref_model: torch.nn.Module, policy: torch.nn.Module, ref_name: str) -> None:
    """TR-DPO blends the policy into the reference weight by weight: a --ref-model of another shape
    trained ``--ref-update-steps`` steps and then failed in the update with nothing saved. Checked
    before the first step."""
    ref_params = {n: p.shape for n, p in ref_model.named_parameters()}
    for name, p in policy.named_parameters():
        if ref_params.get(name) != p.shape:
            got = "has no such weight" if name not in ref_params else f"has {tuple(ref_params[name])}"
            raise ConfigError(f"--ref-update-steps blends the policy into --ref-model {ref_name} weight by weight, "
                              f"but its {name} {got}, the policy's is {tuple(p.shape)}: give a reference of the "
                              "policy's architecture and size, or leave --ref-model unset")


@torch.no_grad()
def update_reference(ref_model: torch.nn.Module, policy: torch.nn.Module, alpha: float) -> None:
    """TR-DPO's reference update (Gorbatovski et al. 2024, arXiv 2404.09656): π_ref ← α·π_θ + (1 − α)·π_ref,
    weight by weight; ``alpha = 1`` is the hard update (a copy of the policy)."""
    ref_params = dict(ref_model.named_parameters())
    for name, p in policy.named_parameters():
        ref_params[name].lerp_(p.detach().to(ref_params[name].dtype), alpha)
