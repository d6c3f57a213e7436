"""Returns and advantage estimators over (T, N) tensors, time first. Pure torch, no environment code.

Shared by the Gymnasium PPO/A2C loops (``dpolab.rl.gym_ppo``, ``dpolab.rl.gym_a2c``) and the language-model
PPO. Conventions, for step ``t`` of column ``n`` (one environment, or one sequence):

- ``rewards[t]``: r_t, received after taking a_t in s_t.
- ``values[t]``: V(s_t).
- ``next_values[t]``: V(s_{t+1}) where s_{t+1} is the *true* next observation, also when the episode
  ended at ``t`` (at a time-limit truncation that is the final observation, not the reset one).
  :func:`shift_values` builds it from ``values`` and the value of the observation after the last step.
- ``terminated[t]``: s_{t+1} is terminal, so nothing follows: V(s_{t+1}) is taken as 0.
- ``truncated[t]``: the episode was cut at ``t`` (time limit): we bootstrap with γ·V(s_{t+1}), but the
  recursion does not reach across into the next episode.
- ``mask[t]`` (optional): 0 for steps that are not real transitions (padding of a language-model
  batch, or the ignored reset step of a Gymnasium next-step autoreset; dpolab's Gymnasium collector
  resets in the same step and needs no mask). Masked steps get advantage 0 and return 0 and never
  feed earlier steps.

Language-model use (per-token rewards). With ``B`` responses padded to length ``T`` (right padding),
``rewards``, ``values`` and ``mask`` of shape (B, T), the last real token of row b at index
``L_b - 1``::

    terminated = torch.zeros_like(mask, dtype=torch.bool)
    terminated[torch.arange(B), lengths - 1] = True           # the episode ends at the last real token
    adv, ret = gae(rewards.T, values.T, shift_values(values.T), terminated.T,
                   gamma=1.0, lam=0.95, mask=mask.T)
    adv, ret = adv.T, ret.T                                    # back to (B, T)

The scalar reward belongs on the last real token (never on a pad); the per-token KL penalty goes on
every real token.
"""

from __future__ import annotations

import torch

__all__ = ["discounted_returns", "gae", "nstep_returns", "shift_values", "whiten"]


