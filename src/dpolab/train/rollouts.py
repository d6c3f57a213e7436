"""Sampled experience for the on-policy trainers, exact on any number of processes.

A step's prompts are the engine's micro-batch: process ``r`` of ``W`` holds its slice of the global
chunk (:class:`dpolab.data.batching.BatchOrder`). Each process samples ``k`` completions of each of
its prompts, every completion from its own seed (:func:`dpolab.lm.sampling.row_seeds` of the step and
the prompt's dataset row), so a completion does not depend on which process or batch drew it. The
completions of a prompt stay on one process, so group statistics need no communication; statistics
over the whole batch (a batch std, token counts) are summed across processes.

Optimization over the experience is planned on GLOBAL completion indices: mini-batch ``m`` of a
seeded permutation of the step's ``n_global`` completions, each process taking the ones it holds,
split into passes of at most ``micro_batch_size`` (stand-ins where a process has fewer passes). With
the engine's global loss normaliser this gives the gradient one process with the whole batch would.
A process whose share of an (uneven, last) chunk is empty samples prompt 0 as stand-in rows: they
keep it in step with the others and carry no weight.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from dpolab.train.algorithm import Pass


@dataclass
class Samples:
    """One step's completions on this process: ``n = len(prompts) · k`` rows, on the device.

    gen: the :class:`dpolab.lm.generation.Generation` of the n rows. rows: the dataset row of each
    completion's prompt. prompts, completions: texts. scores (n,): the weighted reward; terms: each
    reward function's (n,) values. offset: the global index of this process's first completion;
    n_global: completions over all processes. real: False for stand-in rows (an empty share)."""

    gen: object
    rows: list[int]
    prompts: list[str]
    completions: list[str]
    scores: torch.Tensor
    terms: dict[str, torch.Tensor]
    k: int
    offset: int
    n_global: int
    real: bool = True

    @property
    def n(self) -> int:
        return len(self.rows)


def sample_step(engine, cfg, prompts, idx: list[int], k: int, rewards, sampler, *, seed: int, micro: int,
                with_logps: bool = False, dtype: torch.dtype = torch.float32) -> Samples:
    """Sample ``k`` completions of each prompt row ``idx`` (this process's share of micro-batch
    ``micro`` of the engine's order), score them with ``rewards``
    (:class:`dpolab.rewards.functions.WeightedRewards`) and place them in the step's global batch.
    ``seed``: the step's seed; ``with_logps``: ask the sampler for the drawn tokens' log-probs;
    ``dtype``: the scores' (float32 by default; float64 where they are compared or baselined, as
    float32 rounds rewards with a large offset, 1e8 + n, to multiples of 8)."""
    from dpolab.lm.generation import decode_responses
    from dpolab.lm.sampling import row_seeds

    acc, order = engine.accelerator, engine.order
    chunk = order.global_rows(micro)  # the step's prompts over all processes
    per = -(-len(chunk) // acc.num_processes)
    start = min(acc.process_index * per, len(chunk))
    real = bool(idx)
    idx = idx or [0]
    rows = [i for i in idx for _ in range(k)]
    gen = sampler.sample([prompts.ids[i] for i in rows], max_new_tokens=cfg.max_new_tokens,
                         temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                         seeds=row_seeds(seed, [i * k + j for i in idx for j in range(k)]), with_logps=with_logps)
    texts = [prompts.texts[i] for i in rows]
    completions = decode_responses(engine.tokenizer, gen)
    scores, terms = rewards.score(texts, completions, prompts.columns(rows), dtype=dtype)
    return Samples(gen, rows, texts, completions, scores.to(engine.device), {n: t.to(engine.device) for n, t in
                   terms.items()}, k, start * k, len(chunk) * k, real)


@torch.no_grad()
def rollout_token_logps(model, gen, temperature: float, batch: int, *, with_entropy: bool = False,
                        shared: bool = False):
    """Per-token log-probs (and entropies) of a Generation's responses, ``(n, R)``, zero after EOS,
    in forward passes of ``batch`` rows (no gradient); ``shared``: as :func:`response_logps`."""
    logps, ents = [], []
    for s in range(0, gen.batch_size, batch):
        lp, ent = response_logps(model, gen.select(torch.arange(s, min(s + batch, gen.batch_size))), temperature,
                                 with_entropy=with_entropy, shared=shared)
        logps.append(lp)
        ents.append(ent)
    return torch.cat(logps), (torch.cat(ents) if with_entropy else None)


@torch.no_grad()
def reference_token_logps(policy, ref_model, gen, temperature: float, batch: int, *, shared: bool = False,
                          accelerator=None) -> torch.Tensor:
    """The reference's per-token log-probs of a Generation's responses, ``(n, R)``: ``ref_model`` (made
    by :func:`dpolab.train.on_policy.reference_model`), or with ``None`` the PEFT ``policy`` with its
    adapters disabled, under ``accelerator``'s autocast as the prepared policy's forward runs (so at
    the start, the reference being the policy, the two agree exactly); ``shared``: as
    :func:`response_logps`."""
    if ref_model is not None:
        return rollout_token_logps(ref_model, gen, temperature, batch, shared=shared)[0]
    with policy.disable_adapter(), (accelerator.autocast() if accelerator is not None else nullcontext()):
        return rollout_token_logps(policy, gen, temperature, batch, shared=shared)[0]


def response_logps(model, gen, temperature: float, *, with_entropy: bool = False, shared: bool = False):
    """``(log π(y_t | x, y_<t) (B, R), entropy (B, R) or None)`` for a Generation's responses, zero
    after EOS, with gradient (:func:`dpolab.lm.logps.model_token_logps`: only response positions go
    through the LM head). ``shared``: rows with the same prompt run it once
    (:mod:`dpolab.lm.shared_prompt`; the same values up to rounding)."""
    from dpolab.lm.logps import model_token_logps

    if shared:  # two forward calls whatever the rows: every process calls a DDP model alike
        from dpolab.lm.shared_prompt import prompt_groups, shared_prompt_token_logps

        return shared_prompt_token_logps(model, gen, prompt_groups(gen), temperature=temperature,
                                         with_entropy=with_entropy)
    P = gen.prompt_length
    loss_mask = torch.cat([torch.zeros_like(gen.prompt_mask), gen.response_mask], dim=1)
    lp, ent = model_token_logps(model, gen.input_ids, gen.attention_mask, loss_mask, gen.position_ids,
                                temperature=temperature, with_entropy=with_entropy)
    return lp[:, P:], (ent[:, P:] if ent is not None else None)


def minibatch_rows(samples: Samples, n_minibatches: int, seed: int) -> list[list[int]]:
    """This process's local rows of each of ``n_minibatches`` mini-batches of a seeded permutation of
    the step's global completions (the same permutation on every process)."""
    perm = torch.randperm(samples.n_global, generator=torch.Generator().manual_seed(seed)).tolist()
    size = -(-samples.n_global // n_minibatches)
    lo, hi = samples.offset, samples.offset + (samples.n if samples.real else 0)
    return [[g - lo for g in perm[m * size:(m + 1) * size] if lo <= g < hi] for m in range(n_minibatches)]


def row_passes(engine, rows: list[int], micro_batch_size: int, units, where: str, *, width: int = 0,
               budget: int = 0, prompt_of: list[int] | None = None, prompt_width: int = 0) -> list[Pass]:
    """Passes of at most ``micro_batch_size`` local rows (a LongTensor batch each), padded with stand-ins
    to the largest count of any process; ``units(rows_tensor) -> int``: the loss units of a pass.
    With a token ``budget`` (> 0) and rows of ``width`` padded tokens each, a pass also holds at most
    ``budget // width`` rows (at least one), in as few passes as that allows, of even sizes (16 rows,
    at most 13 a pass: 8 and 8): the gradient is the same, the activations bounded.

    ``prompt_of`` (the prompt of each local row) for passes that run each of their prompts once
    (:mod:`dpolab.lm.shared_prompt`): the rows are taken grouped by prompt, and a pass's tokens count
    ``prompt_width`` per distinct prompt plus ``width − prompt_width`` per row."""
    if prompt_of is not None:
        parts = _shared_parts(sorted(rows, key=lambda r: (prompt_of[r], r)), prompt_of, micro_batch_size,
                              budget, prompt_width, width - prompt_width)
        return _as_passes(engine, parts, units, where)
    if budget > 0 and width > 0 and rows:
        cap = max(1, budget // width)
        if cap < micro_batch_size:
            n = -(-len(rows) // cap)
            micro_batch_size = -(-len(rows) // n)
    return _as_passes(engine, [rows[i:i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)],
                      units, where)


def _shared_parts(rows: list[int], prompt_of: list[int], size: int, budget: int, P: int, R: int) -> list[list[int]]:
    """Consecutive runs of ``rows`` of at most ``size`` rows and (``budget`` > 0) at most ``budget``
    tokens, each distinct prompt counted once (``P``) and each row's response (``R``); at least one
    row a pass."""
    def tokens(part: list[int]) -> int:
        return len({prompt_of[r] for r in part}) * P + len(part) * R

    parts: list[list[int]] = []
    cur: list[int] = []
    for r in rows:
        if cur and (len(cur) == size or (budget > 0 and tokens(cur + [r]) > budget)):
            parts.append(cur)
            cur = []
        cur.append(r)
    parts += [cur] if cur else []
    # as many passes of even sizes where they fit (16 rows as 8 and 8, not 15 and 1)
    n, even = len(parts), -(-len(rows) // max(len(parts), 1))
    split = [rows[i:i + even] for i in range(0, len(rows), even)] if rows else []
    if len(split) == n and all(budget <= 0 or tokens(p) <= budget for p in split):
        return split
    return parts


def _as_passes(engine, parts: list[list[int]], units, where: str) -> list[Pass]:
    from dpolab.train import distributed

    device = engine.device
    parts = [torch.tensor(p, device=device) for p in parts]
    out = [Pass(p, units(p), 0, f"{where}, rows {p.tolist()[:8]}") for p in parts]
    n = distributed.global_max(engine.accelerator, len(out)) if engine.accelerator.num_processes > 1 else len(out)
    stand_in = torch.tensor([0], device=device)
    return out + [Pass(stand_in, 0, 0, where, real=False)] * (n - len(out))


def global_moments(accelerator, values: torch.Tensor, weight: bool = True) -> tuple[float, float, float]:
    """(count, mean, unbiased std) of ``values`` over all processes (one all-reduce); a process
    passes ``weight=False`` for stand-in rows."""
    from dpolab.train import distributed

    v = values.double().reshape(-1) if weight else values.new_zeros(0).double()
    n, s, sq = distributed.global_sum(accelerator, [float(v.numel()), float(v.sum()), float((v * v).sum())])
    if n == 0:
        return 0.0, 0.0, 0.0
    mean = s / n
    var = (sq - n * mean * mean) / (n - 1) if n > 1 else 0.0
    return n, mean, max(var, 0.0) ** 0.5


def global_means(accelerator, real: bool, **values: torch.Tensor) -> dict[str, tuple[float, float]]:
    """``{name: (mean, unbiased std)}`` of each tensor's entries over all processes (one all-reduce
    per tensor); stand-in rows (``real=False``) count for nothing."""
    return {k: global_moments(accelerator, v, real)[1:] for k, v in values.items()}


def reward_term_metrics(accelerator, samples: Samples, *, total: bool = True) -> dict[str, float]:
    """``rewards/<name>/mean`` and ``/std`` of each reward over all processes' completions, and with
    ``total`` those of the weighted score (``rewards/mean``, ``rewards/std``)."""
    out = {}
    keyed = [(f"rewards/{n}", t) for n, t in samples.terms.items()]
    if total:
        keyed.insert(0, ("rewards", samples.scores))
    for key, values in keyed:
        _, mean, std = global_moments(accelerator, values, samples.real)
        out[f"{key}/mean"], out[f"{key}/std"] = mean, std
    return out


def reward_metrics(accelerator, samples: Samples) -> dict[str, float]:
    """Mean and std of the weighted score and of each reward over all processes' completions, the
    completion lengths and the share cut at ``--max-new-tokens`` (no EOS)."""
    from dpolab.train import distributed

    out = reward_term_metrics(accelerator, samples)
    gen, w = samples.gen, float(samples.real)
    lengths = gen.response_lengths.double()
    n, total, truncated = distributed.global_sum(accelerator, [w * len(lengths), w * float(lengths.sum()),
                                                               w * float((~gen.finished).sum())])
    out["completions/mean_length"] = total / max(n, 1)
    out["completions/clipped_ratio"] = truncated / max(n, 1)
    return out


def global_whiten(accelerator, x: torch.Tensor, mask: torch.Tensor, real: bool = True, *, shift_mean: bool = True,
                  eps: float = 1e-8) -> torch.Tensor:
    """:func:`dpolab.rl.advantages.whiten` over the masked entries of every process: the mean and the
    unbiased variance come from global sums (stand-in rows, ``real=False``, count for nothing)."""
    m = mask.bool()
    n, mean, std = global_moments(accelerator, x[m], real)
    if n < 1:
        raise ValueError("global_whiten: the mask selects no element")
    out = (x - mean) * torch.rsqrt(torch.tensor(std * std + eps, dtype=x.dtype, device=x.device))
    if not shift_mean:
        out = out + mean
    return out * m.to(x.dtype)


def global_explained_variance(acc, values, returns, mask, real: bool) -> float:
    """1 − Var[G − V] / Var[G] over the response tokens of every process."""
    m = mask.bool()
    _, _, std_ret = global_moments(acc, returns[m], real)
    _, _, std_err = global_moments(acc, (returns - values)[m], real)
    return float("nan") if std_ret == 0 else 1 - (std_err / std_ret) ** 2
