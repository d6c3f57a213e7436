"""Reading raw rows: every source kind, provenance (line/row numbers), fingerprints, clear errors,
and a fuzz test that malformed bytes only ever raise DataError."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpolab.data import Record, data_fingerprint, load_records, parse_preference
from dpolab.errors import DataError

ROWS = [
    {"prompt": "p1", "chosen": "c1", "rejected": "r1"},
    {"prompt": "p2", "chosen": "c2", "rejected": "r2"},
    {"prompt": "p3", "chosen": "c3", "rejected": "r3"},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def datas(records: list[Record]) -> list[dict]:
    return [r.data for r in records]


# ---------------------------------------------------------------------------------------------
# Every source kind


def test_jsonl_lines_are_1_based_and_count_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    # CRLF line ends, a blank line between rows 1 and 2, a UTF-8 BOM in front.
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(ROWS[0]) + "\r\n\r\n" + json.dumps(ROWS[1]) + "\r\n"
                                        + json.dumps(ROWS[2])).encode())
    records = load_records(str(path))
    assert datas(records) == ROWS
    assert [r.line for r in records] == [1, 3, 4]
    assert {r.path for r in records} == {str(path)} and {r.unit for r in records} == {"line"}
    assert records[1].where == f"{path}:3"


def test_gzip_compressed_text_files(tmp_path):
    import gzip

    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "d", "chosen": "e", "rejected": "f"}]
    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    records = load_records(str(path))
    assert [r.data for r in records] == rows and records[1].line == 2
    (tmp_path / "cut.jsonl.gz").write_bytes(path.read_bytes()[:-8])
    with pytest.raises(DataError, match="not a complete gzip file"):
        load_records(str(tmp_path / "cut.jsonl.gz"))
    (tmp_path / "x.tar.gz").write_bytes(path.read_bytes())
    with pytest.raises(DataError, match="unsupported file extension"):
        load_records(str(tmp_path / "x.tar.gz"))


def test_json_list_and_columns(tmp_path):
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps(ROWS))
    columns = tmp_path / "cols.json"
    columns.write_text(json.dumps({k: [r[k] for r in ROWS] for k in ROWS[0]}))
    for path in (listed, columns):
        records = load_records(str(path))
        assert datas(records) == ROWS
        assert [r.line for r in records] == [1, 2, 3] and records[0].unit == "row"
        assert records[2].where == f"{path} row 3"


def test_csv_with_quoted_newlines_and_commas(tmp_path):
    rows = [dict(ROWS[0], chosen='multi\nline, "quoted"'), ROWS[1]]
    records = load_records(str(write_csv(tmp_path / "d.csv", rows)))
    assert datas(records) == rows
    assert [r.line for r in records] == [1, 2]


def test_parquet_keeps_nested_message_lists(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": [{"role": "user", "content": "hi"}],
             "chosen": [{"role": "assistant", "content": "hello"}],
             "rejected": [{"role": "assistant", "content": "go away"}]}] * 2
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    records = load_records(str(path))
    assert datas(records) == rows and [r.line for r in records] == [1, 2]
    assert parse_preference(records[0]).conversational


class _ChatTokenizer:
    chat_template = "{{ messages }}"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        return "|".join(m["content"] for m in messages)


def test_parquet_nulls_of_mixed_rows_read_as_absent_fields(tmp_path):
    """Parquet holds null where a row lacks a column: rows of both prompt forms (and of both SFT
    forms) in one file read as they do from JSONL."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dpolab.data.prompts import render_prompt
    from dpolab.data.sft import parse_sft

    turns = [{"role": "user", "content": "hi"}]
    path = tmp_path / "prompts.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "the movie was", "messages": None},
                                         {"prompt": None, "messages": turns}]), path)
    records = load_records(str(path))
    assert records[0].data == {"prompt": "the movie was", "messages": None}
    assert [render_prompt(r.data, _ChatTokenizer(), record=r) for r in records] == [("the movie was", False),
                                                                                    ("hi", True)]
    path = tmp_path / "sft.parquet"
    chat = turns + [{"role": "assistant", "content": "hello"}]
    pq.write_table(pa.Table.from_pylist([{"prompt": "a", "completion": "b", "messages": None},
                                         {"prompt": None, "completion": None, "messages": chat}]), path)
    assert [parse_sft(r) for r in load_records(str(path))] == [("completion", ("a", "b")), ("chat", (chat, 0))]


