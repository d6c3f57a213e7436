"""Supervised fine-tuning data: formats, tokenization with a loss mask, padding and packing.

Formats, detected per row (``docs/sft.md``):

* prompt/completion: ``{"prompt": str, "completion": str}``; the loss covers the completion
  (``loss_on="completion"``, the default) or every token (``loss_on="full"``). A conversational
  variant takes message lists for both: ``{"prompt": [...], "completion": [...]}``;
* conversational: ``{"messages": [{"role", "content"}, ...]}`` rendered with the tokenizer's chat
  template; the loss covers the assistant turns (their content and what the template writes after
  it, e.g. EOS), not the role headers the template writes before them;
* plain text: ``{"text": str}``; the loss covers every token.

Tokenization follows the preference data (``dpolab.data.preference``): a prompt and its completion
are tokenized separately with ``add_special_tokens=False`` and concatenated as ids (no BPE merge
across the boundary), the completion as text that continues another (no SentencePiece "▁" start
mark: :mod:`dpolab.lm.continuation`); a conversation is tokenized whole, its targets found by
character offsets (:func:`encode_pieces`); the tokenizer's own leading specials (BOS) are
prepended; EOS is appended to completions and texts not ending with it (chat templates write their
own end-of-turn tokens).

Loss-mask convention (as in ``dpolab.lm.logps``): ``loss_mask[t] = 1`` when token ``t`` is a training
target, predicted by the logits at ``t - 1`` of the *same example*. ``loss_mask[0]`` is always 0, so
packed examples never learn a token from the previous example's context.
"""

from __future__ import annotations

import bisect
import dataclasses
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from dpolab.data.loading import (
    Record,
    load_records,
    missing,
    record_error,
    role_problem,
    text_problem,
    tool_call_turns,
)
from dpolab.data.preference import encode_after, eval_count, special_ids, with_eos
from dpolab.errors import ConfigError, DataError
from dpolab.lm.continuation import encode_continuations

LOSS_ON = ("completion", "full")
MAX_SKIPPED_EXAMPLES = 20


@dataclass
class SFTExample:
    """One tokenized example: ``input_ids`` and a same-length 0/1 ``loss_mask`` (``loss_mask[0] == 0``).
    ``index`` is its position in its split."""

    input_ids: list[int]
    loss_mask: list[int]
    index: int = 0
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class PackedRow:
    """Several examples concatenated into one row of at most ``max_length`` tokens.

    ``position_ids`` restart at 0 for each example; ``segment_ids`` number the examples 1, 2, ...;
    ``indices`` are their :attr:`SFTExample.index`."""

    input_ids: list[int]
    loss_mask: list[int]
    position_ids: list[int]
    segment_ids: list[int]
    indices: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


# ----------------------------------------------------------------------------------------------
# Format detection and tokenization


def _text_field(record: Record, name: str) -> str:
    value = record.data.get(name)
    if not isinstance(value, str):
        if name not in record.data:
            raise record_error(record, missing(record, name), field=name)
        raise record_error(record, f"must be a string, got {'null' if value is None else type(value).__name__}",
                           field=name)
    if problem := text_problem(value):
        raise record_error(record, problem, field=name)
    return value


def _messages_field(record: Record, name: str) -> list[dict]:
    value = record.data.get(name)
    if not isinstance(value, (list, tuple)) or not value:
        raise record_error(record, "must be a non-empty list of {'role', 'content'} messages", field=name)
    value = tool_call_turns(value)
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise record_error(record, "each message needs string 'role' and 'content'", field=f"{name}[{i}]")
        if problem := role_problem(m["role"]):
            raise record_error(record, problem, field=f"{name}[{i}].role")
        if problem := text_problem(m["content"]):
            raise record_error(record, problem, field=f"{name}[{i}].content")
    # whole messages, as the template expects them (tool calls, a tool's name); a null key is absent
    return [{k: v for k, v in m.items() if v is not None} for m in value]


# the row forms, in the order a row is read as the first it fills: the column that decides, and its columns
_FORMS = {"messages": ("messages",), "completion": ("prompt", "completion"), "text": ("text",)}


