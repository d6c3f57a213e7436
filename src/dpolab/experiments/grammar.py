"""A small, documented grammar of movie-review-like texts of mixed sentiment (dpolab's own).

It stands in for IMDb in the DPO paper's controlled-sentiment experiment, so the demo runs with no
download. A review is 2-4 sentences; each sentence picks a template and fills its slots. Sentiment
is drawn per slot: the review has a "mood" p ~ Uniform(0, 1) and each sentiment slot is positive with
probability p, negative otherwise (a few slots are neutral). So reviews range from glowing to
scathing and are often mixed, and a prefix does not decide how its continuation will feel: exactly
what a sentiment-steering experiment needs.

    review    := sentence{2..4}
    sentence  := "{Opener} {was} {adj}." | "The {aspect} {was} {adj}." | "I {verdict} it."
               | "{Opener} {was} {adj}, and the {aspect} {was} {adj}."
               | "{Opener} {was} {adj}, but the {aspect} {was} {adj}."
               | "Overall, a {adj} {thing}." | "I would {recommend} it to {audience}."
    adj       := positive | negative | neutral words below (VADER scores them; neutral ones score 0)

Prompts for the experiment are the first 2-4 words of held-out reviews, as the paper used prefixes
of IMDb reviews.
"""

from __future__ import annotations

import random

OPENERS = ["This movie", "The film", "This show", "The story", "The sequel", "This drama", "The comedy",
           "The documentary", "This thriller", "The new series"]
WAS = ["was", "is", "felt", "seemed"]
ASPECTS = ["acting", "plot", "music", "script", "ending", "dialogue", "cast", "pacing", "soundtrack",
           "camera work", "lead actor", "story"]
THINGS = ["experience", "evening", "film", "ride", "watch", "story"]
AUDIENCES = ["everyone", "my friends", "families", "fans of the genre", "anyone", "my parents"]

POSITIVE = ["wonderful", "great", "brilliant", "charming", "delightful", "funny", "beautiful", "excellent",
            "amazing", "lovely", "fantastic", "superb", "clever", "enjoyable", "good", "perfect"]
NEGATIVE = ["terrible", "boring", "awful", "dull", "bad", "painful", "stupid", "disappointing", "horrible",
            "weak", "lame", "ugly", "annoying", "poor", "sad", "mediocre"]
NEUTRAL = ["long", "quiet", "slow", "predictable", "short", "loud", "familiar", "strange"]
VERDICT_POS = ["loved", "enjoyed", "liked", "adored"]
VERDICT_NEG = ["hated", "disliked", "regretted", "endured"]
RECOMMEND_POS = ["recommend", "happily recommend", "gladly show"]
RECOMMEND_NEG = ["not recommend", "never recommend", "not show"]


def _adj(rng: random.Random, mood: float) -> str:
    u = rng.random()
    if u < 0.12:
        return rng.choice(NEUTRAL)
    return rng.choice(POSITIVE) if rng.random() < mood else rng.choice(NEGATIVE)


def _sentence(rng: random.Random, mood: float) -> str:
    pos = rng.random() < mood
    kind = rng.randrange(7)
    if kind == 0:
        return f"{rng.choice(OPENERS)} {rng.choice(WAS)} {_adj(rng, mood)}."
    if kind == 1:
        return f"The {rng.choice(ASPECTS)} {rng.choice(WAS)} {_adj(rng, mood)}."
    if kind == 2:
        return f"I {rng.choice(VERDICT_POS if pos else VERDICT_NEG)} it."
    if kind == 3:
        return (f"{rng.choice(OPENERS)} {rng.choice(WAS)} {_adj(rng, mood)}, and the {rng.choice(ASPECTS)} "
                f"{rng.choice(WAS)} {_adj(rng, mood)}.")
    if kind == 4:
        return (f"{rng.choice(OPENERS)} {rng.choice(WAS)} {_adj(rng, mood)}, but the {rng.choice(ASPECTS)} "
                f"{rng.choice(WAS)} {_adj(rng, 1 - mood)}.")
    if kind == 5:
        return f"Overall, a {_adj(rng, mood)} {rng.choice(THINGS)}."
    return f"I would {rng.choice(RECOMMEND_POS if pos else RECOMMEND_NEG)} it to {rng.choice(AUDIENCES)}."


def generate_review(rng: random.Random) -> str:
    """One review of 2-4 sentences with a random mood."""
    mood = rng.random()
    return " ".join(_sentence(rng, mood) for _ in range(rng.randint(2, 4)))


def generate_reviews(n: int, seed: int = 0) -> list[str]:
    """``n`` reviews, reproducible for a given seed."""
    rng = random.Random(seed)
    return [generate_review(rng) for _ in range(n)]


def review_prefix(review: str, rng: random.Random, *, min_words: int = 2, max_words: int = 4) -> str:
    """The first 2-4 words of a review: a prompt that leaves the sentiment open."""
    words = review.split()
    k = min(len(words), rng.randint(min_words, max_words))
    return " ".join(words[:k])
