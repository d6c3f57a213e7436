"""`dpolab generate` and `dpolab eval` through the CLI on tiny local models: seeded and batch-size
independent sampling, greedy decoding equal to Hugging Face's, pass-through fields, one-line errors
with nothing written; an evaluation where a model fine-tuned toward the reward beats its base, a
model against itself wins exactly half, the reference's KL to itself is 0, and the plot is a PNG."""

from __future__ import annotations

import json
import shutil
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from dpolab.cli import main

PROMPTS = ["the movie", "a film", "the plot", "what a", "I hated", "the music", "a story", "the worst"]
SFT_COMPLETIONS = [" was great fun and i loved every minute", " was clever and the music was wonderful",
                   " a delightful story charming and warm", " the worst film of the year a total mess"]

REWARD_SOURCE = '''
def lower_space(prompts, completions):
    """Fraction of the completion's characters that are lowercase ASCII letters or spaces (0 if empty)."""
    return [sum(ch == " " or "a" <= ch <= "z" for ch in c) / max(len(c), 1) for c in completions]


def row_id(prompts, completions, id):
    """The prompt row's own `id` field: what `dpolab eval` passes to a reward that names it."""
    return [float(i) for i in id]
'''


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("commands")
    (path / "prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": p, "id": i, "completion": f"ref {i}"}) + "\n" for i, p in enumerate(PROMPTS)),
        encoding="utf-8")
    (path / "rewards.py").write_text(REWARD_SOURCE, encoding="utf-8")
    return path


def _gen(model_dir, *extra) -> list[str]:
    return ["generate", "--model", str(model_dir), "--no-progress", "--max-new-tokens", "8", *map(str, extra)]


def _run_gen(capsys, model_dir, *extra) -> list[dict]:
    assert main(_gen(model_dir, *extra)) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


# -- generate ------------------------------------------------------------------------------------
def test_generate_and_eval_say_how_many_prompts_were_cut(tiny_model_dir, work, tmp_path, capsys):
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"prompt": "the movie was great fun and the music " * 3}) + "\n"
                    + json.dumps({"prompt": "a"}) + "\n", encoding="utf-8")
    out = tmp_path / "g.jsonl"
    assert main(_gen(tiny_model_dir, "--data", data, "--max-prompt-length", 6, "--output", out)) == 0
    assert "1 of 2 prompts are longer than --max-prompt-length 6 tokens" in capsys.readouterr().err
    assert _read_jsonl(out)[0]["prompt"] == "the movie was great fun and the music " * 3  # the whole text
    reward = tmp_path / "r.py"
    reward.write_text("def f(prompts, completions):\n    return [0.0] * len(completions)\n")
    assert main(["eval", "--models", str(tiny_model_dir), "--data", str(data), "--reward", f"{reward}:f",
                 "--max-prompt-length", "6", "--max-new-tokens", "2", "--no-progress", "--bootstrap", "0",
                 "--output", str(tmp_path / "e.json")]) == 0
    assert "1 of 2 prompts are longer than --max-prompt-length 6 tokens" in capsys.readouterr().err
    assert json.loads((tmp_path / "e.json").read_text())["models"][0]["truncated_prompts"] == 1