def test_unpaired_surrogates_are_refused_by_every_loader(tmp_path):
    from dpolab.data.prompts import render_prompt
    from dpolab.data.sft import parse_sft

    path = tmp_path / "s.jsonl"
    path.write_text('{"prompt": "a\\ud800", "completion": "b"}\n'
                    '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "\\udc00"}]}\n')
    first, second = load_records(str(path))
    surrogate = "contains an unpaired UTF-16 surrogate"
    with pytest.raises(DataError, match=rf"s\.jsonl:1: field 'prompt': {surrogate}"):
        render_prompt(first.data, _ChatTokenizer(), record=first)
    with pytest.raises(DataError, match=rf"s\.jsonl:1: field 'prompt': {surrogate}"):
        parse_sft(first)
    with pytest.raises(DataError, match=rf"s\.jsonl:2: field 'messages\[1\]\.content': {surrogate}"):
        parse_sft(second)
    role = Record({"messages": [{"role": "us\ud800er", "content": "x"}, {"role": "assistant", "content": "y"}]},
                  str(path), 3)  # a template renders the role too
    with pytest.raises(DataError, match=rf"s\.jsonl:3: field 'messages\[0\]\.role': {surrogate}"):
        parse_sft(role)
    with pytest.raises(DataError, match=rf"s\.jsonl:3: field 'messages\[0\]\.role': {surrogate}"):
        render_prompt({"messages": role.data["messages"][:1]}, _ChatTokenizer(), record=role)


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(ROWS)
    ds.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": ds, "test": ds.select([2])}).save_to_disk(str(tmp_path / "dict"))
    assert datas(load_records(str(tmp_path / "single"))) == ROWS
    assert datas(load_records(str(tmp_path / "dict"))) == ROWS
    test = load_records(str(tmp_path / "dict"), split="test")
    assert datas(test) == [ROWS[2]] and test[0].line == 1 and test[0].unit == "row"
    with pytest.raises(DataError, match=r"no split 'valid'.*train, test"):
        load_records(str(tmp_path / "dict"), split="valid")


def test_hub_name_goes_to_load_dataset_with_split(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, split=None, **kwargs):
        calls.append((name, split, kwargs))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    records = load_records("someone/prefs", split="test")
    assert calls == [("someone/prefs", "test", {})]
    assert datas(records) == ROWS and records[0].path == "someone/prefs" and records[1].line == 2


def test_hub_failure_is_a_data_error(monkeypatch):
    import datasets

    def failing(name, split=None, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", failing)
    with pytest.raises(DataError, match=r"^someone/prefs: not a local file or folder, and cannot load dataset.*ConnectionError: offline"):
        load_records("someone/prefs")


def test_a_hub_lookup_is_announced_unless_offline(monkeypatch, capsys):
    """Offline, the Hub libraries retry for most of a minute before failing: the user is told at once
    that the name is not local and is being looked up, and how to skip that (once per name)."""
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda name, split=None, **kw: datasets.Dataset.from_list(ROWS))
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
        load_records("someone/announced")
        assert capsys.readouterr().err == ""
        monkeypatch.delenv(var)
    load_records("someone/announced")
    load_records("someone/announced")
    err = capsys.readouterr().err
    assert err.count("dataset 'someone/announced' is not a local path: looking it up on the Hugging Face Hub "
                     "(HF_HUB_OFFLINE=1 uses only the local cache)") == 1, err


