"""SFT data: format detection, loss masks (completion-only vs full), chat templates, truncation,
bad rows, padding, packing and the block-diagonal mask."""

from __future__ import annotations

import json

import pytest
import torch

from dpolab.data.loading import Record
from dpolab.data.sft import (
    PackedRow,
    SFTExample,
    block_causal_mask,
    chat_segments,
    collate_sft,
    load_sft_data,
    pack_examples,
    parse_sft,
    tokenize_sft,
)
from dpolab.errors import DataError


def enc(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def tok_row(tok, row: dict, **kw):
    kind, payload = parse_sft(Record(row, "mem.jsonl", 1))
    return tokenize_sft(kind, payload, tok, max_length=kw.pop("max_length", 128),
                        max_prompt_length=kw.pop("max_prompt_length", 64), **kw)


def test_prompt_completion_masks_completion_only_and_full(tiny_tokenizer):
    tok = tiny_tokenizer
    prompt, completion = "the movie was", " great fun"
    p, c, eos = enc(tok, prompt), enc(tok, completion), tok.eos_token_id
    ex = tok_row(tok, {"prompt": prompt, "completion": completion})
    # Tokenized separately and concatenated, EOS appended; the tiny tokenizer adds no BOS.
    assert ex.input_ids == p + c + [eos]
    assert ex.loss_mask == [0] * len(p) + [1] * (len(c) + 1)
    full = tok_row(tok, {"prompt": prompt, "completion": completion}, loss_on="full")
    assert full.input_ids == ex.input_ids
    assert full.loss_mask == [0] + [1] * (len(p) + len(c))  # the first token has no predictor


def test_chat_loss_starts_after_the_role_header_when_the_generation_prompt_writes_more(tiny_tokenizer):
    """A template whose generation prompt adds an empty thinking block that rendered turns do not
    have (as reasoning models' templates do): the role header the two share is context, the turn's
    content the target (before, the whole turn, header included, was the target)."""
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = tok.chat_template.replace("{% if add_generation_prompt %}<|assistant|>\n{% endif %}",
                                                  "{% if add_generation_prompt %}<|assistant|>\n<think></think>\n"
                                                  "{% endif %}")
    messages = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi"}]
    assert tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True).endswith("<think></think>\n")
    pieces = chat_segments(tok, messages)
    assert "".join(t for t, _ in pieces) == tok.apply_chat_template(messages, tokenize=False)
    assert [t for t, target in pieces if target] == ["hi</s>\n"]
    for answer in ("<html>ok</html>", "<think>x</think>y"):  # content that starts like the extra block
        pieces = chat_segments(tok, [messages[0], {"role": "assistant", "content": answer}])
        assert [t for t, target in pieces if target] == [answer + "</s>\n"], pieces
    # a template that refuses the stand-in contents the header is found with: the role header is still
    # context (the common prefix of the generation prompt and the turn)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'assistant' and not m['content'].endswith('.') %}"
                         "{{ raise_exception('answers end with a period') }}{% endif %}{% endfor %}" + tok.chat_template)
    pieces = chat_segments(tok, [messages[0], {"role": "assistant", "content": "Hello."}])
    assert [t for t, target in pieces if target] == ["Hello.</s>\n"], pieces


def test_an_answer_header_without_a_generation_prompt_is_context(tiny_tokenizer):
    """A conversation opening with an assistant turn (the generation prompt of an empty conversation is
    refused by transformers 5), or a template that ignores add_generation_prompt: the turn's role
    header was trained as if it were the answer's content."""
    import copy

    tok = tiny_tokenizer
    messages = [{"role": "assistant", "content": "hello how are you"}, {"role": "user", "content": "fine"},
                {"role": "assistant", "content": "good"}]
    pieces = chat_segments(tok, messages)
    assert "".join(t for t, _ in pieces) == tok.apply_chat_template(messages, tokenize=False)
    assert [t for t, target in pieces if target] == ["hello how are you</s>\n", "good</s>\n"], pieces
    ignores = copy.deepcopy(tiny_tokenizer)
    ignores.chat_template = "{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n{% endfor %}"
    pieces = chat_segments(ignores, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}])
    assert [t for t, target in pieces if target] == ["yes\n"], pieces


