"""Fuzzing the user-facing inputs (issue 8): malformed Parquet (random bytes, cut files, valid files
with wrong column types) through the real preference/SFT/prompt loaders, and malformed YAML configs
(random text, wrong types, unknown keys, unsafe tags, deep nesting) through ``parse_config``.
The only acceptable failure is a :class:`DpolabError` subclass; success must give sane objects.
(JSONL/CSV/JSON bytes are fuzzed in tests/test_data_loading.py.)"""

from __future__ import annotations

import io
import tempfile
import types
import typing
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpolab.config import parse_config
from dpolab.data import load_preference_data
from dpolab.data.prompts import load_prompts
from dpolab.data.sft import load_sft_data
from dpolab.errors import ConfigError, DpolabError
from dpolab.train.dpo import DPOConfig

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                      HealthCheck.too_slow])

# -- Parquet ------------------------------------------------------------------------------------
COLUMNS = ["prompt", "chosen", "rejected", "completion", "text", "messages", "other"]
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "robot", ""]),
                                 "content": st.one_of(st.text(max_size=20), st.none())})
# One pyarrow-compatible strategy per column type, so each generated column is homogeneous.
COLUMN_VALUES = [
    st.text(max_size=30),
    st.one_of(st.text(max_size=30), st.none()),
    st.integers(-2**40, 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.binary(max_size=20),
    st.lists(st.text(max_size=10), max_size=3),
    st.lists(MESSAGE, max_size=4),
    st.fixed_dictionaries({"content": st.text(max_size=10)}),
]


@st.composite
def parquet_tables(draw) -> bytes:
    n = draw(st.integers(0, 5))
    names = draw(st.lists(st.sampled_from(COLUMNS), min_size=1, max_size=4, unique=True))
    columns = {}
    for name in names:
        values = draw(st.sampled_from(COLUMN_VALUES))
        columns[name] = draw(st.lists(values, min_size=n, max_size=n))
    buf = io.BytesIO()
    pq.write_table(pa.table(columns), buf)
    return buf.getvalue()


def _good_parquet() -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({"prompt": ["a b", "c d"], "chosen": [" great", " fun"],
                             "rejected": [" awful", " dull"]}), buf)
    return buf.getvalue()


GOOD = _good_parquet()
PARQUET_PAYLOADS = st.one_of(
    parquet_tables(),
    st.binary(max_size=200).map(lambda b: b"PAR1" + b + b"PAR1"),           # magic, garbage inside
    st.integers(0, len(GOOD) - 1).map(lambda i: GOOD[:i]),                   # a file cut short
    st.tuples(st.integers(0, len(GOOD) - 1), st.integers(0, 255)).map(      # one byte flipped
        lambda t: GOOD[:t[0]] + bytes([t[1]]) + GOOD[t[0] + 1:]),
)


def _load_all(path: Path, tokenizer) -> None:
    """Every loader that reads user data files; each must succeed sanely or raise DpolabError."""
    for load in (
        lambda: load_preference_data(str(path), tokenizer, max_length=32, max_prompt_length=16, eval_fraction=0),
        lambda: load_sft_data(str(path), tokenizer, max_length=32, eval_fraction=0),
        lambda: load_prompts(str(path), tokenizer, max_prompt_length=16),
    ):
        try:
            out = load()
        except DpolabError as err:
            assert str(err).strip() and "\n" not in str(err).strip().splitlines()[0]
            continue
        rows = getattr(out, "train", None)
        if rows is not None:
            assert len(rows) >= 1


@FUZZ
@given(payload=PARQUET_PAYLOADS)
def test_fuzz_parquet_through_every_loader(tiny_tokenizer, payload):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.parquet"
        path.write_bytes(payload)
        _load_all(path, tiny_tokenizer)


def test_parquet_wrong_column_type_names_file_row_and_field(tiny_tokenizer, tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "chosen": [" x", " y"], "rejected": [1, 2]}), path)
    with pytest.raises(DpolabError) as info:
        load_preference_data(str(path), tiny_tokenizer, max_length=32, max_prompt_length=16, eval_fraction=0)
    msg = str(info.value)
    assert f"{path} row 1" in msg and "rejected" in msg, msg


# -- YAML configs -------------------------------------------------------------------------------
FIELDS = [f for f in DPOConfig.__dataclass_fields__]
TYPOS = st.sampled_from(FIELDS).map(lambda k: k[:-1] + ("x" if k[-1] != "x" else "y"))
YAML_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=6)


def _parse(text: str | bytes) -> DPOConfig:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
        return parse_config(DPOConfig, ["--config", str(path), "--model", "m", "--data", "d"], prog="dpolab dpo")


