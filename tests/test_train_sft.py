"""The SFT trainer: packed == unpacked loss, end to end through the CLI, gradient accumulation,
packing in training, resume, bad input."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpolab.cli import main
from dpolab.data.sft import collate_sft, pack_examples, tokenize_sft
from dpolab.train.sft import batch_nll

WORDS = ["the", "movie", "was", "great", "fun", "film", "plot", "music", "story", "acting"]


def write_sft_data(path: Path, n: int = 48, seed: int = 0) -> Path:
    """Prompt/completion rows where the completion repeats the prompt's words (a learnable rule);
    completions of different lengths, so token- and example-weighted means differ."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(n):
            words = [rng.choice(WORDS) for _ in range(rng.randint(1, 5))]
            fh.write(json.dumps({"prompt": "Repeat: " + " ".join(words) + "\n", "completion": " ".join(words)}) + "\n")
    return path



@pytest.fixture()
def sft_data(tmp_path):
    return write_sft_data(tmp_path / "sft.jsonl")


def _args(model_dir, data, out, *extra):
    return ["sft", "--model", str(model_dir), "--data", str(data), "--output-dir", str(out),
            "--max-length", "48", "--no-progress", *map(str, extra)]


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_unpacked(tiny_tokenizer, tiny_model, attn):
    """Packing with restarted positions and the block-diagonal mask reproduces the padded batch's
    per-token loss (and gradient); a plain 2D mask over the packed row would not."""
    from dpolab.lm.logps import model_sequence_logps

    tiny_model.config._attn_implementation = attn
    rng = random.Random(1)
    examples = []
    for i in range(7):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8)))
        examples.append(tokenize_sft("completion", (f"Say: {words}", f" {words}"), tiny_tokenizer, max_length=64,
                                     max_prompt_length=32, loss_on="full", index=i))
    rows = pack_examples(examples, 64)
    assert len(rows) < len(examples)
    pad = tiny_tokenizer.pad_token_id

    def mean_loss_and_grad(batch):
        tiny_model.zero_grad()
        nll, n = batch_nll(tiny_model, batch)
        (nll / n).backward()
        return (nll / n).item(), tiny_model.model.embed_tokens.weight.grad.clone()

    loss_u, grad_u = mean_loss_and_grad(collate_sft(examples, pad))
    packed = collate_sft(rows, pad)
    loss_p, grad_p = mean_loss_and_grad(packed)
    assert abs(loss_p - loss_u) < 1e-5
    torch.testing.assert_close(grad_p, grad_u, atol=1e-6, rtol=1e-4)
    with torch.no_grad():  # attention leaking across examples changes the loss
        logps, counts = model_sequence_logps(tiny_model, packed.input_ids, packed.attention_mask, packed.loss_mask,
                                             packed.position_ids)
    assert abs(-logps.sum().item() / counts.sum().item() - loss_u) > 1e-5