def test_text_rows_train_on_every_token(tiny_tokenizer):
    tok = tiny_tokenizer
    ex = tok_row(tok, {"text": "a terrible boring film"})
    ids = enc(tok, "a terrible boring film")
    assert ex.input_ids == ids + [tok.eos_token_id]
    assert ex.loss_mask == [0] + [1] * len(ids)
    with pytest.raises(DataError, match=r"mem\.jsonl:1.*'text'.*is empty"):  # only EOS: nothing to predict
        tok_row(tok, {"text": ""})


def test_chat_loss_covers_assistant_turns_only(tiny_tokenizer):
    tok = tiny_tokenizer
    messages = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi, how can I help?"},
                {"role": "user", "content": "the movie"}, {"role": "assistant", "content": "was great"}]
    pieces = chat_segments(tok, messages)
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert "".join(t for t, _ in pieces) == rendered
    # The template writes "<|assistant|>\n" before and "</s>\n" after each assistant content.
    assert [t for t, target in pieces if target] == ["hi, how can I help?</s>\n", "was great</s>\n"]
    ex = tok_row(tok, {"messages": messages})
    targets = [i for i, m in zip(ex.input_ids, ex.loss_mask) if m]
    assert targets == enc(tok, "hi, how can I help?</s>\n") + enc(tok, "was great</s>\n")
    assert tok.decode(ex.input_ids) == rendered
    full = tok_row(tok, {"messages": messages}, loss_on="full")
    assert full.input_ids == ex.input_ids and sum(full.loss_mask) == len(ex.input_ids) - 1
    # Conversational prompt/completion: the assistant turn inside the prompt is context only.
    pc = tok_row(tok, {"prompt": messages[:3], "completion": messages[3:]})
    assert pc.input_ids == ex.input_ids
    assert [i for i, m in zip(pc.input_ids, pc.loss_mask) if m] == enc(tok, "was great</s>\n")
    # One side messages, the other a string (as DPO's pairs take it): the string is that side's turn.
    assert tok_row(tok, {"prompt": messages[:3], "completion": "was great"}).input_ids == ex.input_ids
    assert tok_row(tok, {"prompt": "the movie", "completion": messages[3:]}).input_ids == \
        tok_row(tok, {"messages": messages[2:]}).input_ids


def test_truncation_keeps_prompt_end_then_completion_start(tiny_tokenizer):
    tok = tiny_tokenizer
    prompt, completion = "the movie was great fun and", " I loved every minute"
    p, c = enc(tok, prompt), enc(tok, completion) + [tok.eos_token_id]
    ex = tok_row(tok, {"prompt": prompt, "completion": completion}, max_length=8, max_prompt_length=3)
    assert ex.truncated and ex.input_ids == p[-3:] + c[:5]
    assert ex.loss_mask == [0, 0, 0, 1, 1, 1, 1, 1]


def test_bad_rows_name_file_line_and_field(tiny_tokenizer, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": 3}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2.*completion"):
        load_sft_data(str(bad), tiny_tokenizer, max_length=32)
    other = tmp_path / "other.jsonl"
    other.write_text('{"question": "a"}\n')
    with pytest.raises(DataError, match=r"other\.jsonl:1.*expected 'prompt' and 'completion'"):
        load_sft_data(str(other), tiny_tokenizer, max_length=32)
    msgs = tmp_path / "msgs.jsonl"
    msgs.write_text(json.dumps({"messages": [{"role": "user", "content": 5}]}) + "\n")
    with pytest.raises(DataError, match=r"msgs\.jsonl:1.*messages\[0\]"):
        load_sft_data(str(msgs), tiny_tokenizer, max_length=32)
    no_assistant = tmp_path / "na.jsonl"
    no_assistant.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError, match="no assistant message"):
        load_sft_data(str(no_assistant), tiny_tokenizer, max_length=32)
    cased = tmp_path / "cased.jsonl"  # "ASSISTANT" would read as no assistant turn: the role, said by name
    cased.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                              {"role": "ASSISTANT", "content": "yo"}]}) + "\n")
    with pytest.raises(DataError, match=r"cased\.jsonl:1: field 'messages\[1\]\.role': role 'ASSISTANT': did you"):
        load_sft_data(str(cased), tiny_tokenizer, max_length=32)