def test_a_folder_of_data_files_reads_each_file_as_a_file(tmp_path, capsys):
    """datasets.load_dataset read such a folder: a mixed folder lost its other formats silently, CSV
    cells were typed (a number answer refused as 'must be a string'), a missing field read as null,
    and errors named the folder's row, not the file's line; it was also announced as a Hub lookup."""
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "a.jsonl", ROWS[:2])
    write_csv(data / "b.csv", [{"prompt": "p3", "chosen": "1", "rejected": ""}])
    (data / ".hidden.jsonl").write_text("not read\n")
    (data / "notes.txt").write_text("not data\n")
    records = load_records(str(data))
    assert datas(records) == [*ROWS[:2], {"prompt": "p3", "chosen": "1", "rejected": ""}]  # CSV cells: strings
    assert [r.where for r in records] == [f"{data / 'a.jsonl'}:1", f"{data / 'a.jsonl'}:2", f"{data / 'b.csv'} row 1"]
    assert "Hub" not in capsys.readouterr().err
    write_jsonl(data / "c.jsonl", [{"prompt": "p", "chosen": "c"}])  # the file's own line, and 'missing'
    with pytest.raises(DataError, match=r"c\.jsonl:1: field 'rejected': missing"):
        [parse_preference(r) for r in load_records(str(data))]


def test_a_folders_splits_come_from_its_file_names(tmp_path):
    """As datasets names them: a split keyword between separators in a file or folder name."""
    from dpolab.data.loading import folder_splits

    data = tmp_path / "data"
    (data / "dev").mkdir(parents=True)
    write_jsonl(data / "train-00000.jsonl", ROWS[:1])
    write_jsonl(data / "data_train_1.jsonl", ROWS[1:2])
    write_jsonl(data / "test.jsonl", ROWS[2:])
    write_jsonl(data / "dev" / "part.jsonl", ROWS[:1])
    write_jsonl(data / "retrained.jsonl", ROWS[:1])  # 'train' inside a word: no split name
    splits = folder_splits(data)
    assert {k: [p.name for p in v] for k, v in splits.items()} == {
        "train": ["data_train_1.jsonl", "train-00000.jsonl"], "validation": ["part.jsonl"], "test": ["test.jsonl"]}
    assert datas(load_records(str(data), split="test")) == ROWS[2:]
    with pytest.raises(DataError, match=r"no split 'eval2' in the folder's data files \(splits: train, validation, "
                                        r"test\)"):
        load_records(str(data), split="eval2")
    (tmp_path / "plain").mkdir()
    write_jsonl(tmp_path / "plain" / "rows.jsonl", ROWS)  # no split names: every file is train
    assert datas(load_records(str(tmp_path / "plain"))) == ROWS
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no data file"):
        load_records(str(tmp_path / "empty"))


def test_a_csv_cell_longer_than_the_csv_modules_limit_is_read(tmp_path):
    """A cell over 131,072 characters was 'malformed CSV: field larger than field limit'."""
    long = "word " * 40_000
    rows = load_records(str(write_csv(tmp_path / "long.csv", [{"prompt": long, "chosen": "a", "rejected": "b"}])))
    assert rows[0].data["prompt"] == long


# ---------------------------------------------------------------------------------------------
# Fingerprints


def test_fingerprint_tracks_content_and_split(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    first = data_fingerprint(str(path))
    assert first == data_fingerprint(str(path)) and len(first) == 64
    write_jsonl(path, ROWS[:2])
    assert data_fingerprint(str(path)) != first
    assert data_fingerprint("a/b") != data_fingerprint("a/b", split="test")
    assert data_fingerprint("a/b") != data_fingerprint("a/c")
    folder = tmp_path / "f"
    folder.mkdir()
    write_jsonl(folder / "x.jsonl", ROWS)
    before = data_fingerprint(str(folder))
    (folder / "x.jsonl").write_text("{}")
    assert data_fingerprint(str(folder)) != before
    with pytest.raises(DataError, match="file not found"):
        data_fingerprint(str(tmp_path / "missing.jsonl"))


# ---------------------------------------------------------------------------------------------
# Errors name the file, the line or row, and the field


def test_malformed_jsonl_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + '{"prompt": "x", "chosen": }\n')
    with pytest.raises(DataError) as info:
        load_records(str(path))
    assert str(info.value).startswith(f"{path}:3: invalid JSON")
    assert info.value.path == str(path) and info.value.line == 3


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n[1, 2]\n")
    with pytest.raises(DataError, match=r":2: expected a JSON object, got a list"):
        load_records(str(path))


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(ROWS[0]).encode() + b"\n" + b'{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: not valid UTF-8"):
        load_records(str(path))


