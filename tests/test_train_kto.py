"""`dpolab kto` end to end: unpaired data (formats, split, partners, errors), learning the hidden rule,
the per-step reference point z0, exactness (passes, precomputed reference, 2 processes, resume after
SIGTERM) and the run directory. Tiny Llama models built in-process; data generated with a known rule."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpolab import cli
from dpolab.data.unpaired import (
    UnpairedExample,
    implied_pairs,
    load_unpaired_data,
    mismatched_partners,
    parse_unpaired,
    tokenize_split,
)
from dpolab.errors import ConfigError, DataError
from test_data_preference import CharTokenizer, ids, rec
from test_train_dpo import WORDS, write_rule_data

ROOT = Path(__file__).resolve().parents[1]
TIMING = {"tokens_per_second", "wall_seconds", "ref_precompute_seconds"}
# `dpolab kto` through the real CLI entry (error handling, process group, exit) in a fresh process
LAUNCH = ("import sys\nfrom dpolab import cli\ncli.COMMANDS.setdefault('kto', ('dpolab.train.kto', 'KTO'))\n"
          "sys.exit(cli.entry())\n")
SGD = ("--optimizer", "sgd", "--learning-rate", "0.5", "--max-grad-norm", "0", "--lr-scheduler", "constant",
       "--logging-steps", "1")


@pytest.fixture(autouse=True)
def _kto_command(monkeypatch):
    monkeypatch.setitem(cli.COMMANDS, "kto", ("dpolab.train.kto", "KTO"))


def write_unpaired_data(path: Path, n: int = 64, seed: int = 0, desirable_share: float = 0.5) -> Path:
    """Unpaired rows of the rule data: each prompt gets ONE completion, " great ..." (desirable) or
    " awful ..." (undesirable); every third row is conversational (TRL's unpaired chat format)."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            prompt = "Review: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))
            good = rng.random() < desirable_share
            completion = (" great " if good else " awful ") + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))
            row = {"prompt": prompt, "completion": completion, "label": good}
            if i % 3 == 2:
                row = {"prompt": [{"role": "user", "content": prompt}],
                       "completion": [{"role": "assistant", "content": completion}], "label": good}
            fh.write(json.dumps(row) + "\n")
    return path


def kto(model_dir, data, out, *extra) -> int:
    return cli.main(["kto", "--model", str(model_dir), "--data", str(data), "--output-dir", str(out),
                     "--max-length", "48", "--max-prompt-length", "24", "--no-progress", *map(str, extra)])


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


def _metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING}
            for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def _assert_close_runs(a: Path, b: Path, atol: float) -> None:
    wa, wb = _weights(a), _weights(b)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=atol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
    train_a, train_b = ([r for r in _metrics(run) if "kl" in r] for run in (a, b))  # not the eval rows
    assert len(train_a) == len(train_b) > 0
    for ra, rb in zip(train_a, train_b):
        assert rb["kl"] == pytest.approx(ra["kl"], abs=1e-5) and rb["loss"] == pytest.approx(ra["loss"], abs=1e-5)


# -- data ---------------------------------------------------------------------------------------------
def test_rows_pairs_and_chat_parse_into_examples():
    (ex,) = parse_unpaired(rec({"prompt": "p", "completion": " c", "label": False}))
    assert (ex.example.prompt, ex.example.chosen, ex.desirable, ex.pair) == ("p", " c", False, -1)
    chat = parse_unpaired(rec({"prompt": [{"role": "user", "content": "hi"}],
                               "completion": [{"role": "assistant", "content": "yo"}], "label": True}))
    assert chat[0].example.conversational and chat[0].example.chosen == [{"role": "assistant", "content": "yo"}]
    good, bad = parse_unpaired(rec({"chosen": "Q: x\nAssistant: yes", "rejected": "Q: x\nAssistant: no"}), pair=3)
    assert (good.desirable, bad.desirable, good.pair, bad.pair) == (True, False, 3, 3)
    assert good.example.prompt == bad.example.prompt == "Q: x\nAssistant:" and bad.example.chosen == " no"
    (csv_row,) = parse_unpaired(rec({"prompt": "p", "completion": "c", "label": "True"}, path="d.csv", unit="row"))
    assert csv_row.desirable is True


