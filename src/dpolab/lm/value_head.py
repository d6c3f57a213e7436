"""The critic for language-model PPO: a value head on a causal LM's last hidden state.

Two layouts, one interface (:class:`PolicyWithValue`, whose forward returns ``(logits, values)``):

- shared trunk (default): ``V(s_t) = w·h_t + b`` on the policy's own last hidden state ``h_t``,
  computed in the same forward as the logits (``output_hidden_states=True``);
- separate value model: a second causal LM (its own weights, e.g. a copy of the SFT model) whose
  last hidden state feeds the head; its LM head is unused.

Saving: the policy goes to ``final/`` (loadable by ``AutoModelForCausalLM``); the head to
``final/value_head.safetensors``; a separate value model's trunk to ``final/value_model/``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dpolab.errors import DpolabError

__all__ = ["PolicyWithValue", "ValueHead", "hidden_size_of", "load_critic", "load_value_head", "save_value_head"]

VALUE_HEAD_FILE = "value_head.safetensors"
VALUE_MODEL_DIR = "value_model"


def hidden_size_of(model) -> int:
    """Width of the last hidden state of a causal LM (config.hidden_size, else its LM head input)."""
    config = getattr(model, "config", None)
    for name in ("hidden_size", "n_embd", "d_model"):
        if config is not None and isinstance(getattr(config, name, None), int):
            return int(getattr(config, name))
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "in_features"):
        raise DpolabError("cannot find the hidden size of the model for the value head")
    return int(head.in_features)


class ValueHead(nn.Module):
    """``V = w·h + b``: hidden states (..., H) -> values (...,). Zero-initialised, so V ≡ 0 at the start
    and the first advantages are the plain GAE of the rewards."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1)


class PolicyWithValue(nn.Module):
    """Policy LM plus critic, as one module (one optimizer, one ``accelerate.prepare``).

    ``forward(input_ids, attention_mask, position_ids)`` -> ``(logits (B, T, V), values (B, T))``, where
    ``values[:, t]`` is the value of the state ending at token t. With ``value_model=None`` the head
    reads the policy's last hidden state (one forward); otherwise it reads ``value_model``'s.
    """

    def __init__(self, policy: nn.Module, value_head: ValueHead, value_model: nn.Module | None = None):
        super().__init__()
        self.policy = policy
        self.value_head = value_head
        self.value_model = value_model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None, *, prompt_length: int | None = None,
                response_ids: torch.Tensor | None = None, response_mask: torch.Tensor | None = None,
                temperature: float = 1.0, with_entropy: bool = False) -> tuple[torch.Tensor, ...]:
        """Logits (B, T, V) and values (B, T) of every position; with ``prompt_length = P`` only the
        positions that predict response tokens: logits (B, T − P, V) and values (B, T − P) from
        positions P − 1 … T − 2 (the LM head then runs on those rows only, where the model's
        forward takes ``logits_to_keep``).

        With ``response_ids`` and ``response_mask`` (B, R = T − P) it returns instead the lean
        ``(log-probs (B, R), values (B, R), entropies (B, R) or None)`` of the response tokens at
        ``temperature``, zero where the mask is 0: only the predicting rows reach the LM head, which
        is fused into the log-prob (:class:`dpolab.lm.logps.ResponseRows`): no (B, R, V) logits."""
        if response_ids is not None:
            return self._response_logps(input_ids, attention_mask, position_ids, prompt_length, response_ids,
                                        response_mask, temperature, with_entropy)
        shared = self.value_model is None
        kw = {}
        keep = None if prompt_length is None else input_ids.shape[1] - prompt_length + 1
        if keep is not None and _accepts(self.policy, "logits_to_keep"):
            kw["logits_to_keep"] = keep
        out = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          output_hidden_states=shared, use_cache=False, **kw)
        if shared:
            hidden = out.hidden_states[-1]  # (B, T, H)
        else:
            hidden = self.value_model(input_ids=input_ids, attention_mask=attention_mask,
                                      position_ids=position_ids, output_hidden_states=True,
                                      use_cache=False).hidden_states[-1]
        logits, values = out.logits, self.value_head(hidden)
        if keep is not None:
            logits, values = logits[:, -keep:-1], values[:, -keep:-1]
        return logits, values

    def _response_logps(self, input_ids, attention_mask, position_ids, P, response_ids, response_mask, temperature,
                        with_entropy):
        from dpolab.lm.logps import ResponseRows

        shared = self.value_model is None
        pred = torch.zeros(input_ids.shape, dtype=torch.bool, device=input_ids.device)
        pred[:, P - 1:-1] = response_mask.bool()                                      # positions predicting them
        rows_of = ResponseRows(self.policy, lambda h: h[pred] if h.shape[:2] == pred.shape else None)
        with rows_of:
            out = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              output_hidden_states=shared, use_cache=False)
        logits = out.logits
        if logits.ndim == 3 and not (rows_of.fused and rows_of.selected):
            logits = logits[pred]
        m = response_mask.bool()
        token, ent, _ = rows_of.token_logps(logits, response_ids[m], temperature=temperature,
                                            with_entropy=with_entropy)
        hidden = out.hidden_states[-1] if shared else self.value_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, output_hidden_states=True,
            use_cache=False).hidden_states[-1]
        values = self.value_head(hidden)[:, P - 1:-1].float() * m
        logps = torch.zeros(m.shape, dtype=token.dtype, device=token.device).masked_scatter(m, token)
        entropy = torch.zeros_like(logps).masked_scatter(m, ent) if with_entropy else None
        return logps, values, entropy

    def critic_state(self) -> dict[str, torch.Tensor]:
        """Weights of the critic's own parameters (head, and the separate value model if any)."""
        state = {f"value_head.{k}": v for k, v in self.value_head.state_dict().items()}
        if self.value_model is not None:
            state.update({f"value_model.{k}": v for k, v in self.value_model.state_dict().items()})
        return state


