"""`dpolab dpo` with the whole loss family: every registered loss trains through the CLI, weighted
combinations log each term, WPO weights, TR-DPO's reference updates (and their exact resume), BCO's
running shift, and the options a loss does not read are refused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.test_train_dpo import write_rule_data

from dpolab.cli import main
from dpolab.losses.dpo import PREFERENCE_LOSSES


@pytest.fixture()
def rule_data(tmp_path):
    return write_rule_data(tmp_path / "prefs.jsonl", n=32)


def _args(model_dir, data, out, *extra):
    return ["dpo", "--model", str(model_dir), "--data", str(data), "--output-dir", str(out), "--max-length", "48",
            "--max-prompt-length", "24", "--no-progress", "--eval-fraction", "0", "--batch-size", "4",
            "--learning-rate", "1e-3", "--logging-steps", "1", *map(str, extra)]


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("loss", PREFERENCE_LOSSES)
def test_every_registered_loss_trains_through_the_cli(tiny_model_dir, rule_data, tmp_path, loss):
    out = tmp_path / loss
    assert main(_args(tiny_model_dir, rule_data, out, "--loss", loss, "--max-steps", 2)) == 0
    rows = _rows(out)
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    cfg = (out / "config.yaml").read_text()
    assert f"loss: {loss}" in cfg


def test_combination_logs_each_term_and_sums_them(tiny_model_dir, rule_data, tmp_path):
    out = tmp_path / "mix"
    assert main(_args(tiny_model_dir, rule_data, out, "--loss", "sigmoid,ipo", "--loss-weights", "1,0.5",
                      "--max-steps", 1, "--no-prefix-sharing")) == 0
    (row,) = _rows(out)
    assert row["loss"] == pytest.approx(row["losses/sigmoid"] + 0.5 * row["losses/ipo"], rel=1e-6)
    # at policy = reference (step 1): DPO's loss is ln 2, IPO's (0 − 1/(2β))² with β = 0.1
    assert row["losses/sigmoid"] == pytest.approx(math.log(2), abs=1e-6)
    assert row["losses/ipo"] == pytest.approx(25.0, abs=1e-4)


def test_wpo_weights_scale_each_pair_loss(tiny_model_dir, rule_data, tmp_path):
    """At step 1 (policy = reference) every DPO pair loss is ln 2, so the weighted mean loss is
    ln 2 times the mean WPO weight."""
    out = tmp_path / "wpo"
    assert main(_args(tiny_model_dir, rule_data, out, "--wpo", "--max-steps", 2)) == 0
    first = _rows(out)[0]
    assert first["wpo/weight"] > 0 and first["wpo/weight"] != pytest.approx(1.0)
    assert first["loss"] == pytest.approx(math.log(2) * first["wpo/weight"], rel=1e-5)


def test_wpo_pair_losses_weight_recomputed_from_the_logits(tiny_model):
    """The trainer's WPO weight (:func:`pair_losses` with ``wpo``) against one recomputed here from
    each unpadded row's own logits z_t: a_t = log softmax(z_t)[y_t] − log Σ_v softmax(z_t)_v²
    (docs/dpo.md, WPO eq. 2), w = exp(mean_t a_t(chosen) + mean_t a_t(rejected)). The reference is
    the policy itself, so each DPO pair loss is ln 2 · w."""
    from dpolab.data.collate import collate_preference
    from dpolab.data.preference import TokenizedPair
    from dpolab.train.dpo import DPOConfig
    from dpolab.train.pair_layout import pair_losses

    pairs = [TokenizedPair([5, 6, 7], [8, 9], [10, 11, 12], 0, False), TokenizedPair([5, 13], [14], [15, 16], 1, False)]

    def direct(prompt, response):  # (Σ_t log π(y_t), Σ_t a_t, |y|) of one row, unpadded
        ids = torch.tensor([prompt + response])
        z = tiny_model(input_ids=ids).logits[0, len(prompt) - 1:-1].double()  # the positions predicting y
        logp = torch.log_softmax(z, -1)[torch.arange(len(response)), torch.tensor(response)]
        log_sq = torch.log((torch.softmax(z, -1) ** 2).sum(-1))
        return logp.sum(), (logp - log_sq).sum(), len(response)

    with torch.no_grad():
        chosen = [direct(p.prompt_ids, p.chosen_ids) for p in pairs]
        rejected = [direct(p.prompt_ids, p.rejected_ids) for p in pairs]
        ref = (torch.stack([c[0] for c in chosen]).float(), torch.stack([r[0] for r in rejected]).float())
        cfg = DPOConfig(model="m", data="d", wpo=True)
        losses, stats = pair_losses(cfg, tiny_model, collate_preference(pairs, 0), ref)
    w = torch.stack([torch.exp(c[1] / c[2] + r[1] / r[2]) for c, r in zip(chosen, rejected)])
    assert ((w - 1).abs() > 1e-3).all()  # not the trivial weight
    torch.testing.assert_close(losses.double(), math.log(2) * w, rtol=1e-5, atol=0)
    assert stats["wpo/weight"] == pytest.approx(w.mean().item(), rel=1e-5)


def test_token_log_sq_norms_and_their_sums_in_both_layouts(tiny_model, tiny_tokenizer):
    from dpolab.data.collate import collate_preference, collate_prefix_shared
    from dpolab.data.preference import TokenizedPair
    from dpolab.lm.logps import token_log_sq_norms
    from dpolab.train.pair_layout import batch_logps

    z = torch.randn(3, 5, 11, dtype=torch.float64)
    direct = torch.log((torch.softmax(z, -1) ** 2).sum(-1))
    torch.testing.assert_close(token_log_sq_norms(z, chunk_size=4), direct, rtol=0, atol=1e-12)
    pairs = [TokenizedPair([5, 6, 7], [8, 9], [10, 11, 12], 0, False), TokenizedPair([5, 13], [14], [15, 16], 1, False)]
    with torch.no_grad():
        _, _, plain = batch_logps(tiny_model, collate_preference(pairs, 0), with_sq_norms=True)
        _, _, shared = batch_logps(tiny_model, collate_prefix_shared(pairs, 0), with_sq_norms=True)
    torch.testing.assert_close(plain, shared, rtol=0, atol=1e-5)
    assert (plain <= 0).all()


def test_tr_dpo_hard_update_makes_the_next_step_start_at_the_reference(tiny_model_dir, rule_data, tmp_path):
    """τ = 1, α = 1: after every step π_ref ← π_θ, so every step's loss is computed at policy =
    reference: exactly ln 2 for DPO, and the implicit rewards are 0 (the margins 0)."""
    out = tmp_path / "tr"
    assert main(_args(tiny_model_dir, rule_data, out, "--no-precompute-ref", "--ref-update-steps", 1,
                      "--max-steps", 3, "--learning-rate", "1e-2")) == 0
    rows = _rows(out)
    assert all(r["loss"] == pytest.approx(math.log(2), abs=1e-6) for r in rows)
    assert all(abs(r["rewards/margins"]) < 1e-6 for r in rows)
    # without the update the policy moves away from the reference: the loss leaves ln 2
    plain = tmp_path / "plain"
    assert main(_args(tiny_model_dir, rule_data, plain, "--no-precompute-ref", "--max-steps", 3,
                      "--learning-rate", "1e-2")) == 0
    assert abs(_rows(plain)[-1]["loss"] - math.log(2)) > 1e-4


def test_tr_dpo_soft_updates_resume_exactly(tiny_model_dir, rule_data, tmp_path):
    common = ("--no-precompute-ref", "--ref-update-steps", 2, "--ref-update-alpha", 0.5, "--max-steps", 5,
              "--save-steps", 1, "--save-total-limit", 10, "--learning-rate", "1e-2")
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert main(_args(tiny_model_dir, rule_data, full, *common)) == 0
    assert (full / "checkpoints" / "step-3" / "reference.safetensors").is_file()
    assert main(_args(tiny_model_dir, rule_data, resumed, *common, "--resume", full / "checkpoints" / "step-3")) == 0
    a, b = load_file(str(full / "final" / "model.safetensors")), load_file(str(resumed / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = ("tokens_per_second",)
    tail = lambda run: [{k: v for k, v in r.items() if k not in strip} for r in _rows(run) if r["step"] > 3]  # noqa: E731
    assert tail(full) == tail(resumed)


def test_bco_shift_is_a_running_mean_carried_by_checkpoints(tiny_model_dir, rule_data, tmp_path):
    out = tmp_path / "bco"
    assert main(_args(tiny_model_dir, rule_data, out, "--loss", "bco_pair", "--max-steps", 3,
                      "--learning-rate", "1e-2")) == 0
    rows = _rows(out)
    state = json.loads((out / "checkpoints" / "step-3" / "trainer_state.json").read_text())["algorithm"]
    n = 2 * 4  # rewards per step: chosen and rejected of 4 pairs
    expected = sum((r["rewards/chosen"] + r["rewards/rejected"]) * n / 2 for r in rows) / (3 * n)
    assert state["bco_count"] == 3 * n
    assert state["bco_delta"] == pytest.approx(expected, rel=1e-6, abs=1e-9)
    # step 1 uses δ = 0: at policy = reference the BCO loss is 2·ln 2
    assert rows[0]["loss"] == pytest.approx(2 * math.log(2), abs=1e-6)


def test_tr_dpo_refuses_a_reference_of_another_shape_before_training(tiny_model_dir, tiny_tokenizer, rule_data,
                                                                      tmp_path, capsys):
    """A --ref-model of another size trained --ref-update-steps steps, then failed in the update with a
    bare RuntimeError and nothing saved."""
    from dpolab.lm.tiny import tiny_llama

    other = tmp_path / "wider"
    tiny_llama(len(tiny_tokenizer), hidden_size=48, layers=2, heads=4, tokenizer=tiny_tokenizer).save_pretrained(other)
    tiny_tokenizer.save_pretrained(other)
    out = tmp_path / "run"
    assert main(_args(tiny_model_dir, rule_data, out, "--no-precompute-ref", "--ref-update-steps", 2, "--ref-model",
                      other, "--max-steps", 4)) == 2
    err = capsys.readouterr().err.strip()
    assert "--ref-update-steps blends the policy into --ref-model" in err and err.count("\n") == 0, err
    assert not (out / "metrics.jsonl").exists()


def test_bco_shift_in_a_combination_follows_bcos_own_rewards(tiny_model_dir, rule_data, tmp_path):
    """In a combination δ was the running mean of the FIRST term's rewards (orpo,bco_pair: ORPO's
    λ·mean log-prob, -0.58; bco_pair,orpo: BCO's βρ, 0.01): a sum whose order of names mattered."""
    deltas = []
    for losses in ("orpo,bco_pair", "bco_pair,orpo"):
        out = tmp_path / losses.replace(",", "-")
        assert main(_args(tiny_model_dir, rule_data, out, "--loss", losses, "--max-steps", 2,
                          "--learning-rate", "1e-2")) == 0
        rows = _rows(out)
        state = json.loads((out / "checkpoints" / "step-2" / "trainer_state.json").read_text())["algorithm"]
        assert state["bco_delta"] == pytest.approx(sum(r["bco/rewards"] for r in rows) / 2, rel=1e-6, abs=1e-9)
        deltas.append(state["bco_delta"])
    assert deltas[0] == pytest.approx(deltas[1], rel=1e-5, abs=1e-7), deltas
    assert abs(deltas[0]) < 0.1  # βρ near the start, not ORPO's log-probs


