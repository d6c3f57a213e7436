"""Real data end to end: Anthropic HH-RLHF (harmless-base test split, 2,312 pairs; docs/hh-rlhf.md).

The file is read from the shared data folder next to the repository (``../shared/data/``) and never
copied into it; every test skips, saying why, where the file is absent. On a sample of the real rows
(every 10th, plus the rows known to be awkward): a byte-level BPE trained on the sample, a tiny Llama,
then ``dpolab sft`` (the chosen final replies given the conversation), ``dpolab rm`` and ``dpolab dpo`` on
the pairs and ``dpolab ppo`` on the prompts, each through the CLI, at a max length that truncates. Each
run's ``data_report.json`` is checked against counts computed here from the raw rows with our own
split and token arithmetic; each run leaves a summary and a final model that reloads.
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest
import torch

from dpolab.cli import main

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
ROWS = 2312
MARKER = "\n\nAssistant:"
# 1-based lines of the file (found by scanning it; pinned by test_whole_file_splits_...):
EMPTY_CHOSEN_REPLY = [87, 517, 926, 1104]            # the chosen final reply is a single space
MARKER_INSIDE_A_REPLY = [1255, 1689, 1951, 1953, 2037]  # a final reply itself contains "\n\nAssistant:"
SAMPLE_EVERY = 10
MAX_LENGTH, MAX_PROMPT_LENGTH = 256, 128  # HH dialogues are longer: truncation happens
VOCAB = 2048


@pytest.fixture(scope="module")
def hh_rows() -> list[dict]:
    if not DATA.is_file():
        pytest.skip(f"real HH-RLHF data not found at {DATA} (it lives in the shared data folder next to the "
                    "repository, ../shared/data/, which this checkout does not have)")
    with gzip.open(DATA, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def our_split(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """Written here independently of the loader: the prompt is everything up to the last
    "\\n\\nAssistant:" that ends before the first character where chosen and rejected differ."""
    differ = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
    at = chosen[:differ].rfind(MARKER)
    if at < 0:
        return None
    cut = at + len(MARKER)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def fit(p: int, c: int, r: int, max_length: int, max_prompt_length: int) -> tuple[int, int, int, bool]:
    """Token counts after truncation (c and r include the EOS): the prompt keeps at most
    ``max_prompt_length`` tokens, then each response what is left of ``max_length``."""
    if p + max(c, r) <= max_length:
        return p, c, r, False
    p = min(p, max_prompt_length)
    budget = max_length - p
    return p, min(c, budget), min(r, budget), True


@pytest.fixture(scope="module")
def sample(hh_rows, tmp_path_factory) -> tuple[Path, list[tuple[int, str, str, str]]]:
    """The sample as an HH-format JSONL file in a temporary folder, and (line, prompt, chosen reply,
    rejected reply) per row, split by :func:`our_split`."""
    lines = sorted(set(range(1, ROWS + 1, SAMPLE_EVERY)) | set(EMPTY_CHOSEN_REPLY) | set(MARKER_INSIDE_A_REPLY))
    rows = [hh_rows[i - 1] for i in lines]
    path = tmp_path_factory.mktemp("hh") / "hh-sample.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path, [(line, *our_split(r["chosen"], r["rejected"])) for line, r in zip(lines, rows)]


@pytest.fixture(scope="module")
def hh_tokenizer(sample):
    from dpolab.lm.tiny import train_tokenizer

    _, split = sample
    return train_tokenizer([t for _, p, c, r in split for t in (p + c, p + r)], vocab_size=VOCAB)


@pytest.fixture(scope="module")
def hh_model_dir(hh_tokenizer, tmp_path_factory) -> Path:
    from dpolab.lm.tiny import tiny_llama

    path = tmp_path_factory.mktemp("hh-tiny-llama")
    model = tiny_llama(len(hh_tokenizer), hidden_size=32, layers=2, heads=4, max_positions=MAX_LENGTH,
                       tokenizer=hh_tokenizer)
    model.save_pretrained(path)
    hh_tokenizer.save_pretrained(path)
    return path


def _lengths(tokenizer, texts: list[str]) -> list[int]:
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _report(run: Path) -> dict:
    return json.loads((run / "data_report.json").read_text())


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_whole_file_splits_at_the_last_shared_assistant_turn(hh_rows, tmp_path):
    """All 2,312 rows are read (none dropped) and each splits where our own split does: after the
    last "\\n\\nAssistant:" the two dialogues share. Five final replies contain a marker of their own
    (a naive split at the text's last marker would put part of a reply in the prompt), and four
    chosen replies are empty but for a space: those stay in the data, as a one-token response."""
    from dpolab.data import load_records, parse_preference

    path = tmp_path / "hh.jsonl"
    with gzip.open(DATA, "rb") as src:
        path.write_bytes(src.read())
    records = load_records(str(path))
    assert len(records) == len(hh_rows) == ROWS
    assert [r.line for r in records] == list(range(1, ROWS + 1))
    marker_inside, empty_chosen = [], []
    for rec in records:
        ex = parse_preference(rec)
        ours = our_split(rec.data["chosen"], rec.data["rejected"])
        assert ours is not None, rec.where
        assert (ex.prompt, ex.chosen, ex.rejected) == ours, rec.where
        assert ex.prompt.endswith(MARKER) and ex.prompt.startswith("\n\nHuman:")
        assert "\n\nHuman:" not in ex.chosen + ex.rejected  # only the final assistant reply differs
        if MARKER in ex.chosen or MARKER in ex.rejected:
            marker_inside.append(rec.line)
        if not ex.chosen.strip():
            empty_chosen.append(rec.line)
    assert marker_inside == MARKER_INSIDE_A_REPLY
    assert empty_chosen == EMPTY_CHOSEN_REPLY


def test_loader_tokens_and_skips_match_our_arithmetic(sample, hh_tokenizer):
    """The loader's prompt ids are our split's, tokenized on its own; with max_prompt_length ==
    max_length every pair whose prompt fills the budget is skipped, counted and explained."""
    from dpolab.data import load_preference_data

    path, split = sample
    full = load_preference_data(str(path), hh_tokenizer, max_length=1 << 20, max_prompt_length=1 << 19,
                                eval_fraction=0)
    eos = hh_tokenizer.eos_token_id
    assert len(full.train) == len(split) and full.report.truncated == 0
    for pair, (line, p, c, r) in zip(full.train, split):
        ids = hh_tokenizer([p, c, r], add_special_tokens=False)["input_ids"]
        assert (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids) == (ids[0], ids[1] + [eos], ids[2] + [eos]), line

    budget = 160
    prompts = _lengths(hh_tokenizer, [p for _, p, _, _ in split])
    expected = [k for k, n in enumerate(prompts, start=1) if n >= budget]  # lines of the sample file
    assert 0 < len(expected) < len(split)
    report = load_preference_data(str(path), hh_tokenizer, max_length=budget, max_prompt_length=budget,
                                  eval_fraction=0).report
    assert report.skipped == len(expected) and report.rows == len(split) == report.train_rows + report.skipped
    assert [e.split(": ", 1)[0] for e in report.skipped_examples] == [f"{path}:{k}" for k in expected][:20]
    assert all("no response token left after truncation" in e for e in report.skipped_examples)


def test_sft_rm_dpo_ppo_on_real_dialogues(sample, hh_tokenizer, hh_model_dir, tmp_path):
    """sft -> rm and dpo (from the SFT model) -> ppo (against the reward model), as docs/hh-rlhf.md runs
    them, at 256 tokens: each data report's rows, truncations and token counts equal ours."""
    from transformers import AutoModelForCausalLM

    from dpolab.rewards.functions import score

    path, split = sample
    n = len(split)
    P = _lengths(hh_tokenizer, [p for _, p, _, _ in split])
    C = [k + 1 for k in _lengths(hh_tokenizer, [c for _, _, c, _ in split])]  # + EOS
    R = [k + 1 for k in _lengths(hh_tokenizer, [r for _, _, _, r in split])]
    common = ["--max-length", MAX_LENGTH, "--max-steps", 3, "--batch-size", 4, "--no-progress"]

    # SFT: the assistant's final chosen reply given the conversation (prompt/completion rows).
    sft_data = tmp_path / "hh-sft.jsonl"
    sft_data.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for _, p, c, _ in split),
                        encoding="utf-8")
    sft = tmp_path / "sft"
    assert main(["sft", "--model", str(hh_model_dir), "--data", str(sft_data), "--output-dir", str(sft),
                 "--learning-rate", "1e-3", *map(str, common)]) == 0
    fitted = [fit(p, c, c, MAX_LENGTH, MAX_LENGTH // 2) for p, c in zip(P, C)]
    rep = _report(sft)
    assert rep["rows"] == n and rep["train_rows"] + rep["eval_rows"] == n and rep["skipped"] == 0
    assert rep["formats"] == {"completion": n}
    assert rep["truncated"] == sum(f[3] for f in fitted) > 0
    assert rep["tokens"] == sum(p + c for p, c, _, _ in fitted)
    assert rep["target_tokens"] == sum(c for _, c, _, _ in fitted)
    assert _summary(sft)["steps"] == 3 and math.isfinite(_summary(sft)["eval/loss"])

    # RM and DPO on the pairs themselves (implicit prompts), starting from the SFT model.
    fitted = [fit(p, c, r, MAX_LENGTH, MAX_PROMPT_LENGTH) for p, c, r in zip(P, C, R)]
    for command, key in (("rm", "eval/accuracy"), ("dpo", "eval/rewards/accuracies")):
        out = tmp_path / command
        assert main([command, "--model", str(sft / "final"), "--data", str(path), "--output-dir", str(out),
                     "--max-prompt-length", str(MAX_PROMPT_LENGTH), "--learning-rate", "1e-3",
                     *map(str, common)]) == 0
        rep = _report(out)
        assert rep["rows"] == n and rep["train_rows"] + rep["eval_rows"] == n, command
        assert rep["skipped"] == 0 and rep["skipped_examples"] == []
        assert rep["formats"] == {"implicit": n}, command  # every prompt found by the shared-prefix split
        assert rep["truncated"] == sum(f[3] for f in fitted) > 0, command
        assert rep["tokens"] == sum(2 * p + c + r for p, c, r, _ in fitted), command
        s = _summary(out)
        assert s["steps"] == 3 and 0 <= s[key] <= 1, command

    # PPO on the conversations as prompts, against the reward model.
    prompts = tmp_path / "hh-prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for _, p, _, _ in split), encoding="utf-8")
    ppo = tmp_path / "ppo"
    assert main(["ppo", "--model", str(sft / "final"), "--reward-model", str(tmp_path / "rm" / "final"),
                 "--data", str(prompts), "--output-dir", str(ppo), "--max-prompt-length", str(MAX_PROMPT_LENGTH),
                 "--max-new-tokens", "8", "--rollout-batch-size", "4", "--mini-batch-size", "4",
                 "--ppo-epochs", "1", "--max-steps", "1", "--eval-prompts", "4", "--no-progress"]) == 0
    rep = _report(ppo)
    assert rep["prompts"] == n and rep["truncated"] == sum(p > MAX_PROMPT_LENGTH for p in P) > 0
    assert _summary(ppo)["steps"] == 1 and math.isfinite(_summary(ppo)["eval/reward"])

    # Every final model reloads and reads a real dialogue.
    _, p, c, r = split[0]
    ids = torch.tensor([hh_tokenizer(p, add_special_tokens=False)["input_ids"][-MAX_PROMPT_LENGTH:]])
    for run in (sft, tmp_path / "dpo", ppo):
        model = AutoModelForCausalLM.from_pretrained(run / "final")
        assert torch.isfinite(model(ids).logits).all(), run
    rewards = score(tmp_path / "rm" / "final", [p, p], [c, r], max_length=MAX_LENGTH,
                    max_prompt_length=MAX_PROMPT_LENGTH)
    assert len(rewards) == 2 and all(math.isfinite(x) for x in rewards)