def parse_sft(record: Record) -> tuple[str, tuple]:
    """``("completion", (prompt, completion))``, ``("chat", (messages, loss_from))`` or
    ``("text", (text,))``; :class:`DataError` naming the file, line and field on a bad row."""
    data = {k: v for k, v in record.data.items() if v is not None}  # a Parquet/Arrow column's null: absent
    # the first form the row fills, in this order; an empty cell of another form's column (a CSV with
    # every form's columns) is no value, and a prompt/completion form needs its completion (chat sets
    # such as UltraChat keep the first user turn as a `prompt` column beside `messages`)
    form = next((f for f in _FORMS if data.get(f) not in ("", [], None)), None)
    if form is not None:
        data = {k: v for k, v in data.items() if k in _FORMS[form] or not any(k in f for f in _FORMS.values())}
    if "messages" in data:
        messages = _messages_field(record, "messages")
        if not any(m["role"] == "assistant" for m in messages):
            raise record_error(record, "no assistant message to train on", field="messages")
        return "chat", (messages, 0)
    if "prompt" in data or "completion" in data:
        if isinstance(data.get("prompt"), (list, tuple)) or isinstance(data.get("completion"), (list, tuple)):
            # one side messages, the other a string: the string is that side's one turn (as in DPO's pairs)
            prompt = ([{"role": "user", "content": _text_field(record, "prompt")}]
                      if isinstance(data.get("prompt"), str) else _messages_field(record, "prompt"))
            completion = ([{"role": "assistant", "content": _text_field(record, "completion")}]
                          if isinstance(data.get("completion"), str) else _messages_field(record, "completion"))
            if not any(m["role"] == "assistant" for m in completion):
                raise record_error(record, "no assistant message to train on", field="completion")
            return "chat", (prompt + completion, len(prompt))
        return "completion", (_text_field(record, "prompt"), _text_field(record, "completion"))
    if "text" in data:
        text = _text_field(record, "text")
        if not text:  # it would train on nothing (its only token, EOS, is the first)
            raise record_error(record, "is empty: a 'text' row needs text to train on", field="text")
        return "text", (text,)
    nulls = [k for k in ("messages", "prompt", "completion", "text") if k in record.data]
    if nulls:  # only null fields of a known form
        raise record_error(record, "is null", field=nulls[0])
    raise record_error(record, f"unrecognised SFT row with fields {sorted(data)}; expected 'prompt' and "
                       "'completion', 'messages', or 'text'")


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _turn_header(tokenizer, messages: list[dict], i: int) -> str | None:
    """The rendering up to where assistant message ``i``'s content starts: the common prefix of the
    conversation rendered with two different one-letter contents for it (None if a template fails)."""
    try:
        a, b = (_render(tokenizer, messages[:i] + [{**messages[i], "content": c}], False) for c in ("a", "b"))
    except Exception:  # noqa: BLE001 -- a template may reject the stand-in turn
        return None
    return os.path.commonprefix([a, b])


def chat_segments(tokenizer, messages: list[dict], loss_from: int = 0) -> list[tuple[str, bool]]:
    """Split a rendered conversation into ``(text, is_target)`` pieces whose concatenation is the
    chat template's rendering of ``messages``.

    An assistant message at index ``>= loss_from`` is a target from the end of its generation
    prompt (role header) to the end of its rendering. Requires the template to be prefix-stable
    (rendering ``messages[:i]`` is a prefix of rendering ``messages[:i+1]``); ``ValueError`` if not.
    """
    return _chat_segments(tokenizer, messages, loss_from)[0]