@FUZZ
@given(mapping=st.dictionaries(st.one_of(st.sampled_from(FIELDS), TYPOS), YAML_VALUES, max_size=5))
def test_fuzz_yaml_mappings(mapping):
    try:
        cfg = _parse(yaml.safe_dump(mapping))
    except ConfigError as err:
        unknown = [k for k in mapping if k not in FIELDS]
        if unknown and "unknown option" in str(err):
            assert "did you mean" in str(err)  # a one-letter typo always has a close match
        return
    hints = typing.get_type_hints(DPOConfig)
    for key, value in mapping.items():  # accepted: the values arrived, typed as declared
        assert key in FIELDS
        got = getattr(cfg, key)
        assert _conforms(got, hints[key]), (key, value, got)
        if value is None:  # the default: what validate() resolves it to without the key (`beta: null`: the loss's β)
            assert got == getattr(_parse(yaml.safe_dump({k: v for k, v in mapping.items() if k != key})), key), \
                (key, value, got)
        elif isinstance(value, (bool, int, float, str)) and isinstance(got, list):
            # one value for a list option is a one-item list (`loss_weights: 0`, as `--loss-weights 0`),
            # or for a text value its comma-separated items
            assert got == [value] or isinstance(value, str), (key, value, got)
        elif isinstance(value, (bool, int, float, str)):
            # a number given for a text option arrives as its text (`prompt: 7`); otherwise unchanged
            as_text = isinstance(value, (int, float)) and str in _scalar_types(hints[key])
            assert got == (str(value) if as_text else value), (key, value, got)


def _changed_value(field, hint):
    """A value of the field's declared type that is not its default."""
    choices, default = field.metadata.get("choices"), field.default
    base = next(iter(_scalar_types(hint) - {type(None)}))
    if choices:
        return next(c for c in choices if c != default)
    if typing.get_origin(base) is list:
        return [0.5, 1.5] if typing.get_args(base) == (float,) else ["a", "b"]
    if base is bool:
        return not default
    if base is int:
        return (default or 0) + 3
    if base is float:
        return (default or 0.25) * 0.5
    return "some text"


# What an option needs beside it to be read (its loss, or no precomputed reference): with it, every
# option is set once (a refusal is a failure, not a skip).
_CONTEXT = {"loss": {"loss": "ipo"}, "loss_weights": {"loss": "sigmoid,ipo"},
            "simpo_gamma": {"loss": "simpo"}, "discopop_tau": {"loss": "discopop"},
            "orpo_lambda": {"loss": "orpo"}, "cpo_alpha": {"loss": "cpo"},
            "ref_update_steps": {"precompute_ref": False}, "bco_delta": {"loss": "bco_pair"},
            "ref_update_alpha": {"ref_update_steps": 4, "precompute_ref": False}}


def test_yaml_values_of_every_option_arrive_as_given():
    """Each option alone, set in YAML to a value of its type other than its default: accepted values
    arrive unchanged and typed as declared (the fuzz above rarely draws an accepted scalar)."""
    import dataclasses

    hints = typing.get_type_hints(DPOConfig)
    accepted = 0
    for field in dataclasses.fields(DPOConfig):
        if field.name in ("model", "data", "config") or not field.metadata.get("cli", True):
            continue
        context = _CONTEXT.get(field.name, {})
        value = context.get(field.name, _changed_value(field, hints[field.name]))
        cfg = _parse(yaml.safe_dump({**context, field.name: value}))
        got = getattr(cfg, field.name)
        assert got == value and _conforms(got, hints[field.name]), (field.name, value, got)
        accepted += 1
    assert accepted >= len(FIELDS) - 4, accepted  # all but model, data, config and non-CLI fields
    assert type(_parse("beta: 1\n").beta) is float  # an integer written for a float option arrives as one


def _scalar_types(hint) -> set:
    args = typing.get_args(hint)
    return set().union(*map(_scalar_types, args)) if isinstance(hint, types.UnionType) else {hint}


def _conforms(value, hint) -> bool:
    if isinstance(hint, types.UnionType):
        return any(_conforms(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_conforms(v, item) for v in value)
    if hint is float:  # an integer given for a float option arrives converted
        return isinstance(value, float)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


@FUZZ
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=200)))
def test_fuzz_yaml_random_text(text):
    try:
        _parse(text)
    except ConfigError:
        pass


@pytest.mark.parametrize("text,needle", [
    ("betaa: 0.2\n", "did you mean 'beta'"),
    ("beta: [1, 2]\n", "beta"),
    ("beta: .nan\n", "beta"),
    ("max_steps: 1e400\n", "max_steps"),
    ("learning_rate: .inf\n", "learning_rate"),
    ("loss: sigmod\n", "did you mean 'sigmoid'"),
    ("- beta\n- 0.1\n", "mapping"),
    ("beta: 0.1\n  bad: indent\n", "c.yaml:2"),
    ("[" * 5000 + "]" * 5000, "c.yaml"),
    ("!!python/object/apply:os.system ['echo PWNED']\n", "c.yaml"),
    ("beta: !!python/object/apply:os.getcwd []\n", "c.yaml"),
])
def test_bad_yaml_configs_are_one_line_errors(text, needle):
    with pytest.raises(ConfigError) as info:
        _parse(text)
    assert needle in str(info.value), str(info.value)


def test_unknown_flag_suggests_the_closest_option():
    with pytest.raises(ConfigError, match=r"unrecognized option '--betta' \(did you mean '--beta'\?\)"):
        parse_config(DPOConfig, ["--model", "m", "--data", "d", "--betta", "0.1"], prog="dpolab dpo")
    with pytest.raises(ConfigError, match="finite"):
        parse_config(DPOConfig, ["--model", "m", "--data", "d", "--beta", "nan"], prog="dpolab dpo")
