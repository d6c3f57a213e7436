"""Preference formats, tokenization and truncation (exact ids), the eval split and the report."""

from __future__ import annotations

import copy
import json
import random

import pytest

from dpolab.data import (
    PreferenceExample,
    Record,
    load_preference_data,
    parse_preference,
    split_implicit_prompt,
    tokenize_preference,
)
from dpolab.errors import ConfigError, DataError

BOS, EOS = 1, 2


class CharTokenizer:
    """A stand-in tokenizer whose ids are the characters' code points, so expected ids can be
    written by hand: ``"ab"`` -> ``[97, 98]``. ``add_bos`` mimics tokenizers that put BOS in front
    when ``add_special_tokens=True``; the chat template writes ``chr(1)`` (= BOS) when ``bos_in_template``."""

    pad_token_id = 0

    def __init__(self, *, add_bos: bool = False, bos: int | None = BOS, eos: int | None = EOS,
                 bos_in_template: bool = False):
        self.add_bos, self.bos_token_id, self.eos_token_id = add_bos, bos, eos
        self.bos_in_template = bos_in_template

    def __call__(self, text, add_special_tokens: bool = True):
        def enc(s: str) -> list[int]:
            return ([self.bos_token_id] if add_special_tokens and self.add_bos else []) + [ord(c) for c in s]

        return {"input_ids": enc(text) if isinstance(text, str) else [enc(t) for t in text]}

    def apply_chat_template(self, messages, *, tokenize: bool, add_generation_prompt: bool) -> str:
        assert tokenize is False
        text = "".join(f"<{m['role']}>{m['content']}|" for m in messages)
        return (chr(BOS) if self.bos_in_template else "") + text + ("<assistant>" if add_generation_prompt else "")


def ids(text: str) -> list[int]:
    return [ord(c) for c in text]


def rec(data: dict, line: int = 7, path: str = "d.jsonl", unit: str = "line") -> Record:
    return Record(data, path, line, unit)


def example(prompt, chosen, rejected) -> PreferenceExample:
    return PreferenceExample(prompt, chosen, rejected, "d.jsonl", 1)


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


# ---------------------------------------------------------------------------------------------
# Formats


def test_standard_format():
    ex = parse_preference(rec({"prompt": "Q?", "chosen": " yes", "rejected": " no", "extra": 1}))
    assert (ex.prompt, ex.chosen, ex.rejected, ex.path, ex.line) == ("Q?", " yes", " no", "d.jsonl", 7)
    assert not ex.conversational


def test_implicit_prompt_splits_after_the_last_turn_marker():
    # The responses share the word " I", which must stay in the responses, not move to the prompt.
    head = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant:"
    ex = parse_preference(rec({"chosen": head + " I am fine.", "rejected": head + " I don't care."}))
    assert (ex.prompt, ex.chosen, ex.rejected) == (head, " I am fine.", " I don't care.")


def test_implicit_prompt_whitespace_fallback_and_failure():
    assert split_implicit_prompt("Q: 2+2? A: 4", "Q: 2+2? A: 5") == ("Q: 2+2? A:", " 4", " 5")
    # The common prefix "ab c" ends inside a word: the split falls back to the space before it.
    assert split_implicit_prompt("ab cd", "ab ce") == ("ab", " cd", " ce")
    assert split_implicit_prompt("yes", "no") is None
    assert split_implicit_prompt("same", "same") is None  # no whitespace, no marker
    with pytest.raises(DataError, match=r"^d\.jsonl:7: field 'prompt': no 'prompt' field"):
        parse_preference(rec({"chosen": "yes", "rejected": "no"}))