def test_generate_from_file_passes_fields_through_and_is_seeded(tiny_model_dir, work, tmp_path, monkeypatch):
    out = tmp_path / "a.jsonl"
    assert main(_gen(tiny_model_dir, "--data", work / "prompts.jsonl", "--num-samples", 3, "--seed", 1,
                     "--output", out)) == 0
    rows = _read_jsonl(out)
    assert len(rows) == 3 * len(PROMPTS)
    assert [r["prompt"] for r in rows] == [p for p in PROMPTS for _ in range(3)]
    assert [r["sample"] for r in rows] == [0, 1, 2] * len(PROMPTS)
    assert [r["id"] for r in rows] == [i for i in range(len(PROMPTS)) for _ in range(3)]
    # the row's own "completion" is kept under another name; ours is the sampled text
    assert rows[3]["input_completion"] == "ref 1"
    for r in rows:
        assert set(r) == {"prompt", "completion", "sample", "response_tokens", "finished", "id", "input_completion"}
        assert 1 <= r["response_tokens"] <= 8 and isinstance(r["finished"], bool)
        assert r["finished"] or r["response_tokens"] == 8
    assert len({r["completion"] for r in rows}) > len(PROMPTS)  # the samples of a prompt differ

    again, batched, other = tmp_path / "b.jsonl", tmp_path / "c.jsonl", tmp_path / "d.jsonl"
    assert main(_gen(tiny_model_dir, "--data", work / "prompts.jsonl", "--num-samples", 3, "--seed", 1,
                     "--output", again)) == 0
    assert again.read_bytes() == out.read_bytes()
    # per-(prompt, sample) seeds: the batch size does not change the draws
    assert main(_gen(tiny_model_dir, "--data", work / "prompts.jsonl", "--num-samples", 3, "--seed", 1,
                     "--output", batched, "--batch-size", 1)) == 0
    assert batched.read_bytes() == out.read_bytes()
    # through the model's own forward (--no-direct-decoder): the same draws, the decoder not even tried
    from dpolab.lm import generation

    asked, real_fast = [], generation.fast_decoder
    monkeypatch.setattr(generation, "fast_decoder", lambda *a: (asked.append(1), real_fast(*a))[1])
    assert main(_gen(tiny_model_dir, "--data", work / "prompts.jsonl", "--num-samples", 3, "--seed", 1,
                     "--output", batched, "--no-direct-decoder")) == 0
    assert batched.read_bytes() == out.read_bytes() and not asked
    assert main(_gen(tiny_model_dir, "--data", work / "prompts.jsonl", "--num-samples", 3, "--seed", 1,
                     "--output", batched)) == 0
    assert batched.read_bytes() == out.read_bytes() and asked
    monkeypatch.undo()
    # without generate(seeds=...), one row at a time with its own generator: the same draws
    import dpolab.commands.generate as gen_cmd

    monkeypatch.setattr(gen_cmd, "_generate_takes_seeds", lambda: False)
    assert main(_gen(tiny_model_dir, "--data", work / "prompts.jsonl", "--num-samples", 3, "--seed", 1,
                     "--output", again)) == 0
    assert again.read_bytes() == out.read_bytes()
    monkeypatch.undo()
    assert main(_gen(tiny_model_dir, "--data", work / "prompts.jsonl", "--num-samples", 3, "--seed", 2,
                     "--output", other)) == 0
    assert [r["completion"] for r in _read_jsonl(other)] != [r["completion"] for r in rows]


def test_generate_writes_strict_json_from_parquet_fields(tiny_model_dir, tmp_path):
    """A Parquet column's NaN or infinity (and one inside a list) is written as null: strict JSON
    readers accept every line, and the other values pass through unchanged."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    src, out = tmp_path / "p.parquet", tmp_path / "out.jsonl"
    pq.write_table(pa.table({"prompt": ["a b", "c d"], "score": [float("nan"), 1.5],
                             "scores": [[float("inf"), 2.0], [3.0]]}), src)
    assert main(_gen(tiny_model_dir, "--data", src, "--output", out)) == 0

    def strict(text):
        raise AssertionError(f"non-JSON number {text}")

    rows = [json.loads(line, parse_constant=strict) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [(r["score"], r["scores"]) for r in rows] == [(None, [None, 2.0]), (1.5, [3.0])]


def test_generate_from_prompt_flags_and_greedy(tiny_model_dir, tiny_tokenizer, capsys):
    """--prompt takes several values and repeats (commas stay inside a prompt); temperature 0 is
    greedy: the same whatever the seed, and equal to Hugging Face's greedy generate."""
    from transformers import AutoModelForCausalLM

    from dpolab.data.prompts import tokenize_prompts

    texts = ["the movie, the plot", "I hated", "a story"]
    greedy = _run_gen(capsys, tiny_model_dir, "--prompt", texts[0], texts[1], "--prompt", texts[2], "--temperature", 0,
                      "--seed", 3, "--num-samples", 2)
    assert [r["prompt"] for r in greedy] == [t for t in texts for _ in range(2)]
    assert greedy == _run_gen(capsys, tiny_model_dir, "--prompt", *texts, "--temperature", 0, "--seed", 4,
                              "--num-samples", 2)
    assert greedy[0]["completion"] == greedy[1]["completion"]

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids, _ = tokenize_prompts(texts, tiny_tokenizer)
    for text, prompt_ids, row in zip(texts, ids, greedy[::2]):
        ids_t = torch.tensor([prompt_ids])
        out = model.generate(ids_t, attention_mask=torch.ones_like(ids_t), max_new_tokens=8, do_sample=False,
                             eos_token_id=tiny_tokenizer.eos_token_id, pad_token_id=tiny_tokenizer.pad_token_id)
        response = out[0, len(prompt_ids):].tolist()
        if tiny_tokenizer.eos_token_id in response:
            response = response[:response.index(tiny_tokenizer.eos_token_id) + 1]
        assert row["response_tokens"] == len(response), text
        assert row["completion"] == tiny_tokenizer.decode(response, skip_special_tokens=True)

    sampled = _run_gen(capsys, tiny_model_dir, "--prompt", *texts, "--seed", 3)
    assert [r["completion"] for r in sampled] != [r["completion"] for r in greedy[::2]]