@pytest.mark.parametrize("row, field", [
    ({"prompt": "p", "completion": "c"}, "label"),
    ({"prompt": "p", "completion": "c", "label": "yes"}, "label"),
    ({"prompt": "p", "completion": "c", "label": 1}, "label"),
    ({"prompt": "p", "label": True}, "completion"),
    ({"completion": "c", "label": True}, "prompt"),
    ({"prompt": "p", "completion": [{"role": "assistant", "content": 3}], "label": True}, "completion[0]"),
    # both forms: it was read as the unpaired example, the pair dropped silently
    ({"prompt": "p", "completion": "c", "label": True, "chosen": "a", "rejected": "b"}, "chosen"),
    ({"prompt": "p", "completion": "c", "label": False, "rejected": "b"}, "rejected"),
])
def test_bad_rows_name_line_and_field(row, field):
    with pytest.raises(DataError) as err:
        parse_unpaired(rec(row, line=5))
    assert err.value.line == 5 and err.value.field == field and "d.jsonl:5" in str(err.value)


def test_a_missing_prompt_names_a_close_field():
    with pytest.raises(DataError, match=r"field 'prompt': missing \(did you mean 'Prompt'\?\): an unpaired row"):
        parse_unpaired(rec({"Prompt": "p", "completion": "c", "label": True}))


def test_each_example_tokenized_as_a_chosen_row_with_a_derangement_partner():
    from dpolab.data.preference import encode_prompt_completions

    tok = CharTokenizer(add_bos=True)
    texts = [("abc", "de"), ("fgh", "ijklmnop"), ("q", "r"), ("stuv", "w")]
    examples = [UnpairedExample(parse_unpaired(rec({"prompt": p, "completion": c, "label": i % 2 == 0}))[0].example,
                                i % 2 == 0) for i, (p, c) in enumerate(texts)]
    rows = tokenize_split(examples, tok, max_length=8, max_prompt_length=3, rng=random.Random(0))
    expected = encode_prompt_completions(tok, *zip(*texts), max_length=8, max_prompt_length=3)
    assert [r.prompt_ids + r.completion_ids for r in rows] == expected  # exactly a preference pair's chosen row
    assert rows[1].prompt_ids == [1, *ids("gh")] and rows[1].truncated  # the prompt is cut first, keeping its end
    for r in rows:  # the partner's completion, cut to the room the prompt leaves
        assert r.partner != r.index and r.mismatched_ids == rows[r.partner].completion_ids[:8 - len(r.prompt_ids)]
    partners = mismatched_partners(50, random.Random(1))
    assert sorted(partners) == list(range(50)) and all(j != i for i, j in enumerate(partners))
    i, seen = 0, set()
    while i not in seen:  # one cycle through all rows
        seen.add(i)
        i = partners[i]
    assert len(seen) == 50 and partners == mismatched_partners(50, random.Random(1))
    with pytest.raises(DataError) as err:  # no completion token can survive: a located error
        tokenize_split(examples[:1], tok, max_length=3, max_prompt_length=3, rng=random.Random(0))
    assert err.value.field == "completion" and "d.jsonl:7" in str(err.value)


