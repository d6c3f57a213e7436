"""Prompt data for on-policy training and evaluation (``dpolab ppo``, the demo's evaluation).

Each row holds either ``prompt`` (a string, used as is) or ``messages`` (a list of
``{"role", "content"}`` turns, rendered with the tokenizer's chat template and
``add_generation_prompt=True`` so the model continues as the assistant). Other fields are ignored.

Tokenisation: a plain prompt is tokenised with the tokenizer's special tokens (e.g. a BOS); a
rendered chat prompt already contains them (``add_special_tokens=False``). Prompts longer than
``max_prompt_length`` keep their *end* (the part next to the response) and are counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dpolab.errors import DataError

__all__ = ["PromptData", "load_prompts", "render_prompt", "tokenize_prompts"]


@dataclass
class PromptData:
    """``texts[i]`` (what the model is conditioned on, as text) and its ``ids[i]`` (≤ max_prompt_length)."""

    texts: list[str]
    ids: list[list[int]]
    source: str = ""
    truncated: int = 0
    locations: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, rows: list[int]) -> PromptData:
        return PromptData([self.texts[i] for i in rows], [self.ids[i] for i in rows], self.source,
                          0, [self.locations[i] for i in rows] if self.locations else [])

    def report(self) -> dict:
        return {"source": self.source, "prompts": len(self), "truncated": self.truncated}


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

    has_prompt, has_messages = "prompt" in row and row["prompt"] is not None, "messages" in row
    if has_prompt and has_messages:
        raise err("row has both 'prompt' and 'messages'; give one")
    if has_prompt:
        prompt = row["prompt"]
        if not isinstance(prompt, str):
            raise err(f"expected a string, got {type(prompt).__name__}", field="prompt")
        if not prompt.strip():
            raise err("empty prompt", field="prompt")
        return prompt, False
    if has_messages:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise err("expected a non-empty list of {role, content} turns", field="messages")
        for i, m in enumerate(messages):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise err(f"turn {i} must be an object with string 'role' and 'content'", field="messages")
        if getattr(tokenizer, "chat_template", None) is None:
            raise err("conversational prompt, but the tokenizer has no chat template", field="messages")
        if messages[-1]["role"] == "assistant":
            raise err("the last turn is the assistant's; a prompt ends with a user (or system) turn", field="messages")
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text, True
    raise err("row needs a 'prompt' string or a 'messages' list")


def tokenize_prompts(texts: list[str], tokenizer, *, chat: list[bool] | None = None,
                     max_prompt_length: int | None = None) -> tuple[list[list[int]], int]:
    """Token ids of each prompt (keeping the last ``max_prompt_length``) and how many were truncated."""
    chat = chat or [False] * len(texts)
    out, truncated = [], 0
    for text, is_chat in zip(texts, chat):
        ids = tokenizer(text, add_special_tokens=not is_chat)["input_ids"]
        if max_prompt_length is not None and len(ids) > max_prompt_length:
            ids, truncated = ids[-max_prompt_length:], truncated + 1
        out.append(list(ids))
    return out, truncated


def load_prompts(source: str, tokenizer, *, max_prompt_length: int | None = None,
                 split: str = "train") -> PromptData:
    """Read, validate, render and tokenise every prompt of ``source`` (see the module docstring).

    Raises :class:`DataError` naming the file, line and field of the first bad row, or when a
    prompt tokenises to nothing.
    """
    from dpolab.data.loading import load_records, record_error

    records = load_records(source, split=split)
    texts, chat, where = [], [], []
    for rec in records:
        if not isinstance(rec.data, dict):
            raise record_error(rec, "expected a JSON object")
        text, is_chat = render_prompt(rec.data, tokenizer, record=rec)
        texts.append(text)
        chat.append(is_chat)
        where.append(rec)
    ids, truncated = tokenize_prompts(texts, tokenizer, chat=chat, max_prompt_length=max_prompt_length)
    for i, row in enumerate(ids):
        if not row:
            raise record_error(where[i], "prompt has no tokens after tokenisation",
                               field="messages" if chat[i] else "prompt")
    return PromptData(texts, ids, str(source), truncated, [r.where for r in where])
