"""The demo's pure pieces: the frontier and its verdict, the review grammar, the VADER reward."""

from __future__ import annotations

import random

from dpolab.experiments.grammar import generate_reviews, review_prefix
from dpolab.experiments.report import frontier_verdict, pareto
from dpolab.experiments.sentiment_reward import vader_sentiment


def test_pareto_keeps_points_no_other_beats():
    # (kl, reward): (2, 0.4) is beaten by (1, 0.5); (3, 0.5) adds KL without reward
    pts = [(2.0, 0.4), (0.0, 0.1), (3.0, 0.5), (1.0, 0.5), (4.0, 0.9)]
    assert pareto(pts) == [(0.0, 0.1), (1.0, 0.5), (4.0, 0.9)]


def _rows(method, pts):
    return [{"method": method, "kl": kl, "reward": r} for kl, r in pts]


def test_frontier_verdict_cases():
    dpo = _rows("DPO", [(1.0, 0.6), (2.0, 0.8)])
    ppo = _rows("PPO", [(1.5, 0.5), (3.0, 0.7)])
    v = frontier_verdict(dpo + ppo)
    # every PPO point has a DPO point with no more KL and more reward; no DPO point is dominated
    assert v["ppo_points_dominated_by_dpo"] == 1.0 and v["dpo_points_dominated_by_ppo"] == 0.0
    assert v["text"].startswith("DPO's frontier dominates")
    assert v["best_reward"] == {"DPO": 0.8, "PPO": 0.7}
    flipped = frontier_verdict(_rows("PPO", [(1.0, 0.6), (2.0, 0.8)]) + _rows("DPO", [(1.5, 0.5), (3.0, 0.7)]))
    assert flipped["text"].startswith("PPO's frontier dominates")
    mixed = frontier_verdict(_rows("DPO", [(1.0, 0.6), (5.0, 0.7)]) + _rows("PPO", [(0.5, 0.5), (2.0, 0.8)]))
    assert mixed["text"].startswith("Neither frontier dominates")
    assert mixed["ppo_points_dominated_by_dpo"] == 0.0 and mixed["dpo_points_dominated_by_ppo"] == 0.5


def test_grammar_is_reproducible_and_of_mixed_sentiment():
    reviews = generate_reviews(400, seed=3)
    assert reviews == generate_reviews(400, seed=3) and reviews != generate_reviews(400, seed=4)
    scores = vader_sentiment([""] * len(reviews), reviews)
    assert sum(s > 0.3 for s in scores) > 80 and sum(s < -0.3 for s in scores) > 80  # both moods common
    prefix = review_prefix(reviews[0], random.Random(0))
    assert reviews[0].startswith(prefix) and 2 <= len(prefix.split()) <= 4


def test_vader_reward_scores_the_completion_only():
    assert vader_sentiment(["a terrible film"], [" it was wonderful"])[0] > 0.5
    assert vader_sentiment(["a wonderful film"], [" it was terrible"])[0] < -0.4
