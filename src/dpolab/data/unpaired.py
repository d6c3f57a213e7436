"""Unpaired (KTO) data: completions labelled desirable or undesirable, and preference pairs split in two.

Row formats (detected per row; docs/kto.md):

* unpaired: ``prompt``, ``completion``, ``label`` (``true``: desirable, ``false``: undesirable; in CSV
  files also the strings ``true``/``false``). ``prompt`` a string or messages, ``completion`` a
  string or assistant message(s), as TRL's unpaired formats; a ``completion`` that is a whole
  conversation may stand without ``prompt``;
* any preference format of :mod:`dpolab.data.preference` (standard, implicit prompt, chat), parsed by
  :func:`~dpolab.data.preference.parse_preference` and split into a desirable example (chosen) and an
  undesirable one (rejected) of the same prompt: an *implied pair*, kept together in one split.

Each example is tokenized on its own exactly as a preference pair's chosen row is (prompt and
completion separately, EOS appended, the prompt truncated first) by
:func:`~dpolab.data.preference.tokenize_preference`, so its tokens never depend on another example.

KTO's reference point needs log-probs of *mismatched* pairs, a prompt with another example's
completion. Here each example ``i`` of a split gets a fixed partner ``j(i)``: a seeded derangement (one
cycle through a shuffled order, so every completion is used once and never with its own prompt). A
row travels as the pair ``(x_i, y_i, y_j(i))`` (:class:`UnpairedRow`), so the pair collators and the
reference machinery (precomputed cache, live model, PEFT base) serve KTO unchanged. The partner's
completion keeps its tokens as tokenized for its own row, cut to the room ``x_i`` leaves.
"""

from __future__ import annotations

import dataclasses
import random
import re
from dataclasses import dataclass

from dpolab.data.loading import Record, load_records, located_error, missing, record_error
from dpolab.data.preference import (
    MAX_SKIPPED_EXAMPLES,
    DataReport,
    PreferenceExample,
    TokenizedPair,
    eval_count,
    parse_preference,
    tokenize_preference,
)
from dpolab.errors import ConfigError, DataError


@dataclass
class UnpairedExample:
    """One example before tokenization: ``example.chosen`` (= ``.rejected``) is the completion.

    ``field`` names where the completion came from (``completion``, or ``chosen``/``rejected`` of a
    pair); ``pair`` is the source row of a pair split in two (-1 for an unpaired row)."""

    example: PreferenceExample
    desirable: bool
    field: str = "completion"
    pair: int = -1


@dataclass
class UnpairedRow(TokenizedPair):
    """A tokenized example as the pair ``(prompt_i, completion_i, completion of j(i))``: ``chosen_ids``
    is its own completion, ``rejected_ids`` its partner's (the mismatched pair of the KL estimate)."""

    desirable: bool = True
    pair: int = -1     # source row of its implied pair (-1: none)
    partner: int = -1  # j(i), the row whose completion ``rejected_ids`` holds

    @property
    def completion_ids(self) -> list[int]:
        return self.chosen_ids

    @property
    def mismatched_ids(self) -> list[int]:
        return self.rejected_ids


@dataclass
class UnpairedReport(DataReport):
    """:class:`~dpolab.data.preference.DataReport` counting examples (a pair counts two), plus:
    the training split's ``desirable``/``undesirable`` counts, ``from_pairs`` (examples split from pairs,
    both splits), ``eval_pairs`` (implied pairs in the eval split) and ``mismatched_same_prompt``
    (training rows whose partner happens to share their prompt). ``identical`` counts source pairs
    whose two responses are the same (split into one completion labelled both ways). ``formats`` counts source rows:
    ``unpaired``, ``unpaired_conversational``, or the pair formats of ``load_preference_data``."""

    desirable: int = 0
    undesirable: int = 0
    from_pairs: int = 0
    eval_pairs: int = 0
    mismatched_same_prompt: int = 0


@dataclass
class UnpairedData:
    train: list[UnpairedRow]
    eval: list[UnpairedRow]
    report: UnpairedReport


