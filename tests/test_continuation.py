"""SentencePiece tokenizers that mark a text's start ("▁", Llama-2/Mistral style): a response is
tokenized as it reads after its prompt, and sampled tokens decode to text that re-encodes to them."""

from __future__ import annotations

import string

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dpolab.data.loading import Record
from dpolab.data.preference import encode_prompt_completions, parse_preference, tokenize_preference
from dpolab.data.sft import parse_sft, tokenize_sft
from dpolab.lm.continuation import decode_continuation, encode_continuations, marks_starts
from dpolab.lm.generation import Generation, decode_responses
from dpolab.lm.tiny import CHAT_TEMPLATE, train_tokenizer

CORPUS = ["Question: what is the capital of France?\nAnswer: Paris", "Hello world, it is Paris.",
          "<|user|>\nwhat is it?</s>\n<|assistant|>\nParis</s>\n", "the movie was great fun"] * 40
PROMPT = "Question: what is the capital of France?"


def _sentencepiece(form: str):
    """A BPE tokenizer in the two forms Llama-2-style tokenizer.json files take: the older normalizer
    that prepends "▁" and replaces spaces, and the newer Metaspace pre-tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    if form == "normalizer":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=form)
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=form)
    alphabet = list(string.ascii_letters + string.digits + string.punctuation + "\n▁")
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=alphabet)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="module", params=["normalizer", "first", "always"])
def sp(request):
    return _sentencepiece(request.param)


def enc(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def in_context(tok, prompt: str, text: str) -> list[int]:
    whole, head = enc(tok, prompt + text), enc(tok, prompt)
    assert whole[:len(head)] == head
    return whole[len(head):]


@pytest.mark.parametrize("response", [" Paris", "Paris", " Paris.\nAnswer: Paris"])
def test_a_pair_response_is_tokenized_as_it_reads_after_its_prompt(sp, response):
    assert marks_starts(sp)
    want = in_context(sp, PROMPT, response)
    if not response.startswith(" "):
        assert enc(sp, response) != want  # encoded alone it gains a "▁" start mark: the defect
    ex = parse_preference(Record({"prompt": PROMPT, "chosen": response, "rejected": " Lyon"}, "m.jsonl", 1))
    pair = tokenize_preference(ex, sp, max_length=64, max_prompt_length=32)
    assert pair.prompt_ids == enc(sp, PROMPT)
    assert pair.chosen_ids == want + [sp.eos_token_id]
    assert pair.rejected_ids == in_context(sp, PROMPT, " Lyon") + [sp.eos_token_id]
    assert encode_prompt_completions(sp, [PROMPT], [response]) == [enc(sp, PROMPT) + want + [sp.eos_token_id]]


def test_a_response_after_an_empty_prompt_is_a_texts_start(sp):
    ex = parse_preference(Record({"prompt": "", "chosen": "Paris", "rejected": "Lyon"}, "m.jsonl", 1))
    pair = tokenize_preference(ex, sp, max_length=64, max_prompt_length=32)
    assert pair.prompt_ids == [sp.bos_token_id]
    assert pair.chosen_ids == enc(sp, "Paris") + [sp.eos_token_id]


def test_sft_completions_and_chat_turns_are_tokenized_in_context(sp):
    kind, payload = parse_sft(Record({"prompt": PROMPT, "completion": " Paris"}, "m.jsonl", 1))
    ex = tokenize_sft(kind, payload, sp, max_length=64, max_prompt_length=32)
    assert ex.input_ids == enc(sp, PROMPT) + in_context(sp, PROMPT, " Paris") + [sp.eos_token_id]
    messages = [{"role": "user", "content": "what is it?"}, {"role": "assistant", "content": "Paris"}]
    kind, payload = parse_sft(Record({"messages": messages}, "m.jsonl", 1))
    ex = tokenize_sft(kind, payload, sp, max_length=64, max_prompt_length=32)
    text = sp.apply_chat_template(messages, tokenize=False)
    if sp.backend_tokenizer.pre_tokenizer is not None and "always" in str(sp.backend_tokenizer.pre_tokenizer):
        return  # "always" marks every text after a special token: no single encoding to compare with
    assert ex.input_ids == enc(sp, text)


LLAMA2_TEMPLATE = (  # the Llama-2 chat template without its system-prompt branch: no generation prompt, and
    # a space between "[/INST]" and the answer
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + m['content'].strip() + "
    "' [/INST]' }}{% else %}{{ ' ' + m['content'].strip() + ' ' + eos_token }}{% endif %}{% endfor %}")


def test_sft_with_the_llama2_template_trains_the_answers_first_word_as_sampling_reads_it(sp):
    """Pieces encoded apart made the template's space one context token ▁ and the answer "P aris":
    after "[/INST]" the model never learned ▁Paris, and sampled answers lost their first word. The
    whole conversation is encoded once; a token overlapping the answer is a target."""
    sp.chat_template = LLAMA2_TEMPLATE
    try:
        messages = [{"role": "user", "content": "what is it?"}, {"role": "assistant", "content": "Paris"},
                    {"role": "user", "content": "and it?"}, {"role": "assistant", "content": "Paris"}]
        kind, payload = parse_sft(Record({"messages": messages}, "m.jsonl", 1))
        ex = tokenize_sft(kind, payload, sp, max_length=128, max_prompt_length=64)
        assert ex.input_ids == enc(sp, sp.apply_chat_template(messages, tokenize=False))
        prompt = enc(sp, sp.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True))
        assert ex.input_ids[:len(prompt)] == prompt and ex.loss_mask[:len(prompt)] == [0] * len(prompt)
        first = ex.input_ids[len(prompt)]
        assert ex.loss_mask[len(prompt)] == 1
        assert decode_continuation(sp, [first]).startswith(" P")  # ▁P…: the space and the word, one target
        second = enc(sp, sp.apply_chat_template(messages[:3], tokenize=False, add_generation_prompt=True))
        assert ex.input_ids[:len(second)] == second  # the second prompt as sampling encodes it
    finally:
        sp.chat_template = CHAT_TEMPLATE


@pytest.mark.parametrize("text", [" Paris", "Paris", "  two spaces", " x\nAnswer: it", " "])
def test_sampled_tokens_decode_to_text_that_encodes_to_them(sp, text):
    ids = encode_continuations(sp, [text])[0]
    assert decode_continuation(sp, ids) == text
    assert encode_continuations(sp, [decode_continuation(sp, ids)])[0] == ids


def test_decoded_responses_keep_the_space_a_start_mark_stands_for(sp):
    response = in_context(sp, PROMPT, " Paris") + [sp.eos_token_id]
    for prompt, want in ((enc(sp, PROMPT), " Paris"), ([sp.bos_token_id], "Paris")):
        gen = Generation(torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.bool),
                         torch.tensor([response]), torch.ones(1, len(response), dtype=torch.bool),
                         torch.tensor([True]))
        assert decode_responses(sp, gen) == [want]
    alone = enc(sp, "Paris")  # after BOS only, the text's own start mark is dropped as always
    gen = Generation(torch.tensor([[sp.bos_token_id]]), torch.ones(1, 1, dtype=torch.bool),
                     torch.tensor([alone]), torch.ones(1, len(alone), dtype=torch.bool), torch.tensor([False]))
    assert decode_responses(sp, gen) == ["Paris"]


def test_byte_level_tokenizers_are_unchanged():
    tok = train_tokenizer(CORPUS, vocab_size=400, min_frequency=1)
    assert not marks_starts(tok)
    texts = [" Paris", "Paris", "\n\nAnswer", " "]
    assert encode_continuations(tok, texts) == [enc(tok, t) for t in texts]
    assert decode_continuation(tok, enc(tok, " Paris")) == tok.decode(enc(tok, " Paris"))


def _chat_pair(tok, template: str, rejected: str):
    """A conversational pair ("Paris" over ``rejected``) under ``template``: (row, pair, prompt text)."""
    tok.chat_template = template
    try:
        row = {"prompt": [{"role": "user", "content": "what is it?"}],
               "chosen": [{"role": "assistant", "content": "Paris"}],
               "rejected": [{"role": "assistant", "content": rejected}]}
        pair = tokenize_preference(parse_preference(Record(row, "m.jsonl", 1)), tok, max_length=64,
                                   max_prompt_length=32)
        return row, pair, tok.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    finally:
        tok.chat_template = CHAT_TEMPLATE


def test_pairs_with_the_llama2_template_start_their_responses_with_its_space(sp):
    """Llama-2's template writes " " between "[/INST]" and the answer and has no generation prompt:
    the space starts the response (▁Paris, as sampling after the prompt writes it); it was refused."""
    row, pair, prompt = _chat_pair(sp, LLAMA2_TEMPLATE, " Lyon")
    sp.chat_template = LLAMA2_TEMPLATE
    try:
        assert pair.prompt_ids == enc(sp, prompt)
        assert pair.chosen_ids == in_context(sp, prompt, " Paris") + [sp.eos_token_id]
        assert pair.rejected_ids == in_context(sp, prompt, " Lyon") + [sp.eos_token_id]
        whole = enc(sp, sp.apply_chat_template(row["prompt"] + row["chosen"], tokenize=False))
        assert whole[:len(pair.prompt_ids) + len(pair.chosen_ids) - 1] == pair.prompt_ids + pair.chosen_ids[:-1]
    finally:
        sp.chat_template = CHAT_TEMPLATE


class _MergingNewlines:
    """A character tokenizer that prepends "▁" and reads "\\n\\n" as one token: a text starting with a
    newline merges with the "\\n" anchor."""

    def _ids(self, text: str) -> list[int]:
        text, out, i = "▁" + text if text else text, [], 0
        while i < len(text):
            step = 2 if text[i:i + 2] == "\n\n" else 1
            out.append(-1 if step == 2 else ord(text[i]))
            i += step
        return out

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [self._ids(t) for t in texts] if isinstance(texts, list) else self._ids(texts)}


def test_a_text_merging_with_the_anchor_is_encoded_after_another_one():
    tok = _MergingNewlines()
    assert marks_starts(tok)
    assert encode_continuations(tok, ["\nA", " b", "\n\nc"]) == [[10, 65], [32, 98], [-1, 99]]


SPACE_PROMPT_TEMPLATE = (  # a generation prompt ending in a space that the rendered turn shares
    "{% for m in messages %}{% if m['role'] == 'user' %}User: {{ m['content'] }}\n{% else %}Assistant: "
    "{{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}Assistant: {% endif %}")
TURNS = [{"role": "user", "content": "what is it?"}, {"role": "assistant", "content": "Paris"},
         {"role": "user", "content": "and it?"}, {"role": "assistant", "content": "Paris"}]


def _context_is_the_sampled_prompt(tok, messages, turns):
    """For each trained turn, the ids before its first target are the sampled prompt's ids."""
    from dpolab.data.prompts import tokenize_prompts

    kind, payload = parse_sft(Record({"messages": messages}, "m.jsonl", 1))
    ex = tokenize_sft(kind, payload, tok, max_length=256, max_prompt_length=128)
    for i in turns:
        (prompt,), _ = tokenize_prompts([tok.apply_chat_template(messages[:i], tokenize=False,
                                                                 add_generation_prompt=True)], tok)
        assert ex.input_ids[:len(prompt)] == prompt, (i, tok.convert_ids_to_tokens(ex.input_ids))
        assert ex.loss_mask[len(prompt)] == 1 and not any(ex.loss_mask[len(prompt) - 1:len(prompt)]), i