@pytest.mark.parametrize("row, kind", [
    ({"prompt": "Hi", "prompt_id": "x", "messages": [{"role": "user", "content": "Hi"},
                                                     {"role": "assistant", "content": "Hello"}]}, "chat"),
    ({"prompt": "a", "completion": "b", "text": "a b"}, "completion"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "text": ""}, "chat"),
    ({"prompt": "", "completion": "", "text": "c"}, "text"),
])
def test_a_row_is_read_as_the_first_form_it_fills(row, kind):
    """messages, then prompt/completion (with a completion), then text: UltraChat-style rows keep the
    first user turn in a `prompt` column beside `messages`, and a CSV row has every form's columns."""
    assert parse_sft(Record(row, "mem.jsonl", 1))[0] == kind


def test_csv_rows_of_different_forms_read_each_form(tiny_tokenizer, tmp_path):
    # a CSV has every column in every row: another form's cells are empty, not absent
    path = tmp_path / "mixed.csv"
    path.write_text("text,prompt,completion\nthe whole text,,\n,the movie, was great\n")
    data = load_sft_data(str(path), tiny_tokenizer, max_length=32, eval_fraction=0)
    assert data.report.formats == {"text": 1, "completion": 1}
    same = tmp_path / "same.jsonl"
    same.write_text('{"text": "the whole text"}\n{"prompt": "the movie", "completion": " was great"}\n')
    expected = load_sft_data(str(same), tiny_tokenizer, max_length=32, eval_fraction=0)
    assert [(e.input_ids, e.loss_mask) for e in data.train] == [(e.input_ids, e.loss_mask) for e in expected.train]


def test_load_splits_skips_and_reports(tiny_tokenizer, tmp_path):
    path = tmp_path / "d.jsonl"
    long_chat = {"messages": [{"role": "user", "content": "the movie was great fun " * 5},
                              {"role": "assistant", "content": "ok"}]}
    rows = [{"prompt": f"p{i}", "completion": " the movie"} for i in range(18)] + [{"text": "hello"}, long_chat]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_sft_data(str(path), tiny_tokenizer, max_length=24, eval_fraction=0.25, seed=3)
    r = data.report
    assert r.rows == 20 and r.skipped == 1 and "d.jsonl:20" in r.skipped_examples[0]  # assistant cut off
    assert r.eval_rows == 5 and r.train_rows + r.eval_rows == 19
    assert r.formats == {"completion": 18, "text": 1, "chat": 1}
    assert [e.index for e in data.train] == list(range(len(data.train)))
    again = load_sft_data(str(path), tiny_tokenizer, max_length=24, eval_fraction=0.25, seed=3)
    assert [e.input_ids for e in again.eval] == [e.input_ids for e in data.eval]  # the split is seeded


