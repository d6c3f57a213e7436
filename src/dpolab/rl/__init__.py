"""Reinforcement learning: tabular foundations and Gymnasium policy-gradient methods.

Tabular part (all numpy float64): :mod:`dpolab.rl.mdp` (Markov chains, MRPs, MDPs, Bellman solves),
:mod:`dpolab.rl.policy_evaluation` (returns, Monte Carlo and TD(0) policy evaluation),
:mod:`dpolab.rl.planning` (policy iteration, value iteration, tabular Q-learning),
:mod:`dpolab.rl.approx` (linear value-function approximation), :mod:`dpolab.rl.envs` (the
textbook examples, our Q-table gridworld, Gymnasium toy-text conversion) and :mod:`dpolab.rl.cli`
(``dpolab rl solve`` / ``dpolab rl evaluate``). See docs/rl-foundations.md.
"""

from __future__ import annotations

from dpolab.rl.mdp import MDP, MRP, MarkovChain

__all__ = ["MDP", "MRP", "MarkovChain"]
