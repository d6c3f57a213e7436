"""Shared fixtures: tiny local tokenizers and models (no network, built in-process)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

# Property tests draw the same examples on every run, so the suite passes or fails the same way in
# CI; DPOLAB_FUZZ_RANDOM=1 draws new ones (to look for new failures: each random run has found one).
try:
    from hypothesis import settings as _hypothesis_settings

    _hypothesis_settings.register_profile("dpolab", derandomize=not os.environ.get("DPOLAB_FUZZ_RANDOM"))
    _hypothesis_settings.load_profile("dpolab")
except ImportError:
    pass

CORPUS = [
    "the movie was great fun and I loved every minute",
    "a terrible boring film with awful acting",
    "the plot was clever and the music was wonderful",
    "I hated the ending, it was dull and slow",
    "what a delightful story, charming and warm",
    "the worst film of the year, a total mess",
    "User: hello there\nAssistant: hi, how can I help?",
] * 20


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tests use tiny models: intra-op threads only add synchronisation (measured 0.88 s vs 0.02 s
    per tiny step on a busy 2-core machine). Subprocesses started by tests inherit OMP_NUM_THREADS."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from dpolab.lm.tiny import train_tokenizer

    return train_tokenizer(CORPUS, vocab_size=320)


@pytest.fixture()
def tiny_model(tiny_tokenizer):
    from dpolab.lm.tiny import tiny_llama

    return tiny_llama(len(tiny_tokenizer), hidden_size=32, layers=2, heads=4, tokenizer=tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny Llama + tokenizer saved in Hugging Face format, loadable by ``from_pretrained``."""
    from dpolab.lm.tiny import tiny_llama

    path = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_llama(len(tiny_tokenizer), hidden_size=32, layers=2, heads=4, tokenizer=tiny_tokenizer)
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path