def _chat_segments(tokenizer, messages: list[dict], loss_from: int = 0) -> tuple[list[tuple[str, bool]], list[int]]:
    """:func:`chat_segments`, and where each trained turn's sampling prompt ends in the text (the
    rendering with ``add_generation_prompt=True`` where the turn continues it; else the header's
    end): Llama-2's template writes no generation prompt, so sampling starts before the space the
    rendered turn puts ahead of its content."""
    pieces: list[tuple[str, bool]] = []
    prompt_ends: list[int] = []
    prev = ""
    for i, message in enumerate(messages):
        full = _render(tokenizer, messages[:i + 1], False)
        if not full.startswith(prev):
            raise ValueError(f"the chat template is not prefix-stable at message {i}: rendering the "
                             "first messages is not a prefix of rendering one more")
        if message["role"] == "assistant" and i >= loss_from:
            try:
                head = _render(tokenizer, messages[:i], True)
            except Exception:  # noqa: BLE001 -- a template may reject an empty/odd prefix
                head = prev
            sampled = head if head.startswith(prev) and full.startswith(head) else None
            if head == prev:  # no generation prompt (refused for an empty conversation, or ignored by the
                # template): the header is where two contents of the turn part; it was trained as content
                probe = _turn_header(tokenizer, messages, i)
                head = probe if probe and probe.startswith(prev) and full.startswith(probe) else prev
            if head.startswith(prev) and not full.startswith(head):
                # the generation prompt writes more than a rendered turn's header (e.g. an empty
                # "<think></think>" block): the header ends where two renderings of the turn with
                # different contents part (a text common prefix with the real content could run into
                # it); where the text before the content depends on it (or the template refuses the
                # stand-ins), the common prefix of the generation prompt and the turn
                probe = _turn_header(tokenizer, messages, i)
                head = probe if probe and probe.startswith(prev) and full.startswith(probe) else \
                    os.path.commonprefix([head, full])
            if not (head.startswith(prev) and full.startswith(head)):
                head = prev  # no usable generation prompt: the whole turn is the target
            pieces += [(head[len(prev):], False), (full[len(head):], True)]
            prompt_ends.append(len(sampled if sampled is not None else head))
        else:
            pieces.append((full[len(prev):], False))
        prev = full
    return [(t, target) for t, target in pieces if t], prompt_ends


def encode_pieces(tokenizer, pieces: list[tuple[str, bool]],
                  prompt_ends: list[int] | None = None) -> tuple[list[int], list[bool]]:
    """Token ids of the pieces' text and which tokens are targets.

    A fast tokenizer encodes the text up to each of ``prompt_ends`` (where a trained turn's sampling
    prompt ends) whole, as that prompt is encoded for sampling, then the next stretch likewise where
    the longer text's tokens begin with those (a token is a target where its characters overlap a
    target piece: with Llama-2's template ``▁Paris`` holds the space before the answer and its first
    word). Where they do not (the prompt's last token merges with the answer: "Assistant: " then
    "Paris"), the stretch's pieces are encoded after the prompt as text continuing it, as the model
    samples them there. A slow tokenizer, which gives no offsets, encodes piece by piece, each after
    the first as text continuing another (:mod:`dpolab.lm.continuation`)."""
    if not pieces:
        return [], []
    if not getattr(tokenizer, "is_fast", False):
        return _encode_apart(tokenizer, pieces, first_alone=True)
    text = "".join(t for t, _ in pieces)
    starts, at = [], 0
    for t, _ in pieces:
        starts.append(at)
        at += len(t)
    ids: list[int] = []
    own: list[bool] = []
    done = 0
    cuts = sorted({c for c in (prompt_ends or []) if 0 < c < len(text)} | {len(text)})
    # one batched call (the fast tokenizer encodes the prefixes in parallel)
    encoded = tokenizer([text[:cut] for cut in cuts], add_special_tokens=False, return_offsets_mapping=True)
    for cut, whole, offsets in zip(cuts, encoded["input_ids"], encoded["offset_mapping"]):
        whole = list(whole)
        if whole[:len(ids)] == ids:
            own += [_overlaps_target(a, b, pieces, starts) for a, b in offsets[len(ids):]]
            ids = whole
        else:
            part = [(t[max(done - s0, 0):cut - s0], target) for (t, target), s0 in zip(pieces, starts)
                    if s0 < cut and s0 + len(t) > done]
            more, flags = _encode_apart(tokenizer, part, first_alone=False)
            ids, own = ids + more, own + flags
        done = cut
    return ids, own


def _overlaps_target(a: int, b: int, pieces: list[tuple[str, bool]], starts: list[int]) -> bool:
    """Whether characters ``[a, b)`` hold a target piece's; a token without characters (offsets
    trimmed to nothing) only inside a target piece, not at its start."""
    if b <= a:
        k = bisect.bisect_right(starts, a) - 1
        return k >= 0 and pieces[k][1] and starts[k] < a
    first = max(bisect.bisect_right(starts, a) - 1, 0)
    last = max(bisect.bisect_right(starts, b - 1) - 1, 0)
    return any(target for _, target in pieces[first:last + 1])