@pytest.mark.parametrize("name,content", [("e.jsonl", ""), ("e.json", "  \n"), ("e.csv", ""),
                                          ("e.json", "[]"), ("h.csv", "prompt,chosen,rejected\n")])
def test_empty_sources(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=r"empty"):
        load_records(str(path))


def test_empty_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "e.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), path)
    with pytest.raises(DataError, match="e.parquet: no rows"):
        load_records(str(path))


def test_unsupported_extension_and_missing_file(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("hello")
    with pytest.raises(DataError, match=r"d\.txt: unsupported file extension '\.txt'"):
        load_records(str(path))
    # a second or trailing slash: not a hub id, so not a hub lookup either
    for missing in (str(tmp_path / "nope.jsonl"), "./nope", "data/nope.parquet", "data/hh/prefs", "prefs/"):
        with pytest.raises(DataError, match=r"file not found") as info:
            load_records(missing)
        assert info.value.path == missing


def test_json_that_is_really_jsonl_gets_a_hint(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n")
    with pytest.raises(DataError, match=r"d\.json:2: invalid JSON: Extra data.*name the file \.jsonl"):
        load_records(str(path))


def test_json_bad_shapes(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([ROWS[0], "oops"]))
    with pytest.raises(DataError, match=r"d\.json row 2: expected a JSON object, got a string"):
        load_records(str(path))
    path.write_text(json.dumps({"prompt": ["a", "b"], "chosen": ["c"]}))
    with pytest.raises(DataError, match="columns have different lengths"):
        load_records(str(path))
    path.write_text("3")
    with pytest.raises(DataError, match="expected a list of objects"):
        load_records(str(path))
    path.write_text(json.dumps({"data": ROWS}))  # rows wrapped in an object: said so, not "field missing"
    with pytest.raises(DataError, match=r"d\.json: an object whose one key 'data' holds the rows"):
        load_records(str(path))
    path.write_text(json.dumps({"messages": [[{"role": "user", "content": "hi"}]]}))  # one column of lists: fine
    assert load_records(str(path))[0].data == {"messages": [{"role": "user", "content": "hi"}]}


def test_csv_ragged_row_names_row_and_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,chosen,rejected\na,b,c\nd,e\n")
    with pytest.raises(DataError, match=r"d\.csv row 2: has 2 fields but the header has 3 \(line 3\)") as info:
        load_records(str(path))
    assert info.value.path == str(path) and info.value.line == 2


def test_a_key_given_twice_in_a_row_is_an_error(tmp_path):
    # JSON parsers keep the last value: the first would be lost without a word
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "x", "chosen": " y", "rejected": " z"}\n'
                    '{"prompt": "x", "chosen": " y", "rejected": " z", "chosen": " w"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: key 'chosen' given twice in one object"):
        load_records(str(path))
    whole = tmp_path / "d.json"
    whole.write_text('[{"prompt": "x"}, {"prompt": "x", "meta": {"a": 1, "a": 2}}]')
    with pytest.raises(DataError, match=r"d\.json row 2: key 'a' given twice"):  # the row, as JSONL's line
        load_records(str(whole))
    whole.write_text('{"prompt": ["x"], "prompt": ["y"]}')  # columns: no row to name
    with pytest.raises(DataError, match=r"d\.json: key 'prompt' given twice"):
        load_records(str(whole))


def test_a_missing_field_names_the_fields_the_row_has():
    from dpolab.data.sft import parse_sft

    with pytest.raises(DataError, match=r"d\.csv row 1: field 'chosen': missing \(did you mean ' chosen'\?\)"):
        parse_preference(Record({"prompt": "a", " chosen": "b", " rejected": "c"}, "d.csv", 1, "row"))
    with pytest.raises(DataError, match=r"d\.jsonl:4: field 'rejected': missing \(the row has 'prompt', 'chosen'\)"):
        parse_preference(Record({"prompt": "a", "chosen": "b"}, "d.jsonl", 4))
    with pytest.raises(DataError, match=r"s\.jsonl:2: field 'text': is null"):  # not "unrecognised row"
        parse_sft(Record({"text": None}, "s.jsonl", 2))


def test_csv_unclosed_quote_is_an_error_not_one_long_field(tmp_path):
    # a lenient reader takes everything after the quote as one field: three rows became one
    path = tmp_path / "d.csv"
    path.write_text('prompt,chosen,rejected\na,b,"c\nd,e,f\ng,h,i\n')
    with pytest.raises(DataError, match=r"d\.csv:2: malformed CSV: a quoted field opened on this line is "
                       r"never closed"):  # the line the quote opened on, not the file's end
        load_records(str(path))
    path.write_text('\nprompt,chosen,rejected\n\n"a\nb",b,c\n\nd,"e,f\ng,h,i\n')  # blank and multi-line rows
    with pytest.raises(DataError, match=r"d\.csv:7: malformed CSV"):
        load_records(str(path))


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=r"d\.parquet: not a readable Parquet file"):
        load_records(str(path))