def test_options_no_loss_reads_and_bad_combinations_are_refused(tiny_model_dir, rule_data, tmp_path, capsys):
    def err(*extra) -> str:
        assert main(_args(tiny_model_dir, rule_data, tmp_path / "bad", *extra)) == 2
        return capsys.readouterr().err

    assert "--simpo-gamma is not read by --loss sigmoid" in err("--simpo-gamma", 0.5)
    assert "--orpo-lambda is not read" in err("--loss", "sigmoid,ipo", "--orpo-lambda", 0.2)
    assert "did you mean 'nca_pair'" in err("--loss", "sigmoid,nca_pairr")
    assert "one weight >= 0 per loss" in err("--loss", "sigmoid,ipo", "--loss-weights", "1")
    assert "stale" in err("--ref-update-steps", 2)
    assert "--beta is not read by --loss orpo" in err("--loss", "orpo", "--beta", 0.5)  # ORPO's weight is λ
    for loss in ("simpo", "orpo,cpo"):  # reference-free: a reference model would be loaded for nothing
        assert f"--ref-model is not used by --loss {loss}, which needs no reference model" in err(
            "--loss", loss, "--ref-model", tiny_model_dir)
    assert "--ref-cache-dir is not used by --loss simpo" in err("--loss", "simpo", "--ref-cache-dir", tmp_path / "c")
    assert "--ref-cache-dir is read only when reference log-probs are precomputed" in err(
        "--no-precompute-ref", "--ref-cache-dir", tmp_path / "c")  # it was ignored: nothing cached there
    assert "cannot load --ref-model '" + str(tmp_path / "none") + "': no such folder" in err(
        "--ref-model", tmp_path / "none", "--dry-run")  # the dry run checks it as the real run does
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("flags, message", [
    (("--rpo-alpha", -1), "--loss sigmoid: --rpo-alpha must be >= 0, got -1.0"),
    (("--loss", "orpo", "--orpo-lambda", -1), "--loss orpo: --orpo-lambda must be > 0"),
    (("--loss", "cpo", "--cpo-alpha", -1), "--loss cpo: --cpo-alpha must be >= 0"),
    (("--loss", "discopop", "--discopop-tau", 0), "--loss discopop: --discopop-tau must be > 0"),
    (("--loss", "exo_pair", "--label-smoothing", 0), "--label-smoothing must be in (0, 0.5] for exo_pair"),
    (("--loss", "robust", "--label-smoothing", 0.5), "--label-smoothing must be in [0, 0.5) for robust DPO"),
    (("--loss", "sigmoid,aot", "--label-smoothing", 0.7), "--label-smoothing must be in [0, 0.5] for DPO/cDPO"),
])
def test_each_losss_option_ranges_are_checked_before_any_work(tiny_model_dir, rule_data, tmp_path, capsys,
                                                              flags, message):
    """The ranges each loss checks when it runs are checked at validation, by the flag's name: before,
    a real run loaded the model, wrote its run folder and reference cache, then died with a traceback at
    the first step (and --dry-run accepted the values)."""
    for extra in (("--dry-run",), ()):
        assert main(_args(tiny_model_dir, rule_data, tmp_path / "bad", *flags, *extra)) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "bad").exists()


def test_cdpo_takes_label_smoothing_one_half_as_documented(tiny_model_dir, rule_data, tmp_path):
    """ε = 0.5 makes cDPO's loss constant (log 2) at any margin (docs/dpo.md: ε ∈ [0, 0.5])."""
    out = tmp_path / "cdpo"
    assert main(_args(tiny_model_dir, rule_data, out, "--label-smoothing", 0.5, "--max-steps", 2)) == 0
    assert all(r["loss"] == pytest.approx(math.log(2), abs=1e-6) for r in _rows(out))


def test_single_loss_defaults_land_in_the_saved_config(tiny_model_dir, rule_data, tmp_path):
    out = tmp_path / "simpo"
    assert main(_args(tiny_model_dir, rule_data, out, "--loss", "simpo", "--max-steps", 1)) == 0
    cfg = (out / "config.yaml").read_text()
    assert "beta: 2.0" in cfg  # SimPO's own β, not DPO's 0.1
