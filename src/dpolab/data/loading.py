"""Reading raw rows from files, ``save_to_disk`` folders and the Hugging Face Hub.

Every row comes back as a :class:`Record`: the row's dict plus where it came from, so that any later
error (a missing field, a row that does not fit) can name the file and the line or row.

Sources, by what ``source`` is:

* an existing file, by extension: ``.jsonl`` (one JSON object per line), ``.json`` (a list of
  objects, or an object of equal-length columns), ``.parquet``, ``.csv`` (header row first);
* an existing folder: a ``datasets`` ``save_to_disk`` folder (``Dataset`` or ``DatasetDict``, the
  latter indexed by ``split``), else a folder of data files, each read as a file, their splits
  named by the files' names (:func:`folder_splits`);
* anything else that does not look like a local path: a Hub dataset name, read with
  ``datasets.load_dataset(source, split=split)``.

Bad input raises :class:`dpolab.errors.DataError` naming the file and the line (JSONL, and JSON
syntax errors) or the 1-based row (JSON lists, CSV data rows, Parquet and ``datasets`` rows).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpolab.errors import DataError
from dpolab.hub import may_be_hub_id, note_hub_lookup

FILE_EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv", ".jsonl.gz", ".json.gz", ".csv.gz")
JSON_WHITESPACE = " \t\r\n"


@dataclass(frozen=True)
class Record:
    """One raw row with its provenance.

    ``line`` is the 1-based line for JSONL files (``unit == "line"``) and the 1-based row number for
    JSON lists, CSV data rows (header excluded), Parquet and ``datasets`` rows (``unit == "row"``).
    """

    data: dict
    path: str
    line: int
    unit: str = "line"

    @property
    def where(self) -> str:
        """``"data.jsonl:7"`` or ``"data.csv row 7"``: the location used in messages."""
        return f"{self.path}:{self.line}" if self.unit == "line" else f"{self.path} row {self.line}"


def record_error(record: Record, message: str, *, field: str | None = None) -> DataError:
    """A :class:`DataError` located at ``record`` (file and line, or file and row)."""
    return located_error(record.path, record.line, record.unit, message, field=field)


def missing(record: Record, name: str) -> str:
    """"missing", with the fields the row has (a close one named: a CSV header's ``' chosen'``)."""
    return "missing " + fields_hint(record.data, name)


def fields_hint(data: dict, *names: str) -> str:
    """``(did you mean 'x'?)`` for a field close to one of ``names``, else the fields ``data`` has."""
    import difflib

    have = [k for k in data if isinstance(k, str)]
    close = next((c for n in names for c in difflib.get_close_matches(n, have, n=1, cutoff=0.7)), None)
    shown = ", ".join(map(repr, have[:12])) + (", ..." if len(have) > 12 else "")
    return f"(did you mean {close!r}?)" if close else f"(the row has {shown or 'no field'})"


# Roles real chat datasets use; another role is kept as given (a template may know it).
KNOWN_ROLES = ("system", "user", "assistant", "tool", "developer", "function", "ipython")


def role_problem(role: str) -> str | None:
    """What is wrong with a message's role, or None. An empty role, or a known one spelt with other
    case or spaces (``"Assistant"``, ``"user "``), is refused: roles are compared exactly, by the
    loss mask (which turns are the assistant's) and by chat templates."""
    if problem := text_problem(role):  # a template renders the role as text
        return problem
    if not role.strip():
        return "role is empty"
    fixed = role.strip().lower()
    if fixed in KNOWN_ROLES and role != fixed:
        return f"role {role!r}: did you mean {fixed!r}? (roles are compared exactly)"
    return None


def tool_call_turns(messages: list) -> list:
    """Messages with OpenAI's form of a turn that only calls tools (``"content": null`` beside
    ``tool_calls``) given empty content, as chat templates render it; other messages unchanged."""
    return [{**m, "content": ""} if isinstance(m, dict) and m.get("content") is None and m.get("tool_calls") else m
            for m in messages]


def text_problem(text: str) -> str | None:
    """What makes a string unusable as text, or None: an unpaired UTF-16 surrogate (valid JSON,
    ``"\\ud800"``) that no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "contains an unpaired UTF-16 surrogate (invalid text)"
    return None


def located_error(path: str, line: int | None, unit: str, message: str, *,
                  field: str | None = None) -> DataError:
    """A :class:`DataError` whose text reads ``path:LINE: ...`` or ``path row N: ...``."""
    if unit == "line" or line is None:
        return DataError(message, path=path, line=line, field=field)
    err = DataError(message, path=f"{path} row {line}", field=field)
    err.path, err.line = path, line
    return err


def looks_like_path(source: str) -> bool:
    """True for a name that cannot be a Hub repository id (``name`` or ``namespace/name``): a data
    file's extension, a leading ``/``, ``.`` or ``~``, a second ``/`` or a trailing one, or the
    platform's own separator; such a name that does not exist is "not found", never a Hub lookup."""
    return source.lower().endswith(FILE_EXTENSIONS) or not may_be_hub_id(source)


def load_records(source: str, *, split: str = "train") -> list[Record]:
    """Read every row of ``source`` (a file, a folder or a Hub dataset name) as :class:`Record`.

    ``split`` selects the split of a ``DatasetDict`` folder or a Hub dataset; plain files have one.
    Raises :class:`DataError` for a missing file, an unsupported extension, malformed content, a
    row that is not an object, or a source with no rows.
    """
    source = str(source)
    path = Path(source).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".gz":  # a gzip-compressed text file: read by the extension before .gz
            suffix = Path(path.stem).suffix.lower() + ".gz"
        readers = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet,
                   ".csv": _read_csv, ".jsonl.gz": _read_jsonl, ".json.gz": _read_json, ".csv.gz": _read_csv}
        if suffix not in readers:
            raise DataError(f"unsupported file extension '{path.suffix or '(none)'}'; expected one "
                            f"of {', '.join(FILE_EXTENSIONS)}", path=source)
        records = readers[suffix](path, source)
    elif path.is_dir():
        records = _read_folder(path, source, split)
    elif looks_like_path(source):
        raise DataError("file not found", path=source)
    else:
        records = _read_hub(source, split)
    if not records:
        raise DataError("no rows: the data source is empty", path=source)
    return records