def _accepts(model: nn.Module, name: str) -> bool:
    """Whether the forward of ``model`` (or of the model a PEFT wrapper holds) takes ``name``."""
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return name in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return False


def save_value_head(head: ValueHead, directory: str | Path) -> Path:
    """Write ``directory/value_head.safetensors`` (keys ``weight`` (1, H), ``bias`` (1,))."""
    from safetensors.torch import save_file

    path = Path(directory) / VALUE_HEAD_FILE
    save_file({k: v.detach().contiguous().cpu() for k, v in head.linear.state_dict().items()}, str(path))
    return path


def load_value_head(directory: str | Path) -> ValueHead:
    """Read a head written by :func:`save_value_head`."""
    from safetensors.torch import load_file

    path = Path(directory) / VALUE_HEAD_FILE
    if not path.is_file():
        raise DpolabError(f"no value head at {path}")
    state = load_file(str(path))
    head = ValueHead(int(state["weight"].shape[1]))
    head.linear.load_state_dict(state)
    return head


def load_critic(model: PolicyWithValue, path: str | Path) -> None:
    """Load a ``critic.safetensors`` (the value head, and the value model if separate) into ``model``;
    every tensor must fit and every critic weight must be there."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        weights = load_file(str(path))
        result = model.load_state_dict(weights, strict=False)
    except (OSError, RuntimeError) as err:
        raise DpolabError(f"cannot load {path}: {str(err).strip().splitlines()[0]}") from None
    missing = [k for k in model.critic_state() if k not in weights]
    if result.unexpected_keys or missing:
        raise DpolabError(f"{path} does not fit this critic (value head / --value-model settings differ)")


def save_policy_with_value(model: PolicyWithValue, tokenizer, path: str | Path, *, merge_lora: bool = False) -> None:
    """``final/`` of LM PPO: the policy as a Hugging Face folder (LoRA merged), the value head beside
    it and a separate value model's trunk in ``value_model/``."""
    from dpolab.runs.checkpoint import save_pretrained_atomic

    def critic(folder: Path) -> None:  # into the folder before its rename: a stop leaves all or none
        save_value_head(model.value_head, folder)
        if model.value_model is not None:
            model.value_model.save_pretrained(folder / VALUE_MODEL_DIR, safe_serialization=True)

    save_pretrained_atomic(model.policy.merge_and_unload() if merge_lora else model.policy, tokenizer, Path(path),
                           also=critic)


@torch.no_grad()
def rollout_values(model, gen, temperature: float, batch: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """For a Generation, in forward passes of ``batch`` rows of a :class:`PolicyWithValue` (possibly
    wrapped): the sampled tokens' log-probs (n, R), the values (n, R), both zero after EOS, and the
    summed per-token entropy of the policy."""
    logps, values, entropy = [], [], 0.0
    for lo in range(0, gen.batch_size, batch):
        g = gen.select(torch.arange(lo, min(lo + batch, gen.batch_size), device=gen.response_mask.device))
        lp, v, ent = model(g.input_ids, g.attention_mask, g.position_ids, prompt_length=g.prompt_length,
                           response_ids=g.response_ids, response_mask=g.response_mask, temperature=temperature,
                           with_entropy=True)
        logps.append(lp)
        values.append(v)
        entropy += float(ent.sum())
    return torch.cat(logps), torch.cat(values), entropy


def checkpoint_files(state_dict: dict[str, torch.Tensor], lora: bool) -> dict[str, dict[str, torch.Tensor]]:
    """A :class:`PolicyWithValue`'s checkpoint: the policy's weights as ``model.safetensors`` (LoRA
    runs: the adapters), the critic's as ``critic.safetensors``."""
    policy = {k[len("policy."):]: v for k, v in state_dict.items() if k.startswith("policy.")}
    return {"model.safetensors": {k: v for k, v in policy.items() if not lora or "lora_" in k},
            "critic.safetensors": {k: v for k, v in state_dict.items() if not k.startswith("policy.")}}


def load_checkpoint(model: PolicyWithValue, directory: str | Path, lora: bool) -> None:
    """Load what :func:`checkpoint_files` wrote."""
    from dpolab.runs.checkpoint import load_checkpoint_weights

    load_checkpoint_weights(model.policy, Path(directory), partial=lora)
    load_critic(model, Path(directory) / "critic.safetensors")