def test_conversational_with_message_prompt():
    prompt = [msg("system", "be nice"), msg("user", "hi")]
    ex = parse_preference(rec({"prompt": prompt, "chosen": [msg("assistant", "hello")],
                               "rejected": [msg("assistant", "go")]}))
    assert ex.conversational and ex.prompt == prompt
    assert ex.chosen == [msg("assistant", "hello")] and ex.rejected == [msg("assistant", "go")]
    # Responses that repeat the prompt messages are cut back to the assistant part.
    ex = parse_preference(rec({"prompt": prompt, "chosen": prompt + [msg("assistant", "hello")],
                               "rejected": [msg("assistant", "go")]}))
    assert ex.chosen == [msg("assistant", "hello")]
    # String responses next to a message prompt become assistant messages.
    ex = parse_preference(rec({"prompt": prompt, "chosen": "hello", "rejected": "go"}))
    assert ex.chosen == [msg("assistant", "hello")] and ex.prompt == prompt


def test_conversational_implicit_prompt_is_the_shared_head():
    head = [msg("user", "a"), msg("assistant", "b"), msg("user", "c")]
    row = {"chosen": head + [msg("assistant", "good")], "rejected": head + [msg("assistant", "bad")]}
    ex = parse_preference(rec(row))
    assert ex.prompt == head and ex.chosen == [msg("assistant", "good")]
    assert ex.rejected == [msg("assistant", "bad")]
    # A string prompt next to whole conversations (UltraFeedback style) repeats the user turn.
    assert parse_preference(rec(dict(row, prompt="c"))).prompt == head
    # A string prompt with assistant-only responses becomes the user message.
    ex = parse_preference(rec({"prompt": "q", "chosen": [msg("assistant", "x")],
                               "rejected": [msg("assistant", "y")]}))
    assert ex.prompt == [msg("user", "q")]


@pytest.mark.parametrize("row,field,pattern", [
    ({"prompt": "p", "rejected": "r"}, "chosen", "missing"),
    ({"prompt": "p", "chosen": None, "rejected": "r"}, "chosen", "is null"),
    ({"prompt": None, "chosen": "a b", "rejected": "a c"}, "prompt", "is null"),  # not an implicit prompt
    ({"prompt": "p", "chosen": "c", "rejected": 3}, "rejected", "expected a string or a list"),
    ({"prompt": 1.5, "chosen": "c", "rejected": "r"}, "prompt", "got float"),
    ({"prompt": "p", "chosen": "c", "rejected": [msg("assistant", "r")]}, "rejected", "both be"),
    ({"prompt": "p", "chosen": [], "rejected": [msg("assistant", "r")]}, "chosen", "empty message list"),
    ({"prompt": "p", "chosen": ["hi"], "rejected": ["x"]}, "chosen[0]", "got str"),
    ({"prompt": "p", "chosen": [{"content": "x"}], "rejected": [msg("assistant", "r")]}, "chosen[0]",
     "'role' must be a string, got missing"),
    ({"prompt": "p", "chosen": [{"role": "assistant", "content": 4}], "rejected": [msg("assistant", "r")]},
     "chosen[0]", "'content' must be a string, got int"),
    ({"chosen": [msg("user", "a"), msg("assistant", "x")], "rejected": [msg("user", "b"), msg("assistant", "y")]},
     "rejected", "differ before their final assistant"),
    ({"chosen": [msg("user", "a")], "rejected": [msg("user", "a"), msg("assistant", "y")]},
     "chosen", "does not end with an assistant message"),
    ({"chosen": [msg("assistant", "x")], "rejected": [msg("assistant", "y")]}, "prompt",
     "only assistant messages"),
    ({"prompt": [msg("user", "q")], "chosen": [msg("user", "x")], "rejected": [msg("assistant", "y")]},
     "chosen", "must be assistant messages"),
    ({"prompt": "p\ud800", "chosen": "c", "rejected": "r"}, "prompt", "surrogate"),
    ({"prompt": "p", "chosen": [msg("Assistant", "x")], "rejected": [msg("assistant", "y")]}, "chosen[0].role",
     "role 'Assistant': did you mean 'assistant'"),
    ({"prompt": [msg("user ", "q")], "chosen": "x", "rejected": "y"}, "prompt[0].role", "did you mean 'user'"),
    ({"prompt": [msg("", "q")], "chosen": "x", "rejected": "y"}, "prompt[0].role", "role is empty"),
])
def test_bad_rows_name_the_line_and_field(row, field, pattern):
    with pytest.raises(DataError, match=pattern) as info:
        parse_preference(rec(row))
    err = info.value
    assert (err.path, err.line, err.field) == ("d.jsonl", 7, field)
    assert str(err).startswith(f"d.jsonl:7: field '{field}': ")