def _encode_apart(tokenizer, pieces: list[tuple[str, bool]], *, first_alone: bool) -> tuple[list[int], list[bool]]:
    texts = [t for t, _ in pieces if t]
    flags = [target for t, target in pieces if t]
    if not texts:
        return [], []
    encoded = ([list(tokenizer(texts[0], add_special_tokens=False)["input_ids"])] if first_alone else []) + \
        encode_continuations(tokenizer, texts[1:] if first_alone else texts)
    ids, own = [], []
    for target, piece in zip(flags, encoded):
        ids += piece
        own += [target] * len(piece)
    return ids, own


def tokenize_sft(kind: str, payload: tuple, tokenizer, *, max_length: int, max_prompt_length: int,
                 loss_on: str = "completion", index: int = 0, where: str = "") -> SFTExample | None:
    """Tokenize one parsed row (:func:`parse_sft`) into an :class:`SFTExample`.

    Truncation: a prompt/completion row longer than ``max_length`` first loses the start of its
    prompt (down to ``max_prompt_length`` tokens, leading BOS kept), then the end of its completion
    (for message lists, the prompt is every token before the first target: the prompt's turns and
    the first answer's header); text and ``messages`` rows lose their end. ``None`` when no target
    token is left."""
    if loss_on not in LOSS_ON:
        raise ConfigError(f"loss_on must be one of {list(LOSS_ON)}, got {loss_on!r}")
    sp = special_ids(tokenizer)
    prefix = list(sp.prefix)
    truncated = False
    if kind == "completion":
        prompt_text, completion_text = payload
        prompt = list(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
        (completion,) = encode_after(tokenizer, [prompt_text], [completion_text])
        if not prefix and not prompt:
            prefix = [sp.start_id]
        completion = with_eos(completion, sp.eos_id)
        if len(prefix) + len(prompt) + len(completion) > max_length:
            keep = max(max_prompt_length - len(prefix), 0)
            if len(prompt) > keep:
                prompt, truncated = prompt[len(prompt) - keep:], True
            budget = max(max_length - len(prefix) - len(prompt), 0)
            if len(completion) > budget:
                completion, truncated = completion[:budget], True
        ids = prefix + prompt + completion
        target = [loss_on == "full"] * (len(prefix) + len(prompt)) + [True] * len(completion)
    else:
        prompt_ends = None
        if kind == "text":
            pieces = [(payload[0], True)]
        else:
            messages, loss_from = payload
            try:
                pieces, prompt_ends = _chat_segments(tokenizer, messages, loss_from)
            except Exception as exc:  # noqa: BLE001 -- no template, roles it rejects, instability
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                what = "this conversation" if loss_from == 0 else "the conversation of 'prompt' and 'completion'"
                raise DataError(f"cannot use the tokenizer's chat template for {what}: {reason}",
                                path=where or None, field="messages" if loss_from == 0 else None) from exc
        ids, own = encode_pieces(tokenizer, pieces, prompt_ends)
        if kind == "text":
            ids, own = with_eos(ids, sp.eos_id), own + [True] * (ids[-1:] != [sp.eos_id])
        head = 0
        if prefix and ids[:len(prefix)] != prefix:  # a chat template may already write BOS
            ids, own = prefix + ids, [False] * len(prefix) + own
        if prefix:
            head = len(prefix)
        elif tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id]:
            head = 1  # a BOS only the template writes: kept when the prompt is cut
        if kind == "chat" and payload[1] > 0 and len(ids) > max_length:
            lead = next((i for i, t in enumerate(own) if t), len(own))  # the prompt: before the first target
            keep = max(max_prompt_length - head, 0)
            if lead - head > keep:
                cut = lead - head - keep
                ids, own, truncated = ids[:head] + ids[head + cut:], own[:head] + own[head + cut:], True
        if len(ids) > max_length:
            ids, own, truncated = ids[:max_length], own[:max_length], True
        target = [t or loss_on == "full" for t in own]
    mask = [int(t) for t in target]
    if mask:
        mask[0] = 0
    if sum(mask) == 0:
        return None
    return SFTExample(ids, mask, index, truncated)


