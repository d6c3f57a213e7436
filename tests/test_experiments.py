"""The demo's pure pieces: the frontier and its verdict, the review grammar, the VADER reward."""

from __future__ import annotations

import math
import random

import pytest

from dpolab.experiments.grammar import generate_reviews, review_prefix
from dpolab.experiments.report import best_of_n_kl_bound, frontier_verdict, pareto
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


def test_frontier_verdict_over_several_methods():
    """Five methods, shares by hand ((kl, reward); weak dominance = no more KL and at least the reward):
    A = (1, .6), (4, .9)    B = (2, .5), (5, .8)    C = (.5, .7), (6, .95)    D = (3, .2)    E = (0, .1), (1, .6)
    B by A: (2,.5) <- (1,.6) yes; (5,.8) <- (4,.9) yes -> 100%; A by B: 0%     => A dominates B
    A by C: (1,.6) <- (.5,.7) yes; (4,.9) needs kl <= 4 and r >= .9: no -> 50%; C by A: (.5,.7) no, (6,.95) no -> 0%
    D by every other: (3,.2) <- (1,.6) (A, E), (2,.5) (B), (.5,.7) (C) -> 100%; nothing by D -> A, B, C, E dominate D
    A by E: (1,.6) <- (1,.6) yes (a tie), (4,.9) no -> 50%; E by A: (0,.1) no, (1,.6) yes -> 50%
    joint frontier (nothing with no more KL and strictly more reward, or less KL and as much):
    E (0,.1), C (.5,.7), A (4,.9), C (6,.95); (1,.6) of A and E is beaten by C's (.5,.7)."""
    pts = {"A": [(1, .6), (4, .9)], "B": [(2, .5), (5, .8)], "C": [(.5, .7), (6, .95)], "D": [(3, .2)],
           "E": [(0, .1), (1, .6)]}
    v = frontier_verdict([r for m, p in pts.items() for r in _rows(m, p)], kl_budgets=(1.0, 5.0))
    assert v["methods"] == ["A", "B", "C", "D", "E"]
    share = v["dominated_share"]
    assert share["B"]["A"] == 1.0 and share["A"]["B"] == 0.0
    assert share["A"]["C"] == 0.5 and share["C"]["A"] == 0.0
    assert all(share["D"][m] == 1.0 for m in "ABCE") and all(share[m]["D"] == 0.0 for m in "ABCE")
    assert share["A"]["E"] == 0.5 and share["E"]["A"] == 0.5
    assert ["A", "B"] in v["dominates"] and ["C", "D"] in v["dominates"] and ["A", "E"] not in v["dominates"]
    assert ["A", "C"] not in v["dominates"] and ["C", "A"] not in v["dominates"]  # 50% is not dominance
    assert v["joint_frontier_points"] == {"A": 1, "B": 0, "C": 2, "D": 0, "E": 1}
    assert v["best_reward"] == {"A": .9, "B": .8, "C": .95, "D": .2, "E": .6}
    assert v["best_reward_at_kl"]["1"] == {"A": .6, "B": None, "C": .7, "D": None, "E": .6}
    assert v["best_reward_at_kl"]["5"] == {"A": .9, "B": .8, "C": .7, "D": .2, "E": .6}
    assert "ppo_points_dominated_by_dpo" not in v  # only with both DPO and PPO
    text = v["text"]
    assert text.startswith("Over every method (A, B, C, D and E): ")
    assert "A's frontier dominates B's and D's" in text and "C's frontier dominates D's" in text
    assert "made of points of A (1), C (2) and E (1)" in text


def test_frontier_verdict_with_dpo_and_ppo_keeps_the_paper_sentence_first():
    rows = _rows("DPO", [(1.0, 0.6), (2.0, 0.8)]) + _rows("PPO", [(1.5, 0.5), (3.0, 0.7)]) + \
        _rows("best-of-N", [(0.0, 0.1), (0.5, 0.9)])
    v = frontier_verdict(rows)
    assert v["text"].startswith("DPO's frontier dominates PPO's at this scale")
    assert "best-of-N's frontier dominates DPO's and PPO's" in v["text"]
    assert v["ppo_points_dominated_by_dpo"] == 1.0 and v["dpo_points_dominated_by_ppo"] == 0.0


def test_frontier_verdict_states_the_share_it_checks():
    """Dominance allows 1% of exceptions: the sentence gives the counts, not "every PPO point"."""
    rows = _rows("DPO", [(1.0, 0.9)]) + _rows("PPO", [(2.0, 0.5)] * 99 + [(0.5, 0.1)])
    v = frontier_verdict(rows)
    assert v["dominates"] == [["DPO", "PPO"]] and v["ppo_points_dominated_by_dpo"] == 0.99
    assert v["text"].startswith("DPO's frontier dominates PPO's at this scale: 99 of the 100 PPO points are "
                                "matched or beaten by a DPO point (dominance asks for at least 99%)")
    assert "0 of the 1 DPO points by a PPO point" in v["text"] and "every" not in v["text"]
    flipped = frontier_verdict(_rows("PPO", [(1.0, 0.9)]) + _rows("DPO", [(2.0, 0.5)] * 3))
    assert flipped["text"] == ("PPO's frontier dominates DPO's at this scale (the paper found the opposite): 3 of "
                               "the 3 DPO points are matched or beaten by a PPO point (dominance asks for at least "
                               "99%) and 0 of the 1 PPO points by a DPO point.")


def test_best_of_n_kl_bound():
    # log N − (N−1)/N: 0 for N = 1 (the reference itself); log 2 − 1/2 = 0.19315 for N = 2
    assert best_of_n_kl_bound(1) == 0.0
    assert best_of_n_kl_bound(2) == pytest.approx(0.1931471806, abs=1e-9)
    assert best_of_n_kl_bound(16) == pytest.approx(math.log(16) - 15 / 16, abs=1e-12)
    bounds = [best_of_n_kl_bound(n) for n in (1, 2, 4, 8, 16, 32)]
    assert bounds == sorted(bounds) and bounds[-1] < math.log(32)  # grows, but slower than log N


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


def test_a_negative_kl_estimate_compares_as_zero():
    """A sampled KL estimate below 0 (few prompts) made an RLOO point of lower reward than best-of-1
    (KL exactly 0) undominated, as if it cost less than no change at all."""
    v = frontier_verdict(_rows("RLOO", [(-0.1, 0.3)]) + _rows("best-of-N", [(0.0, 0.4)]))
    assert v["dominated_share"]["RLOO"]["best-of-N"] == 1.0


def test_shares_in_the_report_never_round_up_to_every_point():
    from dpolab.experiments.report import _pct

    assert [_pct(x) for x in (0.995, 1.0, 0.5, 0.0, 2 / 3)] == ["99%", "100%", "50%", "0%", "66%"]