# ---------------------------------------------------------------------------------------------
# Tokenization and truncation, with hand-written ids (CharTokenizer: id = code point)


def tok_char(prompt, chosen, rejected, *, max_length=100, max_prompt_length=50, **kw):
    return tokenize_preference(example(prompt, chosen, rejected), CharTokenizer(**kw),
                               max_length=max_length, max_prompt_length=max_prompt_length)


def test_ids_are_prompt_then_response_plus_eos():
    pair = tok_char("abcdef", "xy", "z")
    assert pair.prompt_ids == ids("abcdef")
    assert pair.chosen_ids == ids("xy") + [EOS] and pair.rejected_ids == ids("z") + [EOS]
    assert not pair.truncated and pair.num_tokens == 2 * 6 + 3 + 2


def test_truncation_prompt_end_first_then_response_start():
    # |prompt| + max(|chosen|, |rejected|) = 6 + 3 = 9.
    assert not tok_char("abcdef", "xy", "z", max_length=9, max_prompt_length=4).truncated  # fits
    pair = tok_char("abcdef", "xy", "z", max_length=8, max_prompt_length=4)  # 9 > 8: prompt -> "cdef"
    assert pair.prompt_ids == ids("cdef") and pair.chosen_ids == ids("xy") + [EOS] and pair.truncated
    pair = tok_char("abcdef", "xy", "z", max_length=6, max_prompt_length=4)  # budget 6 - 4 = 2
    assert pair.prompt_ids == ids("cdef")
    assert pair.chosen_ids == ids("xy") and pair.rejected_ids == ids("z") + [EOS]  # EOS cut from chosen
    pair = tok_char("ab", "wxyz", "z", max_length=4, max_prompt_length=3)  # short prompt kept whole
    assert pair.prompt_ids == ids("ab") and pair.chosen_ids == ids("wx") and pair.truncated
    # No room left for any response token: skipped.
    assert tok_char("abcdef", "xy", "z", max_length=4, max_prompt_length=4) is None


def test_bos_is_added_only_if_the_tokenizer_adds_it_and_survives_truncation():
    assert tok_char("ab", "x", "y").prompt_ids == ids("ab")  # add_special_tokens adds nothing
    pair = tok_char("abcdef", "x", "y", add_bos=True)
    assert pair.prompt_ids == [BOS] + ids("abcdef") and pair.chosen_ids == ids("x") + [EOS]
    pair = tok_char("abcdef", "xy", "z", add_bos=True, max_length=6, max_prompt_length=3)
    assert pair.prompt_ids == [BOS] + ids("ef") and pair.chosen_ids == ids("xy") + [EOS]


def test_empty_prompt_gets_one_start_token_and_empty_response_is_eos():
    assert tok_char("", "", "no").prompt_ids == [BOS]
    assert tok_char("", "", "no").chosen_ids == [EOS]
    assert tok_char("", "x", "y", bos=None).prompt_ids == [EOS]
    assert tok_char("", "x", "y", add_bos=True).prompt_ids == [BOS]


def test_conversational_rendering_and_template_bos_not_doubled():
    ex = example([msg("user", "hi")], [msg("assistant", "yo")], [msg("assistant", "a"), msg("assistant", "b")])
    pair = tokenize_preference(ex, CharTokenizer(), max_length=100, max_prompt_length=50)
    assert pair.prompt_ids == ids("<user>hi|<assistant>")
    assert pair.chosen_ids == ids("yo") + [EOS] and pair.rejected_ids == ids("a\nb") + [EOS]
    tokenizer = CharTokenizer(add_bos=True, bos_in_template=True)
    pair = tokenize_preference(ex, tokenizer, max_length=100, max_prompt_length=50)
    assert pair.prompt_ids == [BOS] + ids("<user>hi|<assistant>")


