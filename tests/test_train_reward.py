"""The Bradley-Terry reward model: recovery of a known reward (Bayes-rate accuracy, correlation),
the one-forward loss wiring with a margin, the scoring API's consistency with training, last-token
readout, gradient accumulation, resume and bad input."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dpolab.cli import main
from dpolab.lm.reward_model import RewardModel, load_reward_model
from dpolab.rewards.functions import score

# A known reward: r(y) = sum of per-word scores over the words of y.
WORD_SCORES = {"alpha": -1.5, "bravo": -1.0, "charlie": -0.5, "delta": -0.2,
               "echo": 0.2, "foxtrot": 0.5, "golf": 1.0, "hotel": 1.5}
PROMPT = "Rate:"


def true_reward(text: str) -> float:
    return sum(WORD_SCORES[w] for w in text.split())


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def random_text(rng: random.Random, words: int = 4) -> str:
    return " " + " ".join(rng.choice(list(WORD_SCORES)) for _ in range(words))


def write_bt_pairs(path: Path, n: int, seed: int) -> float:
    """``n`` pairs of random texts labelled by Bradley-Terry sampling from the true reward:
    the first text is chosen with probability σ(r1 − r2). Returns the Bayes rate of these pairs,
    mean of max(σ(Δ), 1 − σ(Δ)): the expected accuracy of the best possible ranker."""
    rng = random.Random(seed)
    bayes = 0.0
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(n):
            a, b = random_text(rng), random_text(rng)
            p = sigmoid(true_reward(a) - true_reward(b))
            bayes += max(p, 1 - p)
            chosen, rejected = (a, b) if rng.random() < p else (b, a)
            fh.write(json.dumps({"prompt": PROMPT, "chosen": chosen, "rejected": rejected}) + "\n")
    return bayes / n



@pytest.fixture(scope="module")
def word_model_dir(tmp_path_factory):
    """A tiny Llama whose tokenizer has one token per word of WORD_SCORES."""
    from dpolab.lm.tiny import tiny_llama, train_tokenizer

    corpus = [PROMPT + " " + " ".join(WORD_SCORES)] * 20
    tok = train_tokenizer(corpus, vocab_size=300)
    path = tmp_path_factory.mktemp("word-llama")
    tiny_llama(len(tok), hidden_size=32, layers=2, heads=4, tokenizer=tok).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _args(model_dir, data, out, *extra):
    return ["rm", "--model", str(model_dir), "--data", str(data), "--output-dir", str(out), "--max-length", "32",
            "--max-prompt-length", "8", "--no-progress", *map(str, extra)]


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _recovery(word_model_dir, tmp_path, *, n_train, n_eval, steps):
    train_file, eval_file = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    write_bt_pairs(train_file, n_train, seed=1)
    bayes = write_bt_pairs(eval_file, n_eval, seed=2)
    out = tmp_path / "rm"
    assert main(_args(word_model_dir, train_file, out, "--eval-data", eval_file, "--learning-rate", "5e-3",
                      "--batch-size", "16", "--max-steps", steps, "--lr-scheduler", "constant",
                      "--logging-steps", "20", "--eval-batch-size", "200")) == 0
    rng = random.Random(7)
    texts = [random_text(rng) for _ in range(200)]
    learned = score(out / "final", [PROMPT] * len(texts), texts, batch_size=100)
    corr = float(np.corrcoef(learned, [true_reward(t) for t in texts])[0, 1])
    return _summary(out), bayes, corr


def test_reward_model_recovers_known_reward(word_model_dir, tmp_path):
    """Held-out pairwise accuracy reaches the Bayes rate (≈ 0.83 here; ±0.05 covers the sampling
    noise of 400 labels, sd ≈ 0.019) and the learned reward correlates with the true one."""
    summary, bayes, corr = _recovery(word_model_dir, tmp_path, n_train=800, n_eval=400, steps=150)
    assert 0.78 < bayes < 0.88
    assert summary["eval/accuracy"] > bayes - 0.05, (summary["eval/accuracy"], bayes)
    assert corr > 0.9, corr


@pytest.mark.slow
def test_reward_model_recovers_known_reward_long(word_model_dir, tmp_path):
    summary, bayes, corr = _recovery(word_model_dir, tmp_path, n_train=4000, n_eval=2000, steps=400)
    assert abs(summary["eval/accuracy"] - bayes) < 0.025, (summary["eval/accuracy"], bayes)
    assert corr > 0.97, corr


def test_margin_loss_matches_scored_rewards(word_model_dir, tmp_path):
    """With a zero learning rate the step's logged loss is mean_i −log σ(r(x, y_w,i) − r(x, y_l,i) − m)
    for the rewards that score() gives the same texts: the one-forward chosen/rejected split, the
    margin and the scoring API's tokenization agree with training."""
    data = tmp_path / "p.jsonl"
    write_bt_pairs(data, 8, seed=3)
    out = tmp_path / "m"
    assert main(_args(word_model_dir, data, out, "--learning-rate", "0", "--max-steps", "1", "--batch-size", "8",
                      "--eval-fraction", "0", "--margin", "2.0", "--logging-steps", "1")) == 0
    rows = [json.loads(x) for x in data.read_text().splitlines()]
    rc = score(out / "final", [r["prompt"] for r in rows], [r["chosen"] for r in rows])
    rr = score(out / "final", [r["prompt"] for r in rows], [r["rejected"] for r in rows], batch_size=3)
    expected = np.mean([-math.log(sigmoid(c - r - 2.0)) for c, r in zip(rc, rr)])
    logged = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert logged["loss"] == pytest.approx(expected, abs=1e-5)
    assert logged["accuracy"] == np.mean([c > r for c, r in zip(rc, rr)])
    from transformers import AutoModelForSequenceClassification

    reloaded = AutoModelForSequenceClassification.from_pretrained(out / "final")
    assert reloaded.config.num_labels == 1 and reloaded.config.pad_token_id is not None