def test_sft_cli_learns_and_final_reloads(tiny_model_dir, sft_data, tmp_path):
    common = ("--eval-fraction", "0.25", "--batch-size", "8")
    untrained = tmp_path / "untrained"
    assert main(_args(tiny_model_dir, sft_data, untrained, "--learning-rate", "0", "--max-steps", "1", *common)) == 0
    out = tmp_path / "run"
    assert main(_args(tiny_model_dir, sft_data, out, "--learning-rate", "3e-3", "--max-steps", "40",
                      "--logging-steps", "10", "--eval-steps", "20", "--lr-scheduler", "constant", *common)) == 0
    before, after = _summary(untrained)["eval/loss"], _summary(out)["eval/loss"]
    assert after < 0.5 * before, (before, after)
    s = _summary(out)
    assert s["steps"] == 40 and s["eval/perplexity"] == pytest.approx(2.718281828 ** after, rel=1e-6)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "grad_norm", "learning_rate", "tokens_per_second"} <= set(rows[0])
    assert [r["step"] for r in rows if "eval/loss" in r] == [20, 40]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tok = AutoTokenizer.from_pretrained(out / "final")
    ids = tok("Repeat: the movie\n", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()


def test_grad_accumulation_matches_one_big_batch(tiny_model_dir, sft_data, tmp_path):
    """8 examples in 1 micro-batch == 4 micro-batches of 2 == passes within a token budget: the loss is
    averaged over all target tokens of the step (a per-micro-batch mean would weight short completions
    more; SGD shows it)."""
    common = ("--optimizer", "sgd", "--learning-rate", "0.5", "--max-steps", "2", "--max-grad-norm", "0",
              "--eval-fraction", "0")
    assert main(_args(tiny_model_dir, sft_data, tmp_path / "a", "--batch-size", "8", *common)) == 0
    assert main(_args(tiny_model_dir, sft_data, tmp_path / "b", "--batch-size", "2", "--grad-accum", "4",
                      *common)) == 0
    # a token budget of 20 cuts each micro-batch of 8 into passes of one or two examples
    assert main(_args(tiny_model_dir, sft_data, tmp_path / "c", "--batch-size", "8", "--micro-batch-tokens", "20",
                      *common)) == 0
    wa, wb, wc = _weights(tmp_path / "a"), _weights(tmp_path / "b"), _weights(tmp_path / "c")
    init = load_file(str(tiny_model_dir / "model.safetensors"))
    assert any(not torch.equal(wa[k], init[k]) for k in wa)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(wa[k], wc[k], atol=1e-5, rtol=1e-4)
    assert json.loads((tmp_path / "c" / "summary.json").read_text())["micro_batch_tokens"] == 20


def test_packed_training_step_equals_unpacked(tiny_model_dir, sft_data, tmp_path):
    """One SGD step over the whole data set, packed or padded: the same weights."""
    common = ("--optimizer", "sgd", "--learning-rate", "0.5", "--max-steps", "1", "--max-grad-norm", "0",
              "--eval-fraction", "0", "--batch-size", "64", "--loss-on", "full")
    assert main(_args(tiny_model_dir, sft_data, tmp_path / "u", *common)) == 0
    assert main(_args(tiny_model_dir, sft_data, tmp_path / "p", "--packing", *common)) == 0
    report = json.loads((tmp_path / "p" / "data_report.json").read_text())
    assert report["train_batch_rows"] < report["train_rows"]
    wa, wb = _weights(tmp_path / "u"), _weights(tmp_path / "p")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)


