"""The DPO trainer end to end: CLI, run directory, equivalences (accumulation, reference cache,
resume) and bad input. Tiny Llama models built in-process; data generated here with a known rule."""

from __future__ import annotations

import json
import math
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpolab.cli import main

WORDS = ["the", "movie", "was", "great", "fun", "film", "plot", "music", "story", "acting"]


def write_rule_data(path: Path, n: int = 64, seed: int = 0) -> Path:
    """Preference pairs whose preferred side follows a rule: the chosen response opens with
    "great", the rejected one with "awful", and both continue with the same words."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(n):
            prompt = "Review: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))
            tail = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))
            fh.write(json.dumps({"prompt": prompt, "chosen": f" great {tail}", "rejected": f" awful {tail}"}) + "\n")
    return path


@pytest.fixture()
def rule_data(tmp_path):
    return write_rule_data(tmp_path / "prefs.jsonl")


def _args(model_dir, data, out, *extra):
    return ["dpo", "--model", str(model_dir), "--data", str(data), "--output-dir", str(out),
            "--max-length", "48", "--max-prompt-length", "24", "--no-progress", *map(str, extra)]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


def test_dpo_cli_learns_rule_and_final_reloads(tiny_model_dir, rule_data, tmp_path):
    out = tmp_path / "run"
    rc = main(_args(tiny_model_dir, rule_data, out, "--learning-rate", "3e-3", "--beta", "0.5",
                    "--max-steps", "30", "--batch-size", "8", "--eval-fraction", "0.25",
                    "--logging-steps", "5", "--eval-steps", "15"))
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 30
    assert summary["eval/rewards/accuracies"] >= 0.95, summary
    assert summary["eval/rewards/margins"] > 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
            "logps/chosen", "logps/rejected"} <= set(rows[0])
    assert any("eval/loss" in r for r in rows)
    assert (out / "config.yaml").is_file() and (out / "checkpoints" / "latest").is_file()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tok = AutoTokenizer.from_pretrained(out / "final")
    ids = tok("Review: the movie", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()


def _run(tiny_model_dir, data, out, *extra) -> dict:
    assert main(_args(tiny_model_dir, data, out, "--eval-fraction", "0", *extra)) == 0
    return json.loads((out / "summary.json").read_text())


def test_grad_accumulation_matches_one_big_batch(tiny_model_dir, rule_data, tmp_path):
    """1 micro-batch of 8 pairs == 4 micro-batches of 2 (SGD exposes any loss-scale error)."""
    common = ("--optimizer", "sgd", "--learning-rate", "0.5", "--max-steps", "2", "--max-grad-norm", "0")
    _run(tiny_model_dir, rule_data, tmp_path / "a", "--batch-size", "8", "--grad-accum", "1", *common)
    _run(tiny_model_dir, rule_data, tmp_path / "b", "--batch-size", "2", "--grad-accum", "4", *common)
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    init = load_file(str(tiny_model_dir / "model.safetensors"))
    assert any(not torch.equal(wa[k], init[k]) for k in wa)  # training moved the weights
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)


def test_precomputed_reference_equals_on_the_fly(tiny_model_dir, rule_data, tmp_path):
    common = ("--optimizer", "sgd", "--learning-rate", "0.5", "--max-steps", "3", "--batch-size", "4")
    _run(tiny_model_dir, rule_data, tmp_path / "live", "--no-precompute-ref", *common)
    _run(tiny_model_dir, rule_data, tmp_path / "pre", *common)  # precomputed: the default
    wa, wb = _weights(tmp_path / "live"), _weights(tmp_path / "pre")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)
    cache = list((tmp_path / "pre" / "cache").glob("ref-logps-*.safetensors"))
    assert len(cache) == 1
    # The cache is reused on a second run with the same data and model...
    _run(tiny_model_dir, rule_data, tmp_path / "pre2", "--ref-cache-dir", tmp_path / "pre" / "cache", *common)
    assert len(list((tmp_path / "pre" / "cache").glob("*.safetensors"))) == 1
    # ...and a changed dataset gets a new key, never the stale values.
    other = write_rule_data(tmp_path / "other.jsonl", seed=1)
    _run(tiny_model_dir, other, tmp_path / "pre3", "--ref-cache-dir", tmp_path / "pre" / "cache", *common)
    assert len(list((tmp_path / "pre" / "cache").glob("*.safetensors"))) == 2


def test_the_cache_key_sees_every_tokenizer_file(tiny_model_dir, tmp_path):
    """Editing a model folder's chat template (or merges, or a SentencePiece model) changes the ids the
    reference scores, so it changes the model's fingerprint in the cache key (before: only the
    .safetensors and .json files counted, and a stale cache was reused)."""
    import os
    import shutil

    from dpolab.lm.loading import model_fingerprint

    folder = Path(shutil.copytree(tiny_model_dir, tmp_path / "m"))
    before = model_fingerprint(str(folder))
    template = folder / "chat_template.jinja"
    template.write_text(template.read_text() if template.exists() else "{{ messages }}")
    os.utime(template, ns=(1, 1))
    assert model_fingerprint(str(folder)) != before


def test_a_damaged_reference_cache_is_computed_again(tiny_model_dir, rule_data, tmp_path, capsys):
    """A cache file cut short (a killed copy, a full disk) or overwritten is said and recomputed, not
    a safetensors traceback on every later run that hashes to it."""
    cache = tmp_path / "cache"
    common = ("--batch-size", "4", "--learning-rate", "1e-3", "--max-steps", "2", "--ref-cache-dir", cache)
    _run(tiny_model_dir, rule_data, tmp_path / "a", *common)
    (path,) = cache.glob("ref-logps-*.safetensors")
    good = load_file(str(path))["train"].clone()  # the file is mapped: a copy before it is damaged
    whole = path.read_bytes()
    overwritten = whole[:-64] + bytes(64)  # values zeroed under an intact header: read as log-probs of 0
    for damage in (whole[: path.stat().st_size // 2], b"garbage\n", overwritten):
        path.write_bytes(damage)
        capsys.readouterr()
        _run(tiny_model_dir, rule_data, tmp_path / f"b{len(damage)}", *common)
        assert f"reference log-probs: cannot read the cache {path}" in capsys.readouterr().err
        torch.testing.assert_close(load_file(str(path))["train"], good, equal_nan=True)


def test_a_cache_that_cannot_be_written_is_said_and_the_run_goes_on(tiny_model_dir, rule_data, tmp_path, capsys):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would go")
    summary = _run(tiny_model_dir, rule_data, tmp_path / "run", "--batch-size", "4", "--max-steps", "1",
                   "--ref-cache-dir", blocker)
    assert summary["steps"] == 1 and "cannot write the cache" in capsys.readouterr().err


def test_short_run_precomputes_only_the_pairs_it_visits(tiny_model_dir, rule_data, tmp_path):
    """3 steps x 4 pairs of 64: 12 rows computed, and row 0 (the stand-in for an empty micro-batch),
    the rest NaN; a longer run with the same cache computes the missing rows only (the stored values
    are kept bit for bit)."""
    cache = tmp_path / "cache"
    common = ("--batch-size", "4", "--learning-rate", "1e-3", "--ref-cache-dir", cache)
    _run(tiny_model_dir, rule_data, tmp_path / "short", "--max-steps", "3", *common)
    (path,) = cache.glob("ref-logps-*.safetensors")
    short = load_file(str(path))["train"]
    done = ~short[:, 0].isnan()
    assert done[0] and int(done.sum()) == 13 and not short[done].isnan().any()  # row 0 not among the 12 here
    _run(tiny_model_dir, rule_data, tmp_path / "long", "--max-steps", "20", *common)
    full = load_file(str(path))["train"]
    assert not full.isnan().any() and torch.equal(full[done], short[done])
    # and the values equal a fresh full pass
    _run(tiny_model_dir, rule_data, tmp_path / "fresh", "--max-steps", "20", "--batch-size", "4",
         "--learning-rate", "1e-3", "--ref-cache-dir", tmp_path / "cache2")
    (fresh,) = (tmp_path / "cache2").glob("ref-logps-*.safetensors")
    torch.testing.assert_close(load_file(str(fresh))["train"], full, atol=1e-5, rtol=1e-5)


def test_a_short_run_whose_step_has_an_empty_micro_batch(tiny_model_dir, tmp_path):
    """25 training pairs in steps of 2 micro-batches of 4: one step of the epoch holds one real
    micro-batch and an empty one, run as row 0 with weight 0; here that step is the one planned step
    and row 0 is not in it. Row 0's reference must be computed anyway: 0 · its NaN made every
    gradient NaN ("non-finite gradient norm at step 1")."""
    data = write_rule_data(tmp_path / "p.jsonl", n=31)
    data.write_text("\n".join(data.read_text().splitlines()[::-1]) + "\n")
    out = tmp_path / "run"
    assert main(_args(tiny_model_dir, data, out, "--max-steps", "1", "--batch-size", "4", "--grad-accum", "2",
                      "--eval-fraction", "0.2", "--seed", "0")) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 1


def test_any_split_into_forward_passes_gives_the_same_step(tiny_model_dir, rule_data, tmp_path):
    """--micro-batch-tokens only bounds activation memory: one pass of 8 pairs, passes of ~1 pair
    (40 tokens) and the size-based default give the same weights (SGD exposes any scale error)."""
    common = ("--optimizer", "sgd", "--learning-rate", "0.5", "--max-steps", "2", "--max-grad-norm", "0",
              "--batch-size", "8")
    for layout in ("--prefix-sharing", "--no-prefix-sharing"):
        runs = {}
        for budget in ("0", "40", None):
            out = tmp_path / f"{layout}-{budget}"
            _run(tiny_model_dir, rule_data, out, layout, *common, *(("--micro-batch-tokens", budget) if budget else ()))
            runs[budget] = _weights(out)
        init = load_file(str(tiny_model_dir / "model.safetensors"))
        assert any(not torch.equal(runs["0"][k], init[k]) for k in init)
        for budget in ("40", None):
            for k in runs["0"]:
                torch.testing.assert_close(runs[budget][k], runs["0"][k], atol=1e-5, rtol=1e-4)


def test_gradient_checkpointing_gives_the_same_step(tiny_model_dir, rule_data, tmp_path, monkeypatch):
    """--gradient-checkpointing (transformers' own, the policy trains in training mode) recomputes
    each layer in the backward pass and gives the weights of the plain passes."""
    import transformers.modeling_utils as tmu  # where transformers takes its checkpoint function from

    common = ("--optimizer", "sgd", "--learning-rate", "0.5", "--max-steps", "2", "--max-grad-norm", "0",
              "--batch-size", "8")
    _run(tiny_model_dir, rule_data, tmp_path / "plain", *common)
    calls = []
    real = tmu.checkpoint
    monkeypatch.setattr(tmu, "checkpoint", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    summary = _run(tiny_model_dir, rule_data, tmp_path / "ckpt", "--gradient-checkpointing", *common)
    assert len(calls) >= 2 * 2 and summary["micro_batch_tokens"] == 0  # both layers, each step; no budget
    wa, wb = _weights(tmp_path / "plain"), _weights(tmp_path / "ckpt")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-5, rtol=1e-4)


def test_resume_from_checkpoint_is_exact(tiny_model_dir, rule_data, tmp_path):
    common = ("--learning-rate", "1e-3", "--max-steps", "6", "--batch-size", "4", "--logging-steps", "1",
              "--save-steps", "3", "--save-total-limit", "5")
    full = tmp_path / "full"
    _run(tiny_model_dir, rule_data, full, *common)
    # A second run that starts from the full run's step-3 checkpoint ends bitwise equal.
    resumed = tmp_path / "resumed"
    _run(tiny_model_dir, rule_data, resumed, "--resume", full / "checkpoints" / "step-3", *common)
    wa, wb = _weights(full), _weights(resumed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    rows_full = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    rows_res = [json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    strip = ("tokens_per_second",)
    tail_full = [{k: v for k, v in r.items() if k not in strip} for r in rows_full if r["step"] > 3]
    tail_res = [{k: v for k, v in r.items() if k not in strip} for r in rows_res if r["step"] > 3]
    assert tail_full == tail_res


def test_lora_run_saves_loadable_merged_model(tiny_model_dir, rule_data, tmp_path):
    out = tmp_path / "lora"
    _run(tiny_model_dir, rule_data, out, "--lora", "--lora-r", "4", "--learning-rate", "1e-2",
         "--max-steps", "3", "--batch-size", "4")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert not any("lora" in n for n, _ in model.named_parameters())
    init = load_file(str(tiny_model_dir / "model.safetensors"))
    final = _weights(out)
    assert any(not torch.equal(final[k], init[k]) for k in init if k in final)


@pytest.mark.parametrize("loss", ["ipo", "hinge", "robust", "simpo", "ref_free"])
def test_loss_variants_run(tiny_model_dir, rule_data, tmp_path, loss):
    extra = ("--label-smoothing", "0.1") if loss == "robust" else ()
    summary = _run(tiny_model_dir, rule_data, tmp_path / loss, "--loss", loss, "--max-steps", "2",
                   "--batch-size", "4", "--learning-rate", "1e-3", *extra)
    assert summary["steps"] == 2 and all(
        isinstance(v, (int, float)) and v == v for v in summary.values() if not isinstance(v, str))


def test_bad_jsonl_line_is_a_clear_error(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": 3, "rejected": "c"}\n')
    out = tmp_path / "run"
    assert main(_args(tiny_model_dir, bad, out)) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2" in err and "chosen" in err and "Traceback" not in err
    assert not (out / "summary.json").exists()


def test_unknown_loss_and_missing_args(tiny_model_dir, rule_data, tmp_path, capsys):
    assert main(_args(tiny_model_dir, rule_data, tmp_path / "r", "--loss", "sigmoidd")) == 2
    assert "did you mean 'sigmoid'" in capsys.readouterr().err
    assert main(["dpo", "--data", str(rule_data)]) == 2
    assert "--model is required" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("flags,message", [
    (("--learning-rate", "-1"), "--learning-rate must be a finite number >= 0, got -1.0"),
    (("--weight-decay", "-0.1"), "--weight-decay must be a finite number >= 0"),
    (("--max-grad-norm", "-1"), "--max-grad-norm must be a finite number >= 0"),
    (("--warmup-steps", "-1"), "--warmup-steps must be a finite number >= 0"),
    (("--save-steps", "-5"), "--save-steps must be a finite number >= 0"),
    (("--epochs", "0"), "--epochs must be > 0 (or give --max-steps N)"),
    (("--lora", "--lora-r", "0"), "--lora-r must be >= 1"),
    (("--lora", "--lora-dropout", "1"), "--lora-dropout must be in [0, 1)"),
])
def test_out_of_range_numbers_are_refused_by_name(tiny_model_dir, rule_data, tmp_path, capsys, flags, message):
    """Caught with the option's name before any work (torch and peft would raise mid-start, after
    the model loaded), in a dry run too."""
    for extra in ((), ("--dry-run",)):
        assert main(_args(tiny_model_dir, rule_data, tmp_path / "r", *flags, *extra)) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "r").exists()


def test_lora_targets_the_model_does_not_have_are_one_line(tiny_model_dir, rule_data, tmp_path, capsys):
    """peft's NoMatchingPeftModuleError (a traceback) becomes one line naming the layers there are."""
    assert main(_args(tiny_model_dir, rule_data, tmp_path / "r", "--lora", "--lora-target-modules",
                      "q_proj,foo_proj", "--max-steps", "1")) == 2
    err = capsys.readouterr().err
    assert "--lora-target-modules: the model has no module named foo_proj; its linear layers are " in err, err
    assert "q_proj" in err and "Traceback" not in err and not (tmp_path / "r").exists()