# ----------------------------------------------------------------------------------------------
# Whole data sets


@dataclass
class SFTReport:
    """What loading did: ``rows == train_rows + eval_rows + skipped``; ``formats`` counts rows per
    detected format; ``target_tokens`` counts loss tokens over kept examples."""

    rows: int = 0
    train_rows: int = 0
    eval_rows: int = 0
    skipped: int = 0
    truncated: int = 0
    tokens: int = 0
    target_tokens: int = 0
    formats: dict = field(default_factory=dict)
    skipped_examples: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class SFTData:
    train: list[SFTExample]
    eval: list[SFTExample]
    report: SFTReport


def load_sft_data(source: str, tokenizer, *, max_length: int = 1024, max_prompt_length: int | None = None,
                  loss_on: str = "completion", eval_source: str | None = None, eval_fraction: float = 0.05,
                  seed: int = 0, split: str = "train", eval_split: str = "test") -> SFTData:
    """Load, parse, split (held-out rows drawn as in :func:`dpolab.data.load_preference_data`) and
    tokenize an SFT data set. ``max_prompt_length`` defaults to ``max_length // 2``."""
    if max_length < 2:
        raise ConfigError(f"max_length must be at least 2, got {max_length}")
    max_prompt_length = max_length // 2 if max_prompt_length is None else max_prompt_length
    if not 1 <= max_prompt_length < max_length:
        raise ConfigError(f"max_prompt_length must be in [1, max_length), got {max_prompt_length}")
    if not 0 <= eval_fraction < 1:
        raise ConfigError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    records = load_records(source, split=split)
    if eval_source is not None:
        train_rec, eval_rec = records, load_records(eval_source, split=eval_split)
    else:
        held = set(random.Random(seed).sample(range(len(records)), eval_count(len(records), eval_fraction)))
        train_rec = [r for i, r in enumerate(records) if i not in held]
        eval_rec = [r for i, r in enumerate(records) if i in held]
    report = SFTReport(rows=len(train_rec) + len(eval_rec))
    kw = dict(max_length=max_length, max_prompt_length=max_prompt_length, loss_on=loss_on)
    train = _tokenize_all(train_rec, tokenizer, report, kw)
    evals = _tokenize_all(eval_rec, tokenizer, report, kw)
    report.train_rows, report.eval_rows = len(train), len(evals)
    if not train:
        first = report.skipped_examples[0] if report.skipped_examples else "none"
        raise DataError(f"no usable training rows: all {len(train_rec)} were skipped (first: {first})", path=source)
    return SFTData(train, evals, report)


def _tokenize_all(records: list[Record], tokenizer, report: SFTReport, kw: dict) -> list[SFTExample]:
    out: list[SFTExample] = []
    for record in records:
        kind, payload = parse_sft(record)
        report.formats[kind] = report.formats.get(kind, 0) + 1
        ex = tokenize_sft(kind, payload, tokenizer, index=len(out), where=record.where, **kw)
        if ex is None:
            report.skipped += 1
            if len(report.skipped_examples) < MAX_SKIPPED_EXAMPLES:
                report.skipped_examples.append(f"{record.where}: no target token left after truncation "
                                               f"(max_length={kw['max_length']}, max_prompt_length="
                                               f"{kw['max_prompt_length']})")
            continue
        report.truncated += ex.truncated
        report.tokens += len(ex)
        report.target_tokens += sum(ex.loss_mask)
        out.append(ex)
    return out


# ----------------------------------------------------------------------------------------------
# Packing and batching


