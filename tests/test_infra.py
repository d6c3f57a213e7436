"""The shared infrastructure: CLI dispatch, config generation, run directory."""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass

import pytest

from dpolab.cli import main
from dpolab.config import load_yaml, opt, parse_config
from dpolab.errors import ConfigError, DataError
from dpolab.runs.rundir import RunDir


@dataclass
class _Cfg:
    beta: float = opt(0.1, "KL coefficient")
    loss: str = opt("sigmoid", "loss", choices=("sigmoid", "ipo"))
    steps: int = opt(10, "steps")
    lora: bool = opt(False, "use LoRA")
    name: str | None = opt(None, "optional name")
    names: list[str] | None = opt(None, "names, comma separated")
    weights: list[float] | None = opt(None, "weights, comma separated")


def test_config_precedence(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("beta: 0.5\nsteps: 3\n")
    cfg = parse_config(_Cfg, ["--config", str(cfg_file), "--steps", "7", "--lora"], prog="t")
    assert (cfg.beta, cfg.steps, cfg.lora, cfg.loss, cfg.name) == (0.5, 7, True, "sigmoid", None)


def test_a_repeated_list_option_adds_to_the_list(tmp_path):
    """`--reward a --reward b` kept only b (argparse's last value) while the run said nothing; now it is
    `--reward a,b`; given on the command line the list replaces the YAML file's."""
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("names: [x]\nweights: [9]\n")
    cfg = parse_config(_Cfg, ["--config", str(cfg_file), "--names", "a", "--names", "b,c", "--weights", "1",
                              "--weights", "2"], prog="t")
    assert (cfg.names, cfg.weights) == (["a", "b", "c"], [1.0, 2.0])
    assert parse_config(_Cfg, ["--config", str(cfg_file), "--steps", "1"], prog="t").names == ["x"]
    with pytest.raises(ConfigError, match=r"unrecognized arguments: 2 \(an option takes one value: give a list as "
                                          "one comma-separated value"):
        parse_config(_Cfg, ["--weights", "1", "2"], prog="t")
    cfg_file.write_text('names: "a, b"\n')  # a list given as one string: split at commas, each item stripped
    assert parse_config(_Cfg, ["--config", str(cfg_file)], prog="t").names == ["a", "b"]


def test_config_unknown_key_suggests(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("betta: 0.5\n")
    with pytest.raises(ConfigError, match="did you mean 'beta'"):
        load_yaml(cfg_file, _Cfg)


def test_a_flag_with_no_close_option_gets_no_suggestion(capsys):
    """Flags were compared with their "--": `dpolab rm --lora` suggested '--help', --lora-r '--no-dry-run'."""
    from dpolab.config import suggest
    from dpolab.train.rm import RewardConfig

    for flag, hint in (("--lora", None), ("--lora-r", None), ("--learning-rat", "--learning-rate"),
                       ("--max-step", "--max-steps")):
        with pytest.raises(ConfigError) as err:
            parse_config(RewardConfig, ["--model", "m", "--data", "d", flag, "1"], prog="t")
        assert ("did you mean" in str(err.value)) == (hint is not None), (flag, str(err.value))
        assert hint is None or f"did you mean '{hint}'" in str(err.value)
    assert suggest("sigmod", ["sigmoid", "ipo"]) == " (did you mean 'sigmoid'?)"


def test_config_names_the_line_and_refuses_a_key_given_twice(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("beta: 0.5\nsteps: 3\nbeta: 0.7\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:3: 'beta' is given twice \(first on line 1\)"):
        load_yaml(cfg_file, _Cfg)
    cfg_file.write_text("beta: 0.5\nsteps: ten\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:2: 'steps' must be of type int"):
        load_yaml(cfg_file, _Cfg)
    cfg_file.write_text("beta: 0.5\n\nbetta: 0.5\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:3: unknown option 'betta'"):
        load_yaml(cfg_file, _Cfg)


def test_config_booleans_read_alike_in_yaml_and_on_the_command_line(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    for text, want in (("lora: 1", True), ("lora: 0", False), ("lora: yes", True), ("lora: 'off'", False)):
        cfg_file.write_text(text + "\n")
        assert parse_config(_Cfg, ["--config", str(cfg_file)], prog="t").lora is want, text
    cfg_file.write_text("lora: 2\n")
    with pytest.raises(ConfigError, match="'lora' must be true or false, got 2"):
        parse_config(_Cfg, ["--config", str(cfg_file)], prog="t")


def test_a_yaml_integer_with_a_leading_zero_reads_as_on_the_command_line(tmp_path):
    """YAML 1.1 reads 0123 as octal (83): `steps: 0100` gave 64 steps, `--steps 0100` 100."""
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("steps: 0100\n")
    assert parse_config(_Cfg, ["--config", str(cfg_file)], prog="t").steps == 100
    assert parse_config(_Cfg, ["--steps", "0100"], prog="t").steps == 100
    cfg_file.write_text("steps: 0x10\n")  # an explicit base is still that base
    assert parse_config(_Cfg, ["--config", str(cfg_file)], prog="t").steps == 16


def test_negative_numbers_in_exponent_notation_are_values_not_options():
    """argparse took -1e-3 for an option ("--beta: expected one argument"); -1 and -.5 it read."""
    for text, want in (("-1e-3", -1e-3), ("-2.5E2", -250.0), ("-.5", -0.5), ("-3", -3.0)):
        assert parse_config(_Cfg, ["--beta", text], prog="t").beta == want, text
    assert parse_config(_Cfg, ["--weights", "-1e-2"], prog="t").weights == [-1e-2]
    with pytest.raises(ConfigError, match="unrecognized option '--nope'"):
        parse_config(_Cfg, ["--nope", "-1e-3"], prog="t")


def test_config_text_that_yaml_reads_as_a_boolean_or_a_float_is_refused(tmp_path):
    """`name: no` would be the text 'False', `name: 0.10` the text '0.1': refused with the advice to
    quote; an integer keeps its text, and quoted values pass as written."""
    cfg_file = tmp_path / "c.yaml"
    for text, kind in (("name: no", "a boolean"), ("name: 0.10", "a number"), ("name: 1e-3", None)):
        cfg_file.write_text(text + "\n")
        if kind is None:  # YAML 1.1 reads 1e-3 (no dot) as text
            assert parse_config(_Cfg, ["--config", str(cfg_file)], prog="t").name == "1e-3"
            continue
        with pytest.raises(ConfigError, match=rf"c\.yaml:1: 'name' is text, but YAML read .* as {kind} .*put it in "
                                              "quotes"):
            parse_config(_Cfg, ["--config", str(cfg_file)], prog="t")
    for text, want in (("name: 7", "7"), ("name: '0.10'", "0.10"), ("name: 'no'", "no")):
        cfg_file.write_text(text + "\n")
        assert parse_config(_Cfg, ["--config", str(cfg_file)], prog="t").name == want, text
    for text, number in (("12:30", 750), ("0x1F", 31), ("010", 10), ("1_000", 1000)):  # YAML 1.1 integers
        cfg_file.write_text(f"name: {text}\n")
        with pytest.raises(ConfigError, match=rf"c\.yaml:1: 'name' is text, but YAML read '{text}' as the number "
                                              rf"{number}; put it in quotes"):
            parse_config(_Cfg, ["--config", str(cfg_file)], prog="t")
    cfg_file.write_text("steps: 0x10\n")  # an integer option takes them as YAML reads them
    assert type(parse_config(_Cfg, ["--config", str(cfg_file)], prog="t").steps) is int


def test_config_list_option_given_one_yaml_scalar(tmp_path):
    """A list option given one value in YAML is a list of one, checked as a list's items are: text
    that YAML reads as a boolean, a float or an integer written otherwise asks for quotes."""
    cfg_file = tmp_path / "c.yaml"
    for text in ("names: no", "names: 0.10", "names: 12:30", "names: [no]"):
        cfg_file.write_text(text + "\n")
        with pytest.raises(ConfigError, match=r"c\.yaml:1: 'names' is text, but YAML read .*put it in quotes"):
            parse_config(_Cfg, ["--config", str(cfg_file)], prog="t")
    for text, field, want in (("names: a,b", "names", ["a", "b"]), ("names: 7", "names", ["7"]),
                              ("weights: 0.5", "weights", [0.5]), ("weights: 2", "weights", [2.0]),
                              ("weights: [1, 0.5]", "weights", [1.0, 0.5])):
        cfg_file.write_text(text + "\n")
        assert getattr(parse_config(_Cfg, ["--config", str(cfg_file)], prog="t"), field) == want, text


def test_config_bad_values():
    with pytest.raises(ConfigError, match="--steps"):
        parse_config(_Cfg, ["--steps", "ten"], prog="t")
    with pytest.raises(ConfigError, match="did you mean 'ipo'"):
        parse_config(_Cfg, ["--loss", "ipoo"], prog="t")
    with pytest.raises(ConfigError, match="unrecognized"):
        parse_config(_Cfg, ["--nope", "1"], prog="t")


def test_data_error_names_file_line_field():
    err = DataError("must be a string", path="d.jsonl", line=3, field="chosen")
    assert str(err) == "d.jsonl:3: field 'chosen': must be a string"


def test_cli_help_and_unknown(capsys):
    assert main(["--help"]) == 0
    assert "usage: dpolab" in capsys.readouterr().out
    assert main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_output_to_a_closed_pipe_ends_quietly(tmp_path):
    """`dpolab rl solve ... | head`: the reader is gone before the table is printed; a quiet exit
    (141, as a tool stopped by SIGPIPE) instead of a BrokenPipeError traceback."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "dpolab", "rl", "solve", "--env", "qtable-gridworld"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    proc.stdout.close()  # before anything is written: the first print fails
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == "", err


def test_rundir_checkpoints_atomic_and_rotated(tmp_path):
    run = RunDir(tmp_path / "run", keep_last=2)
    for step in (1, 2, 3):
        run.save_checkpoint(step, lambda d, s=step: (d / "state.json").write_text(json.dumps({"s": s})))
    names = sorted(p.name for p in run.list_checkpoints())
    assert names == ["step-2", "step-3"]
    assert run.resolve_checkpoint("latest").name == "step-3"
    # a failing writer leaves the previous checkpoint and `latest` untouched
    with pytest.raises(RuntimeError):
        run.save_checkpoint(4, lambda d: (_ for _ in ()).throw(RuntimeError("boom")))
    assert run.resolve_checkpoint("latest").name == "step-3"
    assert not (run.checkpoints / "step-4").exists()


def test_rundir_metrics_truncate_on_resume(tmp_path):
    run = RunDir(tmp_path / "run")
    for step in range(1, 6):
        run.log(step, {"loss": float(step)})
    run.truncate_metrics(3)
    rows = [json.loads(x) for x in run.metrics_path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    summary = run.write_summary({"eval/loss": 0.5}, steps=3)
    assert summary["steps"] == 3 and "wall_seconds" in summary


def test_abbreviated_flags_are_rejected():
    """A prefix of a flag is not accepted: it would silently change meaning when options are added."""
    with pytest.raises(ConfigError, match="--ste"):
        parse_config(_Cfg, ["--ste", "3"], prog="t")


def test_a_config_built_in_python_is_converted_and_checked_as_the_command_line_does(tmp_path):
    from dpolab.config import check_config
    from dpolab.train.dpo import DPOConfig

    cfg = check_config(DPOConfig(model=tmp_path / "m", data=tmp_path / "d.jsonl", batch_size="2", beta="0.5",
                                 loss="sigmoid,ipo", loss_weights="1,0.5"))
    assert (cfg.model, cfg.data) == (str(tmp_path / "m"), str(tmp_path / "d.jsonl"))  # text, as config.yaml needs
    assert (cfg.batch_size, cfg.beta, cfg.loss_weights) == (2, 0.5, [1.0, 0.5])
    assert check_config(cfg) is cfg
    import dataclasses

    assert set(vars(cfg)) == {f.name for f in dataclasses.fields(cfg)}  # vars(cfg) is printed and saved
    for bad, message in (({"beta": -1.0}, "beta"), ({"loss": "bogus"}, "unknown loss 'bogus'"),
                         ({"max_steps": 1.5}, "'max_steps' must be of type int"),
                         ({"learning_rate": float("nan")}, "learning_rate")):
        with pytest.raises(ConfigError, match=message):
            check_config(DPOConfig(model="m", data="d", **bad))
    changed = check_config(DPOConfig(model="m", data="d"))
    changed.beta = -1.0  # a sweep that edits a checked config: checked again
    with pytest.raises(ConfigError, match="beta"):
        check_config(changed)


def test_train_from_python_refuses_a_bad_config_before_any_work(tiny_model_dir, tmp_path):
    from dpolab.train.dpo import DPOConfig, train

    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="unknown loss 'bogus'"):
        train(DPOConfig(model=tiny_model_dir, data=tmp_path / "missing.jsonl", loss="bogus", output_dir=out))
    assert not out.exists()


def test_check_config_leaves_the_callers_object_as_it_was():
    """validate() resolves a loss's β: a sweep copying the object (dataclasses.replace) must not
    inherit the first loss's β, and an edit to an equal value of another type is converted again."""
    import dataclasses

    from dpolab.config import check_config
    from dpolab.train.dpo import DPOConfig

    base = DPOConfig(model="m", data="d")
    checked = check_config(base)
    assert base.beta is None and checked.beta == 0.1 and checked is not base
    assert check_config(dataclasses.replace(base, loss="simpo")).beta == 2.0  # SimPO's own default
    checked.batch_size = 2.0  # equal to 2, another type: checked again
    assert type(check_config(checked).batch_size) is int


def test_outputs_that_are_not_plain_files_are_written_not_replaced(tmp_path):
    """The temporary-file-and-rename replaced what the path named: /dev/null became a plain file (as
    root), a FIFO's reader got nothing, a link to /dev/stdout (/proc/self/fd/1) was replaced and a
    link to a file was replaced by a file, its target left as it was."""
    import threading

    from dpolab.runs.rundir import atomic_write_text

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()), daemon=True)
    reader.start()
    link_to_fifo = tmp_path / "stdout-like"
    link_to_fifo.symlink_to(fifo)
    atomic_write_text(link_to_fifo, "through the pipe\n")
    reader.join(timeout=10)
    assert got == ["through the pipe\n"] and stat.S_ISFIFO(os.lstat(fifo).st_mode) and link_to_fifo.is_symlink()
    target, link = tmp_path / "real.json", tmp_path / "link.json"
    target.write_text("old")
    link.symlink_to(target)
    atomic_write_text(link, b"new")
    assert link.is_symlink() and target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "link.json", "real.json", "stdout-like"]


def test_make_config_converts_as_the_command_line_does_and_refuses_empty_paths():
    """make_config(cls, dict) took "no" for a bool as True (a LoRA run) and "4" for an int (a TypeError
    at the first comparison); an optional path given empty (an unset shell variable) named the working
    directory: --eval-data "" read every test file below it as the evaluation data."""
    from dpolab.config import make_config
    from dpolab.train.dpo import DPOConfig

    cfg = make_config(DPOConfig, {"model": "m", "data": "d", "lora": "no", "batch_size": "4", "beta": "0.5"})
    assert (cfg.lora, cfg.batch_size, cfg.beta) == (False, 4, 0.5)
    with pytest.raises(ConfigError, match="'--batch-size' must be of type int, got 'four'"):
        make_config(DPOConfig, {"model": "m", "data": "d", "batch_size": "four"})
    for name in ("eval_data", "ref_model", "ref_cache_dir"):
        with pytest.raises(ConfigError, match=f"--{name.replace('_', '-')} is empty"):
            make_config(DPOConfig, {"model": "m", "data": "d", name: " "})


def test_the_console_note_on_skipped_and_cut_rows():
    from dpolab.train.engine import data_note

    assert data_note({"rows": 9, "skipped": 0, "truncated": 0}) is None
    assert data_note({"rows": 9, "skipped": 1, "skipped_examples": ["d.jsonl:9: no room"], "truncated": 2}) == (
        "note: 1 of 9 rows skipped (the first: d.jsonl:9: no room); 2 rows cut to fit the length limits; "
        "data_report.json in the run folder has the counts")
    assert data_note({"rows": 9, "skipped": 0, "truncated": 0, "identical": 1, "repeats_prompt": 2,
                      "repeats_prompt_examples": ["d.jsonl:3"]}) == (
        "note: 1 pairs with the same chosen and rejected response (no signal in them); 2 pairs whose chosen and "
        "rejected both begin with their prompt (the first: d.jsonl:3): give the responses alone, or leave the "
        "prompt field out for whole texts; data_report.json in the run folder has the counts")
    assert data_note({"rows": 9, "duplicates": 2, "duplicate_examples": ["d.jsonl:8 (= d.jsonl:2)"]}) == (
        "note: 2 rows repeating an earlier row (the first: d.jsonl:8 (= d.jsonl:2)); data_report.json in the run "
        "folder has the counts")
    assert data_note({"prompts": 64, "truncated": 64, "eval_truncated": 5}) == (
        "note: 64 prompts cut to fit the length limits; 5 evaluation prompts cut to fit --max-prompt-length; "
        "data_report.json in the run folder has the counts")


def test_a_flag_these_settings_do_not_read_is_warned_about(capsys, tmp_path):
    """--lora-r without --lora, rloo's --epsilon with --update reinforce, ppo's --target-kl without
    --adaptive-kl ... had no effect, said nowhere. Flags only: a run's config.yaml holds every option."""
    from dpolab.train.ppo import PPOConfig
    from dpolab.train.rloo import RLOOConfig

    base = ["--model", "m", "--data", "d", "--reward", "a:b"]
    parse_config(RLOOConfig, [*base, "--epsilon", "0.3", "--lora-r", "8"], prog="t")
    assert capsys.readouterr().err.splitlines() == [
        "warning: --epsilon is read only with --update clip; it has no effect here",
        "warning: --lora-r is read only with --lora; it has no effect here"]
    parse_config(RLOOConfig, [*base, "--epsilon", "0.3", "--update", "clip", "--lora", "--lora-r", "8"], prog="t")
    parse_config(PPOConfig, [*base, "--adaptive-kl", "--target-kl", "3"], prog="t")
    assert capsys.readouterr().err == ""
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("lora_r: 8\ntarget_kl: 3\n")
    parse_config(PPOConfig, [*base, "--config", str(cfg_file)], prog="t")
    assert capsys.readouterr().err == ""
    parse_config(RLOOConfig, [*base, "--epochs", "2", "--max-steps", "4"], prog="t")
    assert capsys.readouterr().err == "warning: --epochs is read only with --max-steps unset; it has no effect here\n"
    parse_config(RLOOConfig, [*base, "--epochs", "2"], prog="t")
    assert capsys.readouterr().err == ""


def test_config_files_given_twice_are_layered(tmp_path):
    """A second --config replaced the first silently; a later file's keys now override an earlier's
    (a base file and an experiment's), and flags override both."""
    base, exp = tmp_path / "base.yaml", tmp_path / "exp.yaml"
    base.write_text("beta: 0.5\nnames: [a, b]\n")
    exp.write_text("beta: 0.25\n")
    cfg = parse_config(_Cfg, ["--config", str(base), "--config", str(exp)], prog="t")
    assert (cfg.beta, cfg.names) == (0.25, ["a", "b"])
    assert parse_config(_Cfg, ["--config", str(base), "--config", str(exp), "--beta", "1"], prog="t").beta == 1.0


def test_a_whole_number_written_as_a_float_is_an_int_on_the_command_line_as_in_yaml(tmp_path):
    """YAML read `steps: 2.0` as 2 and `--steps 2.0` was refused; `--steps 1e3` (1000 steps) too."""
    assert [parse_config(_Cfg, ["--steps", v], prog="t").steps for v in ("4", "4.0", "1e3")] == [4, 4, 1000]
    for bad in ("2.5", "inf", "nan", "x"):
        with pytest.raises(ConfigError, match="'--steps' must be of type int"):
            parse_config(_Cfg, ["--steps", bad], prog="t")
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("steps: 4.0\n")
    assert parse_config(_Cfg, ["--config", str(cfg_file)], prog="t").steps == 4


def test_a_comma_separated_text_option_takes_a_yaml_list(tmp_path):
    """`report_to: [tensorboard]` and `lora_target_modules: [q_proj, v_proj]` (as TRL's and PEFT's
    configs write them) were refused as not text."""
    from dpolab.config import make_config
    from dpolab.train.dpo import DPOConfig

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("report_to: [tensorboard]\nlora_target_modules: [q_proj, v_proj]\n")
    cfg = parse_config(DPOConfig, ["--model", "m", "--data", "d", "--config", str(cfg_file)], prog="t")
    assert (cfg.report_to, cfg.lora_target_modules) == ("tensorboard", "q_proj,v_proj")
    assert make_config(DPOConfig, {"model": "m", "data": "d", "lora_target_modules": ["q_proj"]}).lora_target_modules \
        == "q_proj"
    with pytest.raises(ConfigError, match="model"):
        make_config(DPOConfig, {"model": ["a", "b"], "data": "d"})  # not a list option: still refused


def test_a_config_from_a_pipe_is_read(tmp_path):
    """`--config <(printf ...)` names /dev/fd/N, a pipe: 'config file not found' though it was there."""
    import os
    import threading

    fifo = tmp_path / "c.yaml"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text("beta: 0.5\n"))
    writer.start()
    try:
        assert parse_config(_Cfg, ["--config", str(fifo)], prog="t").beta == 0.5
    finally:
        writer.join(timeout=10)
    with pytest.raises(ConfigError, match="is a folder, not a YAML file"):
        parse_config(_Cfg, ["--config", str(tmp_path)], prog="t")