def test_lora_on_a_tied_embedding_or_head_is_refused(tiny_tokenizer):
    """With tied embeddings (Gemma, Qwen2.5-0.5B, Llama-3.2-1B, GPT-2) the merge wrote an lm_head or
    embed_tokens adapter into the one shared matrix: final/ changed the other side too, a model other
    than the one trained (its eval/loss 5.85 against the run's 4.99)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dpolab.errors import ConfigError
    from dpolab.lm.loading import apply_lora

    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    tied = LlamaForCausalLM(config)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    for targets in ("q_proj,lm_head", "embed_tokens"):
        with pytest.raises(ConfigError, match="ties its input embeddings and output head"):
            apply_lora(tied, r=2, alpha=4, dropout=0.0, target_modules=targets)
    apply_lora(tied, r=2, alpha=4, dropout=0.0, target_modules="q_proj")  # the rest as before
    untied = LlamaForCausalLM(LlamaConfig(**{**config.to_dict(), "tie_word_embeddings": False}))
    apply_lora(untied, r=2, alpha=4, dropout=0.0, target_modules="q_proj,lm_head")


def test_a_model_path_that_is_not_a_model_folder_says_so(tiny_tokenizer, rule_data, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    # a relative path with two slashes cannot be a hub id (namespace/name): no hub lookup
    for path, says in ((tmp_path / "absent", "no such folder"), (tmp_path / "empty", "the folder has none of"),
                       (rule_data, "it is a file, not a folder"), ("runs/sft/final", "no such folder")):
        assert main(_args(path, rule_data, tmp_path / "r", "--dry-run")) == 2
        err = capsys.readouterr().err
        assert f"cannot load tokenizer '{path}': {says}" in err, err
    tiny_tokenizer.save_pretrained(tmp_path / "tokenizer-only")
    assert main(_args(tmp_path / "tokenizer-only", rule_data, tmp_path / "r", "--max-steps", "1")) == 2
    err = capsys.readouterr().err
    assert f"cannot load model '{tmp_path / 'tokenizer-only'}': the folder has none of config.json" in err, err
    assert not (tmp_path / "r").exists()


def test_a_model_name_not_found_locally_or_on_the_hub_says_both(rule_data, tmp_path, capsys, monkeypatch):
    """A `namespace/name` that is no local folder is looked up on the Hub: said before the lookup
    (offline it retries for most of a minute), and the error says the name is not local either."""
    import transformers

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.")

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    assert main(_args("runs/sft", rule_data, tmp_path / "r", "--dry-run")) == 2
    err = capsys.readouterr().err
    assert err.startswith("dpolab: model 'runs/sft' is not a local path: looking it up on the Hugging Face Hub"), err
    assert ("cannot load tokenizer 'runs/sft': not a local folder, and from the Hub: We couldn't connect to "
            "'https://huggingface.co'") in err, err
    assert not (tmp_path / "r").exists()


def test_dry_run_prints_summary_without_training(tiny_model_dir, rule_data, tmp_path, capsys):
    out = tmp_path / "dry"
    assert main(_args(tiny_model_dir, rule_data, out, "--dry-run")) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["data"]["rows"] == 64 and report["data"]["skipped"] == 0
    assert not out.exists()


def test_help_documents_every_option():
    res = subprocess.run([sys.executable, "-m", "dpolab", "dpo", "--help"], capture_output=True, text=True)
    assert res.returncode == 0
    from dataclasses import fields

    from dpolab.train.dpo import DPOConfig

    for f in fields(DPOConfig):
        assert "--" + f.name.replace("_", "-") in res.stdout, f.name


def test_prefix_sharing_trains_like_the_plain_batch(tiny_model_dir, rule_data, tmp_path):
    """--prefix-sharing computes the prompt once per pair; the result equals the plain (2B, T) path,
    with a live or a precomputed reference; unset, the check on the first pairs turns it on here."""
    common = ("--optimizer", "sgd", "--learning-rate", "0.5", "--max-steps", "2", "--batch-size", "4",
              "--no-group-by-length")  # the same batches for both layouts
    _run(tiny_model_dir, rule_data, tmp_path / "plain", "--no-prefix-sharing", *common)
    _run(tiny_model_dir, rule_data, tmp_path / "shared", "--prefix-sharing", "--no-precompute-ref", *common)
    _run(tiny_model_dir, rule_data, tmp_path / "shared-pre", "--prefix-sharing", *common)
    assert _run(tiny_model_dir, rule_data, tmp_path / "auto", *common)["prefix_sharing"] is True
    wa = _weights(tmp_path / "plain")
    for other in ("shared", "shared-pre", "auto"):
        wb = _weights(tmp_path / other)
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)


def test_prefix_sharing_forms_the_same_steps_under_length_bucketing(tiny_model_dir, rule_data, tmp_path):
    """The bucketed order was built from each layout's own widths, so turning prefix sharing on or off
    (it turns itself on where the model allows it) trained other pairs together: weights 4e-3 apart."""
    common = ("--optimizer", "sgd", "--learning-rate", "0.5", "--max-steps", "4", "--batch-size", "4",
              "--group-by-length")
    _run(tiny_model_dir, rule_data, tmp_path / "plain", "--no-prefix-sharing", *common)
    _run(tiny_model_dir, rule_data, tmp_path / "shared", "--prefix-sharing", *common)
    wa, wb = _weights(tmp_path / "plain"), _weights(tmp_path / "shared")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)


def test_length_bucketed_run_resumes_exactly(tiny_model_dir, rule_data, tmp_path):
    common = ("--group-by-length", "--learning-rate", "1e-3", "--max-steps", "6", "--batch-size", "4",
              "--save-steps", "3", "--save-total-limit", "5")
    full = tmp_path / "full"
    _run(tiny_model_dir, rule_data, full, *common)
    resumed = tmp_path / "resumed"
    _run(tiny_model_dir, rule_data, resumed, "--resume", full / "checkpoints" / "step-3", *common)
    wa, wb = _weights(full), _weights(resumed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    plain = tmp_path / "plain"
    _run(tiny_model_dir, rule_data, plain, "--no-group-by-length", *[c for c in common if c != "--group-by-length"])
    assert any(not torch.equal(wa[k], _weights(plain)[k]) for k in wa)  # the batches really differ


def test_max_prompt_length_defaults_to_half_of_max_length(tiny_model_dir, rule_data, tmp_path, capsys):
    """--max-length 128 alone: the prompt limit is 64 (a fixed default of 256 refused every
    --max-length <= 256 given without --max-prompt-length)."""
    import yaml

    out = tmp_path / "run"
    assert main(["dpo", "--model", str(tiny_model_dir), "--data", str(rule_data), "--output-dir", str(out),
                 "--max-length", "128", "--max-steps", "1", "--no-progress"]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["max_prompt_length"] == 64
    assert main(_args(tiny_model_dir, rule_data, tmp_path / "x", "--ref-update-alpha", "0.5", "--no-precompute-ref")) == 2
    assert "--ref-update-alpha is read only with --ref-update-steps" in capsys.readouterr().err


def test_bf16_weights_under_bf16_autocast(tiny_model_dir, rule_data, tmp_path):
    """--dtype bfloat16 --mixed-precision bf16 (TRL's torch_dtype + bf16=True): accelerate's forward
    returns float32 hidden states, which met the bf16 head weight in dpolab's fused head
    ("expected m1 and m2 to have the same dtype") in every trainer that reads log-probs."""
    out = tmp_path / "bf16"
    assert main(_args(tiny_model_dir, rule_data, out, "--dtype", "bfloat16", "--mixed-precision", "bf16",
                      "--max-steps", "2", "--batch-size", "4")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["prefix_sharing"] and math.isfinite(summary["eval/loss"])
    assert next(iter(_weights(out).values())).dtype == torch.bfloat16


def test_bf16_resume_into_a_new_folder_is_exact(tiny_model_dir, rule_data, tmp_path):
    """Under --mixed-precision bf16 a fresh run scores the reference with the policy (accelerate's
    autocast forward); a resume elsewhere loads the reference apart, which scored in float32 under
    the same cache key: 2e-5 off the uninterrupted run. It gets the same autocast forward now."""
    common = ("--learning-rate", "1e-3", "--max-steps", "4", "--batch-size", "4", "--save-steps", "2",
              "--mixed-precision", "bf16")
    full = tmp_path / "full"
    _run(tiny_model_dir, rule_data, full, *common)
    resumed = tmp_path / "resumed"
    _run(tiny_model_dir, rule_data, resumed, "--resume", full / "checkpoints" / "step-2", *common)
    wa, wb = _weights(full), _weights(resumed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_resume_that_cannot_continue_is_refused_before_any_model_loads(tiny_model_dir, rule_data, tmp_path,
                                                                         monkeypatch, capsys):
    """Another --optimizer, a --max-steps or an --epochs count ending before the checkpoint were refused
    after the model load and the whole reference precompute, which also wrote a new cache file into
    the run folder; now before either."""
    import dpolab.lm.loading as loading

    run = tmp_path / "run"
    common = ("--batch-size", "4", "--save-steps", "2", "--eval-fraction", "0")
    assert main(_args(tiny_model_dir, rule_data, run, "--max-steps", "2", *common)) == 0
    cache = run / "cache"
    shutil.rmtree(cache)
    loaded = []
    real = loading.load_trainable_lm
    monkeypatch.setattr(loading, "load_trainable_lm", lambda cfg: loaded.append(1) or real(cfg))
    for extra, message in ((("--max-steps", "4", "--optimizer", "sgd"), "whose state cannot continue sgd"),
                           (("--max-steps", "1"), "is at step 2, past the 1 steps of this run")):
        assert main(_args(tiny_model_dir, rule_data, run, *common, "--resume", "latest", *extra)) == 2
        assert message in capsys.readouterr().err
        assert not loaded and not cache.exists(), extra
    assert main(_args(tiny_model_dir, rule_data, run, *common, "--resume", "latest", "--max-steps", "0",
                      "--epochs", "0.05")) == 2  # steps planned from the data: after the model, before the cache
    assert "past the 1 steps of this run" in capsys.readouterr().err and not cache.exists()