def test_a_split_of_one_example_is_refused(tiny_tokenizer, tmp_path):
    """z0 pairs each example with another's completion: a split of one would pair it with its own,
    and eval/kl and eval/loss would say nothing (the default --eval-fraction holds out one of 20)."""
    data = write_unpaired_data(tmp_path / "rows.jsonl", n=20)
    with pytest.raises(ConfigError, match=r"--eval-fraction 0.05 holds out one example of .*rows.jsonl; KTO's KL "
                                          r"estimate z0 .* needs 2 or more \(raise --eval-fraction, or 0"):
        load_unpaired_data(str(data), tiny_tokenizer, eval_fraction=0.05)
    assert len(load_unpaired_data(str(data), tiny_tokenizer, eval_fraction=0.0).train) == 20
    one = write_unpaired_data(tmp_path / "one.jsonl", n=1)
    with pytest.raises(ConfigError, match=r"one.jsonl: one example for the eval split.*\(give 2 or more rows in "
                                          r"--eval-data, or leave it out\)"):  # --eval-fraction is not read then
        load_unpaired_data(str(data), tiny_tokenizer, eval_source=str(one))
    with pytest.raises(ConfigError, match=r"rows.jsonl: one example for the train split.*\(lower --eval-fraction\)"):
        load_unpaired_data(str(data), tiny_tokenizer, eval_fraction=0.95)
    with pytest.raises(ConfigError, match=r"one.jsonl: one example for the train split.*\(give more rows\)"):
        load_unpaired_data(str(one), tiny_tokenizer, eval_fraction=0.05)  # nothing held out: no fraction to lower


@pytest.mark.parametrize("ext", ["parquet", "csv"])
def test_unpaired_rows_and_pairs_mix_in_a_columnar_file(tiny_tokenizer, tmp_path, ext):
    """A columnar file holds every column in every row: null (CSV: empty) where a row has no value.
    A pair row's null label and completion are no unpaired row (it was refused: "label: got None")."""
    import pandas as pd

    rows = [{"prompt": f"Q{i}:", "completion": " good" if i % 2 else " bad", "label": bool(i % 2),
             "chosen": None, "rejected": None} for i in range(4)]
    rows += [{"prompt": f"P{i}:", "completion": None, "label": None, "chosen": " yes", "rejected": " no"}
             for i in range(3)]
    path = tmp_path / f"mixed.{ext}"
    frame = pd.DataFrame(rows)
    frame.to_parquet(path) if ext == "parquet" else frame.to_csv(path, index=False)
    data = load_unpaired_data(str(path), tiny_tokenizer, eval_fraction=0)
    rep = data.report.as_dict()
    assert rep["formats"] == {"unpaired": 4, "standard": 3} and rep["from_pairs"] == 6
    assert (rep["desirable"], rep["undesirable"]) == (5, 5)


def test_a_template_refusing_a_completion_names_the_completion_field(tiny_tokenizer, tmp_path):
    """KTO tokenizes each completion as a pair's chosen side: a chat template's refusal named 'chosen'
    for an unpaired row (it has 'completion') and for a pair's bad 'rejected'."""
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                         "{{ raise_exception('roles must alternate') }}{% endif %}{% endfor %}" + tok.chat_template)
    user, answer = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}
    good = {"prompt": [user], "completion": [answer], "label": True}
    for bad, field in (({"prompt": [user], "completion": [answer, answer], "label": False}, "completion"),
                       ({"prompt": [user], "chosen": [answer], "rejected": [answer, answer]}, "rejected")):
        path = tmp_path / f"{field}.jsonl"
        path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(DataError, match=rf"{field}\.jsonl:2: field '{field}': the tokenizer's chat template "
                                            "refuses the conversation with this response: roles must alternate"):
            load_unpaired_data(str(path), tok, eval_fraction=0)


def test_pairs_stay_together_in_the_seeded_eval_split(tiny_tokenizer, tmp_path):
    data = write_rule_data(tmp_path / "prefs.jsonl", n=20)
    a = load_unpaired_data(str(data), tiny_tokenizer, eval_fraction=0.25, seed=3)
    b = load_unpaired_data(str(data), tiny_tokenizer, eval_fraction=0.25, seed=3)
    assert [r.partner for r in a.train] == [r.partner for r in b.train]
    assert len(a.train) == 30 and len(a.eval) == 10 and len(implied_pairs(a.eval)) == 5
    for d, u in implied_pairs(a.eval):
        assert a.eval[d].prompt_ids == a.eval[u].prompt_ids and a.eval[d].desirable and not a.eval[u].desirable
    rep = a.report.as_dict()
    assert (rep["rows"], rep["desirable"], rep["undesirable"], rep["from_pairs"], rep["eval_pairs"]) == (40, 15, 15, 40, 5)
    assert rep["formats"] == {"standard": 20}