@pytest.mark.parametrize("template", ["llama2", "tiny", "space"])
def test_sft_trains_each_answer_after_the_prompt_sampling_reads(sp, template):
    """A generation prompt ending in a space ("Assistant: ") merges with the answer in the rendered
    turn (▁Paris): the answer is trained after the prompt's own tokens, as the model samples it
    there (encoding the whole turn trained ▁Paris after "Assistant:", a prompt never sampled from:
    the model answered nothing). One turn for it; every turn where no token crosses the prompt's end."""
    sp.chat_template = {"llama2": LLAMA2_TEMPLATE, "tiny": CHAT_TEMPLATE, "space": SPACE_PROMPT_TEMPLATE}[template]
    try:
        _context_is_the_sampled_prompt(sp, TURNS[:2] if template == "space" else TURNS,
                                       [1] if template == "space" else [1, 3])
    finally:
        sp.chat_template = CHAT_TEMPLATE


def test_byte_level_sft_trains_each_answer_after_the_prompt_sampling_reads():
    tok = train_tokenizer(CORPUS, vocab_size=400, min_frequency=1)
    tok.chat_template = SPACE_PROMPT_TEMPLATE
    _context_is_the_sampled_prompt(tok, TURNS[:2], [1])
    tok.chat_template = CHAT_TEMPLATE
    _context_is_the_sampled_prompt(tok, TURNS, [1, 3])