def test_resume_from_checkpoint_is_exact(tiny_model_dir, sft_data, tmp_path):
    common = ("--learning-rate", "1e-3", "--max-steps", "4", "--batch-size", "4", "--logging-steps", "1",
              "--save-steps", "2", "--save-total-limit", "5", "--eval-fraction", "0", "--packing")
    full = tmp_path / "full"
    assert main(_args(tiny_model_dir, sft_data, full, *common)) == 0
    resumed = tmp_path / "resumed"
    assert main(_args(tiny_model_dir, sft_data, resumed, "--resume", full / "checkpoints" / "step-2", *common)) == 0
    wa, wb = _weights(full), _weights(resumed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_bad_input_is_a_clear_error(tiny_model_dir, sft_data, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": null}\n')
    out = tmp_path / "r"
    assert main(_args(tiny_model_dir, bad, out)) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2" in err and "completion" in err and "Traceback" not in err
    assert main(_args(tiny_model_dir, sft_data, out, "--loss-on", "completions")) == 2
    assert "did you mean 'completion'" in capsys.readouterr().err
    assert main(["sft", "--data", str(sft_data)]) == 2
    assert "--model is required" in capsys.readouterr().err
    assert not out.exists()


def test_dry_run_and_help(tiny_model_dir, sft_data, tmp_path, capsys):
    out = tmp_path / "dry"
    assert main(_args(tiny_model_dir, sft_data, out, "--dry-run", "--packing")) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["data"]["rows"] == 48 and report["data"]["formats"] == {"completion": 48}
    assert not out.exists()
    res = subprocess.run([sys.executable, "-m", "dpolab", "sft", "--help"], capture_output=True, text=True)
    assert res.returncode == 0
    from dataclasses import fields

    from dpolab.train.sft import SFTConfig

    for f in fields(SFTConfig):
        assert "--" + f.name.replace("_", "-") in res.stdout, f.name


def test_nonfinite_loss_stops_without_saving(tiny_tokenizer, sft_data, tmp_path, capsys):
    from dpolab.lm.tiny import tiny_llama

    model_dir = tmp_path / "nan-model"
    model = tiny_llama(len(tiny_tokenizer), hidden_size=32, layers=2, heads=4, tokenizer=tiny_tokenizer)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    model.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    out = tmp_path / "run"
    assert main(_args(model_dir, sft_data, out, "--max-steps", "2", "--batch-size", "4")) == 2
    err = capsys.readouterr().err
    assert "non-finite loss at step 1" in err and "--skip-nonfinite" in err
    assert not (out / "summary.json").exists() and not (out / "final").exists()


def test_lora_run_saves_merged_model(tiny_model_dir, sft_data, tmp_path):
    out = tmp_path / "lora"
    assert main(_args(tiny_model_dir, sft_data, out, "--lora", "--lora-r", "4", "--learning-rate", "1e-2",
                      "--max-steps", "2", "--batch-size", "4", "--eval-fraction", "0", "--save-steps", "1")) == 0
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert not any("lora" in n for n, _ in model.named_parameters())
    init = load_file(str(tiny_model_dir / "model.safetensors"))
    final = _weights(out)
    assert any(not torch.equal(final[k], init[k]) for k in init if k in final)
    ckpt = load_file(str(out / "checkpoints" / "step-2" / "model.safetensors"))
    assert ckpt and all("lora_" in k for k in ckpt)  # checkpoints hold only the adapters


def test_resume_with_another_lora_rank_names_the_mismatch(tiny_model_dir, sft_data, tmp_path, capsys):
    out = tmp_path / "lora"
    common = ("--lora", "--batch-size", "4", "--eval-fraction", "0")
    assert main(_args(tiny_model_dir, sft_data, out, *common, "--lora-r", "4", "--max-steps", "1")) == 0
    capsys.readouterr()
    assert main(_args(tiny_model_dir, sft_data, out, *common, "--lora-r", "8", "--max-steps", "2",
                      "--resume", "latest")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # the message ended at "... for PeftModelForCausalLM:"
    assert "does not fit this model (size mismatch for " in err and "other --lora settings?" in err, err


def test_custom_code_without_trust_remote_code_names_the_flag(tiny_model_dir, tmp_path):
    import shutil

    from dpolab.errors import DpolabError
    from dpolab.lm.loading import load_causal_lm

    custom = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, custom)
    (custom / "modeling_custom.py").write_text(
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'custom_llama'\n"
        "class CustomForCausalLM(LlamaForCausalLM):\n    config_class = CustomConfig\n")
    config = json.loads((custom / "config.json").read_text())
    config["model_type"] = "custom_llama"  # not a type transformers has: its own code would be needed
    config["auto_map"] = {"AutoConfig": "modeling_custom.CustomConfig",
                          "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (custom / "config.json").write_text(json.dumps(config))
    with pytest.raises(DpolabError, match="Pass --trust-remote-code to run it"):
        load_causal_lm(str(custom))


def test_length_grouped_batches_pad_less(tiny_model_dir, sft_data, tmp_path, monkeypatch):
    """The default length-bucketed order pads the training batches less than uniformly random
    batches (--no-group-by-length); measured on the batches the trainer really collates."""
    import dpolab.data.sft as sft_mod

    real = sft_mod.collate_sft
    seen: list[tuple[int, int]] = []

    def recording(rows, pad_id):
        batch = real(rows, pad_id)
        seen.append((int(batch.attention_mask.sum()), batch.attention_mask.numel()))
        return batch

    monkeypatch.setattr(sft_mod, "collate_sft", recording)
    padding = {}
    for flag in ("--group-by-length", "--no-group-by-length"):
        seen.clear()
        assert main(_args(tiny_model_dir, sft_data, tmp_path / flag, flag, "--batch-size", "4", "--max-steps", "8",
                          "--eval-fraction", "0")) == 0
        padding[flag] = 1 - sum(r for r, _ in seen) / sum(n for _, n in seen)
    assert padding["--group-by-length"] < 0.5 * padding["--no-group-by-length"], padding


def test_perplexity_of_a_nan_loss_is_nan():
    import math

    from dpolab.train.sft import perplexity

    assert perplexity(math.log(5.0)) == pytest.approx(5.0) and perplexity(800.0) == math.inf
    assert math.isnan(perplexity(math.nan))  # was reported as inf


def test_a_peft_adapter_folder_as_model_is_merged_into_its_base(tiny_model_dir, tmp_path):
    """--model a LoRA adapter folder (a LoRA SFT run saved as an adapter elsewhere): trained as its
    base with the adapter merged (transformers' own loading kept every weight frozen: "optimizer got an
    empty parameter list"), and final/ is a whole model."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpolab.lm.loading import load_causal_lm

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)  # a non-zero adapter: merging it moves the weights
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(adapter)
    merged = load_causal_lm(str(adapter))
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[key], plain.state_dict()[key])  # the adapter is in the weights
    assert not any("lora" in k for k in merged.state_dict())
    out = tmp_path / "run"
    data = write_sft_data(tmp_path / "sft.jsonl", n=16)
    assert main(["sft", "--model", str(adapter), "--data", str(data), "--output-dir", str(out), "--max-steps", "1",
                 "--batch-size", "4", "--no-progress"]) == 0
    saved = load_file(str(out / "final" / "model.safetensors"))
    assert key in saved and not any("lora" in k for k in saved)


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_new_learning_rate_or_weight_decay_on_resume_applies_from_there(tiny_model_dir, sft_data, tmp_path):
    """The optimizer's saved state carried the checkpoint's rate and decay, so a --learning-rate given on
    --resume was warned about, written to config.yaml and not used (the weights equal the old rate's)."""
    common = ("--max-steps", "4", "--batch-size", "4", "--logging-steps", "1", "--save-steps", "2",
              "--save-total-limit", "5", "--eval-fraction", "0", "--warmup-steps", "1")
    full = tmp_path / "full"
    assert main(_args(tiny_model_dir, sft_data, full, "--learning-rate", "1e-3", *common)) == 0
    faster = tmp_path / "faster"
    assert main(_args(tiny_model_dir, sft_data, faster, "--resume", full / "checkpoints" / "step-2",
                      "--learning-rate", "2e-3", *common)) == 0
    old, new = [r["learning_rate"] for r in _rows(full)], [r["learning_rate"] for r in _rows(faster)]
    assert new == pytest.approx([2 * x for x in old[2:]], rel=1e-12), (old, new)  # steps 3 and 4
    assert old[2] > 0 and not torch.equal(_weights(full)["model.embed_tokens.weight"],
                                          _weights(faster)["model.embed_tokens.weight"])
    decayed = tmp_path / "decayed"
    assert main(_args(tiny_model_dir, sft_data, decayed, "--resume", full / "checkpoints" / "step-2",
                      "--learning-rate", "1e-3", "--weight-decay", "0.5", *common)) == 0
    same = tmp_path / "same"
    assert main(_args(tiny_model_dir, sft_data, same, "--resume", full / "checkpoints" / "step-2",
                      "--learning-rate", "1e-3", *common)) == 0
    wf, ws, wd = _weights(full), _weights(same), _weights(decayed)
    assert all(torch.equal(wf[k], ws[k]) for k in wf)  # unchanged options: still bitwise exact
    assert not all(torch.equal(wf[k], wd[k]) for k in wf)


def test_a_resume_that_cannot_continue_is_refused_before_the_folder_changes(tiny_model_dir, sft_data, tmp_path,
                                                                             capsys):
    """Another --optimizer crashed with a KeyError after the metrics were cut back and summary.json
    removed; a --max-steps below the checkpoint's step 'finished' behind it, overwriting final/."""
    common = ("--max-steps", "4", "--batch-size", "4", "--save-steps", "2", "--save-total-limit", "5",
              "--eval-fraction", "0")
    run = tmp_path / "run"
    assert main(_args(tiny_model_dir, sft_data, run, *common)) == 0
    before = {p: p.read_bytes() for p in (run / "metrics.jsonl", run / "summary.json", run / "config.yaml")}
    capsys.readouterr()
    for extra, message in ((("--optimizer", "sgd"), "was trained with --optimizer adamw, whose state cannot "
                                                    "continue sgd: resume with --optimizer adamw"),
                           (("--max-steps", "1"), "is at step 2, past the 1 steps of this run")):
        args = _args(tiny_model_dir, sft_data, run, *common, "--resume", run / "checkpoints" / "step-2", *extra)
        assert main(args) == 2, extra
        err = capsys.readouterr().err.strip()
        assert message in err and err.count("\n") == 0 and "Traceback" not in err, err
        assert {p: p.read_bytes() for p in before} == before


def test_a_folder_filled_by_a_run_that_ended_while_this_one_loaded_is_refused(tiny_model_dir, sft_data, tmp_path,
                                                                             monkeypatch, capsys):
    """The 'already holds a run' check ran before the model loaded and not again once the lock was
    taken: a run that held the folder and finished in between left its rows, and this one appended."""
    from dpolab.runs.rundir import RunDir

    out = tmp_path / "r"
    claim = RunDir.lock

    def other_run_finished_first(self):
        (self.path / "metrics.jsonl").write_text('{"step": 1}\n')
        (self.path / "checkpoints" / "step-1").mkdir(parents=True)
        return claim(self)

    monkeypatch.setattr(RunDir, "lock", other_run_finished_first)
    assert main(_args(tiny_model_dir, sft_data, out, "--max-steps", "1", "--eval-fraction", "0")) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n' and not (out / "summary.json").exists()


def test_resuming_a_finished_run_does_not_rewrite_its_last_checkpoint(tiny_model_dir, sft_data, tmp_path):
    """A resume of a finished run (its final/ could not be written: a full disk) re-saved the checkpoint
    it resumed from first, which needed that checkpoint's room twice; it evaluates and writes final/."""
    import shutil

    common = ("--max-steps", "2", "--batch-size", "4", "--eval-fraction", "0")
    run = tmp_path / "run"
    assert main(_args(tiny_model_dir, sft_data, run, *common)) == 0
    state = run / "checkpoints" / "step-2" / "training_state.pt"
    stamp = state.stat().st_mtime_ns
    shutil.rmtree(run / "final")
    assert main(_args(tiny_model_dir, sft_data, run, *common, "--resume", "latest")) == 0
    assert state.stat().st_mtime_ns == stamp and (run / "final" / "model.safetensors").exists()
    # a branch into another folder still writes its own checkpoint there
    branch = tmp_path / "branch"
    assert main(_args(tiny_model_dir, sft_data, branch, *common, "--resume", run / "checkpoints" / "step-2")) == 0
    assert (branch / "checkpoints" / "step-2" / "training_state.pt").exists()


def test_a_resume_from_another_directory_with_relative_paths_is_refused(tiny_model_dir, tmp_path, monkeypatch,
                                                                        capsys):
    """config.yaml keeps the paths as typed, and the printed resume command names it absolutely: run
    from another directory holding another sft.jsonl, the resume trained on that file silently."""
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir(), elsewhere.mkdir()
    write_sft_data(here / "sft.jsonl")
    write_sft_data(elsewhere / "sft.jsonl", seed=1)
    run = tmp_path / "run"
    common = ("--max-steps", "2", "--batch-size", "4", "--eval-fraction", "0")
    monkeypatch.chdir(here)
    assert main(_args(tiny_model_dir, "sft.jsonl", run, *common)) == 0
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(_args(tiny_model_dir, "sft.jsonl", run, *common, "--max-steps", "3", "--resume", "latest")) == 2
    err = capsys.readouterr().err
    assert f"was written by a run started in {here}" in err and "(--data sft.jsonl)" in err, err
    assert "max_steps: 2\n" in (run / "config.yaml").read_text()  # the folder as it was
    monkeypatch.chdir(here)  # from where it was started: resumed
    assert main(_args(tiny_model_dir, "sft.jsonl", run, *common, "--max-steps", "3", "--resume", "latest")) == 0


def test_an_empty_output_dir_is_refused_not_taken_for_the_working_directory(tiny_model_dir, sft_data, tmp_path,
                                                                            monkeypatch, capsys):
    """--output-dir "$UNSET" wrote a whole run into the working directory (over a config.yaml there)."""
    monkeypatch.chdir(tmp_path)
    for argv in (_args(tiny_model_dir, sft_data, ""), ["rl", "ppo", "--output-dir", " "],
                 ["eval", "--models", "m", "--data", "d.jsonl", "--reward", "a:b", "--output", ""]):
        assert main(argv) == 2, argv
        assert "is empty (an unset variable?)" in capsys.readouterr().err, argv
    assert [p.name for p in tmp_path.iterdir()] == ["sft.jsonl"]  # the data, nothing written


def test_skipped_and_cut_rows_are_said_on_the_console(tiny_model_dir, tmp_path, capsys):
    """A run said nothing of rows it skipped or cut (data_report.json only; a --dry-run prints it)."""
    data = write_sft_data(tmp_path / "sft.jsonl", n=8)
    with open(data, "a", encoding="utf-8") as fh:  # a chat row whose user turn fills --max-length: no answer left
        fh.write(json.dumps({"messages": [{"role": "user", "content": "the movie was great " * 40},
                                          {"role": "assistant", "content": "yes"}]}) + "\n")
    assert main(_args(tiny_model_dir, data, tmp_path / "run", "--max-steps", "1", "--eval-fraction", "0")) == 0
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("note: ")]
    assert line.startswith(f"note: 1 of 9 rows skipped (the first: {data}:9: ") and "data_report.json" in line, line
    ok = write_sft_data(tmp_path / "ok.jsonl", n=8)
    assert main(_args(tiny_model_dir, ok, tmp_path / "ok", "--max-steps", "1", "--eval-fraction", "0")) == 0
    assert "note: " not in capsys.readouterr().err


def test_unsorted_batches_with_grad_accum_equal_one_large_batch(tiny_model_dir, tmp_path):
    """--no-group-by-length served plain micro-batches: with --grad-accum the epoch's last step took
    micro-batches of the next epoch (--epochs 1 ended at epoch 1.2, rows trained twice) and the
    weights differed from one batch of the same size by 2e-2."""
    data = write_sft_data(tmp_path / "sft.jsonl", n=20)
    common = ("--no-group-by-length", "--optimizer", "sgd", "--learning-rate", "0.5", "--max-grad-norm", "0",
              "--eval-fraction", "0", "--epochs", "1", "--max-steps", "0")
    assert main(_args(tiny_model_dir, data, tmp_path / "big", *common, "--batch-size", "8")) == 0
    assert main(_args(tiny_model_dir, data, tmp_path / "acc", *common, "--batch-size", "2", "--grad-accum", "4")) == 0
    big, acc = (load_file(str(tmp_path / d / "final" / "model.safetensors")) for d in ("big", "acc"))
    assert max(float((big[k] - acc[k]).abs().max()) for k in big) < 1e-5
    assert _summary(tmp_path / "acc")["steps"] == _summary(tmp_path / "big")["steps"] == 3


def test_rows_beyond_the_models_positions_are_one_line_before_any_weights_load(tiny_model_dir, tmp_path, capsys):
    """A --max-length past the model's positions with a row that long was an IndexError inside torch
    at step 1 (the tiny model has 256 positions); also for DPO's pairs."""
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"prompt": "the movie " * 10, "completion": "was great fun " * 100}) + "\n"
                    + "".join(json.dumps({"prompt": "a", "completion": "b"}) + "\n" for _ in range(3)))
    out = tmp_path / "run"
    assert main(_args(tiny_model_dir, data, out, "--max-length", "1000", "--max-steps", "1")) == 2
    err = capsys.readouterr().err
    assert "(--max-length 1000) exceed the 256 positions of" in err and "give --max-length 256 or less" in err, err
    assert not out.exists()
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": "a", "chosen": "good " * n, "rejected": "bad"}) + "\n"
                             for n in (300, 1, 2, 3)))
    assert main(["dpo", "--model", str(tiny_model_dir), "--data", str(pairs), "--output-dir", str(out),
                 "--max-length", "1000", "--dry-run"]) == 2
    assert "exceed the 256 positions" in capsys.readouterr().err


