"""Tokens of a text that continues another, for tokenizers that mark where a text starts.

SentencePiece tokenizers of the Llama-2/Mistral kind prepend a word-boundary mark ("▁") to every
string they encode (``add_dummy_prefix``; ``Metaspace`` with a ``prepend_scheme``) and their decoder
drops the leading space of every decoded string. Encoded apart, a response " Paris" after its prompt
becomes ``▁ ▁Paris`` (or ``Paris`` becomes ``▁Paris``): tokens the model never sees after the prompt
in one text, trained as if it did, and a sampled ``▁Paris`` decodes to "Paris", which re-encoded is
not what was sampled. Here a continuation is encoded after an anchor text whose tokens are then
dropped, and decoded likewise, so that ``encode_continuations(decode_continuation(ids)) == ids``.

Tokenizers that encode a text the same after the anchor as alone (byte-level BPE: GPT-2, Llama-3,
Qwen; Gemma's SentencePiece) are left as they are: :func:`marks_starts` is False for them and both
functions are the plain ``tokenizer(...)``/``tokenizer.decode``.
"""

from __future__ import annotations

__all__ = ["decode_continuation", "encode_continuations", "marks_starts"]

ANCHOR = "\n"  # a newline: SentencePiece vocabularies keep it apart from the text after it
# tried in turn where a text's start merges with the anchor (vocabularies with "\n\n" pieces)
_FALLBACK_ANCHORS = ("0", "!")
_PROBES = ("b", "Paris", " x")


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def marks_starts(tokenizer) -> bool:
    """Whether ``tokenizer`` encodes a text alone otherwise than after another text (a "▁" prepended).

    Probed on a few short texts: ``encode(ANCHOR + t) != encode(ANCHOR) + encode(t)``."""
    return _anchor(tokenizer) is not None


def _anchor(tokenizer) -> list[int] | None:
    """The anchor's ids for a tokenizer that :func:`marks_starts`, else None; probed once per
    tokenizer (kept on it), since every sampled completion is decoded with it."""
    cached = getattr(tokenizer, "_dpolab_anchor", False)
    if cached is not False:
        return cached
    anchor, *alone = _encode(tokenizer, [ANCHOR, *_PROBES])
    after = _encode(tokenizer, [ANCHOR + t for t in _PROBES])
    found = anchor if any(a != anchor + b for a, b in zip(after, alone)) else None
    _keep(tokenizer, "_dpolab_anchor", found)
    return found


def _keep(tokenizer, name: str, value) -> None:
    try:
        setattr(tokenizer, name, value)
    except Exception:  # noqa: BLE001 -- a tokenizer object that takes no attributes: probed each time
        pass


def encode_continuations(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text as it reads after other text (no special tokens added).

    For a tokenizer that :func:`marks_starts`, ``encode(ANCHOR + text)`` without the anchor's tokens;
    where those tokens do not begin it (the text's start merged with the anchor), after another
    anchor; where none stays apart, the text alone."""
    texts = list(texts)
    if not texts:
        return []
    anchor = _anchor(tokenizer)
    if anchor is None:
        return _encode(tokenizer, texts)
    out = []
    for text, ids in zip(texts, _encode(tokenizer, [ANCHOR + t for t in texts])):
        if not text:
            out.append([])
        elif ids[:len(anchor)] == anchor:
            out.append(ids[len(anchor):])
        else:
            out.append(_after_another_anchor(tokenizer, text))
    return out


def _after_another_anchor(tokenizer, text: str) -> list[int]:
    for other in _FALLBACK_ANCHORS:
        head, ids = _encode(tokenizer, [other, other + text])
        if ids[:len(head)] == head:
            return ids[len(head):]
    return _encode(tokenizer, [text])[0]


def decode_continuation(tokenizer, ids: list[int], *, skip_special_tokens: bool = True) -> str:
    """The text of ``ids`` as it reads after other text: for a tokenizer that :func:`marks_starts`,
    a leading "▁" is the space it stands for (decoded alone, the decoder drops it)."""
    anchor = _anchor(tokenizer) if ids else None
    if anchor is None:
        return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    head = getattr(tokenizer, "_dpolab_anchor_text", None)
    if head is None:  # the anchor holds no special token: its text is the same either way
        head = tokenizer.decode(anchor)
        _keep(tokenizer, "_dpolab_anchor_text", head)
    text = tokenizer.decode(anchor + list(ids), skip_special_tokens=skip_special_tokens)
    if text.startswith(head):
        return text[len(head):]
    return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