def test_pairs_after_a_generation_prompt_the_turn_writes_a_space_after(sp):
    """A generation prompt "Assistant:" with turns written "Assistant: answer" (DeepSeek-chat's
    form): the space starts the response (▁Paris); it was dropped and the answer trained as P aris."""
    _, pair, prompt = _chat_pair(sp, SPACE_PROMPT_TEMPLATE.replace("Assistant: {% endif %}", "Assistant:{% endif %}"),
                                 "Lyon")
    assert prompt.endswith("Assistant:")
    assert pair.chosen_ids == in_context(sp, prompt, " Paris") + [sp.eos_token_id]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.text("abcdefgh ,.!?", min_size=1, max_size=16),
                          st.text("abcdefgh ,.!?", min_size=1, max_size=16)), min_size=1, max_size=3))
def test_every_answer_is_trained_after_its_sampled_prompt_and_only_the_answer(turns):
    """Property of the whole-text SFT encoding (byte-level BPE, the tiny chat template): the ids before
    each answer are the sampled prompt's ids, and the trained tokens spell every answer with its
    end-of-turn text, nothing else."""
    tok = _byte_level()
    messages = [m for q, a in turns for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    _context_is_the_sampled_prompt(tok, messages, list(range(1, len(messages), 2)))
    kind, payload = parse_sft(Record({"messages": messages}, "m.jsonl", 1))
    ex = tokenize_sft(kind, payload, tok, max_length=1024, max_prompt_length=512)
    trained = tok.decode([t for t, m in zip(ex.input_ids, ex.loss_mask) if m])
    assert trained == "".join(f"{a}</s>\n" for _, a in turns)


_BYTE_LEVEL = []


def _byte_level():
    if not _BYTE_LEVEL:
        _BYTE_LEVEL.append(train_tokenizer(CORPUS, vocab_size=400, min_frequency=1))
    return _BYTE_LEVEL[0]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.text("ab \n", min_size=1, max_size=8), st.text("ab \n", min_size=1, max_size=8)),
                min_size=1, max_size=3))
def test_answers_merging_with_their_header_are_still_trained_whole(turns):
    """With newlines an answer's start can merge with the header's "\\n" ("\\n\\n" is one byte-level
    pre-token): the first answer is trained after its sampled prompt, and every answer's text is
    trained, whole and alone."""
    tok = _byte_level()
    messages = [m for q, a in turns for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    _context_is_the_sampled_prompt(tok, messages, [1])
    kind, payload = parse_sft(Record({"messages": messages}, "m.jsonl", 1))
    ex = tokenize_sft(kind, payload, tok, max_length=1024, max_prompt_length=512)
    assert tok.decode([t for t, m in zip(ex.input_ids, ex.loss_mask) if m]) == "".join(f"{a}</s>\n" for _, a in turns)