def parse_unpaired(record: Record, pair: int = -1) -> list[UnpairedExample]:
    """The examples of one row: one for an unpaired row, two (desirable, undesirable) for a preference
    pair, which gets the id ``pair``. :class:`DataError` naming the row and field on bad input."""
    data = record.data
    csv = record.path.lower().endswith((".csv", ".csv.gz"))
    # a columnar file (Parquet, CSV, datasets) mixing the forms holds null (CSV: empty) where a row has no value
    if all(data.get(k) is None or (csv and data.get(k) == "") for k in ("label", "completion")):
        ex = parse_preference(record)
        return [UnpairedExample(dataclasses.replace(ex, rejected=ex.chosen), True, "chosen", pair),
                UnpairedExample(dataclasses.replace(ex, chosen=ex.rejected), False, "rejected", pair)]
    pair_fields = [k for k in ("chosen", "rejected") if not (data.get(k) is None or (csv and data.get(k) == ""))]
    if pair_fields:  # both forms filled: which example the row means is not known
        raise record_error(record, f"holds an unpaired example ('completion', 'label') and a pair's "
                           f"{' and '.join(repr(k) for k in pair_fields)}: give one form per row", field=pair_fields[0])
    label = data.get("label")
    if isinstance(label, str) and csv and label.lower() in ("true", "false"):
        label = label.lower() == "true"  # CSV cells are strings
    if not isinstance(label, bool):
        got = missing(record, "label") if "label" not in data else f"got {label!r} ({type(label).__name__})"
        raise record_error(record, f"must be true (desirable) or false (undesirable): {got}", field="label")
    completion = data.get("completion")
    if completion is None:
        raise record_error(record, missing(record, "completion") if "completion" not in data else "is null",
                           field="completion")
    if isinstance(completion, str) and data.get("prompt") is None:
        raise record_error(record, ("is null" if "prompt" in data else missing(record, "prompt")) + ": an unpaired row needs a "
                           "prompt (or a whole conversation as 'completion')", field="prompt")
    # parse_preference validates and splits prompt/completion; errors name 'completion', not 'chosen'
    prompt = {"prompt": data["prompt"]} if "prompt" in data else {}
    as_pair = Record({**prompt, "chosen": completion, "rejected": completion}, record.path, record.line, record.unit)
    try:
        ex = parse_preference(as_pair)
    except DataError as err:
        field = re.sub(r"^(chosen|rejected)", "completion", err.field) if err.field else None
        raise record_error(record, err.reason, field=field) from err
    return [UnpairedExample(ex, label)]


def mismatched_partners(n: int, rng: random.Random) -> list[int]:
    """``j(i)`` for ``n`` rows: one cycle through an ``rng``-shuffled order (a derangement; ``n == 1``
    pairs the row with itself, there being nothing to mismatch)."""
    order = list(range(n))
    rng.shuffle(order)
    partner = [0] * n
    for k, i in enumerate(order):
        partner[i] = order[(k + 1) % n]
    return partner


def implied_pairs(rows: list[UnpairedRow]) -> list[tuple[int, int]]:
    """``(desirable row, undesirable row)`` of every pair split in two whose sides are both in ``rows``."""
    sides: dict[int, dict[bool, int]] = {}
    for i, row in enumerate(rows):
        if row.pair >= 0:
            sides.setdefault(row.pair, {})[row.desirable] = i
    return [(s[True], s[False]) for s in sides.values() if len(s) == 2]


def tokenize_split(examples: list[UnpairedExample], tokenizer, *, max_length: int, max_prompt_length: int,
                   rng: random.Random) -> list[UnpairedRow]:
    """Tokenize each example alone, then give row ``i`` its partner's completion (module docstring).
    A completion with no token left after truncation is a :class:`DataError` at its row and field."""
    rows = []
    for ex in examples:
        try:
            pair = tokenize_preference(ex.example, tokenizer, max_length=max_length,
                                       max_prompt_length=max_prompt_length, index=len(rows))
        except DataError as err:  # the completion is the example's chosen (= rejected): name its own field
            if err.field not in ("chosen", "rejected"):
                raise
            e = ex.example
            raise located_error(e.path, e.line, e.unit, err.reason, field=ex.field) from err
        if pair is None:
            e = ex.example
            raise located_error(e.path, e.line, e.unit, f"no completion token left after truncation "
                                f"(max_length={max_length}, max_prompt_length={max_prompt_length})", field=ex.field)
        rows.append(UnpairedRow(pair.prompt_ids, pair.chosen_ids, [], pair.index, pair.truncated,
                                desirable=ex.desirable, pair=ex.pair))
    for row, j in zip(rows, mismatched_partners(len(rows), rng)):
        # room >= len(own completion) >= 1: the row itself fitted in max_length
        row.rejected_ids, row.partner = rows[j].chosen_ids[:max_length - len(row.prompt_ids)], j
    return rows