def test_report_counts_pairs_with_identical_responses(tiny_tokenizer, tmp_path):
    # such a pair becomes one completion labelled both desirable and undesirable
    rows = [{"prompt": "the movie was", "completion": " great", "label": True},
            {"prompt": "the plot", "completion": " dull", "label": False},
            {"prompt": "x", "chosen": " y", "rejected": " y"},
            {"prompt": "x", "chosen": " y", "rejected": " z"}]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rep = load_unpaired_data(str(path), tiny_tokenizer, eval_fraction=0).report.as_dict()
    assert (rep["identical"], rep["identical_examples"], rep["from_pairs"]) == (1, [f"{path}:3"], 4)


# -- training -----------------------------------------------------------------------------------------
def test_kto_learns_the_rule_from_pairs_and_final_reloads(tiny_model_dir, tmp_path):
    data = write_rule_data(tmp_path / "prefs.jsonl")
    out = tmp_path / "run"
    assert kto(tiny_model_dir, data, out, "--learning-rate", "3e-3", "--beta", "0.5", "--max-steps", "30",
               "--batch-size", "8", "--eval-fraction", "0.25", "--logging-steps", "5", "--eval-steps", "15") == 0
    summary = _summary(out)
    assert summary["steps"] == 30 and summary["eval/rewards/accuracies"] >= 0.95, summary
    assert summary["eval/rewards/chosen"] > 0 > summary["eval/rewards/rejected"] and summary["eval/loss"] < 0.3
    rows = _metrics(out)
    assert {"loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
            "count/chosen", "count/rejected", "grad_norm"} <= set(rows[0])
    assert any("eval/loss" in r and r["step"] == 15 for r in rows)
    report = json.loads((out / "data_report.json").read_text())
    assert (report["desirable"], report["undesirable"], report["eval_pairs"]) == (48, 48, 16)
    assert (out / "config.yaml").is_file() and (out / "checkpoints" / "latest").is_file()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert torch.isfinite(model(torch.tensor([[1, 5, 9]])).logits).all()


def test_kto_learns_the_rule_from_unpaired_rows(tiny_model_dir, tmp_path):
    """Each prompt with ONE labelled completion (strings and chat); held out: implied pairs."""
    data = write_unpaired_data(tmp_path / "rows.jsonl", n=96)
    held = write_rule_data(tmp_path / "held.jsonl", n=16, seed=7)
    out = tmp_path / "run"
    assert kto(tiny_model_dir, data, out, "--eval-data", held, "--learning-rate", "3e-3", "--beta", "0.5",
               "--max-steps", "30", "--batch-size", "8") == 0
    summary = _summary(out)
    assert summary["eval/rewards/accuracies"] >= 0.95 and summary["eval/rewards/margins"] > 0, summary
    report = json.loads((out / "data_report.json").read_text())
    assert report["formats"] == {"unpaired": 64, "unpaired_conversational": 32, "standard": 16}


def test_passes_and_precomputed_reference_give_the_same_steps(tiny_model_dir, tmp_path):
    """One pass of 8 rows with a live reference = precomputed reference = 4 micro-batches of 2 = passes of
    <= 40 tokens: z0 is the step's, whatever the split (SGD exposes any scale error)."""
    data = write_unpaired_data(tmp_path / "rows.jsonl", n=40, desirable_share=0.7)
    common = (*SGD, "--max-steps", "3", "--eval-fraction", "0")
    runs = {"live": ("--batch-size", 8, "--no-precompute-ref", "--micro-batch-tokens", 0),
            "pre": ("--batch-size", 8, "--micro-batch-tokens", 0),
            "accum": ("--batch-size", 2, "--grad-accum", 4), "passes": ("--batch-size", 8, "--micro-batch-tokens", 40)}
    for name, extra in runs.items():
        assert kto(tiny_model_dir, data, tmp_path / name, *common, *extra) == 0
    init = load_file(str(tiny_model_dir / "model.safetensors"))
    assert max(float((_weights(tmp_path / "live")[k] - init[k]).abs().max()) for k in init) > 1e-2
    assert max(r["kl"] for r in _metrics(tmp_path / "live")) > 1e-3  # a real reference point, not the clamp
    for name in ("pre", "accum", "passes"):
        _assert_close_runs(tmp_path / "live", tmp_path / name, atol=1e-5)
    assert list((tmp_path / "pre" / "cache").glob("ref-logps-*.safetensors"))