def test_reward_read_at_last_real_token(word_model_dir):
    """Right-padded batch == one call per text, and == the Hugging Face model's own pooled logit
    (it pools at the last non-pad token; the pad id differs from EOS here)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(word_model_dir)
    assert tok.pad_token_id != tok.eos_token_id
    torch.manual_seed(0)
    hf = load_reward_model(str(word_model_dir), tok).eval()
    texts = [" alpha", " hotel golf echo delta", " bravo charlie"]
    batched = score(hf, [PROMPT] * 3, texts, tokenizer=tok)
    single = [score(hf, [PROMPT], [t], tokenizer=tok)[0] for t in texts]
    assert batched == pytest.approx(single, abs=1e-5)
    from dpolab.data.preference import encode_prompt_completions

    ids = encode_prompt_completions(tok, [PROMPT] * 3, texts)
    assert all(r[-1] == tok.eos_token_id for r in ids)
    width = max(map(len, ids))
    input_ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in ids])
    mask = (input_ids != tok.pad_token_id).long()
    with torch.no_grad():
        hf_logits = hf(input_ids=input_ids, attention_mask=mask).logits[:, 0]
        ours = RewardModel(hf)(input_ids, mask)
    torch.testing.assert_close(ours, hf_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours, torch.tensor(batched), atol=1e-5, rtol=1e-5)


def test_grad_accumulation_and_resume(word_model_dir, tmp_path):
    data = tmp_path / "p.jsonl"
    write_bt_pairs(data, 32, seed=4)
    sgd = ("--optimizer", "sgd", "--learning-rate", "0.5", "--max-steps", "2", "--max-grad-norm", "0",
           "--eval-fraction", "0")
    assert main(_args(word_model_dir, data, tmp_path / "a", "--batch-size", "8", *sgd)) == 0
    assert main(_args(word_model_dir, data, tmp_path / "b", "--batch-size", "2", "--grad-accum", "4", *sgd)) == 0
    # passes within a token budget of 30: one or two pairs each
    assert main(_args(word_model_dir, data, tmp_path / "c", "--batch-size", "8", "--micro-batch-tokens", "30",
                      *sgd)) == 0
    wa = load_file(str(tmp_path / "a" / "final" / "model.safetensors"))
    for other in ("b", "c"):
        wb = load_file(str(tmp_path / other / "final" / "model.safetensors"))
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)
    assert json.loads((tmp_path / "c" / "summary.json").read_text())["micro_batch_tokens"] == 30

    common = ("--learning-rate", "1e-3", "--max-steps", "4", "--batch-size", "4", "--save-steps", "2",
              "--save-total-limit", "5", "--eval-fraction", "0", "--logging-steps", "1")
    assert main(_args(word_model_dir, data, tmp_path / "full", *common)) == 0
    assert main(_args(word_model_dir, data, tmp_path / "res", "--resume", tmp_path / "full" / "checkpoints" / "step-2",
                      *common)) == 0
    wf = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    wr = load_file(str(tmp_path / "res" / "final" / "model.safetensors"))
    assert all(torch.equal(wf[k], wr[k]) for k in wf)
    rows = lambda p: [json.loads(x) for x in (p / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    strip = lambda r: {k: v for k, v in r.items() if k != "tokens_per_second"}  # noqa: E731
    assert [strip(r) for r in rows(tmp_path / "full") if r["step"] > 2] == \
        [strip(r) for r in rows(tmp_path / "res") if r["step"] > 2]


def test_bad_input_dry_run_and_help(word_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    out = tmp_path / "r"
    assert main(_args(word_model_dir, bad, out)) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2" in err and "rejected" in err and "Traceback" not in err
    assert main(_args(tmp_path / "missing-model", bad, out)) == 2
    assert "cannot load" in capsys.readouterr().err
    assert not out.exists()
    good = tmp_path / "good.jsonl"
    write_bt_pairs(good, 10, seed=0)
    assert main(_args(word_model_dir, good, out, "--dry-run")) == 0
    assert json.loads(capsys.readouterr().out)["data"]["rows"] == 10
    assert not out.exists()
    with pytest.raises(Exception, match="2 prompts but 1 completions"):
        score(word_model_dir, ["a", "b"], ["c"])
    res = subprocess.run([sys.executable, "-m", "dpolab", "rm", "--help"], capture_output=True, text=True)
    assert res.returncode == 0
    from dataclasses import fields

    from dpolab.train.rm import RewardConfig

    for f in fields(RewardConfig):
        assert "--" + f.name.replace("_", "-") in res.stdout, f.name


def _word_pairs(tok, path: Path, n: int, seed: int):
    """Tokenized pairs (as training loads them) of different prompt and response lengths."""
    from dpolab.data import load_preference_data

    rng = random.Random(seed)
    path.write_text("".join(json.dumps({"prompt": PROMPT + random_text(rng, rng.randint(0, 3)),
                                        "chosen": random_text(rng, rng.randint(1, 5)),
                                        "rejected": random_text(rng, rng.randint(1, 5))}) + "\n" for _ in range(n)))
    return load_preference_data(str(path), tok, max_length=64, max_prompt_length=32, eval_fraction=0.0).train


def test_prefix_shared_rewards_and_gradients_equal_the_plain_batch(word_model_dir, tmp_path):
    """One row [prompt | chosen | rejected] per pair gives each branch's reward and its gradient as
    the two plain rows do (float32, 1e-5); the check finds the model exact; a reward model whose head
    is not a plain score module is refused, with the reason."""
    from transformers import AutoTokenizer

    from dpolab.train.pair_layout import check_prefix_sharing, collate_pairs
    from dpolab.train.rm import reward_scores

    tok = AutoTokenizer.from_pretrained(word_model_dir)
    torch.manual_seed(0)
    rm = RewardModel(load_reward_model(str(word_model_dir), tok)).eval()
    pairs = _word_pairs(tok, tmp_path / "pairs.jsonl", 6, seed=5)
    assert len({len(p.prompt_ids) for p in pairs}) > 1 and len({len(p.chosen_ids) for p in pairs}) > 1
    out = {}
    for shared in (False, True):
        rm.zero_grad()
        rewards = reward_scores(rm, collate_pairs(shared, pairs, tok.pad_token_id))[0]
        (rewards * torch.linspace(-1, 1, rewards.numel())).sum().backward()
        out[shared] = rewards.detach(), {n: p.grad.clone() for n, p in rm.named_parameters() if p.grad is not None}
    torch.testing.assert_close(out[True][0], out[False][0], atol=1e-5, rtol=1e-5)
    assert out[True][1].keys() == out[False][1].keys()
    for n, g in out[False][1].items():
        torch.testing.assert_close(out[True][1][n], g, atol=1e-5, rtol=1e-4)
    vocab = rm.model.get_input_embeddings().num_embeddings
    assert check_prefix_sharing(rm, pairs, tok.pad_token_id, vocab, score=reward_scores) is None
    rm._plain_head = False  # e.g. an architecture whose head pools by itself
    reason = check_prefix_sharing(rm, pairs, tok.pad_token_id, vocab, score=reward_scores)
    assert "does not accept the shared layout" in reason and "not a plain score module" in reason


def test_gradient_checkpointing_trains_the_same(word_model_dir, tmp_path, monkeypatch):
    import transformers.modeling_utils as tmu  # where transformers takes its checkpoint function from

    data = tmp_path / "p.jsonl"
    write_bt_pairs(data, 32, seed=5)
    sgd = ("--optimizer", "sgd", "--learning-rate", "0.5", "--max-steps", "2", "--max-grad-norm", "0",
           "--eval-fraction", "0", "--batch-size", "8")
    assert main(_args(word_model_dir, data, tmp_path / "plain", *sgd)) == 0
    calls = []
    real = tmu.checkpoint
    monkeypatch.setattr(tmu, "checkpoint", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    assert main(_args(word_model_dir, data, tmp_path / "ckpt", "--gradient-checkpointing", *sgd)) == 0
    assert calls  # transformers' checkpointing ran
    wa, wb = (load_file(str(tmp_path / r / "final" / "model.safetensors")) for r in ("plain", "ckpt"))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-5, rtol=1e-4)


def test_prefix_sharing_on_and_off_train_the_same(word_model_dir, tmp_path):
    """Training with and without prefix sharing: the same weights after two SGD steps (1e-5; the steps
    take the same length-bucketed pairs either way), and the summary says which layout ran (on by
    default, as the check passes)."""
    data = tmp_path / "p.jsonl"
    write_bt_pairs(data, 32, seed=6)
    sgd = ("--optimizer", "sgd", "--learning-rate", "0.5", "--max-steps", "2", "--max-grad-norm", "0",
           "--eval-fraction", "0", "--batch-size", "8")
    assert main(_args(word_model_dir, data, tmp_path / "on", *sgd)) == 0
    assert main(_args(word_model_dir, data, tmp_path / "off", "--no-prefix-sharing", *sgd)) == 0
    assert _summary(tmp_path / "on")["prefix_sharing"] is True
    assert _summary(tmp_path / "off")["prefix_sharing"] is False
    won, woff = (load_file(str(tmp_path / r / "final" / "model.safetensors")) for r in ("on", "off"))
    for k in woff:
        torch.testing.assert_close(won[k], woff[k], atol=1e-5, rtol=1e-4)


def test_a_saved_head_of_another_size_is_one_clear_error(tiny_model_dir, tiny_tokenizer, tmp_path):
    from transformers import AutoConfig, LlamaForSequenceClassification

    from dpolab.errors import DpolabError

    config = AutoConfig.from_pretrained(tiny_model_dir, num_labels=2)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm2")
    tiny_tokenizer.save_pretrained(tmp_path / "rm2")
    with pytest.raises(DpolabError, match=r"rm2' has a 2-label head; a reward model needs 1"):
        load_reward_model(str(tmp_path / "rm2"), tiny_tokenizer, trained=True)


def test_final_scores_alike_with_transformers_when_the_tokenizer_pads_with_eos(word_model_dir, tmp_path, capsys):
    """A tokenizer without a pad token (Llama 3, Mistral, GPT-2 style) pads with EOS; transformers'
    forward reads the reward at the last token that is not the pad id, which was the token before
    the EOS every response ends with. final/ pads with BOS instead, so a right-padded batch through
    AutoModelForSequenceClassification gives the rewards dpolab's score() gives."""
    import shutil

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from dpolab.data.preference import encode_prompt_completions

    nopad = tmp_path / "nopad"
    shutil.copytree(word_model_dir, nopad)
    tok = AutoTokenizer.from_pretrained(nopad)
    tok.pad_token = None
    tok.save_pretrained(nopad)
    data = tmp_path / "p.jsonl"
    write_bt_pairs(data, 16, seed=1)
    assert main(_args(nopad, data, tmp_path / "rm", "--max-steps", "2", "--batch-size", "4", "--learning-rate",
                      "3e-3", "--eval-fraction", "0")) == 0
    assert "final/ pads with '<s>' instead" in capsys.readouterr().err
    final = tmp_path / "rm" / "final"
    tok = AutoTokenizer.from_pretrained(final)
    assert tok.pad_token == "<s>" and tok.pad_token_id != tok.eos_token_id
    texts = [" alpha", " hotel golf echo delta", " bravo charlie"]
    ids = encode_prompt_completions(tok, [PROMPT] * 3, texts)
    width = max(map(len, ids))
    input_ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in ids])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ids])
    hf = AutoModelForSequenceClassification.from_pretrained(final).eval()
    with torch.no_grad():
        theirs = hf(input_ids=input_ids, attention_mask=mask).logits[:, 0]
    torch.testing.assert_close(theirs, torch.tensor(score(str(final), [PROMPT] * 3, texts)), atol=1e-5, rtol=1e-5)