def pack_examples(examples: Sequence[SFTExample], max_length: int) -> list[PackedRow]:
    """Pack examples into rows of at most ``max_length`` tokens, best-fit decreasing (each example,
    longest first, goes to the fullest row it still fits in). Deterministic; no example is split.
    Rows are returned in creation order, examples inside a row in placement order."""
    if max_length < 1:
        raise ConfigError(f"max_length must be positive, got {max_length}")
    rows: list[list[SFTExample]] = []
    free: list[tuple[int, int]] = []  # sorted (free space, row number)
    for ex in sorted(examples, key=lambda e: (-len(e), e.index)):
        if len(ex) > max_length:
            raise ConfigError(f"example {ex.index} has {len(ex)} tokens, more than max_length={max_length}")
        k = bisect.bisect_left(free, (len(ex), -1))
        if k < len(free):
            space, r = free.pop(k)
        else:
            space, r = max_length, len(rows)
            rows.append([])
        rows[r].append(ex)
        bisect.insort(free, (space - len(ex), r))
    packed = []
    for members in rows:
        ids, mask, pos, seg = [], [], [], []
        for s, ex in enumerate(members, start=1):
            ids += ex.input_ids
            mask += [0] + ex.loss_mask[1:]
            pos += list(range(len(ex)))
            seg += [s] * len(ex)
        packed.append(PackedRow(ids, mask, pos, seg, [ex.index for ex in members]))
    return packed


@dataclass
class SFTBatch:
    """A right-padded batch of ``B`` rows of length ``T`` (each row one example, or several packed).

    input_ids: (B, T) long, pads = the pad id. attention_mask: (B, T) long, 1 on real tokens.
    loss_mask: (B, T) bool, target tokens. position_ids: (B, T) long, restarting per example, 0 on pads.
    segment_ids: (B, T) long, 1, 2, ... numbering the examples of a row, 0 on pads.
    num_examples: examples in the batch.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    segment_ids: torch.Tensor
    num_examples: int

    @property
    def packed(self) -> bool:
        return bool((self.segment_ids > 1).any())

    @property
    def num_targets(self) -> int:
        return int(self.loss_mask.sum())

    def to(self, device) -> SFTBatch:
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device)
                                            for f in dataclasses.fields(self) if f.name != "num_examples"})

    def model_attention_mask(self, dtype: torch.dtype, attn_implementation: str | None = None):
        """The mask to pass the model. Unpacked: the 2D padding mask. Packed: a 4D block-diagonal
        causal mask (:func:`block_causal_mask`), so no token attends to another example; with
        flash-attention kernels ``None``, as they split sequences at the position-id restarts."""
        if not self.packed:
            return self.attention_mask
        if attn_implementation and attn_implementation.startswith("flash"):
            return None
        return block_causal_mask(self.segment_ids, dtype)


def block_causal_mask(segment_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive ``(B, 1, T, T)`` mask from ``(B, T)`` segment ids: 0 where query ``i`` may attend to key
    ``j`` (``j <= i``, same nonzero segment), the dtype's minimum elsewhere. A pad query (segment 0)
    attends to itself only, so no softmax row is empty. Hugging Face models take such a 4D mask as
    given (eager and SDPA attention alike)."""
    T = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]                           # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = (same & causal & (segment_ids[:, None, :] > 0)) | torch.eye(T, dtype=torch.bool,
                                                                          device=segment_ids.device)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def collate_sft(rows: Sequence[SFTExample | PackedRow], pad_token_id: int) -> SFTBatch:
    """Right-pad examples or packed rows into an :class:`SFTBatch` (shapes in its docstring)."""
    if not rows:
        raise ValueError("collate_sft needs at least one row")
    B, T = len(rows), max(len(r) for r in rows)
    input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    loss_mask = torch.zeros((B, T), dtype=torch.bool)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    segment_ids = torch.zeros((B, T), dtype=torch.long)
    n_examples = 0
    for i, row in enumerate(rows):
        n = len(row)
        input_ids[i, :n] = torch.tensor(row.input_ids, dtype=torch.long)
        loss_mask[i, :n] = torch.tensor(row.loss_mask, dtype=torch.bool)
        if isinstance(row, PackedRow):
            position_ids[i, :n] = torch.tensor(row.position_ids, dtype=torch.long)
            segment_ids[i, :n] = torch.tensor(row.segment_ids, dtype=torch.long)
            n_examples += len(row.indices)
        else:
            position_ids[i, :n] = torch.arange(n)
            segment_ids[i, :n] = 1
            n_examples += 1
    return SFTBatch(input_ids, (segment_ids > 0).long(), loss_mask, position_ids, segment_ids, n_examples)