def test_prefix_shared_scoring_gives_the_plain_tables_with_fewer_tokens(tiny_model_dir, tmp_path, monkeypatch):
    """The reference precompute and the evaluation score a row's completion and its mismatched one as
    one row [prompt|completion|mismatched] when exact: the same reference tables, z0, losses, eval
    metrics and weights as the plain two rows, with each prompt run once in those passes."""
    from dpolab.train import pair_layout

    data = write_unpaired_data(tmp_path / "rows.jsonl", n=40, desirable_share=0.6)
    common = (*SGD, "--max-steps", "3", "--batch-size", "8", "--eval-fraction", "0.2", "--eval-steps", "3")
    tokens = {"shared": 0, "as plain rows": 0, "prompts": 0}  # of the shared-layout batches
    collate = pair_layout.collate_pairs

    def counting(prefix, rows, pad_id):
        batch = collate(prefix, rows, pad_id)
        if prefix:
            tokens["shared"] += pair_layout.batch_tokens(batch)
            tokens["as plain rows"] += pair_layout.batch_tokens(collate(False, rows, pad_id))
            tokens["prompts"] += sum(len(r.prompt_ids) for r in rows)
        return batch

    monkeypatch.setattr(pair_layout, "collate_pairs", counting)
    for name, extra in (("plain", ("--no-prefix-sharing",)), ("shared", ("--prefix-sharing",))):
        assert kto(tiny_model_dir, data, tmp_path / name, *common, *extra) == 0
    assert _summary(tmp_path / "plain")["prefix_sharing"] is False
    assert _summary(tmp_path / "shared")["prefix_sharing"] is True
    tables = {name: load_file(str(next((tmp_path / name / "cache").glob("ref-logps-*.safetensors"))))
              for name in ("plain", "shared")}
    for split in ("train", "eval"):
        plain, shared = tables["plain"][split], tables["shared"][split]
        assert torch.equal(plain.isnan(), shared.isnan()) and not plain.isnan().all()
        torch.testing.assert_close(shared.nan_to_num(), plain.nan_to_num(), atol=1e-5, rtol=0)
    _assert_close_runs(tmp_path / "plain", tmp_path / "shared", atol=1e-5)
    evals = [[r for r in _metrics(tmp_path / name) if "eval/loss" in r] for name in ("plain", "shared")]
    assert len(evals[0]) == len(evals[1]) >= 1
    for ra, rb in zip(*evals):
        for k in ("eval/loss", "eval/kl", "eval/rewards/margins"):
            assert rb[k] == pytest.approx(ra[k], abs=1e-5), k
    assert tokens["prompts"] > 0 and tokens["shared"] == tokens["as plain rows"] - tokens["prompts"]


def test_lora_run_with_live_base_reference(tiny_model_dir, tmp_path):
    data = write_rule_data(tmp_path / "prefs.jsonl", n=16)
    for name, extra in (("lora-live", ("--no-precompute-ref",)), ("lora-pre", ())):
        assert kto(tiny_model_dir, data, tmp_path / name, "--lora", "--lora-r", "4", *SGD, "--max-steps", "2",
                   "--batch-size", "8", "--eval-fraction", "0", *extra) == 0
    _assert_close_runs(tmp_path / "lora-live", tmp_path / "lora-pre", atol=1e-5)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "lora-pre" / "final")
    assert not any("lora" in n for n, _ in model.named_parameters())


