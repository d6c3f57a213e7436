"""Prompt data for on-policy training and evaluation (``dpolab ppo``, the demo's evaluation).

Each row holds either ``prompt`` (a string, used as is) or a list of ``{"role", "content"}`` turns
ending with a user or system turn, in ``messages`` or in ``prompt`` itself, rendered with the
tokenizer's chat template and ``add_generation_prompt=True`` so the model continues as the
assistant. Other fields go to the reward functions that name them.

Tokenisation matches the preference pipeline (``dpolab.data.preference``): the text is tokenised
with ``add_special_tokens=False``; a plain prompt then gets the leading special tokens the tokenizer
would add itself (e.g. a BOS), a rendered chat prompt too unless its template wrote them. An empty prompt
becomes one BOS (or EOS) token, so the first response token has a context. Prompts longer than
``max_prompt_length`` keep their *end* (the part next to the response) and their leading special
tokens, and are counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dpolab.data.loading import fields_hint, role_problem, text_problem, tool_call_turns
from dpolab.errors import DataError

__all__ = ["PromptData", "load_prompts", "render_prompt", "special_prefix", "tokenize_prompts"]


@dataclass
class PromptData:
    """``texts[i]`` (what the model is conditioned on, as text) and its ``ids[i]`` (≤ max_prompt_length)."""

    texts: list[str]
    ids: list[list[int]]
    source: str = ""
    truncated: int = 0
    locations: list[str] = field(default_factory=list)
    extras: list[dict] = field(default_factory=list)  # each row's other fields (e.g. a reference answer)
    cut: list[bool] = field(default_factory=list)  # which rows lost their start to max_prompt_length
    _common: list[str] | None = field(default=None, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, rows: list[int]) -> PromptData:
        cut = [self.cut[i] for i in rows] if self.cut else []
        return PromptData([self.texts[i] for i in rows], [self.ids[i] for i in rows], self.source,
                          sum(cut), [self.locations[i] for i in rows] if self.locations else [],
                          [self.extras[i] for i in rows] if self.extras else [], cut)

    def columns(self, rows: list[int]) -> dict[str, list]:
        """The other fields of ``rows``, one list per field that every row of the data holds (reward
        arguments): the same fields in every batch, however the rows are grouped."""
        if not self.extras or not rows:
            return {}
        if self._common is None:
            self._common = sorted(set.intersection(*(set(e) for e in self.extras)))
        return {k: [self.extras[i][k] for i in rows] for k in self._common}

    def report(self) -> dict:
        return {"source": self.source, "prompts": len(self), "truncated": self.truncated}

    def require_field(self, name: str, why: str) -> None:
        """Every row has the field ``name`` (a reward's argument): checked at load time, where a row
        without it would otherwise fail only when it is first sampled, steps into the run."""
        for i in range(len(self)):
            row = self.extras[i] if self.extras else {}
            if row.get(name) is None:  # null as missing: a Parquet column's null, or JSON's
                raise DataError(f"{'missing' if name not in row else 'null'}; {why}",
                                path=self.locations[i] if self.locations else self.source, field=name)


def extra_fields(row: dict) -> dict:
    """A prompt row's fields other than the prompt itself (e.g. a reference ``answer``)."""
    return {k: v for k, v in row.items() if k not in ("prompt", "messages")}


def render_prompt(row: dict, tokenizer, *, record=None) -> tuple[str, bool]:
    """The prompt text of one row and whether it came from a chat template (True for ``messages``).

    Raises :class:`DataError` (located at ``record``, a :class:`dpolab.data.loading.Record`, when
    given) for a missing, empty or ill-typed ``prompt``/``messages`` field, or ``messages`` with a
    tokenizer lacking a chat template.
    """

    def err(message: str, *, field: str | None = None) -> DataError:
        if record is None:
            return DataError(message, field=field)
        from dpolab.data.loading import record_error

        return record_error(record, message, field=field)

    # a null field is an absent one: a Parquet or Arrow column holds null where a row has no value
    has_prompt, has_messages = row.get("prompt") is not None, row.get("messages") is not None
    if has_prompt and has_messages:
        raise err("row has both 'prompt' and 'messages'; give one")
    if has_prompt and not isinstance(row["prompt"], (list, tuple)):
        prompt = row["prompt"]
        if not isinstance(prompt, str):
            raise err(f"expected a string or a list of {{role, content}} turns, got {type(prompt).__name__}",
                      field="prompt")
        if problem := text_problem(prompt):
            raise err(problem, field="prompt")
        return prompt, False
    if has_prompt or has_messages:  # a 'prompt' list of turns is a conversation too (as in DPO's pairs)
        key = "prompt" if has_prompt else "messages"
        messages = tool_call_turns(list(row[key])) if isinstance(row[key], (list, tuple)) else row[key]
        if not isinstance(messages, list) or not messages:
            raise err("expected a non-empty list of {role, content} turns", field=key)
        for i, m in enumerate(messages):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise err(f"turn {i} must be an object with string 'role' and 'content'", field=key)
            if problem := role_problem(m["role"]):
                raise err(problem, field=f"{key}[{i}].role")
            if problem := text_problem(m["content"]):
                raise err(problem, field=f"{key}[{i}].content")
        if getattr(tokenizer, "chat_template", None) is None:
            raise err("conversational prompt, but the tokenizer has no chat template", field=key)
        if messages[-1]["role"] == "assistant":
            raise err("the last turn is the assistant's; a prompt ends with a user (or system) turn", field=key)
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # noqa: BLE001 -- a template that rejects the roles (raise_exception)
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise err(f"cannot render the conversation with the tokenizer's chat template: "
                      f"{type(exc).__name__}: {reason}", field=key) from None
        return text, True
    null = next((k for k in ("prompt", "messages") if k in row), None)  # there, but null: no "did you mean"
    if null is not None:
        raise err("is null; a row needs a 'prompt' string or a 'messages' list", field=null)
    raise err("row needs a 'prompt' string or a 'messages' list " + fields_hint(row, "prompt", "messages"))


def special_prefix(tokenizer) -> list[int]:
    """The ids ``add_special_tokens=True`` puts before a text (e.g. ``[BOS]``), found with a probe."""
    probe = "a b"
    with_specials = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    for k in range(len(with_specials) - len(plain) + 1):
        if with_specials[k:k + len(plain)] == plain:
            return with_specials[:k]
    return []


def tokenize_prompts(texts: list[str], tokenizer, *,
                     max_prompt_length: int | None = None) -> tuple[list[list[int]], list[bool]]:
    """Token ids of each prompt (see the module docstring) and whether each was truncated."""
    prefix = special_prefix(tokenizer)
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    out, cut = [], []
    for text in texts:
        head = list(prefix)
        body = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if head and body[:len(head)] == head:  # a chat template that writes BOS itself
            body = body[len(head):]
        elif not head and tokenizer.bos_token_id is not None and body[:1] == [tokenizer.bos_token_id]:
            head, body = body[:1], body[1:]  # a BOS only the template writes: kept on truncation too
        if not head and not body:
            body = [start]
        too_long = max_prompt_length is not None and len(head) + len(body) > max_prompt_length
        if too_long:
            keep = max(max_prompt_length - len(head), 0 if head else 1)
            body = body[len(body) - keep:]
        cut.append(too_long)
        out.append(head + body)
    return out, cut


def load_prompts(source: str, tokenizer, *, max_prompt_length: int | None = None,
                 split: str = "train") -> PromptData:
    """Read, validate, render and tokenise every prompt of ``source`` (see the module docstring).

    Raises :class:`DataError` naming the file, line (or row) and field of the first bad row.
    """
    from dpolab.data.loading import load_records, record_error

    records = load_records(source, split=split)
    texts, where, extras = [], [], []
    for rec in records:
        if not isinstance(rec.data, dict):
            raise record_error(rec, "expected a JSON object")
        texts.append(render_prompt(rec.data, tokenizer, record=rec)[0])
        where.append(rec)
        extras.append(extra_fields(rec.data))
    ids, cut = tokenize_prompts(texts, tokenizer, max_prompt_length=max_prompt_length)
    return PromptData(texts, ids, str(source), sum(cut), [r.where for r in where], extras, cut)