def data_fingerprint(source: str, *, split: str = "train") -> str:
    """A sha256 hex digest identifying the data, for cache keys (e.g. reference log-probs).

    Files: the hash of their bytes. Folders: the hash of every file's relative path and bytes, plus
    ``split``. Hub names: the hash of the name and ``split`` (the remote content is not fetched).
    """
    source = str(source)
    path = Path(source).expanduser()
    h = hashlib.sha256()
    if path.is_file():
        _hash_file(h, path)
    elif path.is_dir():
        h.update(f"folder\0split={split}\0".encode())
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(file.relative_to(path).as_posix().encode() + b"\0")
            _hash_file(h, file)
    elif looks_like_path(source):
        raise DataError("file not found", path=source)
    else:
        h.update(f"hub\0{source}\0split={split}".encode())
    return h.hexdigest()


def _hash_file(h: Any, file: Path) -> None:
    with open(file, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)


# ----------------------------------------------------------------------------------------------
# Text files


def _read_bytes(path: Path, source: str) -> bytes:
    """The file's bytes, decompressed when it ends in ``.gz``."""
    import gzip
    import zlib

    try:
        data = path.read_bytes()
        return gzip.decompress(data) if path.suffix.lower() == ".gz" else data
    except OSError as exc:  # gzip.BadGzipFile is an OSError
        raise DataError(f"cannot read file: {exc.strerror or exc}", path=source) from exc
    except (EOFError, zlib.error) as exc:
        raise DataError(f"cannot read file: not a complete gzip file ({exc})", path=source) from exc