def test_resume_from_a_checkpoint_is_bitwise_exact(tiny_model_dir, tmp_path):
    data = write_unpaired_data(tmp_path / "rows.jsonl", n=40)
    common = ("--learning-rate", "1e-3", "--max-steps", "6", "--batch-size", "2", "--grad-accum", "2",
              "--logging-steps", "1", "--save-steps", "3", "--save-total-limit", "5", "--no-precompute-ref")
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert kto(tiny_model_dir, data, full, *common) == 0
    assert kto(tiny_model_dir, data, resumed, "--resume", full / "checkpoints" / "step-3", *common) == 0
    wa, wb = _weights(full), _weights(resumed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [r for r in _metrics(full) if r["step"] > 3] == [r for r in _metrics(resumed) if r["step"] > 3]


def test_sigterm_then_resume_latest_is_bitwise_exact(tiny_model_dir, tmp_path):
    data = write_rule_data(tmp_path / "prefs.jsonl")
    argv = ["--model", str(tiny_model_dir), "--data", str(data), "--max-length", "48", "--max-prompt-length", "24",
            "--no-progress", "--max-steps", "40", "--batch-size", "4", "--learning-rate", "1e-3",
            "--logging-steps", "2", "--eval-fraction", "0.1"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert cli.main(["kto", *argv, "--output-dir", str(ref)]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT / "src")}
    with open(tmp_path / "stderr", "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", LAUNCH, "kto", *argv, "--output-dir", str(run)],
                                stdout=err, stderr=err, env=env)
        metrics, deadline = run / "metrics.jsonl", time.time() + 240
        while proc.poll() is None and time.time() < deadline and not (metrics.exists() and metrics.read_text()):
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=240) == 0
    stderr = (tmp_path / "stderr").read_text()
    assert "SIGTERM" in stderr and "Traceback" not in stderr, stderr[-3000:]
    assert not (run / "summary.json").exists() and (run / "checkpoints" / "latest").is_file()
    hint = f"dpolab kto --config {run / 'config.yaml'} --resume latest"
    assert hint in stderr
    assert cli.main(hint.split()[1:]) == 0
    wa, wb = _weights(ref), _weights(run)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert _metrics(run) == _metrics(ref)


def test_two_processes_equal_one_process_with_a_global_z0(tiny_model_dir, tmp_path):
    """33 rows, 16 per step: 1 process x 16 vs 2 x 8 (torchrun, gloo); the third step holds ONE row, so
    process 1 runs a stand-in; the 2 processes also cut their slices into passes of <= 40 tokens. z0
    of every step is the single process's, i.e. taken over both processes' rows."""
    data = write_unpaired_data(tmp_path / "rows.jsonl", n=33, seed=1, desirable_share=0.7)
    held = write_rule_data(tmp_path / "held.jsonl", n=5, seed=2)
    common = ["--eval-data", held, *SGD, "--max-steps", "3"]
    assert kto(tiny_model_dir, data, tmp_path / "one", *common, "--batch-size", 16) == 0
    (tmp_path / "kto_cli.py").write_text(LAUNCH)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT / "src")}
    argv = ["kto", "--model", tiny_model_dir, "--data", data, "--output-dir", tmp_path / "two", "--max-length", 48,
            "--max-prompt-length", 24, "--no-progress", *common, "--batch-size", 8, "--micro-batch-tokens", 40]
    res = subprocess.run([str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", "--master_port",
                          str(port), str(tmp_path / "kto_cli.py"), *map(str, argv)],
                         env=env, capture_output=True, text=True, timeout=240, start_new_session=True)
    assert res.returncode == 0, res.stderr[-4000:]
    _assert_close_runs(tmp_path / "one", tmp_path / "two", atol=1e-4)
    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert max(r["kl"] for r in one if "kl" in r) > 1e-3
    assert [r.get("count/chosen") for r in one] == [r.get("count/chosen") for r in two]
    sa, sb = _summary(tmp_path / "one"), _summary(tmp_path / "two")
    for key in ("eval/loss", "eval/kl", "eval/rewards/margins", "eval/rewards/accuracies"):
        assert sb[key] == pytest.approx(sa[key], abs=1e-5), key


