"""The sampling interface the on-policy trainers call, so that a dedicated engine (vLLM, SGLang) is
one module: a :class:`Sampler` turns prompt ids into a :class:`~dpolab.lm.generation.Generation`
and is told after every optimizer update that the policy's weights changed.

:class:`LocalSampler` is the default: our own loop (:func:`~dpolab.lm.generation.generate`) on the
trainer's model, in-process, so there are no weights to copy. An engine backend implements the same
two methods; docs/scaling.md ("Generation on a dedicated engine") says what it must synchronise and
what stays exact. A trainer uses only the sampled ids and masks, never log-probs from the sampler:
it recomputes them with its own forward, so a backend whose kernels differ changes which tokens
are drawn but not the loss computed on them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from dpolab.lm.generation import Generation, generate, row_seeds

__all__ = ["LocalSampler", "Sampler", "row_seeds"]



@runtime_checkable
class Sampler(Protocol):
    """What an on-policy trainer needs from a sampler."""

    def sample(self, prompts_ids: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 1.0,
               top_k: int = 0, top_p: float = 1.0, seeds: Sequence[int], with_logps: bool = False) -> Generation:
        """One response per prompt (B lists of token ids), row i drawn from ``seeds[i]`` alone;
        ``temperature = 0`` is greedy. The Generation's tensors are on the trainer's device.
        ``with_logps``: fill ``Generation.logps`` if these are the trained policy's own log-probs
        (same weights, same forward); a backend whose numbers differ leaves it None and the trainer
        computes them itself."""
        ...

    def sync_weights(self, model) -> None:
        """Called after each optimizer update with the trainer's (unwrapped) policy: the next
        :meth:`sample` must draw from these weights."""
        ...


class LocalSampler:
    """The in-process sampler: :func:`~dpolab.lm.generation.generate` on the trainer's own model.

    Args:
        model: the policy (a causal LM); the sampler shares its parameters, so an optimizer
            update is seen at once and :meth:`sync_weights` copies nothing.
        tokenizer: supplies the pad and EOS ids.
        eos_token_id: stop token(s), default :func:`dpolab.lm.generation.stop_ids` (the tokenizer's EOS and
            the model's generation-config EOS ids; ``[]``: never stop early).
        fast: ``generate``'s ``fast`` (the direct decoder where it applies; False: the model's forward).
    """

    def __init__(self, model, tokenizer, *, eos_token_id: int | Sequence[int] | None = None, fast: bool = True):
        self.model, self.tokenizer, self.eos_token_id, self.fast = model, tokenizer, eos_token_id, fast

    def sample(self, prompts_ids: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 1.0,
               top_k: int = 0, top_p: float = 1.0, seeds: Sequence[int], with_logps: bool = False) -> Generation:
        return generate(self.model, self.tokenizer, prompts_ids, max_new_tokens=max_new_tokens,
                        temperature=temperature, top_k=top_k, top_p=top_p, seeds=seeds,
                        eos_token_id=self.eos_token_id, with_logps=with_logps, fast=self.fast)

    def sync_weights(self, model) -> None:
        # the parameters are shared: nothing to copy; a different module (a re-wrapped or
        # re-loaded policy) replaces the one sampled from
        if model is not self.model:
            self.model = model


