"""How a batch of preference pairs meets the model, for every pair trainer (DPO and its family).

Two layouts give the same log-probs (tests/test_perf_prefix.py): the plain ``(2B, T)`` batch, rows
``prompt + chosen`` then ``prompt + rejected``, and the prefix-shared ``(B, L)`` batch, one row
``[prompt | chosen | rejected]`` per pair with a 4D mask, whose prompt is computed once
(:mod:`dpolab.lm.prefix`). Prefix sharing is used when :func:`check_prefix_sharing` shows the model
exact that way. Here too: the padded width each pair forces on a pass (for bucketing and the
token budget), the budget itself, and the reference's log-probs of a batch.
"""

from __future__ import annotations

import dataclasses
import heapq

import torch

from dpolab.errors import ConfigError
from dpolab.train.options import eval_split_of


def load_pairs(cfg, tokenizer):
    """``--data`` (and ``--eval-data`` or the ``--eval-fraction`` split) as tokenized pairs, truncated
    to ``--max-length``/``--max-prompt-length`` (:func:`dpolab.data.load_preference_data`)."""
    from dpolab.data import load_preference_data

    return load_preference_data(cfg.data, tokenizer, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                                eval_source=cfg.eval_data, eval_fraction=cfg.eval_fraction, seed=cfg.seed,
                                split=cfg.data_split, eval_split=eval_split_of(cfg))


def collate_pairs(prefix_sharing: bool, pairs, pad_token_id: int):
    """A plain (2B, T) PreferenceBatch, or when prefix-shared a (B, L) PrefixSharedBatch."""
    from dpolab.data.collate import collate_preference, collate_prefix_shared

    return (collate_prefix_shared if prefix_sharing else collate_preference)(pairs, pad_token_id)


def pair_widths(pairs, prefix_sharing: bool) -> list[int]:
    """The padded width each pair forces on its forward pass: ``P + C + R`` as one shared row, or
    ``2·(P + max(C, R))`` as two plain rows."""
    if prefix_sharing:
        return [len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs]
    return [2 * (len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids))) for p in pairs]


def batch_logps(model, batch, *, with_sq_norms: bool = False) -> tuple[torch.Tensor, ...]:
    """Summed response log-probs and response token counts, (2B,) each (chosen rows, then rejected),
    for either batch layout; the two are equal up to summation order (tests/test_perf_prefix.py).
    ``with_sq_norms``: also the (2B,) sums of log Σ_v π(v)² over response tokens (WPO)."""
    from dpolab.lm.logps import model_sequence_logps
    from dpolab.lm.prefix import PrefixSharedBatch, prefix_shared_logps

    if isinstance(batch, PrefixSharedBatch):
        return prefix_shared_logps(model, batch, with_sq_norms=with_sq_norms)
    return model_sequence_logps(model, batch.input_ids, batch.attention_mask, batch.loss_mask, batch.position_ids,
                                with_sq_norms=with_sq_norms)


def batch_tokens(batch) -> int:
    """Tokens the forward pass runs (not counting pads)."""
    return batch.num_tokens if hasattr(batch, "num_tokens") else int(batch.attention_mask.sum())


def reference_logps(policy, ref_model, batch, accelerator) -> torch.Tensor:
    """Summed response log-probs under the reference for a whole batch, (2B,), detached.

    ``ref_model`` None means a PEFT policy: the reference is its base with adapters disabled."""
    if ref_model is None:
        with accelerator.unwrap_model(policy).disable_adapter():
            return batch_logps(policy, batch)[0].detach()
    return batch_logps(ref_model, batch)[0].detach()


def pair_losses(cfg, model, batch, ref: tuple, *, bco_delta: float | None = None):
    """The (B,) preference losses of a batch of pairs under ``cfg``'s loss (one of the DPO family or a
    weighted combination, :mod:`dpolab.losses.dpo`; with ``cfg.wpo`` WPO-weighted) and their mean
    statistics (the standard names, plus each term of a combination). ``ref``: the reference's
    ``(chosen, rejected)`` summed log-probs, or ``(None, None)`` for reference-free losses."""
    from dpolab.losses.dpo import LOSS_OPTIONS, PairLogps, combined_preference_loss
    from dpolab.losses.weighting import wpo_weights

    B = batch.batch_size
    logps, lengths, *sq = batch_logps(model, batch, with_sq_norms=cfg.wpo)
    lp = PairLogps(policy_chosen=logps[:B], policy_rejected=logps[B:], chosen_lengths=lengths[:B],
                   rejected_lengths=lengths[B:], ref_chosen=ref[0], ref_rejected=ref[1])
    out = combined_preference_loss(cfg.losses, cfg.loss_weights, lp, rpo_alpha=cfg.rpo_alpha,
                                   bco_delta=bco_delta if "bco_pair" in cfg.losses else None,
                                   **{k: getattr(cfg, k) for k in LOSS_OPTIONS if k != "bco_delta"})
    losses, chosen_r, rejected_r = out.losses, out.chosen_rewards, out.rejected_rewards
    terms = {f"losses/{k}": v.detach().mean().item() for k, v in out.terms.items()} if len(out.terms) > 1 else {}
    if cfg.wpo:  # Σ_t a_t = log-prob − log Σ_v π(v)² per response
        aligned = logps.detach() - sq[0]
        weights = wpo_weights(aligned[:B], lengths[:B], aligned[B:], lengths[B:])
        losses = losses * weights
        terms["wpo/weight"] = weights.mean().item()
    if "bco_pair" in cfg.losses and len(cfg.losses) > 1:  # δ follows BCO's own rewards (its β), not the first term's
        bco_c, bco_r = out.term_rewards["bco_pair"]
        terms["bco/rewards"] = ((bco_c.mean() + bco_r.mean()) / 2).item()
    return losses, {**terms, "loss": losses.detach().mean().item(), "rewards/chosen": chosen_r.mean().item(),
                    "rewards/rejected": rejected_r.mean().item(), "rewards/margins": (chosen_r - rejected_r).mean().item(),
                    "rewards/accuracies": (chosen_r > rejected_r).float().mean().item(),
                    "logps/chosen": lp.policy_chosen.detach().mean().item(),
                    "logps/rejected": lp.policy_rejected.detach().mean().item()}