# -- the command line ---------------------------------------------------------------------------------
def test_bad_input_is_one_located_line_and_nothing_written(tiny_model_dir, tmp_path, capsys):
    for i, bad_row in enumerate(({"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": "b", "label": "no"})):
        bad = tmp_path / f"bad{i}.jsonl"
        bad.write_text(json.dumps({"prompt": "a", "completion": "b", "label": True}) + "\n" + json.dumps(bad_row) + "\n")
        out = tmp_path / f"run{i}"
        assert kto(tiny_model_dir, bad, out) == 2
        err = capsys.readouterr().err
        assert f"bad{i}.jsonl:2" in err and "field 'label'" in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1 and not out.exists()
    out = tmp_path / "live"
    assert kto(tiny_model_dir, bad, out, "--no-precompute-ref", "--ref-cache-dir", tmp_path / "c") == 2
    assert "--ref-cache-dir is read only when reference log-probs are precomputed" in capsys.readouterr().err
    assert not out.exists()


def test_imbalance_warning_dry_run_and_help(tiny_model_dir, tmp_path, capsys):
    data = write_unpaired_data(tmp_path / "rows.jsonl", n=40, desirable_share=0.2)
    out = tmp_path / "dry"
    assert kto(tiny_model_dir, data, out, "--dry-run", "--eval-fraction", "0") == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)["data"]
    n_d, n_u = report["desirable"], report["undesirable"]
    assert n_d + n_u == 40 and n_d / n_u < 1
    (line,) = [x for x in captured.err.splitlines() if x.startswith("warning:")]
    assert "outside the paper's recommended [1, 4/3]" in line and "--desirable-weight" in line
    assert not out.exists()
    assert kto(tiny_model_dir, data, out, "--dry-run", "--eval-fraction", "0", "--desirable-weight", n_u / n_d) == 0
    assert "warning:" not in capsys.readouterr().err
    from dataclasses import fields

    from dpolab.train.kto import KTOConfig, cli_main

    with pytest.raises(SystemExit) as done:
        cli_main(["--help"], "dpolab kto")
    assert done.value.code == 0
    text = capsys.readouterr().out
    for f in fields(KTOConfig):
        assert "--" + f.name.replace("_", "-") in text, f.name


def test_reference_cache_names_the_trainer(tiny_model_dir, tmp_path):
    """DPO's (chosen, rejected) and KTO's (matched, mismatched) tables never share a cache file, even
    with every other part of the key equal."""
    from types import SimpleNamespace

    from dpolab.config import make_config
    from dpolab.train.dpo import DPOConfig
    from dpolab.train.kto import KTOConfig
    from dpolab.train.reference import cache_path

    data_file = write_rule_data(tmp_path / "pairs.jsonl", n=8)
    fields = dict(model=str(tiny_model_dir), data=str(data_file), output_dir=str(tmp_path / "out"),
                  ref_cache_dir=str(tmp_path / "cache"))
    row = SimpleNamespace(prompt_ids=[1, 2], chosen_ids=[3], rejected_ids=[4])
    data = SimpleNamespace(train=[row] * 6, eval=[row] * 2)
    run = SimpleNamespace(path=tmp_path / "out")
    paths = {cls.__name__: cache_path(make_config(cls, fields), data, run) for cls in (DPOConfig, KTOConfig)}
    assert paths["DPOConfig"] != paths["KTOConfig"]
    assert paths["DPOConfig"].parent == paths["KTOConfig"].parent == tmp_path / "cache"
    # the same files tokenized otherwise (a template edit, another dpolab version): another key
    moved = SimpleNamespace(prompt_ids=[1], chosen_ids=[2, 3], rejected_ids=[4])
    other = SimpleNamespace(train=[row] * 5 + [moved], eval=[row] * 2)
    assert cache_path(make_config(DPOConfig, fields), other, run) != paths["DPOConfig"]