def test_tokenizer_without_eos_or_template_is_a_clear_error(tiny_tokenizer):
    with pytest.raises(ConfigError, match="no eos_token"):
        tok_char("a", "b", "c", eos=None)
    no_template = copy.deepcopy(tiny_tokenizer)
    no_template.chat_template = None
    ex = example([msg("user", "hi")], [msg("assistant", "yo")], [msg("assistant", "no")])
    with pytest.raises(DataError, match=r"^d\.jsonl:1: field 'prompt': cannot render.*chat template"):
        tokenize_preference(ex, no_template, max_length=64, max_prompt_length=32)


def test_real_tokenizer_separate_tokenization_and_chat_template(tiny_tokenizer):
    tok = tiny_tokenizer

    def enc(s):
        return tok(s, add_special_tokens=False)["input_ids"]

    pair = tokenize_preference(example("the movie was", " great fun", " awful"), tok,
                               max_length=64, max_prompt_length=32)
    assert pair.prompt_ids == enc("the movie was")
    assert pair.chosen_ids == enc(" great fun") + [tok.eos_token_id]
    conv = [msg("user", "hello there")]
    ex = example(conv, [msg("assistant", "hi, how can I help?")], [msg("assistant", "no")])
    pair = tokenize_preference(ex, tok, max_length=64, max_prompt_length=32)
    rendered = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    assert pair.prompt_ids == enc(rendered)
    full = tok.apply_chat_template(conv + ex.chosen, tokenize=False)
    # The pair reads exactly like the template's rendering of the whole conversation (up to its
    # trailing newline): prompt + content + EOS.
    assert tok.decode(pair.prompt_ids + pair.chosen_ids) == full.rstrip("\n")


# ---------------------------------------------------------------------------------------------
# Whole data sets: split, indices, report


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


ROWS40 = [{"prompt": f"p{i:02d}", "chosen": "c", "rejected": "rr"} for i in range(40)]


def test_seeded_eval_split_indices_and_report(tmp_path):
    src = write_rows(tmp_path / "d.jsonl", ROWS40)
    data = load_preference_data(src, CharTokenizer(), max_length=32, max_prompt_length=16, seed=3)
    held = sorted(random.Random(3).sample(range(40), 2))  # round(40 * 0.05) = 2 rows
    assert [p.prompt_ids for p in data.eval] == [ids(f"p{i:02d}") for i in held]
    assert [p.prompt_ids for p in data.train] == [ids(f"p{i:02d}") for i in range(40) if i not in held]
    assert [p.index for p in data.train] == list(range(38)) and [p.index for p in data.eval] == [0, 1]
    # tokens per pair: 2*3 (prompt) + 2 ("c"+EOS) + 3 ("rr"+EOS) = 11.
    assert data.report.as_dict() == {"rows": 40, "train_rows": 38, "eval_rows": 2, "skipped": 0,
                                     "truncated": 0, "tokens": 40 * 11, "skipped_examples": [],
                                     "formats": {"standard": 40}, "identical": 0, "identical_examples": [],
                                     "repeats_prompt": 0, "repeats_prompt_examples": [], "duplicates": 0,
                                     "duplicate_examples": []}
    again = load_preference_data(src, CharTokenizer(), max_length=32, max_prompt_length=16, seed=3)
    assert [p.prompt_ids for p in again.eval] == [p.prompt_ids for p in data.eval]
    other = load_preference_data(src, CharTokenizer(), max_length=32, max_prompt_length=16, seed=4)
    assert [p.prompt_ids for p in other.eval] != [p.prompt_ids for p in data.eval]


def test_identical_responses_are_kept_and_counted_with_where(tmp_path):
    rows = [dict(r) for r in ROWS40[:6]]
    rows[2]["rejected"] = rows[2]["chosen"]
    rows[5] = {"chosen": "p05 same", "rejected": "p05 same"}  # implicit prompt: identical whole texts
    src = write_rows(tmp_path / "d.jsonl", rows)
    rep = load_preference_data(src, CharTokenizer(), eval_fraction=0).report
    assert (rep.train_rows, rep.identical) == (6, 2)
    assert rep.identical_examples == [f"{src}:3", f"{src}:6"]