def test_collate_pads_right_with_positions():
    a = SFTExample([5, 6, 7], [0, 1, 1], 0)
    b = SFTExample([8, 9], [0, 1], 1)
    batch = collate_sft([a, b], pad_token_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch.loss_mask.tolist() == [[False, True, True], [False, True, False]]
    assert batch.position_ids.tolist() == [[0, 1, 2], [0, 1, 0]]
    assert batch.num_targets == 3 and batch.num_examples == 2 and not batch.packed
    assert batch.model_attention_mask(torch.float32) is batch.attention_mask


def test_pack_examples_best_fit_restarts_positions():
    exs = [SFTExample(list(range(10 * i, 10 * i + n)), [0] + [1] * (n - 1), i) for i, n in enumerate([5, 3, 4, 2, 6])]
    rows = pack_examples(exs, 8)
    # Best-fit decreasing: 6 -> row0, 5 -> row1, 4 -> row2, 3 -> row1 (5+3=8), 2 -> row0 (6+2=8).
    assert [r.indices for r in rows] == [[4, 3], [0, 1], [2]]
    r0 = rows[0]
    assert r0.input_ids == exs[4].input_ids + exs[3].input_ids
    assert r0.position_ids == [0, 1, 2, 3, 4, 5, 0, 1]
    assert r0.segment_ids == [1] * 6 + [2] * 2
    assert r0.loss_mask == [0, 1, 1, 1, 1, 1, 0, 1]  # each example's first token is never a target
    assert sorted(i for r in rows for i in r.indices) == list(range(5))
    batch = collate_sft(rows, pad_token_id=0)
    assert batch.packed and batch.num_examples == 5 and batch.num_targets == sum(sum(e.loss_mask) for e in exs)
    assert batch.segment_ids[2].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    with pytest.raises(Exception, match="more than max_length"):
        pack_examples(exs, 5)


def test_block_causal_mask_by_hand():
    seg = torch.tensor([[1, 1, 2, 0]])
    m = block_causal_mask(seg, torch.float32)
    assert m.shape == (1, 1, 4, 4)
    allowed = (m[0, 0] == 0).int().tolist()
    assert allowed == [[1, 0, 0, 0],   # token 0 sees itself
                       [1, 1, 0, 0],   # token 1 sees example 1 causally
                       [0, 0, 1, 0],   # token 2 starts example 2: not example 1
                       [0, 0, 0, 1]]   # the pad sees only itself (no empty softmax row)
    assert m[0, 0, 0, 1].item() == torch.finfo(torch.float32).min
    row = PackedRow([1, 2, 3], [0, 1, 0], [0, 1, 0], [1, 1, 2], [0, 1])
    assert collate_sft([row], 0).model_attention_mask(torch.float32, "flash_attention_2") is None


def test_a_template_that_refuses_the_roles_is_one_located_line_everywhere(tiny_tokenizer, tmp_path):
    """A template that raises (e.g. no system role) names the row, the field and its own message,
    for SFT rows and for prompt rows (generate, eval and the on-policy trainers)."""
    import copy

    from dpolab.data.prompts import load_prompts

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                         "{{ raise_exception('System role not supported') }}{% endif %}"
                         "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    system = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    rows = tmp_path / "sft.jsonl"
    rows.write_text(json.dumps({"messages": [*system, {"role": "assistant", "content": "yo"}]}) + "\n")
    with pytest.raises(DataError, match=r"sft\.jsonl:1: field 'messages': cannot use the tokenizer's chat template "
                                        r"for this conversation: System role not supported$"):
        load_sft_data(str(rows), tok, max_length=64)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "user", "content": "ok"}]}) + "\n"
                       + json.dumps({"messages": system}) + "\n")
    with pytest.raises(DataError, match=r"prompts\.jsonl:2: field 'messages': cannot render the conversation with "
                                        r"the tokenizer's chat template: TemplateError: System role not supported"):
        load_prompts(str(prompts), tok)


def test_message_rows_reach_the_template_whole(tiny_tokenizer, tmp_path):
    """SFT kept only 'role' and 'content' of each message: an assistant turn of tool calls became an
    empty answer and a tool result lost its name (the preference and prompt loaders passed them)."""
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{% if m.name %} name={{ m.name }}{% endif %}\n"
                         "{{ m['content'] }}{% if m.tool_calls %}<call>{{ m.tool_calls[0].name }}</call>{% endif %}"
                         "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": "", "tool_calls": [{"name": "lookup"}]},
                {"role": "tool", "name": "lookup", "content": "42", "tool_call_id": None},
                {"role": "assistant", "content": "it is 42"}]
    ex = tok_row(tok, {"messages": messages})
    text = tok.decode(ex.input_ids)
    assert "<call>lookup</call>" in text and "name=lookup" in text, text
    trained = tok.decode([t for t, m in zip(ex.input_ids, ex.loss_mask) if m])
    assert "<call>lookup</call>" in trained and "it is 42" in trained, trained
    openai = [dict(m, content=None) if m.get("tool_calls") else m for m in messages]  # "content": null: refused
    assert tok_row(tok, {"messages": openai}).input_ids == ex.input_ids
    with pytest.raises(DataError, match=r"field 'messages\[1\]': each message needs string 'role' and 'content'"):
        tok_row(tok, {"messages": [messages[0], {"role": "assistant", "content": None}]})  # no tool call: refused
    # the preference and prompt loaders read OpenAI's form alike (they refused it)
    from dpolab.data.preference import parse_preference, tokenize_preference
    from dpolab.data.prompts import load_prompts

    pair = {"prompt": openai[:3], "chosen": [messages[3]], "rejected": [{"role": "assistant", "content": "no"}]}
    got = tokenize_preference(parse_preference(Record(pair, "p.jsonl", 1)), tok, max_length=128, max_prompt_length=96)
    want = tokenize_preference(parse_preference(Record({**pair, "prompt": messages[:3]}, "p.jsonl", 1)), tok,
                               max_length=128, max_prompt_length=96)
    assert got == want
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"messages": openai[:3]}) + "\n" + json.dumps({"messages": messages[:3]}) + "\n")
    rows = load_prompts(str(path), tok, max_prompt_length=96)
    assert rows.ids[0] == rows.ids[1]


