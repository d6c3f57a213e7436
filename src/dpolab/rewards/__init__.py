"""Rewards for on-policy training and evaluation: reward functions from Python or a reward model
(``functions``) and policy evaluation against them (``evaluation``: mean reward, KL, win rate)."""