def _decode(data: bytes, source: str) -> str:
    """UTF-8 text (a leading BOM dropped); invalid bytes are reported with their line number."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(f"not valid UTF-8 (byte {exc.start})", path=source, line=line) from exc


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return out


class _Marked(dict):
    """An object that gave a key twice (found again only to name its row)."""


def _duplicate_key_row(text: str) -> int | None:
    """The 1-based row of a JSON list of rows holding an object with a key given twice, or None."""

    def mark(pairs: list[tuple[str, Any]]) -> dict:
        out = dict(pairs)
        return _Marked(out) if len(out) != len(pairs) else out

    def marked(value: Any) -> bool:
        if isinstance(value, dict):
            return isinstance(value, _Marked) or any(marked(v) for v in value.values())
        return isinstance(value, list) and any(marked(v) for v in value)

    try:
        value = json.loads(text, object_pairs_hook=mark)
    except (ValueError, RecursionError):
        return None
    if isinstance(value, list):
        return next((i for i, row in enumerate(value, start=1) if marked(row)), None)
    return None


def _parse_json(text: str, source: str, *, line: int | None = None) -> Any:
    """``json.loads`` with errors located: at ``line`` for one JSONL line, else at the error's
    own line in the file."""
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:
        raise DataError(f"key '{exc.args[0]}' given twice in one object (one value would be lost)", path=source,
                        line=line) from None
    except json.JSONDecodeError as exc:
        hint = ""
        if exc.msg == "Extra data" and line is None:
            hint = " (several JSON values: if this is JSON Lines, name the file .jsonl)"
        # json's own messages may end in "at" ("Unterminated string starting at"): not said twice
        msg = exc.msg.removesuffix(" at")
        raise DataError(f"invalid JSON: {msg} at column {exc.colno}{hint}", path=source,
                        line=line if line is not None else exc.lineno) from exc
    except ValueError as exc:  # e.g. an integer longer than Python's digit limit
        raise DataError(f"invalid JSON: {exc}", path=source, line=line) from exc
    except RecursionError as exc:
        raise DataError("invalid JSON: nested too deeply", path=source, line=line) from exc


def _read_jsonl(path: Path, source: str) -> list[Record]:
    text = _decode(_read_bytes(path, source), source)
    if not text.strip(JSON_WHITESPACE):
        raise DataError("file is empty", path=source)
    records = []
    for lineno, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip(JSON_WHITESPACE):  # blank lines are skipped but still counted
            continue
        value = _parse_json(raw, source, line=lineno)  # a CRLF's "\r" is JSON whitespace
        if not isinstance(value, dict):
            raise DataError(f"expected a JSON object, got {_json_type(value)}", path=source,
                            line=lineno)
        records.append(Record(value, source, lineno, "line"))
    return records


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), "a number")


def _read_json(path: Path, source: str) -> list[Record]:
    text = _decode(_read_bytes(path, source), source)
    if not text.strip(JSON_WHITESPACE):
        raise DataError("file is empty", path=source)
    try:
        value = _parse_json(text, source)
    except DataError as err:
        if (row := _duplicate_key_row(text)) is not None:  # name the row, as a JSONL line is named
            raise located_error(source, row, "row", err.reason) from None
        raise
    if (isinstance(value, dict) and len(value) == 1 and isinstance(rows := next(iter(value.values())), list)
            and rows and all(isinstance(r, dict) for r in rows)):
        raise DataError(f"an object whose one key '{next(iter(value))}' holds the rows: give the list of rows "
                        "itself (or JSONL, a row a line)", path=source)
    if isinstance(value, dict) and value and all(isinstance(v, list) for v in value.values()):
        lengths = {k: len(v) for k, v in value.items()}
        if len(set(lengths.values())) != 1:
            raise DataError(f"columns have different lengths: {lengths}", path=source)
        names = list(value)
        rows = [dict(zip(names, vals)) for vals in zip(*value.values())]
    elif isinstance(value, list):
        rows = value
    else:
        raise DataError(f"expected a list of objects or an object of equal-length columns, got "
                        f"{_json_type(value)}", path=source)
    records = []
    for i, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise located_error(source, i, "row", f"expected a JSON object, got {_json_type(row)}")
        records.append(Record(row, source, i, "row"))
    return records


def _allow_long_csv_cells() -> None:
    """The csv module refuses a cell over 131,072 characters ("field larger than field limit"), a
    long but valid text: the limit goes to the largest the platform takes."""
    limit = sys.maxsize
    while csv.field_size_limit() < limit:
        try:
            csv.field_size_limit(limit)
        except OverflowError:  # a C long narrower than sys.maxsize
            limit //= 2


def _read_csv(path: Path, source: str) -> list[Record]:
    _allow_long_csv_cells()
    text = _decode(_read_bytes(path, source), source)
    if not text.strip(JSON_WHITESPACE):
        raise DataError("file is empty", path=source)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)  # an unclosed quote is an error, not one long field
    records: list[Record] = []
    header: list[str] | None = None
    start = 1  # the line the row being read starts on: where an unclosed quote opened
    try:
        for row in reader:
            if not row:  # a blank line
                pass
            elif header is None:
                header = row
                if len(set(header)) != len(header):
                    raise DataError(f"duplicate column names in the header: {header}", path=source,
                                    line=reader.line_num)
            elif len(row) != len(header):
                raise located_error(source, len(records) + 1, "row", f"has {len(row)} fields but the header "
                                    f"has {len(header)} (line {reader.line_num})")
            else:
                records.append(Record(dict(zip(header, row)), source, len(records) + 1, "row"))
            start = reader.line_num + 1
    except csv.Error as exc:
        if "unexpected end of data" in str(exc):
            raise DataError("malformed CSV: a quoted field opened on this line is never closed (unexpected "
                            "end of data)", path=source, line=start) from None
        raise DataError(f"malformed CSV: {exc}", path=source, line=reader.line_num or None) from exc
    if header is None:
        raise DataError("file is empty", path=source)
    return records


# ----------------------------------------------------------------------------------------------
# Parquet, datasets folders, the Hub


def _read_parquet(path: Path, source: str) -> list[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DataError(f"not a readable Parquet file: {exc}", path=source) from exc
    return [Record(row, source, i, "row") for i, row in enumerate(rows, start=1)]


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file())


# The split names a folder's file or sub-folder names give (those of ``datasets``' data-files
# convention): a keyword between separators, e.g. train.jsonl, data-test-00000.parquet, dev/part.csv
SPLIT_KEYWORDS = {"train": ("train", "training"), "validation": ("validation", "valid", "dev", "val"),
                  "test": ("test", "testing", "eval", "evaluation")}


def folder_splits(path: Path) -> dict[str, list[Path]]:
    """The data files under folder ``path`` (hidden ones aside) by split: each file goes to the first
    split whose keyword its relative path holds between separators (``-._ `` or digits); with no
    such file, every file is ``train``."""
    import re

    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(FILE_EXTENSIONS)
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    splits: dict[str, list[Path]] = {}
    for file in files:
        rel = file.relative_to(path).as_posix().lower()
        for name, words in SPLIT_KEYWORDS.items():
            if any(re.search(rf"(^|[-._ 0-9/]){w}([-._ 0-9/]|$)", rel) for w in words):
                splits.setdefault(name, []).append(file)
                break
    return splits or ({"train": files} if files else {})


def _read_folder(path: Path, source: str, split: str) -> list[Record]:
    """A ``save_to_disk`` folder, or a folder of data files, each read as the file it is (its rows
    named by file and line, CSV cells strings, every format of the folder read)."""
    if not _is_saved_dataset(path):
        splits = folder_splits(path)
        if not splits:
            raise DataError(f"the folder holds no data file ({', '.join(FILE_EXTENSIONS)}) and is not a "
                            "save_to_disk folder", path=source)
        if split not in splits:
            raise DataError(f"no split '{split}' in the folder's data files (splits: {', '.join(splits)})",
                            path=source)
        return [r for file in splits[split] for r in load_records(str(file))]
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 -- any failure inside datasets is a bad folder
        raise DataError(f"cannot load the saved dataset: {exc}", path=source) from exc
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"no split '{split}' in the saved dataset (splits: "
                            f"{', '.join(ds)})", path=source)
        ds = ds[split]
    return _dataset_records(ds, source)


def _read_hub(source: str, split: str) -> list[Record]:
    import datasets

    note_hub_lookup(source, "dataset", "HF_DATASETS_OFFLINE")
    try:
        ds = datasets.load_dataset(source, split=split)
    except Exception as exc:  # noqa: BLE001 -- network, missing repo, bad split: all user-fixable
        local = Path(source).expanduser().exists()
        where = "" if local else "not a local file or folder, and "
        cause, seen = exc, [exc]  # datasets wraps the reason (e.g. a bad line of one file) in its own error
        while (cause := cause.__cause__ or cause.__context__) is not None and cause not in seen:
            seen.append(cause)
        detail = "; ".join(f"{type(c).__name__}: {' '.join(str(c).split())}" for c in seen[:3] if str(c).strip())
        hint = " (give the data file itself for an error located to its line)" if local and len(seen) > 1 else ""
        raise DataError(f"{where}cannot load dataset (split '{split}') with datasets.load_dataset: {detail}{hint}",
                        path=source) from exc
    if not isinstance(ds, datasets.Dataset):
        raise DataError(f"expected a map-style datasets.Dataset for split '{split}', got "
                        f"{type(ds).__name__}", path=source)
    return _dataset_records(ds, source)


def _dataset_records(ds: Any, source: str) -> list[Record]:
    return [Record(dict(row), source, i, "row") for i, row in enumerate(ds, start=1)]