def _flags(x: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Bool flags of ``like``'s shape (zeros when ``x`` is None)."""
    if x is None:
        return torch.zeros_like(like, dtype=torch.bool)
    if x.shape != like.shape:
        raise ValueError(f"flag tensor of shape {tuple(x.shape)} does not match rewards {tuple(like.shape)}")
    return x.to(device=like.device, dtype=torch.bool)


def _check(rewards: torch.Tensor, *others: torch.Tensor | None) -> None:
    if rewards.dim() != 2:
        raise ValueError(f"expected (T, N) tensors (time first), got shape {tuple(rewards.shape)}")
    for o in others:
        if o is not None and o.shape != rewards.shape:
            raise ValueError(f"shape mismatch: {tuple(o.shape)} vs rewards {tuple(rewards.shape)}")


def shift_values(values: torch.Tensor, last_next_value: torch.Tensor | None = None) -> torch.Tensor:
    """``next_values[t] = values[t + 1]``, and ``last_next_value`` (N,) (default 0) after the last step.

    values: (T, N) -> (T, N). Correct inside episodes, for a Gymnasium next-step-autoreset rollout
    (the observation after a finished step is that episode's final observation) and for
    language-model rows (the token after the last real one is masked or terminal). With same-step
    autoreset the entries at episode ends must be replaced (V(final observation) at a truncation),
    as :class:`dpolab.rl.rollout.Collector` does.
    """
    last = torch.zeros_like(values[0]) if last_next_value is None else last_next_value.reshape(values[0].shape)
    return torch.cat([values[1:], last.to(values.dtype).unsqueeze(0)], dim=0)


def discounted_returns(rewards: torch.Tensor, dones: torch.Tensor | None = None, gamma: float = 0.99,
                       bootstrap: torch.Tensor | None = None) -> torch.Tensor:
    """Monte Carlo returns G_t = r_t + γ (1 − d_t) G_{t+1}, with G_T = ``bootstrap`` (N,) or 0.

    rewards, dones: (T, N); ``dones[t]`` ends the episode after step t (no bootstrap across it).
    Returns (T, N).
    """
    _check(rewards, dones)
    dones = _flags(dones, rewards)
    out = torch.empty_like(rewards)
    running = torch.zeros_like(rewards[0]) if bootstrap is None else bootstrap.to(rewards.dtype).clone()
    for t in range(rewards.shape[0] - 1, -1, -1):
        running = rewards[t] + gamma * (~dones[t]).to(rewards.dtype) * running
        out[t] = running
    return out


def nstep_returns(rewards: torch.Tensor, next_values: torch.Tensor, terminated: torch.Tensor | None,
                  truncated: torch.Tensor | None = None, *, gamma: float, n: int) -> torch.Tensor:
    """n-step returns G_t^(n) = Σ_{l<k} γ^l r_{t+l} + γ^k (1 − term_{t+k−1}) V(s_{t+k}), k ≤ n.

    The sum stops early (k < n) at the end of an episode (terminated or truncated) or of the
    rollout; it then bootstraps from ``next_values[t+k-1]`` unless the episode terminated there.
    All tensors (T, N); returns (T, N). ``n = 1`` gives the TD target r_t + γV(s_{t+1}).
    """
    if n < 1:
        raise ValueError(f"n-step returns need n >= 1, got {n}")
    _check(rewards, next_values, terminated, truncated)
    term, trunc = _flags(terminated, rewards), _flags(truncated, rewards)
    end = term | trunc
    T = rewards.shape[0]
    out = torch.empty_like(rewards)
    for t in range(T):
        g = torch.zeros_like(rewards[0])
        disc = torch.ones_like(rewards[0])
        alive = torch.ones_like(end[0])  # still inside the same episode
        boot = torch.zeros_like(rewards[0])
        for k in range(n):
            s = t + k
            if s >= T:
                break
            g = g + alive * disc * rewards[s]
            last = alive & (end[s] | (k == n - 1) | (s == T - 1))  # the sum stops after step s
            boot = torch.where(last, disc * gamma * (~term[s]).to(rewards.dtype) * next_values[s], boot)
            alive = alive & ~last
            disc = disc * gamma
        out[t] = g + boot
    return out


def gae(rewards: torch.Tensor, values: torch.Tensor, next_values: torch.Tensor,
        terminated: torch.Tensor | None, truncated: torch.Tensor | None = None, *, gamma: float,
        lam: float, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2015, arXiv 1506.02438, eq. 16).

        δ_t = r_t + γ (1 − term_t) V(s_{t+1}) − V(s_t)
        Â_t = δ_t + γλ (1 − term_t)(1 − trunc_t) m_{t+1} Â_{t+1},   Â after the last step = 0

    λ = 0 gives the TD error δ_t; λ = 1 gives Σ_l γ^l r_{t+l} + γ^k V_boot − V(s_t) (discounted return
    minus the baseline). Vectorised over N, a loop over T.

    Args: rewards, values, next_values, terminated, truncated, mask: (T, N) (see the module docstring).
    Returns ``(advantages, returns)``, both (T, N), with ``returns = advantages + values`` (the
    λ-return, the value target); both are 0 where ``mask`` is 0.
    """
    _check(rewards, values, next_values, terminated, truncated, mask)
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"gae needs gamma and lam in [0, 1], got gamma={gamma}, lam={lam}")
    term, trunc = _flags(terminated, rewards), _flags(truncated, rewards)
    m = torch.ones_like(rewards) if mask is None else mask.to(rewards.dtype)
    deltas = rewards + gamma * (~term).to(rewards.dtype) * next_values - values
    carry = gamma * lam * (~(term | trunc)).to(rewards.dtype)
    adv = torch.empty_like(rewards)
    running = torch.zeros_like(rewards[0])
    for t in range(rewards.shape[0] - 1, -1, -1):
        running = (deltas[t] + carry[t] * running) * m[t]
        adv[t] = running
    return adv, (adv + values) * m


def whiten(x: torch.Tensor, mask: torch.Tensor | None = None, shift_mean: bool = True,
           eps: float = 1e-8) -> torch.Tensor:
    """(x − mean) / std over all elements (or those where ``mask`` is 1); same shape as ``x``.

    Uses the unbiased variance (Bessel's correction, as ``torch.std``). ``shift_mean=False`` only
    rescales (keeps the mean, useful for rewards). Masked-out entries are returned as 0.
    """
    if mask is None:
        mean, var = x.mean(), x.var() if x.numel() > 1 else torch.zeros((), dtype=x.dtype)
        out = (x - mean) * torch.rsqrt(var + eps)
        return out if shift_mean else out + mean
    if mask.shape != x.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match {tuple(x.shape)}")
    m = mask.to(x.dtype)
    n = m.sum()
    if n < 1:
        raise ValueError("whiten: the mask selects no element")
    mean = (x * m).sum() / n
    var = (((x - mean) * m) ** 2).sum() / (n - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m