def test_responses_repeating_their_prompt_are_counted_with_where(tmp_path):
    """A prompt field beside whole texts as responses (a common mix of the two formats) trains the
    prompt twice over; kept, and counted for the console note."""
    rows = [dict(r) for r in ROWS40[:4]]
    rows[1] = {"prompt": "p01", "chosen": "p01 good", "rejected": "p01 bad"}
    rows[3] = {"prompt": "p03", "chosen": "p03 good", "rejected": "other"}  # one side only: not counted
    src = write_rows(tmp_path / "d.jsonl", rows)
    rep = load_preference_data(src, CharTokenizer(), eval_fraction=0).report
    assert (rep.train_rows, rep.repeats_prompt, rep.repeats_prompt_examples) == (4, 1, [f"{src}:2"])


@pytest.mark.parametrize("n,fraction,n_eval", [(1, 0.05, 0), (2, 0.05, 1), (3, 0.0, 0), (10, 0.5, 5),
                                               (4, 0.9, 3)])
def test_eval_size_on_tiny_data(tmp_path, n, fraction, n_eval):
    src = write_rows(tmp_path / "d.jsonl", ROWS40[:n])
    data = load_preference_data(src, CharTokenizer(), eval_fraction=fraction)
    assert (len(data.train), len(data.eval)) == (n - n_eval, n_eval)


def test_eval_source_and_dataset_dict_split(tmp_path):
    train = write_rows(tmp_path / "train.jsonl", ROWS40[:5])
    ev = write_rows(tmp_path / "eval.jsonl", ROWS40[5:8])
    data = load_preference_data(train, CharTokenizer(), eval_source=ev)
    assert len(data.train) == 5 and [p.prompt_ids for p in data.eval] == [ids(f"p0{i}") for i in (5, 6, 7)]
    assert data.report.rows == 8
    # A DatasetDict folder as both: `split` picks the training rows, `eval_split` the eval rows.
    import datasets

    folder = str(tmp_path / "dd")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS40[:4]),
                          "test": datasets.Dataset.from_list(ROWS40[4:6])}).save_to_disk(folder)
    data = load_preference_data(folder, CharTokenizer(), eval_source=folder)
    assert [p.prompt_ids for p in data.eval] == [ids("p04"), ids("p05")] and len(data.train) == 4


def test_skipped_rows_are_counted_and_located(tmp_path):
    # max_length 4 = max_prompt_length: a 5-character prompt keeps 4 tokens and leaves no room.
    rows = [{"prompt": "ab", "chosen": "x", "rejected": "y"}] + \
        [{"prompt": "abcde", "chosen": "x", "rejected": "y"}] * 25 + \
        [{"prompt": "abc", "chosen": "xy", "rejected": "y"}]
    src = write_rows(tmp_path / "d.jsonl", rows)
    data = load_preference_data(src, CharTokenizer(), max_length=4, max_prompt_length=4, eval_fraction=0)
    report = data.report
    assert (report.rows, report.train_rows, report.skipped, report.truncated) == (27, 2, 25, 1)
    assert len(report.skipped_examples) == 20
    assert report.skipped_examples[0].startswith(f"{src}:2: no response token left after truncation")
    assert report.skipped_examples[19].startswith(f"{src}:21: ")
    # Kept: "ab"+x/y (2*2+2+2 = 8 tokens) and "abc" + "x" (EOS lost) / "y" (2*3+1+1 = 8).
    assert data.train[1].chosen_ids == ids("x") and report.tokens == 16
    assert [p.index for p in data.train] == [0, 1]
    bad = write_rows(tmp_path / "bad.jsonl", rows[1:26])
    with pytest.raises(DataError, match=r"bad\.jsonl: no usable training rows: all 25 were skipped "
                       r"\(first: .*bad\.jsonl:1: no response token"):
        load_preference_data(bad, CharTokenizer(), max_length=4, max_prompt_length=4, eval_fraction=0)


