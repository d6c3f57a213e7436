"""Tiny, fully local models and tokenizers: for tests, examples and the laptop-scale demo.

Nothing here touches the network: the tokenizer is a byte-level BPE trained with ``tokenizers`` on
the texts given, and the model is a Llama-style causal LM built from a config with random weights.
Both save and reload through the ordinary Hugging Face ``save_pretrained``/``from_pretrained``.
"""

from __future__ import annotations

from collections.abc import Iterable

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]

# A minimal chat template for conversational data (role headers, then content, then EOS per turn).
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512, *, min_frequency: int = 2):
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it as a ``PreTrainedTokenizerFast``
    with ``<pad>``, ``<s>``, ``</s>``, ``<unk>`` and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llama(vocab_size: int, *, hidden_size: int = 64, layers: int = 2, heads: int = 4,
               intermediate_size: int | None = None, max_positions: int = 256, seed: int = 0,
               tokenizer=None):
    """A Llama-style causal LM with random weights, built from a config (no download)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs = {}
    if tokenizer is not None:
        kwargs = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads,
                         intermediate_size=intermediate_size or 4 * hidden_size,
                         max_position_embeddings=max_positions, tie_word_embeddings=False, **kwargs)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model
