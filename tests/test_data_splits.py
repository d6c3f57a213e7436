"""``--data-split`` / ``--eval-split``: every trainer reads the named splits of a hub dataset or a
``save_to_disk`` DatasetDict (as UltraFeedback's ``train_prefs`` / ``test_prefs``), and a split
that is not there is a clear error naming it and the splits that are."""

from __future__ import annotations

import json

import pytest

from dpolab.cli import main


def _rows(n: int, tag: str, kind: str) -> list[dict]:
    if kind == "sft":
        return [{"prompt": f"Q{tag}{i}:", "completion": " good answer"} for i in range(n)]
    if kind == "prompts":
        return [{"prompt": f"Q{tag}{i}:", "answer": "a"} for i in range(n)]
    return [{"prompt": f"Q{tag}{i}:", "chosen": " good answer", "rejected": " bad answer"} for i in range(n)]


def _dataset_dict(path, kind: str):
    import datasets

    datasets.DatasetDict({"train_prefs": datasets.Dataset.from_list(_rows(12, "t", kind)),
                          "test_prefs": datasets.Dataset.from_list(_rows(3, "e", kind))}).save_to_disk(str(path))
    return path


def _dry_run_data(capsys, argv: list[str]) -> dict:
    assert main(argv) == 0
    out = capsys.readouterr().out
    return json.loads(out[out.index("{"):out.rindex("}") + 1])["data"]


@pytest.mark.parametrize("command,kind", [("dpo", "pairs"), ("rm", "pairs"), ("kto", "pairs"), ("sft", "sft")])
def test_offline_trainers_read_the_named_splits(command, kind, tiny_model_dir, tmp_path, capsys):
    data = _dataset_dict(tmp_path / "dict", kind)
    base = [command, "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(tmp_path / "o"),
            "--dry-run", "--no-progress"]
    report = _dry_run_data(capsys, [*base, "--data-split", "train_prefs", "--eval-data", str(data),
                                    "--eval-split", "test_prefs"])
    per_row = 2 if command == "kto" else 1  # KTO splits each pair into a desirable and an undesirable row
    assert (report["train_rows"], report["eval_rows"]) == (12 * per_row, 3 * per_row), report
    assert main(base) == 2  # the default "train" is not there: the error names it and the splits there are
    err = capsys.readouterr().err
    assert "no split 'train'" in err and "train_prefs" in err and "Traceback" not in err


def test_on_policy_trainers_read_the_named_split(tiny_model_dir, tmp_path, capsys):
    data = _dataset_dict(tmp_path / "dict", "prompts")
    base = ["grpo", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(tmp_path / "o"),
            "--reward", "dpolab.rewards.tasks:exact_match", "--dry-run", "--no-progress"]
    report = _dry_run_data(capsys, [*base, "--data-split", "test_prefs"])
    assert report["prompts"] == 3, report
    assert main(base) == 2
    assert "no split 'train'" in capsys.readouterr().err


def test_eval_split_alone_names_a_split_of_data(tmp_path, capsys):
    """--eval-split without --eval-data was ignored silently (the evaluation held out --eval-fraction
    of the training split, whatever the split's name, even one that does not exist)."""
    from dpolab.config import make_config
    from dpolab.errors import ConfigError
    from dpolab.train.dpo import DPOConfig

    folder = tmp_path / "dd"
    folder.mkdir()
    base = {"model": "m", "data": str(folder)}
    cfg = make_config(DPOConfig, {**base, "eval_split": "test"})
    assert (cfg.eval_data, cfg.eval_split) == (str(folder), "test")
    assert make_config(DPOConfig, base).eval_data is None and make_config(DPOConfig, base).eval_split is None
    with pytest.raises(ConfigError, match="--eval-split train is the training split"):
        make_config(DPOConfig, {**base, "eval_split": "train"})
    afile = tmp_path / "pairs.jsonl"
    afile.write_text("{}\n")
    with pytest.raises(ConfigError, match="is a file, which has no splits"):
        make_config(DPOConfig, {**base, "data": str(afile), "eval_split": "valid"})
    with pytest.raises(ConfigError, match="--data-split validation: --data .* is a file, which has no splits"):
        make_config(DPOConfig, {**base, "data": str(afile), "data_split": "validation"})  # it trained on all of it
    # the config.yaml of runs before: eval_split test beside a file, to resume as it was; said, since
    # an --eval-split test given for a file is not what is evaluated on
    capsys.readouterr()
    assert make_config(DPOConfig, {**base, "data": str(afile), "eval_split": "test"}).eval_data is None
    assert "note: --eval-split test: --data" in capsys.readouterr().err