def test_generate_bad_input_is_one_line_and_writes_nothing(tiny_model_dir, work, tmp_path, capsys):
    out = tmp_path / "never.jsonl"

    def err(*extra) -> str:
        assert main(_gen(tiny_model_dir, "--output", out, *extra)) == 2
        msg = capsys.readouterr().err.strip()
        assert msg.count("\n") == 0 and "Traceback" not in msg, msg
        assert not out.exists()
        return msg

    missing = tmp_path / "missing.jsonl"
    assert f"{missing}: file not found" in err("--data", missing)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": 3}\n', encoding="utf-8")
    assert f"{bad}:2: field 'prompt'" in err("--data", bad)
    assert "did you mean '--num-samples'" in err("--prompt", "a", "--num-sample", 2)
    assert "exactly one of --data" in err()
    assert "--prompt 2: not valid UTF-8 text" in err("--prompt", "a", "caf\udce9")  # a byte the locale cannot decode
    clash = tmp_path / "clash.jsonl"
    clash.write_text('{"prompt": "a", "completion": "ref", "input_completion": "x"}\n', encoding="utf-8")
    assert f"{clash}:1: field 'input_completion': is also the name 'completion' is kept under" in err("--data", clash)
    surrogate = tmp_path / "surrogate.jsonl"
    surrogate.write_text('{"prompt": "a\\ud800"}\n', encoding="utf-8")
    assert f"{surrogate}:1: field 'prompt': contains an unpaired UTF-16 surrogate" in err("--data", surrogate)
    passed = tmp_path / "passed.jsonl"  # a field only copied to the output: said before any sampling
    passed.write_text('{"prompt": "a"}\n{"prompt": "b", "answer": "x\\ud800"}\n', encoding="utf-8")
    assert f"{passed}:2: field 'answer': cannot be written to the output as JSON" in err("--data", passed)
    assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name]
    assert "exactly one of --data" in err("--data", work / "prompts.jsonl", "--prompt", "a")
    assert "--temperature must be a finite number >= 0 (0: greedy), got -1.0" in err("--prompt", "a", "--temperature", -1)
    assert "--top-p must be in (0, 1], got 0.0" in err("--prompt", "a", "--top-p", 0)
    assert "--top-k must be >= 0 (0: off), got -1" in err("--prompt", "a", "--top-k", -1)
    assert "--num-samples must be >= 1" in err("--prompt", "a", "--num-samples", 0)
    assert "is a folder" in err("--prompt", "a", "--output", tmp_path)
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert f"{afile} is a file, not a folder" in err("--prompt", "a", "--output", afile / "out.jsonl")
    assert "no room for the completions" in err("--prompt", "a", "--max-new-tokens", 100_000)  # past the positions
    for device, said in (("mps", "MPS (Apple silicon) is not available here"), ("meta", "choose auto, cpu")):
        assert f"--device {device}: {said}" in err("--prompt", "a", "--device", device)  # tracebacks after loading
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_model_dir, damaged)
    with open(damaged / "model.safetensors", "r+b") as fh:  # an interrupted copy
        fh.truncate(1000)
    assert f"cannot load model '{damaged}': its safetensors weights are damaged" in err("--model", damaged,
                                                                                       "--prompt", "a")
    (damaged / "model.safetensors").unlink()
    assert f"cannot load model '{damaged}': the folder has a config.json but no weights" in err(
        "--model", damaged, "--prompt", "a")
    run = tmp_path / "run"
    (run / "checkpoints" / "step-2").mkdir(parents=True)
    (run / "final").mkdir()
    (run / "config.yaml").write_text("model: x\n")
    for name in ("model.safetensors", "trainer_state.json"):
        (run / "checkpoints" / "step-2" / name).write_text("{}")
    assert f"(a run folder: its trained model is {run / 'final'})" in err("--model", run, "--prompt", "a")
    assert "(a training checkpoint: weights without a config or tokenizer; give the run's final/ folder" in err(
        "--model", run / "checkpoints" / "step-2", "--prompt", "a")