def load_unpaired_data(source: str, tokenizer, *, max_length: int = 512, max_prompt_length: int = 256,
                       eval_source: str | None = None, eval_fraction: float = 0.05, seed: int = 0,
                       split: str = "train", eval_split: str = "test") -> UnpairedData:
    """Load, parse, split and tokenize unpaired (or paired) data; partners drawn per split from ``seed``.

    Without ``eval_source``, ``eval_count(rows, eval_fraction)`` source rows drawn with
    ``random.Random(seed)`` are held out (a pair's two examples stay together), as
    :func:`~dpolab.data.preference.load_preference_data` does; both splits keep the file order."""
    if not 0 <= eval_fraction < 1:
        raise ConfigError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    records = load_records(source, split=split)
    n_held = 0 if eval_source is not None else eval_count(len(records), eval_fraction)
    held = set(random.Random(seed).sample(range(len(records)), n_held))
    eval_rec = (load_records(eval_source, split=eval_split) if eval_source is not None
                else [r for i, r in enumerate(records) if i in held])
    splits, formats, parsed_splits, identical = {}, {}, {}, []
    for name, recs in (("train", [r for i, r in enumerate(records) if i not in held]), ("eval", eval_rec)):
        examples = []
        for i, record in enumerate(recs):
            parsed = parse_unpaired(record, i)
            ex = parsed[0].example
            fmt = ex.source_format if len(parsed) == 2 else "unpaired" + "_conversational" * ex.conversational
            formats[fmt] = formats.get(fmt, 0) + 1
            if len(parsed) == 2 and parsed[0].example.chosen == parsed[1].example.chosen:
                identical.append(ex.where)  # one completion labelled both desirable and undesirable
            examples += parsed
        parsed_splits[name] = examples
    for name, examples in parsed_splits.items():  # every row checked first: a bad row is said before this
        if len(examples) == 1:  # its z0 would pair the example with its own completion
            where = (f"--eval-fraction {eval_fraction} holds out one example of {source}" if name == "eval"
                     and eval_source is None else f"{eval_source if name == 'eval' else source}: one example "
                     f"for the {name} split")
            if name == "eval":
                fix = ("give 2 or more rows in --eval-data, or leave it out" if eval_source is not None
                       else "raise --eval-fraction, or 0 for no eval split")
            else:
                fix = "lower --eval-fraction" if n_held else "give more rows"  # (held rows could come back)
            raise ConfigError(f"{where}; KTO's KL estimate z0 pairs every example with another one's completion, "
                              f"so a split needs 2 or more ({fix})")
        splits[name] = tokenize_split(examples, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length,
                                      rng=random.Random(f"kto-mismatched/{name}/{seed}"))
    train, evals = splits["train"], splits["eval"]
    both = train + evals
    report = UnpairedReport(
        rows=len(both), train_rows=len(train), eval_rows=len(evals), skipped=0,
        truncated=sum(r.truncated for r in both), tokens=sum(r.num_tokens for r in both), formats=formats,
        desirable=sum(r.desirable for r in train), undesirable=sum(not r.desirable for r in train),
        from_pairs=sum(r.pair >= 0 for r in both), eval_pairs=len(implied_pairs(evals)),
        mismatched_same_prompt=sum(r.prompt_ids == train[r.partner].prompt_ids for r in train if r.partner != r.index),
        identical=len(identical), identical_examples=identical[:MAX_SKIPPED_EXAMPLES])
    return UnpairedData(train, evals, report)