def test_bad_arguments_and_bad_rows(tmp_path):
    src = write_rows(tmp_path / "d.jsonl", ROWS40[:3] + [{"prompt": "p", "chosen": "c"}])
    with pytest.raises(DataError, match=r"d\.jsonl:4: field 'rejected': missing"):
        load_preference_data(src, CharTokenizer())
    for kwargs, pattern in [({"eval_fraction": 1.0}, "eval_fraction"), ({"max_length": 1}, "max_length"),
                            ({"max_prompt_length": 0}, "max_prompt_length")]:
        with pytest.raises(ConfigError, match=pattern):
            load_preference_data(src, CharTokenizer(), **kwargs)


def test_conversational_jsonl_end_to_end(tmp_path, tiny_tokenizer):
    rows = [{"chosen": [msg("user", f"hello {i}"), msg("assistant", "hi")],
             "rejected": [msg("user", f"hello {i}"), msg("assistant", "no")]} for i in range(4)]
    src = write_rows(tmp_path / "c.jsonl", rows)
    data = load_preference_data(src, tiny_tokenizer, max_length=64, max_prompt_length=32, eval_fraction=0.25)
    assert (data.report.train_rows, data.report.eval_rows) == (3, 1)
    for pair in data.train + data.eval:
        assert tiny_tokenizer.decode(pair.prompt_ids).endswith("<|assistant|>\n")
        assert pair.chosen_ids[-1] == pair.rejected_ids[-1] == tiny_tokenizer.eos_token_id


def test_a_template_that_refuses_a_response_turn_is_a_located_error(tiny_tokenizer):
    """The response turns are rendered with the prompt once, so that a template's own role checks
    (user/assistant must alternate) see them, as they do for SFT rows."""
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                         "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
                         "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    ok = example([msg("user", "hi")], [msg("assistant", "yo")], [msg("assistant", "no")])
    assert tokenize_preference(ok, tok, max_length=64, max_prompt_length=32) is not None
    twice = example([msg("user", "hi")], [msg("assistant", "yo")], [msg("assistant", "a"), msg("assistant", "b")])
    with pytest.raises(DataError, match=r"^d\.jsonl:1: field 'rejected': the tokenizer's chat template refuses the "
                                        r"conversation with this response: roles must alternate"):
        tokenize_preference(twice, tok, max_length=64, max_prompt_length=32)


def test_a_bos_only_the_template_writes_is_kept_when_the_prompt_is_cut(tiny_tokenizer):
    from dpolab.data.prompts import special_prefix, tokenize_prompts

    tok = copy.deepcopy(tiny_tokenizer)
    assert special_prefix(tok) == [] and tok.bos_token_id is not None  # the tokenizer adds no BOS itself
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    ex = example([msg("user", "the movie was great fun and the music was wonderful")], [msg("assistant", "yo")],
                 [msg("assistant", "no")])
    pair = tokenize_preference(ex, tok, max_length=12, max_prompt_length=6)
    assert pair.truncated and len(pair.prompt_ids) == 6 and pair.prompt_ids[0] == tok.bos_token_id
    text = tok.apply_chat_template(ex.prompt, tokenize=False, add_generation_prompt=True)
    (ids,), cut = tokenize_prompts([text], tok, max_prompt_length=6)
    assert cut == [True] and ids == pair.prompt_ids  # the on-policy prompt is the DPO prompt