def test_field_errors_from_row_sources_say_row(tmp_path):
    rows = [ROWS[0], {"prompt": "p", "chosen": "c", "rejected": 5}]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows))
    records = load_records(str(path))
    with pytest.raises(DataError, match=r"d\.json row 2: field 'rejected': expected a string") as info:
        parse_preference(records[1])
    assert (info.value.line, info.value.field) == (2, "rejected")


# ---------------------------------------------------------------------------------------------
# Fuzz: malformed bytes never escape as anything but DataError

_JSONISH = st.text(alphabet='{}[]",:0123456789.eE+-truefalsn \n\r\t\\u\x00\xff\ud800promptchosenrejected',
                   max_size=80)
_FUZZ_BYTES = st.one_of(
    st.binary(max_size=120),
    _JSONISH.map(lambda s: s.encode("utf-8", "surrogatepass")),
    # A valid row with random bytes spliced in.
    st.tuples(st.integers(0, 60), st.binary(max_size=8)).map(
        lambda t: (json.dumps(ROWS[0]).encode()[:t[0]] + t[1] + json.dumps(ROWS[0]).encode()[t[0]:])),
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=_FUZZ_BYTES, ext=st.sampled_from([".jsonl", ".json", ".csv"]))
def test_fuzz_loader_raises_only_data_error(payload, ext):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"fuzz{ext}"
        path.write_bytes(payload)
        try:
            records = load_records(str(path))
        except DataError as err:
            assert err.path == str(path)
            return
        assert records and all(isinstance(r.data, dict) and r.line >= 1 for r in records)
        for record in records:
            try:
                parse_preference(record)
            except DataError as err:
                assert err.path == str(path) and err.line == record.line


def test_a_cut_off_json_line_says_where_the_string_starts_once(tmp_path):
    """json's message "Unterminated string starting at" was followed by our "at column": "at at"."""
    for name, text, line in (("d.jsonl", '{"prompt": "the movie"}\n{"prompt": "a fi\n', 2),
                             ("d.json", '[{"prompt": "the movie"},\n {"prompt": "a fi', 2)):
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(DataError) as info:
            load_records(str(path))
        msg = str(info.value)
        assert msg.startswith(f"{path}:{line}: invalid JSON: Unterminated string starting at column "), msg
        assert " at at " not in msg, msg


def test_a_null_prompt_is_said_to_be_null(tmp_path, tiny_tokenizer):
    """{"prompt": null} got "did you mean 'prompt'?" although the field is there: it is null."""
    from dpolab.data.prompts import load_prompts

    for row, field in (({"prompt": None}, "prompt"), ({"messages": None}, "messages"),
                       ({"prompt": None, "messages": None}, "prompt")):
        path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "the movie"}, row])
        with pytest.raises(DataError) as info:
            load_prompts(str(path), tiny_tokenizer)
        msg = str(info.value)
        assert msg.startswith(f"{path}:2: field '{field}': is null"), msg
        assert "did you mean" not in msg, msg
    path = write_jsonl(tmp_path / "p.jsonl", [{"promt": "the movie"}])  # a misspelt field keeps its hint
    with pytest.raises(DataError, match=r"did you mean 'promt'\?"):
        load_prompts(str(path), tiny_tokenizer)
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": None, "messages": [{"role": "user", "content": "hi"}]}])
    assert len(load_prompts(str(path), tiny_tokenizer)) == 1  # a null beside the other field: as absent
