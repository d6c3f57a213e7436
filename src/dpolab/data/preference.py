"""Preference pairs: format detection, tokenization with truncation, the eval split and the report.

Formats (detected per row by :func:`parse_preference`; see ``docs/data-formats.md``):

* standard: ``prompt``, ``chosen``, ``rejected`` strings; ``chosen``/``rejected`` are responses only;
* implicit prompt: no ``prompt``; ``chosen`` and ``rejected`` are whole texts sharing the prompt as a
  prefix (Anthropic HH). The split point is the end of the last turn marker (``TURN_MARKERS``) in
  their longest common prefix, else the last whitespace in it (the response keeps the whitespace);
* conversational: ``chosen``/``rejected`` are lists of ``{"role", "content"}`` messages, with the
  prompt given as messages (``prompt``) or as the messages both conversations share before their
  final assistant message(s). The prompt is rendered with the tokenizer's chat template
  (``add_generation_prompt=True``); a response is its assistant message(s)' content.

Tokenization (:func:`tokenize_preference`): prompt and responses are tokenized separately with
``add_special_tokens=False`` and concatenated as ids, so no BPE merge crosses the boundary; a
response after a non-empty prompt is encoded as text that continues another (for SentencePiece
tokenizers that mark a text's start with "▁", without that mark: :mod:`dpolab.lm.continuation`). The
prompt gets the tokenizer's own leading special tokens (BOS) only if the tokenizer adds them itself
with ``add_special_tokens=True`` (found by encoding a probe both ways); an empty prompt becomes one
BOS (or EOS) token so the first response token has a context. EOS is appended to each response.

Truncation, when ``len(prompt) + max(len(chosen), len(rejected)) > max_length``: first the prompt is
cut to ``max_prompt_length`` tokens keeping its END (leading BOS kept), then each response is cut to
the ``max_length - len(prompt)`` tokens at its START (its EOS may be lost). A pair with an empty
response left is skipped: ``tokenize_preference`` returns ``None`` and the report counts it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from dataclasses import dataclass, field

from dpolab.data.loading import (
    Record,
    load_records,
    located_error,
    missing,
    record_error,
    role_problem,
    text_problem,
    tool_call_turns,
)
from dpolab.errors import ConfigError, DataError
from dpolab.lm.continuation import encode_continuations

TURN_MARKERS = ("\n\nAssistant:", "\nAssistant:", "<|assistant|>\n", "<|im_start|>assistant\n",
                "[/INST]")
"""Where an implicit prompt may end (the prompt includes the marker), most specific first."""

MAX_SKIPPED_EXAMPLES = 20


@dataclass
class PreferenceExample:
    """One preference pair before tokenization.

    Strings (standard format) or message lists (conversational): ``prompt`` is the messages before
    the response, ``chosen``/``rejected`` the response's assistant message(s).
    """

    prompt: str | list[dict]
    chosen: str | list[dict]
    rejected: str | list[dict]
    path: str
    line: int
    unit: str = "line"  # "line" (JSONL) or "row" (other sources), as in Record
    source_format: str = "standard"  # how the prompt was found: standard, implicit or conversational
    prompt_field: str = "prompt"  # the field the prompt was read from (errors name it)

    @property
    def conversational(self) -> bool:
        return isinstance(self.chosen, list)

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}" if self.unit == "line" else f"{self.path} row {self.line}"


# ----------------------------------------------------------------------------------------------
# Format detection


def parse_preference(record: Record) -> PreferenceExample:
    """Detect the row's format and return its prompt and responses; :class:`DataError` on bad rows
    (missing or non-string fields, malformed messages, no way to find the prompt)."""
    chosen, rejected = _value(record, "chosen"), _value(record, "rejected")
    prompt = _value(record, "prompt", required=False)

    def make(p, c, r, fmt: str = "", prompt_field: str = "prompt") -> PreferenceExample:
        fmt = fmt or ("conversational" if isinstance(c, list) else "standard")
        return PreferenceExample(p, c, r, record.path, record.line, record.unit, fmt, prompt_field)

    if isinstance(chosen, str) != isinstance(rejected, str):
        raise record_error(record, "'chosen' and 'rejected' must both be strings or both be "
                           "message lists", field="rejected")
    if isinstance(chosen, str):
        if prompt is None:
            split = split_implicit_prompt(chosen, rejected)
            if split is None:
                raise record_error(record, "no 'prompt' field, and 'chosen' and 'rejected' share no "
                                   "prefix ending at a turn marker or whitespace; add a 'prompt' "
                                   "field", field="prompt")
            return make(*split, "implicit", prompt_field="chosen")
        if isinstance(prompt, str):
            return make(prompt, chosen, rejected)
        # Messages as prompt, plain strings as responses.
        return make(prompt, [_assistant(chosen)], [_assistant(rejected)])

    if isinstance(prompt, list):
        return make(prompt, _responses(record, "chosen", chosen, prompt),
                    _responses(record, "rejected", rejected, prompt))
    if not _has_non_assistant(chosen) and not _has_non_assistant(rejected):
        if prompt is None:
            raise record_error(record, "the conversations hold only assistant messages and there "
                               "is no 'prompt' field", field="prompt")
        return make([{"role": "user", "content": prompt}], chosen, rejected)
    # Whole conversations: the prompt is what precedes the final assistant message(s); a string
    # 'prompt' next to them repeats the user turn and is ignored.
    p_chosen, r_chosen = _split_final_assistant(record, "chosen", chosen)
    p_rejected, r_rejected = _split_final_assistant(record, "rejected", rejected)
    if _key(p_chosen) != _key(p_rejected):
        raise record_error(record, "'chosen' and 'rejected' conversations differ before their final "
                           "assistant message(s); they must share the prompt", field="rejected")
    return make(p_chosen, r_chosen, r_rejected, prompt_field="chosen")


def split_implicit_prompt(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """Split two texts sharing a prompt into ``(prompt, chosen_response, rejected_response)``.

    The prompt is the longest common prefix that ends at a turn marker (marker included), else the
    longest common prefix followed by whitespace (the responses start with that whitespace). ``None``
    when no such prefix exists. E.g. ``"\\n\\nHuman: hi\\n\\nAssistant: I am fine"`` vs ``"... I
    don't know"`` splits after ``"Assistant:"``, not inside the shared word ``"I"``.
    """
    lcp = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        lcp += 1
    cut = max((chosen.rfind(m, 0, lcp) + len(m) for m in TURN_MARKERS if chosen.rfind(m, 0, lcp) >= 0),
              default=-1)
    if cut < 0:
        # Last whitespace strictly inside the common prefix (present in both texts).
        cut = next((i for i in range(lcp - 1, 0, -1) if chosen[i].isspace()), -1)
    if cut <= 0:
        return None
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _value(record: Record, name: str, *, required: bool = True):
    """The field ``name``: a string or a validated message list (``None`` if optional and absent)."""
    value = record.data.get(name)
    if value is None:
        if required or name in record.data:  # a null optional field is an error too, not "absent"
            raise record_error(record, missing(record, name) if name not in record.data else "is null",
                               field=name)
        return None
    if isinstance(value, str):
        _check_text(record, name, value)
        return value
    if isinstance(value, (list, tuple)):
        messages = []
        for i, message in enumerate(tool_call_turns(list(value))):
            where = f"{name}[{i}]"
            if not isinstance(message, dict):
                raise record_error(record, f"expected a {{'role', 'content'}} message, got "
                                   f"{type(message).__name__}", field=where)
            for key in ("role", "content"):
                if not isinstance(message.get(key), str):
                    got = ("missing" if key not in message else "null" if message[key] is None
                           else type(message[key]).__name__)
                    raise record_error(record, f"message '{key}' must be a string, got {got}",
                                       field=where)
                _check_text(record, f"{where}.{key}", message[key])
            if problem := role_problem(message["role"]):
                raise record_error(record, problem, field=f"{where}.role")
            messages.append(message)
        if not messages and name != "prompt":
            raise record_error(record, "is an empty message list", field=name)
        return messages
    raise record_error(record, f"expected a string or a list of {{'role', 'content'}} messages, got "
                       f"{type(value).__name__}", field=name)


def _check_text(record: Record, name: str, text: str) -> None:
    if problem := text_problem(text):
        raise record_error(record, problem, field=name)


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def _key(messages: list[dict]) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in messages]


def _has_non_assistant(messages: list[dict]) -> bool:
    return any(m["role"] != "assistant" for m in messages)


def _split_final_assistant(record: Record, name: str, messages: list[dict]):
    k = len(messages)
    while k > 0 and messages[k - 1]["role"] == "assistant":
        k -= 1
    if k == len(messages):
        raise record_error(record, "the conversation does not end with an assistant message",
                           field=name)
    return list(messages[:k]), list(messages[k:])


def _responses(record: Record, name: str, messages: list[dict], prompt: list[dict]) -> list[dict]:
    """Response messages given an explicit message prompt (a repeated prompt prefix is dropped)."""
    if len(messages) > len(prompt) and _key(messages[:len(prompt)]) == _key(prompt):
        messages = messages[len(prompt):]
    if _has_non_assistant(messages):
        raise record_error(record, "with a message 'prompt', the responses must be assistant "
                           "messages", field=name)
    return list(messages)


# ----------------------------------------------------------------------------------------------
# Tokenization


@dataclass
class TokenizedPair:
    """Token ids of one pair. Responses end with EOS unless truncation cut it.

    ``index`` is the pair's position in its split (``train[i].index == i``): the key of per-pair
    caches such as precomputed reference log-probs.
    """

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    index: int
    truncated: bool

    @property
    def num_tokens(self) -> int:
        """Real tokens the model reads for this pair: ``2*|prompt| + |chosen| + |rejected|``."""
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


@dataclass(frozen=True)
class SpecialIds:
    prefix: tuple[int, ...]  # what add_special_tokens=True puts before the text (e.g. BOS)
    start_id: int            # the token standing for an empty prompt
    eos_id: int
    bos_id: int | None = None


def special_ids(tokenizer) -> SpecialIds:
    """What the tokenizer adds around a text (its BOS prefix), the id standing for an empty prompt,
    and EOS, probed once per tokenizer."""
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ConfigError("the tokenizer has no eos_token; responses need one appended (set "
                          "tokenizer.eos_token)")
    probe = "a b"
    with_specials = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    prefix: list[int] = []
    for k in range(len(with_specials) - len(plain) + 1):
        if with_specials[k:k + len(plain)] == plain:
            prefix = with_specials[:k]
            break
    bos_id = tokenizer.bos_token_id
    return SpecialIds(tuple(prefix), eos_id if bos_id is None else bos_id, eos_id, bos_id)


def _texts(ex: PreferenceExample, tokenizer) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) as text; conversations through the chat template."""
    if not ex.conversational:
        return ex.prompt, ex.chosen, ex.rejected  # type: ignore[return-value]
    try:
        prompt = tokenizer.apply_chat_template(ex.prompt, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # noqa: BLE001 -- no template, or a template that rejects the roles
        raise located_error(ex.path, ex.line, ex.unit, "cannot render the conversation with the "
                            f"tokenizer's chat template: {exc}", field=ex.prompt_field) from exc
    gap = {}
    for name, response in (("chosen", ex.chosen), ("rejected", ex.rejected)):
        try:  # rendered so that a template's own checks (roles that must alternate) see the whole turn
            full = tokenizer.apply_chat_template([*ex.prompt, *response], tokenize=False,  # type: ignore[misc]
                                                 add_generation_prompt=False)
        except Exception as exc:  # noqa: BLE001
            raise located_error(ex.path, ex.line, ex.unit, "the tokenizer's chat template refuses the "
                                f"conversation with this response: {exc}", field=name) from exc
        gap[name] = _check_generation_prompt(ex, tokenizer, prompt, full, response[0]["content"])  # type: ignore[index]
    return (prompt, gap["chosen"] + "\n".join(m["content"] for m in ex.chosen),  # type: ignore[union-attr]
            gap["rejected"] + "\n".join(m["content"] for m in ex.rejected))  # type: ignore[union-attr]


def _check_generation_prompt(ex: PreferenceExample, tokenizer, prompt: str, full: str, answer: str) -> str:
    """A template without an ``add_generation_prompt`` branch renders the prompt with no assistant
    header, so prompt + answer would skip the header the template writes before every answer (SFT
    trains it and sampling starts after the prompt): refused. White space alone between the prompt
    (with its generation prompt, if any) and the answer (Llama-2's ``[/INST] answer``, a turn written
    "Assistant: answer" after a generation prompt "Assistant:") is returned, to start the response:
    sampling after the prompt writes it, as ``▁answer``/``Ġanswer``. A template that only writes the
    answer differently (``| trim``) has a generation prompt and is not refused."""
    if not full.startswith(prompt) or full[len(prompt):].startswith(answer):
        return ""
    between = full[len(prompt):]
    between = between[:between.find(answer)] if answer and answer in between else between[:40]
    if between and not between.strip() and full[len(prompt) + len(between):].startswith(answer):
        return between  # also after a generation prompt the turn writes a space after ("Assistant:")
    if tokenizer.apply_chat_template(ex.prompt, tokenize=False, add_generation_prompt=False) != prompt:
        return ""
    raise located_error(ex.path, ex.line, ex.unit, "the tokenizer's chat template has no generation prompt "
                        f"(add_generation_prompt=True adds nothing) but writes {between!r} before an answer: "
                        "pairs would train on answers without it; give the tokenizer a template that "
                        "supports add_generation_prompt")


def _encode_many(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def encode_after(tokenizer, prompts: list[str], texts: list[str]) -> list[list[int]]:
    """Token ids of each response as it reads after its prompt (a SentencePiece tokenizer's "▁"
    start mark only where the prompt is empty: :mod:`dpolab.lm.continuation`)."""
    after = encode_continuations(tokenizer, [t for p, t in zip(prompts, texts) if p])
    alone = iter(_encode_many(tokenizer, [t for p, t in zip(prompts, texts) if not p]))
    rest = iter(after)
    return [next(rest) if p else next(alone) for p in prompts]


def with_eos(ids: list[int], eos_id: int) -> list[int]:
    """``ids`` ending with EOS: appended, unless the text already ended with the EOS token's own text
    (Llama-2-formatted data write "</s>"), which would train EOS after EOS."""
    return ids if ids[-1:] == [eos_id] else ids + [eos_id]


def _assemble(prompt: list[int], chosen: list[int], rejected: list[int], sp: SpecialIds, *,
              max_length: int, max_prompt_length: int, index: int) -> TokenizedPair | None:
    """Add specials, then truncate (prompt keeps its end, responses their start)."""
    prefix = list(sp.prefix)
    if prefix and prompt[:len(prefix)] == prefix:  # the chat template already wrote BOS
        prompt = prompt[len(prefix):]
    elif not prefix and sp.bos_id is not None and prompt[:1] == [sp.bos_id]:
        prefix, prompt = [sp.bos_id], prompt[1:]  # a BOS the template wrote is kept on truncation too
    if not prefix and not prompt:
        prefix = [sp.start_id]
    chosen, rejected = with_eos(chosen, sp.eos_id), with_eos(rejected, sp.eos_id)
    truncated = False
    if len(prefix) + len(prompt) + max(len(chosen), len(rejected)) > max_length:
        keep = max(max_prompt_length - len(prefix), 0)
        if len(prompt) > keep:
            prompt, truncated = prompt[len(prompt) - keep:], True
        budget = max(max_length - len(prefix) - len(prompt), 0)
        if len(chosen) > budget or len(rejected) > budget:
            chosen, rejected, truncated = chosen[:budget], rejected[:budget], True
    if not chosen or not rejected:
        return None
    return TokenizedPair(prefix + prompt, chosen, rejected, index, truncated)


def encode_prompt_completions(tokenizer, prompts: list[str], completions: list[str], *,
                              max_length: int | None = None, max_prompt_length: int | None = None) -> list[list[int]]:
    """Token ids of ``prompt + completion + EOS`` per pair, exactly as a chosen row of a preference pair
    is built (same specials and truncation; no truncation by default). Raises ``ConfigError`` if a
    completion keeps no token."""
    if len(prompts) != len(completions):
        raise ConfigError(f"{len(prompts)} prompts but {len(completions)} completions")
    for name, texts in (("prompts", prompts), ("completions", completions)):
        if not all(isinstance(t, str) for t in texts):
            raise ConfigError(f"{name} must be strings")
    sp = special_ids(tokenizer)
    max_length = max_length or 1 << 30
    max_prompt_length = max_prompt_length or max_length - 1
    out = []
    for p, c in zip(_encode_many(tokenizer, list(prompts)), encode_after(tokenizer, list(prompts), list(completions))):
        pair = _assemble(p, c, c, sp, max_length=max_length, max_prompt_length=max_prompt_length, index=0)
        if pair is None:
            raise ConfigError("a completion has no token left after truncation; raise max_length")
        out.append(pair.prompt_ids + pair.chosen_ids)
    return out


def _check_lengths(max_length: int, max_prompt_length: int) -> None:
    if max_length < 2:
        raise ConfigError(f"max_length must be at least 2, got {max_length}")
    if max_prompt_length < 1:
        raise ConfigError(f"max_prompt_length must be at least 1, got {max_prompt_length}")


def tokenize_preference(ex: PreferenceExample, tokenizer, *, max_length: int,
                        max_prompt_length: int, index: int = 0) -> TokenizedPair | None:
    """Tokenize and truncate one pair (policy in the module docstring); ``None`` if a response
    is left with no token."""
    _check_lengths(max_length, max_prompt_length)
    sp = special_ids(tokenizer)
    prompt, chosen, rejected = _texts(ex, tokenizer)
    p, = _encode_many(tokenizer, [prompt])
    c, r = encode_after(tokenizer, [prompt, prompt], [chosen, rejected])
    return _assemble(p, c, r, sp, max_length=max_length, max_prompt_length=max_prompt_length,
                     index=index)


# ----------------------------------------------------------------------------------------------
# Whole data sets


@dataclass
class DataReport:
    """What loading did. ``rows == train_rows + eval_rows + skipped``; ``truncated`` counts kept
    pairs that lost tokens; ``tokens`` sums :attr:`TokenizedPair.num_tokens` over kept pairs;
    ``formats`` counts rows by how their prompt was found (``standard``: a ``prompt`` field,
    ``implicit``: the prefix chosen and rejected share, ``conversational``: chat messages)."""

    rows: int
    train_rows: int
    eval_rows: int
    skipped: int
    truncated: int
    tokens: int
    skipped_examples: list[str] = field(default_factory=list)  # the first MAX_SKIPPED_EXAMPLES
    formats: dict[str, int] = field(default_factory=dict)  # rows per source format: how prompts were found
    identical: int = 0  # pairs whose chosen and rejected responses are the same (kept: no signal in them)
    identical_examples: list[str] = field(default_factory=list)  # the first MAX_SKIPPED_EXAMPLES
    # string pairs whose chosen and rejected both begin with the whole prompt: responses written as
    # whole texts beside a prompt field (kept: the model reads the prompt twice)
    repeats_prompt: int = 0
    repeats_prompt_examples: list[str] = field(default_factory=list)  # the first MAX_SKIPPED_EXAMPLES
    duplicates: int = 0  # rows equal to an earlier row (prompt, chosen and rejected; kept)
    duplicate_examples: list[str] = field(default_factory=list)  # "where (= where of the first)"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class PreferenceData:
    train: list[TokenizedPair]
    eval: list[TokenizedPair]
    report: DataReport


def eval_count(rows: int, eval_fraction: float) -> int:
    """Rows held out: ``round(rows * eval_fraction)``, at least 1 (if ``eval_fraction > 0`` and
    ``rows >= 2``) and at most ``rows - 1``."""
    if eval_fraction <= 0 or rows < 2:
        return 0
    return min(rows - 1, max(1, round(rows * eval_fraction)))


def load_preference_data(source: str, tokenizer, *, max_length: int = 512,
                         max_prompt_length: int = 256, eval_source: str | None = None,
                         eval_fraction: float = 0.05, seed: int = 0, split: str = "train",
                         eval_split: str = "test") -> PreferenceData:
    """Load, parse, split and tokenize a preference data set.

    Without ``eval_source``, ``eval_count(rows, eval_fraction)`` rows drawn with
    ``random.Random(seed)`` are held out (before tokenization, so the choice does not depend on the
    length limits); both splits keep the file order. Rows with no response token left are skipped
    and reported; bad rows raise :class:`DataError`.
    """
    _check_lengths(max_length, max_prompt_length)
    if not 0 <= eval_fraction < 1:
        raise ConfigError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    sp = special_ids(tokenizer)
    examples = [parse_preference(r) for r in load_records(source, split=split)]
    if eval_source is not None:
        train_ex = examples
        eval_ex = [parse_preference(r) for r in load_records(eval_source, split=eval_split)]
    else:
        held = set(random.Random(seed).sample(range(len(examples)),
                                              eval_count(len(examples), eval_fraction)))
        train_ex = [ex for i, ex in enumerate(examples) if i not in held]
        eval_ex = [ex for i, ex in enumerate(examples) if i in held]

    report = DataReport(rows=len(train_ex) + len(eval_ex), train_rows=0, eval_rows=0, skipped=0,
                        truncated=0, tokens=0)
    seen: dict[bytes, str] = {}  # a digest per row, not its text: large sets stay small
    for ex in (*train_ex, *eval_ex):
        report.formats[ex.source_format] = report.formats.get(ex.source_format, 0) + 1
        key = hashlib.blake2b(json.dumps([ex.prompt, ex.chosen, ex.rejected], sort_keys=True, default=str)
                              .encode("utf-8", "surrogatepass"), digest_size=16).digest()
        if key in seen:
            report.duplicates += 1
            if len(report.duplicate_examples) < MAX_SKIPPED_EXAMPLES:
                report.duplicate_examples.append(f"{ex.where} (= {seen[key]})")
        else:
            seen[key] = ex.where
        if ex.chosen == ex.rejected:
            report.identical += 1
            if len(report.identical_examples) < MAX_SKIPPED_EXAMPLES:
                report.identical_examples.append(ex.where)
        if _repeats_prompt(ex):
            report.repeats_prompt += 1
            if len(report.repeats_prompt_examples) < MAX_SKIPPED_EXAMPLES:
                report.repeats_prompt_examples.append(ex.where)
    train = _tokenize_all(train_ex, tokenizer, sp, report, max_length, max_prompt_length)
    evals = _tokenize_all(eval_ex, tokenizer, sp, report, max_length, max_prompt_length)
    report.train_rows, report.eval_rows = len(train), len(evals)
    if not train:
        raise DataError(f"no usable training rows: all {len(train_ex)} were skipped (first: "
                        f"{report.skipped_examples[0] if report.skipped_examples else 'none'})",
                        path=source)
    return PreferenceData(train, evals, report)


def _repeats_prompt(ex: PreferenceExample) -> bool:
    return (ex.source_format == "standard" and isinstance(ex.prompt, str) and len(ex.prompt.strip()) > 0
            and isinstance(ex.chosen, str) and isinstance(ex.rejected, str)
            and ex.chosen.startswith(ex.prompt) and ex.rejected.startswith(ex.prompt))


def _tokenize_all(examples: list[PreferenceExample], tokenizer, sp: SpecialIds, report: DataReport,
                  max_length: int, max_prompt_length: int, chunk: int = 1024) -> list[TokenizedPair]:
    pairs: list[TokenizedPair] = []
    for start in range(0, len(examples), chunk):
        block = examples[start:start + chunk]
        texts = [_texts(ex, tokenizer) for ex in block]
        prompt_texts = [t[0] for t in texts]
        prompts = _encode_many(tokenizer, prompt_texts)
        chosens, rejecteds = (encode_after(tokenizer, prompt_texts, [t[j] for t in texts]) for j in (1, 2))
        for ex, p, c, r in zip(block, prompts, chosens, rejecteds):
            pair = _assemble(p, c, r, sp, max_length=max_length,
                             max_prompt_length=max_prompt_length, index=len(pairs))
            if pair is None:
                report.skipped += 1
                if len(report.skipped_examples) < MAX_SKIPPED_EXAMPLES:
                    report.skipped_examples.append(
                        f"{ex.where}: no response token left after truncation (prompt of {len(p)} "
                        f"tokens; max_length={max_length}, max_prompt_length={max_prompt_length})")
                continue
            report.truncated += pair.truncated
            report.tokens += pair.num_tokens
            pairs.append(pair)
    return pairs