def test_a_template_without_a_generation_prompt_is_refused_for_pairs(tiny_tokenizer):
    """A template with no add_generation_prompt branch renders the prompt without the assistant header
    it writes before every answer: pairs trained on prompt + answer with no header at all (SFT trains
    the header, sampling starts after the prompt). Refused; a template that writes the answer trimmed
    (it has a generation prompt) and one that writes no header at all are accepted."""
    tok = copy.deepcopy(tiny_tokenizer)
    turns = "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    tok.chat_template = turns
    pair = example([msg("user", "hi")], [msg("assistant", "yo")], [msg("assistant", "no")])
    with pytest.raises(DataError, match=r"^d\.jsonl:1: the tokenizer's chat template has no generation prompt "
                                        r"\(add_generation_prompt=True adds nothing\) but writes '<\|assistant\|>\\n' "
                                        r"before an answer"):
        tokenize_preference(pair, tok, max_length=64, max_prompt_length=32)
    tok.chat_template = turns.replace("{{ m['content'] }}", "{{ m['content'] | trim }}") + \
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    spaced = example([msg("user", "hi")], [msg("assistant", " yo")], [msg("assistant", "no")])
    assert tokenize_preference(spaced, tok, max_length=64, max_prompt_length=32) is not None
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"  # no headers: nothing skipped
    assert tokenize_preference(pair, tok, max_length=64, max_prompt_length=32) is not None


def test_a_template_error_on_a_prompt_read_from_the_conversations_names_chosen(tiny_tokenizer):
    """A conversational row without 'prompt' (the prompt is what precedes the final answer in
    'chosen' and 'rejected'): the template's refusal of the prompt named a 'prompt' field it lacks."""
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system turns') }}{% endif %}" \
        + tok.chat_template
    row = {"chosen": [msg("system", "be brief"), msg("user", "hi"), msg("assistant", "yo")],
           "rejected": [msg("system", "be brief"), msg("user", "hi"), msg("assistant", "no")]}
    with pytest.raises(DataError, match=r"^d\.jsonl:7: field 'chosen': cannot render the conversation .*no system"):
        tokenize_preference(parse_preference(rec(row)), tok, max_length=64, max_prompt_length=32)
    with pytest.raises(DataError, match=r"^d\.jsonl:7: field 'prompt': cannot render"):
        tokenize_preference(parse_preference(rec({"prompt": row["chosen"][:2], "chosen": "yo", "rejected": "no"})),
                            tok, max_length=64, max_prompt_length=32)


def test_a_response_ending_with_the_eos_text_gets_no_second_eos(tiny_tokenizer):
    """Llama-2-formatted data end answers with a literal "</s>", read as the EOS token: appending
    another trained EOS after EOS. SFT completions and texts likewise."""
    from dpolab.data.loading import Record
    from dpolab.data.preference import parse_preference, tokenize_preference
    from dpolab.data.sft import parse_sft, tokenize_sft

    tok, eos = tiny_tokenizer, tiny_tokenizer.eos_token_id
    ex = parse_preference(Record({"prompt": "the movie", "chosen": " was good</s>", "rejected": " was bad"},
                                 "d.jsonl", 1))
    pair = tokenize_preference(ex, tok, max_length=64, max_prompt_length=32)
    assert pair.chosen_ids[-2:] != [eos, eos] and pair.chosen_ids[-1] == eos
    assert pair.rejected_ids[-1] == eos and pair.rejected_ids[-2] != eos
    for row in ({"prompt": "the movie", "completion": " was good</s>"}, {"text": "the movie was good</s>"}):
        sft = tokenize_sft(*parse_sft(Record(row, "d.jsonl", 1)), tok, max_length=64, max_prompt_length=32)
        assert sft.input_ids[-1] == eos and sft.input_ids[-2] != eos and sft.loss_mask[-1] == 1


def test_duplicate_rows_are_counted_with_where(tmp_path):
    """A row repeated (an export run twice, a split built from overlapping sources) trains twice and,
    across the splits, evaluates on training rows; kept, and counted for the console note."""
    rows = [dict(r) for r in ROWS40[:5]] + [dict(ROWS40[1]), dict(ROWS40[1]), dict(ROWS40[3])]
    src = write_rows(tmp_path / "d.jsonl", rows)
    rep = load_preference_data(src, CharTokenizer(), eval_fraction=0).report
    assert rep.duplicates == 3
    assert rep.duplicate_examples == [f"{src}:6 (= {src}:2)", f"{src}:7 (= {src}:2)", f"{src}:8 (= {src}:4)"]