def test_an_adapter_folder_without_a_tokenizer_and_one_prompt_string_in_python(tiny_model_dir, tmp_path):
    """What a PEFT model's save_pretrained writes (no tokenizer files) was refused as a model ('not a
    Hugging Face model folder'): its base's tokenizer is used. GenerateConfig(prompt="text") sampled
    one prompt per character of the text."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from dpolab.commands.generate import GenerateConfig, run_generate

    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                LoraConfig(r=2, target_modules=["q_proj"]))
    peft_model.save_pretrained(tmp_path / "adapter")
    assert not (tmp_path / "adapter" / "tokenizer.json").exists()
    rows = run_generate(GenerateConfig(model=str(tmp_path / "adapter"), prompt="the movie", max_new_tokens=3,
                                       temperature=0, progress=False))
    assert [r["prompt"] for r in rows] == ["the movie"]
    assert rows == run_generate(GenerateConfig(model=str(tiny_model_dir), prompt=["the movie"], max_new_tokens=3,
                                               temperature=0, progress=False))  # B = 0 at init: the base's answer


# -- eval ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tiny_model_dir, work) -> dict[str, Path]:
    """The base, a copy of it in another folder, and the base fine-tuned for 40 SFT steps on
    lowercase completions: trained toward the reward (the fraction of lowercase letters and spaces)."""
    copy = work / "base-copy"
    shutil.copytree(tiny_model_dir, copy)
    sft = work / "sft.jsonl"
    sft.write_text("".join(json.dumps({"prompt": PROMPTS[i % 8], "completion": SFT_COMPLETIONS[i % 4]}) + "\n"
                           for i in range(64)), encoding="utf-8")
    assert main(["sft", "--model", str(tiny_model_dir), "--data", str(sft), "--output-dir", str(work / "sft"),
                 "--max-steps", "40", "--learning-rate", "1e-2", "--batch-size", "8", "--eval-fraction", "0",
                 "--no-progress"]) == 0
    return {"base": Path(tiny_model_dir), "copy": copy, "trained": work / "sft" / "final"}


@pytest.fixture(scope="module")
def evaluation(models, work) -> dict:
    out = work / "eval"
    args = ["eval", "--models", str(models["base"]), str(models["trained"]), "--models", str(models["copy"]),
            "--labels", "base", "trained", "copy", "--data", str(work / "prompts.jsonl"),
            "--reward", f"{work / 'rewards.py'}:lower_space", "--num-samples", "4", "--max-new-tokens", "8",
            "--output", str(out / "results.json"), "--plot", str(out / "frontier.png"),
            "--samples-output", str(out / "samples.jsonl"), "--no-progress", "--bootstrap", "500"]
    assert main(args) == 0
    return {"dir": out, "results": json.loads((out / "results.json").read_text(encoding="utf-8")), "args": args}


def test_eval_trained_model_beats_its_base(evaluation):
    by = {m["label"]: m for m in evaluation["results"]["models"]}
    base, trained = by["base"], by["trained"]
    assert trained["reward"] > base["reward"] + 0.1, (trained["reward"], base["reward"])
    assert trained["win_rate"] > 0.6 and trained["win_rate_ci90"][0] > 0.5, trained
    assert trained["wins"] > trained["losses"]
    assert trained["kl"] > 0 and trained["kl_ci90"][0] <= trained["kl"] <= trained["kl_ci90"][1]


def test_eval_self_comparisons_are_exact(evaluation):
    """Same seeds: the baseline against itself and its copy (another folder, loaded and sampled on its
    own) tie on every completion, a win rate of exactly 0.5; the KL of both to the baseline (the
    default reference) is exactly 0 (the copy's computed through both models)."""
    res = evaluation["results"]
    by = {m["label"]: m for m in res["models"]}
    assert res["baseline"] == res["reference"] == by["base"]["model"]
    for label in ("base", "copy"):
        m = by[label]
        assert m["win_rate"] == 0.5 and m["ties"] == 32 and m["wins"] == m["losses"] == 0
        assert m["kl"] == 0.0 and m["kl_std"] == 0.0
        assert m["reward"] == by["base"]["reward"]
    samples = _read_jsonl(evaluation["dir"] / "samples.jsonl")
    assert len(samples) == 3 * 32
    base = [s["completion"] for s in samples if s["model"] == "base"]
    assert base == [s["completion"] for s in samples if s["model"] == "copy"]
    assert base != [s["completion"] for s in samples if s["model"] == "trained"]


def test_eval_json_has_every_field_and_the_plot_is_a_png(evaluation):
    res = evaluation["results"]
    assert {"data", "prompts", "num_samples", "completions", "reward", "baseline", "reference", "models",
            "config"} <= set(res)
    assert (res["prompts"], res["num_samples"], res["completions"]) == (8, 4, 32)
    keys = {"model", "label", "reward", "reward_std", "reward_sem", "reward_ci90", "kl", "kl_std", "kl_sem",
            "kl_ci90", "response_length", "eos_fraction", "win_rate", "win_rate_sem", "win_rate_ci90", "wins",
            "ties", "losses", "truncated_prompts"}
    for m in res["models"]:
        assert set(m) == keys and m["truncated_prompts"] == 0
        assert m["reward_ci90"][0] <= m["reward"] <= m["reward_ci90"][1]
        assert 1 <= m["response_length"] <= 8 and 0 <= m["eos_fraction"] <= 1
        assert m["wins"] + m["ties"] + m["losses"] == 32
    assert (evaluation["dir"] / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_passes_row_fields_to_the_reward(work, tiny_model_dir, tmp_path):
    """A reward that names a column of the prompt rows (`id`, 0..7) receives it for each completion,
    as in training: every sample of prompt i scores i, so the mean is 3.5 and the std over prompts fixed."""
    out = tmp_path / "ids.json"
    assert main(["eval", "--models", str(tiny_model_dir), "--data", str(work / "prompts.jsonl"), "--reward",
                 f"{work / 'rewards.py'}:row_id", "--num-samples", "3", "--max-new-tokens", "4", "--no-kl",
                 "--output", str(out), "--samples-output", str(tmp_path / "s.jsonl"), "--no-progress"]) == 0
    (m,) = json.loads(out.read_text(encoding="utf-8"))["models"]
    assert m["reward"] == pytest.approx(3.5)
    rows = _read_jsonl(tmp_path / "s.jsonl")
    assert [r["reward"] for r in rows] == [float(i) for i in range(8) for _ in range(3)]


def test_eval_reward_fields_do_not_depend_on_the_batch(tiny_model_dir, tmp_path, capsys):
    """A field only some rows hold is passed to no batch (else the result would move with
    --batch-size); a field a reward requires, missing or null in a row, is refused before sampling."""
    (tmp_path / "opt_rewards.py").write_text(
        "def optional(prompts, completions, answer=None):\n"
        "    return [0.0 if answer is None else 1.0 for _ in completions]\n", encoding="utf-8")
    data = tmp_path / "partial.jsonl"
    data.write_text('{"prompt": "a", "answer": "x"}\n{"prompt": "b"}\n', encoding="utf-8")
    means = []
    for batch in ("1", "2"):
        out = tmp_path / f"b{batch}.json"
        assert main(["eval", "--models", str(tiny_model_dir), "--data", str(data), "--reward",
                     f"{tmp_path / 'opt_rewards.py'}:optional", "--max-new-tokens", "2", "--no-kl",
                     "--batch-size", batch, "--output", str(out), "--no-progress"]) == 0
        means.append(json.loads(out.read_text(encoding="utf-8"))["models"][0]["reward"])
    assert means == [0.0, 0.0]
    capsys.readouterr()
    for text, got in (('{"prompt": "a", "answer": "x"}\n{"prompt": "b"}\n', "missing"),
                      ('{"prompt": "a", "answer": "x"}\n{"prompt": "b", "answer": null}\n', "null")):
        data.write_text(text, encoding="utf-8")
        assert main(["eval", "--models", str(tiny_model_dir), "--data", str(data), "--reward",
                     "dpolab.rewards.tasks:exact_match", "--max-new-tokens", "2", "--no-kl",
                     "--output", str(tmp_path / "never.json"), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"{data}:2: field 'answer': {got}; the reward exact_match takes it as an argument" in err, err
    assert not (tmp_path / "never.json").exists()


def test_eval_with_a_reward_model_and_a_python_reward_summed(work, tiny_model_dir, tiny_tokenizer, tmp_path):
    """--reward-model without --max-prompt-length (prompts uncut), weighted with a Python reward:
    each sample's reward is 0.5·RM + 2·row_id, the RM scored on its own."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from dpolab.rewards.functions import score

    rm_dir = tmp_path / "rm"
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(tiny_model_dir, num_labels=1)) \
        .save_pretrained(rm_dir)
    tiny_tokenizer.save_pretrained(rm_dir)
    assert main(["eval", "--models", str(tiny_model_dir), "--data", str(work / "prompts.jsonl"), "--reward-model",
                 str(rm_dir), "--reward", f"{work / 'rewards.py'}:row_id", "--reward-weights", "2,0.5",
                 "--max-new-tokens", "4", "--no-kl", "--output", str(tmp_path / "r.json"),
                 "--samples-output", str(tmp_path / "s.jsonl"), "--no-progress"]) == 0
    rows = _read_jsonl(tmp_path / "s.jsonl")
    rm = score(str(rm_dir), [r["prompt"] for r in rows], [r["completion"] for r in rows])
    assert [r["reward"] for r in rows] == pytest.approx([2.0 * i + 0.5 * v for i, v in enumerate(rm)], abs=1e-5)
    assert json.loads((tmp_path / "r.json").read_text())["reward"] == f"2*{work / 'rewards.py'}:row_id + 0.5*{rm_dir}"


def test_eval_bad_input_is_one_line(models, work, tiny_model_dir, tmp_path, capsys):
    from dpolab.lm.tiny import tiny_llama, train_tokenizer

    out = tmp_path / "never.json"
    reward = f"{work / 'rewards.py'}:lower_space"

    def err(*extra) -> str:
        assert main(["eval", "--data", str(work / "prompts.jsonl"), "--output", str(out), "--no-progress",
                     "--max-new-tokens", "4", *map(str, extra)]) == 2
        msg = capsys.readouterr().err.strip()
        assert msg.count("\n") == 0 and "Traceback" not in msg, msg
        assert not out.exists()
        return msg

    other = tmp_path / "other-vocab"
    tok = train_tokenizer(["completely different words here", "zebra quartz jumps"] * 10, vocab_size=280)
    tiny_llama(len(tok), hidden_size=16, layers=1, heads=2, tokenizer=tok).save_pretrained(other)
    tok.save_pretrained(other)
    assert "different vocabulary" in err("--models", tiny_model_dir, other, "--reward", reward)
    assert "--models is required" in err("--reward", reward)
    assert "give --reward module:function and/or --reward-model" in err("--models", tiny_model_dir)
    assert "no room for the completions" in err("--models", tiny_model_dir, "--reward", reward,
                                                "--max-new-tokens", 100_000)
    assert "is a LlamaForCausalLM, not a reward model" in err("--models", tiny_model_dir, "--reward-model",
                                                              tiny_model_dir)
    assert "2 labels for 1 models" in err("--models", tiny_model_dir, "--reward", reward, "--labels", "a", "b")
    assert "--labels: 'a' given more than once" in err("--models", tiny_model_dir, tiny_model_dir, "--reward", reward,
                                                       "--labels", "a", "a")
    assert "--models (give --labels to tell them apart)" in err("--models", tiny_model_dir, tiny_model_dir,
                                                                "--reward", reward)
    # one folder spelt two ways was sampled and scored twice, as two models
    assert "are the same folder; give it once" in err("--models", tiny_model_dir, f"{tiny_model_dir}/",
                                                      "--reward", reward)
    assert "needs the KL" in err("--models", tiny_model_dir, "--reward", reward, "--no-kl",
                                 "--plot", tmp_path / "p.png")
    assert "did you mean '--baseline'" in err("--models", tiny_model_dir, "--reward", reward, "--baselin", "x")
    short = tmp_path / "short"  # the reference scores the completions: its positions were not checked
    from transformers import AutoTokenizer

    policy_tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tiny_llama(len(policy_tok), hidden_size=16, layers=1, heads=2, max_positions=4,
               tokenizer=policy_tok).save_pretrained(short)
    policy_tok.save_pretrained(short)
    assert f"exceed the 4 positions of {short}" in err("--models", tiny_model_dir, "--ref-model", short,
                                                       "--reward", reward)
    weightless = tmp_path / "weightless"  # found after the models before it were sampled and scored
    shutil.copytree(tiny_model_dir, weightless)
    (weightless / "model.safetensors").unlink()
    assert f"cannot load model '{weightless}': the folder has a config.json but no weights" in err(
        "--models", tiny_model_dir, weightless, "--reward", reward)


@pytest.mark.parametrize("command, cls", [("generate", "dpolab.commands.generate:GenerateConfig"),
                                          ("eval", "dpolab.commands.evaluate:EvalConfig")])
def test_help_documents_every_option(command, cls, capsys):
    import importlib

    module, name = cls.split(":")
    config = getattr(importlib.import_module(module), name)
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for f in fields(config):
        assert "--" + f.name.replace("_", "-") in text, f.name
    assert "--config" in text and "examples:" in text


def test_eval_outputs_naming_one_file_are_refused_before_any_work(work, tmp_path, capsys):
    """Outputs are written in turn at the end, so two flags naming one file (also spelled differently,
    or through a symlink) would keep only the last: refused by check(), before a model is looked at
    (the model here does not exist)."""
    same = tmp_path / "same.json"
    (tmp_path / "link").symlink_to(tmp_path)
    cases = [(["--samples-output", same, "--output", same], "--output and --samples-output both name"),
             (["--plot", tmp_path / "x.png", "--output", tmp_path / "sub" / ".." / "x.png"],
              "--output and --plot both name"),
             (["--plot", tmp_path / "link" / "p.png", "--samples-output", tmp_path / "p.png"],
              "--plot and --samples-output both name")]
    for extra, message in cases:
        assert main(["eval", "--models", str(tmp_path / "no-such-model"), "--data", str(work / "prompts.jsonl"),
                     "--reward", f"{work / 'rewards.py'}:lower_space", "--no-progress",
                     *map(str, extra)]) == 2
        msg = capsys.readouterr().err.strip()
        assert message in msg and "give each output its own file" in msg and msg.count("\n") == 0, msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link"]


def test_eval_names_a_single_weighted_reward_with_its_weight(work, tiny_model_dir, tmp_path, capsys):
    """One reward under --reward-weights 2 scores twice its values: the results and the table say `2*spec`
    (as a weighted sum of several names each weight); weight 1 keeps the bare spec."""
    from types import SimpleNamespace

    from dpolab.commands.evaluate import reward_label

    spec = f"{work / 'rewards.py'}:row_id"
    out = tmp_path / "r.json"
    assert main(["eval", "--models", str(tiny_model_dir), "--data", str(work / "prompts.jsonl"), "--reward", spec,
                 "--reward-weights", "2", "--max-new-tokens", "2", "--no-kl", "--output", str(out),
                 "--no-progress"]) == 0
    res = json.loads(out.read_text(encoding="utf-8"))
    assert res["reward"] == f"2*{spec}" and res["models"][0]["reward"] == pytest.approx(7.0)  # 2 * mean id 3.5
    assert f"; reward 2*{spec}; " in capsys.readouterr().err
    label = lambda *w: reward_label(SimpleNamespace(reward=["a"], reward_model=None,  # noqa: E731
                                                    reward_weights=list(w) or None))
    assert (label(), label(1.0), label(0.5), label(-1.0)) == ("a", "a", "0.5*a", "-1*a")


def test_eval_baseline_outside_models_may_not_take_a_models_label(work, tiny_model_dir, tmp_path, capsys):
    """A --baseline not among --models is evaluated under its own name: a --labels name equal to it
    would give two rows one label, so it is refused like repeated labels, before any work."""
    out = tmp_path / "never.json"
    assert main(["eval", "--models", str(tiny_model_dir), "--labels", "m1", "--baseline", "m1",
                 "--data", str(work / "prompts.jsonl"), "--reward", f"{work / 'rewards.py'}:lower_space",
                 "--output", str(out), "--no-progress"]) == 2
    msg = capsys.readouterr().err.strip()
    assert "--baseline m1: not among --models" in msg and "--labels gives to another model" in msg, msg
    assert msg.count("\n") == 0 and not out.exists()


def test_eval_baseline_spelled_with_a_trailing_slash_is_that_model():
    """--baseline runs/m/ for --models runs/m evaluated the model twice, the second time as the baseline."""
    from dpolab.commands.evaluate import EvalConfig

    cfg = EvalConfig(models=["runs/m", "runs/n"], baseline="runs/m/", data="p.jsonl", reward=["r:f"])
    cfg.check()
    assert cfg.baseline == "runs/m"


def test_the_python_api_writes_its_outputs_and_converts_values_as_the_command_line(work, tiny_model_dir, tmp_path,
                                                                                  capsys):
    """run_generate/run_eval checked that output paths were writable and then wrote nothing (only the
    command line wrote them); "4" for an int was a TypeError, reward_weights="2" a crash after every
    model was sampled, seed=3.0 other completions than seed 3."""
    from dpolab.commands.evaluate import EvalConfig, run_eval
    from dpolab.commands.generate import GenerateConfig, run_generate

    out = tmp_path / "gen.jsonl"
    rows = run_generate(GenerateConfig(model=str(tiny_model_dir), prompt=["the movie"], max_new_tokens="4",
                                       seed=3.0, num_samples="2", output=str(out), progress=False))
    assert _read_jsonl(out) == rows and len(rows) == 2
    assert rows == _run_gen(capsys, tiny_model_dir, "--prompt", "the movie", "--max-new-tokens", 4, "--seed", 3,
                            "--num-samples", 2)
    paths = {k: tmp_path / f"eval.{k}" for k in ("json", "jsonl", "png")}
    results, samples = run_eval(EvalConfig(models=str(tiny_model_dir), data=str(work / "prompts.jsonl"),
                                           reward=f"{work / 'rewards.py'}:row_id", reward_weights="2",
                                           num_samples=1, max_new_tokens="3", progress=False,
                                           output=str(paths["json"]), samples_output=str(paths["jsonl"]),
                                           plot=str(paths["png"])))
    assert json.loads(paths["json"].read_text())["models"] == results["models"]
    assert _read_jsonl(paths["jsonl"]) == samples and paths["png"].read_bytes()[:4] == b"\x89PNG"
    assert results["models"][0]["reward"] == pytest.approx(2 * 3.5)


def test_the_table_title_names_the_baseline_and_reference_by_their_labels():
    """`--models base_m tuned --labels base tuned`: the rows said base and tuned, the title 'win rate vs
    base_m'."""
    from dpolab.commands.evaluate import format_table

    row = dict(reward=0.5, reward_sem=0.1, reward_ci90=[0.4, 0.6], kl=0.0, kl_sem=0.0, response_length=4.0,
               eos_fraction=1.0, win_rate=0.5, win_rate_ci90=[0.5, 0.5])
    results = {"prompts": 2, "num_samples": 1, "reward": "r:f", "baseline": "runs/base_m", "reference": "runs/base_m",
               "models": [{"model": "runs/base_m", "label": "base", **row}, {"model": "tuned", "label": "tuned", **row}]}
    title = format_table(results).splitlines()[0]
    assert "win rate vs base (ties count half); KL to base" in title, title