def test_a_message_prompt_loses_its_start_to_max_prompt_length(tiny_tokenizer):
    """--max-prompt-length did nothing for prompt/completion rows of message lists: they were cut at
    the end, so a long prompt left no target and the row was skipped; now the prompt (every token
    before the first target) keeps its end, down to max_prompt_length, as string prompts do."""
    tok = tiny_tokenizer
    prompt = [{"role": "user", "content": "the movie was great fun and I loved every minute " * 3}]
    completion = [{"role": "assistant", "content": "a delightful story"}]
    whole = tok_row(tok, {"prompt": prompt, "completion": completion}, max_length=512)
    lead = whole.loss_mask.index(1)  # the first target token
    answer = len(whole) - lead
    ex = tok_row(tok, {"prompt": prompt, "completion": completion}, max_length=answer + 5, max_prompt_length=5)
    assert ex.truncated and ex.input_ids == whole.input_ids[lead - 5:]
    assert sum(ex.loss_mask) == sum(whole.loss_mask)  # the whole answer is still trained
    # the end is cut only once the prompt is down to max_prompt_length
    ex = tok_row(tok, {"prompt": prompt, "completion": completion}, max_length=answer + 2, max_prompt_length=5)
    assert ex.input_ids == whole.input_ids[lead - 5:lead - 5 + answer + 2]


def test_a_bos_only_the_template_writes_is_kept_when_a_message_prompt_is_cut(tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = "{{ bos_token }}" + tok.chat_template
    prompt = [{"role": "user", "content": "the movie was great fun and I loved every minute " * 3}]
    completion = [{"role": "assistant", "content": "a delightful story"}]
    whole = tok_row(tok, {"prompt": prompt, "completion": completion}, max_length=512)
    assert whole.input_ids[0] == tok.bos_token_id
    lead = whole.loss_mask.index(1)
    ex = tok_row(tok, {"prompt": prompt, "completion": completion}, max_length=len(whole) - lead + 5,
                 max_prompt_length=5)
    assert ex.input_ids == [tok.bos_token_id] + whole.input_ids[lead - 4:]


def test_a_message_completion_without_an_answer_is_refused_not_skipped(tiny_tokenizer, tmp_path):
    bad = tmp_path / "sft.jsonl"
    bad.write_text(json.dumps({"prompt": [{"role": "user", "content": "hi"}],
                               "completion": [{"role": "user", "content": "x"}]}) + "\n")
    with pytest.raises(DataError, match=r"sft.jsonl:1: field 'completion': no assistant message to train on"):
        load_sft_data(str(bad), tiny_tokenizer, eval_fraction=0)


def test_a_template_refusing_a_prompt_completion_conversation_names_its_fields(tiny_tokenizer, tmp_path):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system turns') }}"
                         "{% endif %}" + tok.chat_template)
    bad = tmp_path / "sft.jsonl"
    bad.write_text(json.dumps({"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
                               "completion": [{"role": "assistant", "content": "ok"}]}) + "\n")
    with pytest.raises(DataError) as err:
        load_sft_data(str(bad), tok, eval_fraction=0)
    assert "of 'prompt' and 'completion': no system turns" in str(err.value)
    assert "'messages'" not in str(err.value), str(err.value)