def check_prefix_sharing(model: torch.nn.Module, pairs, pad_token_id: int, vocab_size: int,
                         device: torch.device | str = "cpu", *, score=None) -> str | None:
    """Whether prefix sharing is exact for ``model``: None if so, else the reason it is not.
    ``score(model, batch) -> (values, scale)``, both ``(2B,)``, chosen then rejected, for either
    layout: what must agree and the unit of the tolerances; default :func:`batch_logps` (summed
    response log-probs, tolerances per scored token); the reward model gives its rewards, scale 1.

    Run on two of ``pairs`` (those with the longest rejected responses) before training, without
    gradients, in eval mode, two ways:

    1. the shared row against the plain ``(2B, T)`` batch: equal log-probs up to rounding (catches
       a model that ignores explicit position ids, or gets the layout wrong);
    2. the shared row again with every chosen token replaced: the rejected log-probs must not move
       (catches attention that ignores the 4D mask and lets rejected tokens see chosen ones; masked
       keys contribute exact zeros, so this holds to float rounding for any weights, even random).

    Tolerances per scored token: (1) 1e-4 for float32 weights, 5e-2 for 16-bit ones (the layouts
    round differently); (2) 1e-6 and 1e-3 (the same computation with other, masked-out values: equal
    up to kernel nondeterminism). A model whose attention is uniform (random weights) is exact in the
    shared layout whatever its positions, and passes (1); check (2) does not depend on the weights.
    ``model`` may be wrapped (DDP, FSDP: every process must then run the check, as every forward is
    collective).
    """
    score = score or batch_logps
    # the pairs with the longest rejected responses: a rejected token after the first is what could
    # see the chosen branch (the first is predicted by the last prompt position)
    pairs = heapq.nlargest(2, (p for p in pairs if p.prompt_ids), key=lambda p: len(p.rejected_ids))
    if not pairs:
        return "no pair with a prompt token to check it on"
    altered = [dataclasses.replace(p, chosen_ids=[(t + 1) % vocab_size for t in p.chosen_ids]) for p in pairs]
    dtype = next(model.parameters()).dtype
    full = dtype in (torch.float32, torch.float64)
    tol, tol_same = (1e-4, 1e-6) if full else (5e-2, 1e-3)
    B = len(pairs)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            lp_plain, counts = score(model, collate_pairs(False, pairs, pad_token_id).to(device))
            lp_shared, _ = score(model, collate_pairs(True, pairs, pad_token_id).to(device))
            lp_alt, _ = score(model, collate_pairs(True, altered, pad_token_id).to(device))
    except Exception as err:  # a model whose forward rejects a 4D mask or explicit positions
        return f"the model's forward does not accept the shared layout ({type(err).__name__}: {err})"
    finally:
        model.train(was_training)
    if ((lp_alt[B:] - lp_shared[B:]).abs() > tol_same * counts[B:].float()).any():
        return "rejected tokens see the chosen ones (the attention ignores the 4D mask)"
    if ((lp_shared - lp_plain).abs() > tol * counts.float()).any():
        worst = float((lp_shared - lp_plain).abs().max())
        return f"the shared row's values differ from the plain batch's by {worst:.3g}"
    return None


def resolve_prefix_sharing(cfg, model, pairs, pad_token_id: int, accelerator, *, inner=None, score=None) -> bool:
    """``--prefix-sharing`` on/off as given, or (unset) on when :func:`check_prefix_sharing` finds the
    model exact in the shared layout. Given explicitly and failing the check: an error. ``inner``: the
    Hugging Face model whose config and embedding to inspect (default: ``model`` unwrapped);
    ``score``: as for :func:`check_prefix_sharing`."""
    from dpolab.lm.logps import unwrap_model

    if cfg.prefix_sharing is False:
        return False
    if inner is None:
        inner = unwrap_model(accelerator.unwrap_model(model)) or accelerator.unwrap_model(model)
    attn = getattr(getattr(inner, "config", None), "_attn_implementation", "eager")
    if attn not in ("sdpa", "eager"):
        problem = f"its attention ('{attn}') ignores custom 4D masks"
    else:
        vocab = inner.get_input_embeddings().num_embeddings
        problem = check_prefix_sharing(model, pairs, pad_token_id, vocab, accelerator.device, score=score)
    return prefix_sharing_verdict(cfg.prefix_sharing, problem, accelerator)


def prefix_sharing_verdict(asked: bool | None, problem: str | None, accelerator) -> bool:
    """On when the check found no ``problem``; else an error if ``--prefix-sharing`` was ``asked``
    for, or off with a message (unset)."""
    if problem is None:
        return True
    if asked:
        raise ConfigError(f"--prefix-sharing is not exact for this model: {problem}. Drop --prefix-sharing.")
    accelerator.print(f"prefix sharing off: {problem}")
    return False