def test_a_dry_run_returns_the_data_counts_under_the_summarys_names(tiny_model_dir, tmp_path):
    """train(dry_run=True) said data/skipped and data/truncated, a real run's summary data/skipped_rows
    and data/truncated_rows: code reading one missed the other."""
    from dpolab.train.sft import SFTConfig, train

    data = write_sft_data(tmp_path / "sft.jsonl", n=8)
    out = train(SFTConfig(model=str(tiny_model_dir), data=str(data), output_dir=str(tmp_path / "r"), max_length=48,
                          dry_run=True, progress=False))
    assert out["dry_run"] is True and out["data/skipped_rows"] == out["data/skipped"] == 0
    assert out["data/truncated_rows"] == out["data/truncated"] and out["data/rows"] == 8


def test_the_logged_learning_rate_is_the_one_the_step_used(tiny_model_dir, sft_data, tmp_path):
    """Warmup over 2 steps: step 1 updates at half the rate, step 2 at the whole. The row of step 1
    said the whole rate (the schedule had already moved on to step 2's)."""
    out = tmp_path / "warm"
    assert main(_args(tiny_model_dir, sft_data, out, "--learning-rate", "1e-3", "--warmup-steps", "2",
                      "--lr-scheduler", "linear", "--max-steps", "3", "--logging-steps", "1", "--batch-size", "4",
                      "--eval-fraction", "0")) == 0
    assert [r["learning_rate"] for r in _rows(out)] == pytest.approx([5e-4, 1e-3, 1e-3], rel=1e-12)


def test_progress_false_in_python_hides_the_libraries_loading_bars(tiny_model_dir, sft_data, tmp_path):
    """train(SFTConfig(progress=False)) still drew transformers' 'Loading weights' bars (the command
    line hides them by environment variables): a fresh interpreter, as a user's script."""
    code = ("from dpolab.train.sft import SFTConfig, train\n"
            f"train(SFTConfig(model={str(tiny_model_dir)!r}, data={str(sft_data)!r}, output_dir={str(tmp_path / 'o')!r}, "
            "max_steps=1, batch_size=4, max_length=48, eval_fraction=0, progress=False))\n")
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("HF_HUB_DISABLE_PROGRESS_BARS",
                                                                          "TRANSFORMERS_VERBOSITY")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Loading weights" not in done.stderr and "it/s" not in done.stderr, done.stderr[-2000:]
