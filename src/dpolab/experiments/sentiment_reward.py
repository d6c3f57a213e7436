"""Ground-truth rewards for the experiments.

``vader_sentiment`` is the demo's default: the VADER compound score of the completion, in [-1, 1]
(Hutto & Gilbert 2014; the ``vaderSentiment`` package ships its lexicon, so it runs offline). It has
the signature every dpolab reward callable has: ``f(prompts, completions) -> list[float]``, so
``--reward dpolab.experiments.sentiment_reward:vader_sentiment`` works anywhere a reward is accepted.
"""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def _analyzer():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def vader_sentiment(prompts: list[str], completions: list[str]) -> list[float]:
    """VADER compound sentiment of each completion (the prompt is not scored)."""
    analyzer = _analyzer()
    return [float(analyzer.polarity_scores(c)["compound"]) for c in completions]
