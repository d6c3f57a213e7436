"""Checks and numerics shared by the preference losses (private to ``dpolab.losses``)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

LossOutput = tuple[Tensor, Tensor, Tensor]

_LN2 = math.log(2.0)


def check_beta(beta: float, name: str = "beta") -> None:
    if not beta > 0:
        raise ValueError(f"{name} must be > 0, got {beta}")


def check_shapes(*tensors: Tensor, **named: Tensor) -> None:
    """Equal shapes: broadcasting a (B,) tensor against a (B, T) one would silently mix rows and
    positions. Named tensors are named in the error."""
    if named:
        shapes = {name: tuple(t.shape) for name, t in named.items()}
        if len(set(shapes.values())) > 1:
            raise ValueError("shapes must be equal, got " + ", ".join(f"{k} {v}" for k, v in shapes.items()))
        return
    shape = tensors[0].shape
    for t in tensors[1:]:
        if t.shape != shape:
            raise ValueError(f"log-prob tensors must share one shape, got {shape} and {t.shape}")


def margin(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
           ref_rejected_logps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Return ``(ρ_w, ρ_l, h = ρ_w − ρ_l)``, each ``(B,)``."""
    check_shapes(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    rho_w = policy_chosen_logps - ref_chosen_logps
    rho_l = policy_rejected_logps - ref_rejected_logps
    return rho_w, rho_l, rho_w - rho_l


def rewards(beta: float, rho_w: Tensor, rho_l: Tensor) -> tuple[Tensor, Tensor]:
    return (beta * rho_w).detach(), (beta * rho_l).detach()


def token_mean(logps: Tensor, lengths: Tensor) -> Tensor:
    """Summed log-prob over token count; lengths clamped to ≥ 1 (an empty response sums to 0)."""
    return logps / lengths.clamp_min(1)


def smoothed_logistic(logits: Tensor, eps: float) -> Tensor:
    """Cross-entropy of σ(logits) against the soft label 1 − ε: −(1−ε)·log σ(z) − ε·log σ(−z)."""
    losses = -torch.nn.functional.logsigmoid(logits)
    if eps > 0:
        losses = (1 - eps) * losses - eps * torch.nn.functional.logsigmoid(-logits)
    return losses


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 − e^x)`` for ``x < 0``, accurate at both ends (Mächler 2012, "Accurately computing
    log(1 − exp(−|a|))"): ``log(−expm1(x))`` near 0, ``log1p(−e^x)`` far from it.

    Each branch is evaluated only on inputs where it is finite, so the unused branch of
    ``torch.where`` cannot send a NaN gradient back.
    """
    near_zero = x > -_LN2
    a = torch.log(-torch.expm1(torch.where(near_zero, x, torch.full_like(x, -_LN2))))
    b = torch.log1p(-torch.exp(torch.where(near_zero, torch.full_like(x, -_LN2), x)))
    return torch.where(near_zero, a, b)
