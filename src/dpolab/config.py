"""Configuration: one dataclass per algorithm, the CLI generated from it.

Precedence is defaults < ``--config file.yaml`` < command-line flags. Each field documents itself
through ``opt(default, "help text")``; the generated ``--help`` lists every field. Unknown keys in a
YAML file are rejected with the closest valid name suggested.

Example::

    @dataclass
    class MyConfig:
        beta: float = opt(0.1, "KL coefficient β")
        loss: str = opt("sigmoid", "loss name", choices=("sigmoid", "ipo"))

    cfg = parse_config(MyConfig, argv, prog="dpolab my", description="...")
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import math
import os
import re
import sys
import types
import typing
import weakref
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

from dpolab.errors import ConfigError

T = TypeVar("T")


def opt(default: Any = dataclasses.MISSING, help: str = "", *, choices: tuple | None = None,
        cli: bool = True, default_factory: Any = dataclasses.MISSING, items: bool = False) -> Any:
    """A documented dataclass field. ``cli=False`` keeps it out of the command line (YAML only);
    ``items``: a text of comma-separated items, which YAML (and Python) may also give as a list."""
    meta = {"help": help, "choices": choices, "cli": cli, "items": items}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _base_type(tp: Any) -> tuple[Any, bool]:
    """Strip ``Optional``; return (type, optional)."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _convert(value: Any, tp: Any, name: str) -> Any:
    """Check/convert a YAML or CLI value to the field's type, with a clear error."""
    base, optional = _base_type(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"'{name}' may not be empty")
    origin = get_origin(base)
    try:
        if origin is Literal:
            if value not in get_args(base):
                raise ConfigError(f"'{name}' must be one of {list(get_args(base))}, got {value!r}")
            return value
        if origin in (list, tuple):
            (inner, *_) = get_args(base) or (str,)
            if isinstance(value, str):  # (YAML's "a, b" is a and b, not " b")
                value = [v.strip() for v in value.split(",") if v.strip()]
            elif isinstance(value, (bool, int, float)):  # one YAML scalar is a list of one, checked as its item
                value = [value]
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"'{name}' must be a list, got {value!r}")
            return [_convert(v, inner, name) for v in value]
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, int) and not isinstance(value, bool) and value in (0, 1):  # `flag: 1`, as --flag 1
                return bool(value)
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
                return value.lower() in ("true", "yes", "1", "on")
            raise ConfigError(f"'{name}' must be true or false, got {value!r}")
        if base is int:
            if isinstance(value, str):  # "2.0" or "1e4" as YAML's 2.0 and 1e4 are read: a whole number
                try:
                    return int(value)
                except ValueError:
                    value = float(value)
                    if not math.isfinite(value):
                        raise
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if not math.isfinite(number):  # nan/inf would only surface later as a NaN loss
                raise ConfigError(f"'{name}' must be a finite number, got {value!r}")
            return number
        if base is str:
            if isinstance(value, (bool, float)):  # YAML read `yes`, `off`, `0.10` or `1e-3` so: the text is lost
                kind = "a boolean" if isinstance(value, bool) else "a number"
                raise ConfigError(f"'{name}' is text, but YAML read {value!r} as {kind} (the text may differ "
                                  "from what was written); put it in quotes")
            if isinstance(value, _TextInt) and value.text != str(int(value)):  # 12:30, 0x1F, 010, 1_000
                raise ConfigError(f"'{name}' is text, but YAML read {value.text!r} as the number {int(value)}; "
                                  "put it in quotes")
            if not isinstance(value, (str, int)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"'{name}' must be of type {getattr(base, '__name__', base)}, got {value!r}") from None
    return value


def _fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    """(field, type) pairs: the class's own fields first, in declaration order, then inherited option
    groups (``dpolab.train.options``) in dataclass order, so ``--help`` leads with what is specific."""
    hints = get_type_hints(cls)
    own = {name: i for i, name in enumerate(cls.__dict__.get("__annotations__", {}))}
    ordered = sorted(dataclasses.fields(cls), key=lambda f: (0, own[f.name]) if f.name in own else (1, 0))
    return [(f, hints[f.name]) for f in ordered]


def suggest(name: str, valid: list[str]) -> str:
    """`` (did you mean 'x'?)`` for the valid name closest to ``name``, if one is close. Flags are
    compared without their ``--``, which made every short flag look alike (``--lora`` suggested
    ``--help``)."""
    bare = {v.lstrip("-"): v for v in valid}
    close = difflib.get_close_matches(name.lstrip("-"), list(bare), n=1, cutoff=0.6)
    return f" (did you mean '{bare[close[0]]}'?)" if close else ""


def _item_fields(cls: type) -> set[str]:
    return {f.name for f, _ in _fields(cls) if f.metadata.get("items")}


def _joined(value: Any) -> Any:
    """A list of texts given for a comma-separated text option (``report_to: [tensorboard, wandb]``,
    ``lora_target_modules: [q_proj, v_proj]``) as that text; anything else as it is."""
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return ",".join(v.strip() for v in value)
    return value


def load_yaml(path: str | Path, cls: type) -> dict[str, Any]:
    """Read a YAML config for ``cls``; unknown keys are an error naming the closest valid key."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if path.is_dir():  # a pipe (--config <(...)) or another special file reads like a file
        raise ConfigError(f"--config {path} is a folder, not a YAML file")
    try:
        text = path.read_text(encoding="utf-8")
        lines = _key_lines(path, text)
        raw = yaml.load(text, Loader=_ConfigLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(err, 'problem', err)}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid YAML: nested too deeply") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of option names to values, got {type(raw).__name__}")
    valid = {f.name: tp for f, tp in _fields(cls)}
    listed = _item_fields(cls)
    out = {}
    for key, value in raw.items():
        k = str(key).replace("-", "_")
        where = f"{path}:{lines[k]}" if k in lines else str(path)
        if k not in valid:
            raise ConfigError(f"{where}: unknown option '{key}'{suggest(k, list(valid))}")
        try:
            out[k] = _plain(_convert(_joined(value) if k in listed else value, valid[k], k))
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
    return out


class _TextInt(int):
    """An integer YAML read, with the text it was written as (``12:30``, ``0x1F`` and ``010`` are
    integers in YAML 1.1: as a text option their text would be lost)."""

    text = ""


def _construct_int(loader, node):
    text = node.value
    if re.fullmatch(r"[-+]?0[0-9_]+", text):  # YAML 1.1 reads 0123 as octal 83; the command line as 123
        value = _TextInt(int(text.replace("_", "")))
    else:
        value = _TextInt(yaml.SafeLoader.construct_yaml_int(loader, node))
    value.text = text
    return value


class _ConfigLoader(yaml.SafeLoader):
    pass


_ConfigLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def _plain(value: Any) -> Any:
    if isinstance(value, _TextInt):
        return int(value)
    return [_plain(v) for v in value] if isinstance(value, list) else value


def _key_lines(path: Path, text: str) -> dict[str, int]:
    """The line of each top-level key (``-`` read as ``_``); a key given twice is an error, where
    YAML itself would keep the last value without a word."""
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode):
                name, line = str(key.value).replace("-", "_"), key.start_mark.line + 1
                if name in lines:
                    raise ConfigError(f"{path}:{line}: '{key.value}' is given twice (first on line {lines[name]})")
                lines[name] = line
    return lines


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # argparse takes -1e-3 and -inf for options (its pattern knows -1 and -.5 only): values here
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$",
                                                   re.IGNORECASE)

    def error(self, message: str):  # argparse errors become ConfigError: one line, exit 2
        prefix = "unrecognized arguments: "
        if message.startswith(prefix):
            flags = [a for a in message[len(prefix):].split() if a.startswith("--")]
            if flags:
                name = flags[0].split("=")[0]
                known = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
                message = f"unrecognized option '{name}'{suggest(name, known)}"
            else:  # `--reward-weights 2 0.5`: a second value after an option
                message += " (an option takes one value: give a list as one comma-separated value, e.g. 2,0.5)"
        raise ConfigError(message)


def build_parser(cls: type, prog: str, description: str = "") -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, description=description, argument_default=argparse.SUPPRESS, allow_abbrev=False,
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", metavar="FILE.yaml", action="append",
                        help="YAML file of options; flags override it (given more than once, a later file's keys "
                        "override an earlier's)")
    for f, tp in _fields(cls):
        if not f.metadata.get("cli", True):
            continue
        flag = "--" + f.name.replace("_", "-")
        base, _ = _base_type(tp)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        help_ = f.metadata.get("help") or ""
        if "(default" not in help_ and "(required)" not in help_:  # a help text may say it in words
            help_ += f" (default: {default!r})"
        help_ = help_.replace("%", "%%")
        kwargs: dict[str, Any] = {"help": help_, "dest": f.name}
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["metavar"] = f.name.upper()
            kwargs["type"] = str  # converted in parse_config, for uniform error messages
            if get_origin(base) in (list, tuple):  # `--reward a --reward b` is `--reward a,b` (the last one won)
                kwargs["action"] = "append"
            choices = f.metadata.get("choices") or (get_args(base) if get_origin(base) is Literal else None)
            if choices:
                kwargs["metavar"] = "{" + ",".join(map(str, choices)) + "}"
        parser.add_argument(flag, **kwargs)
    # ArgumentDefaultsHelpFormatter would print "==SUPPRESS=="; defaults are in the help text.
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser


def parse_config(cls: type[T], argv: list[str], prog: str, description: str = "") -> T:
    """Build ``cls`` from defaults, ``--config`` YAML and flags (in increasing precedence)."""
    ns = vars(build_parser(cls, prog, description).parse_args(argv))
    values: dict[str, Any] = {}
    for path in ns.pop("config", None) or []:  # layered: a later file's keys replace an earlier's
        values.update(load_yaml(path, cls))
    types_ = {f.name: tp for f, tp in _fields(cls)}
    for key, value in ns.items():
        if isinstance(value, list) and all(isinstance(v, str) for v in value):  # a repeated list option
            value = ",".join(value)
        values[key] = _convert(value, types_[key], "--" + key.replace("_", "-"))
    cfg = make_config(cls, values)
    warn_unread(cfg, set(ns))
    return cfg


def warn_unread(cfg: Any, given: set[str]) -> None:
    """A warning for each flag ``given`` on the command line that these settings do not read (a class's
    ``READ_ONLY_WITH``: ``{option: (reads(cfg), "what it needs")}``, merged over its bases): --lora-r
    without --lora had no effect, said nowhere. Flags only: a run's config.yaml holds every option."""
    rules: dict[str, tuple] = {}
    for klass in reversed(type(cfg).__mro__):
        rules.update(klass.__dict__.get("READ_ONLY_WITH", {}))
    if os.environ.get("RANK", "0") != "0":  # said once in a multi-process run
        return
    for name in sorted(given & set(rules)):
        reads, needs = rules[name]
        if not reads(cfg):
            print(f"warning: --{name.replace('_', '-')} is read only with {needs}; it has no effect here",
                  file=sys.stderr)


def make_config(cls: type[T], values: dict[str, Any]) -> T:
    """Instantiate ``cls`` and check ``choices``; runs the class's ``validate()`` if it has one."""
    valid = {f.name: tp for f, tp in _fields(cls)}
    for key in values:
        if key not in valid:
            raise ConfigError(f"unknown option '{key}'{suggest(key, list(valid))}")
    # converted as the command line's values are (a dict's "no" for a bool was True, "4" for an int a
    # TypeError at the first comparison); converting a converted value changes nothing
    listed = _item_fields(cls)
    return _finish(cls(**{k: _convert(_fspath_values(_joined(v) if k in listed else v), valid[k],
                                      "--" + k.replace("_", "-")) for k, v in values.items()}))


def check_config(cfg: T) -> T:
    """What the command line gives a config, for one built in Python (``train(DPOConfig(...))``): a
    checked copy, each value converted to its declared type (a ``Path`` becomes its text, ``"2"`` an
    int, ``"a,b"`` a list) with the same errors, then ``choices`` and ``validate()``. The caller's
    object is left as it was (``validate()`` resolves defaults such as a loss's β, which a sweep
    copying the object must not inherit). A config already checked (every one the command line
    builds), and not changed since, is returned as it is."""
    if _CHECKED.get(id(cfg)) == _snapshot(cfg):
        return cfg
    checked = copy.deepcopy(cfg)
    for f, tp in _fields(type(checked)):
        value = getattr(checked, f.name)
        setattr(checked, f.name, _convert(_fspath_values(_joined(value) if f.metadata.get("items") else value),
                                          tp, f.name))
    return _finish(checked)


def _snapshot(cfg: Any) -> str:
    return repr(dataclasses.asdict(cfg))  # repr: 2 and 2.0, 0 and False differ


def _fspath_values(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return [_fspath_values(v) for v in value]
    return value


def _finish(cfg: T) -> T:
    for f, tp in _fields(type(cfg)):
        choices = f.metadata.get("choices")
        value = getattr(cfg, f.name)
        if f.name in ("output_dir", "output") and isinstance(value, str) and not value.strip():
            # Path("") is the working directory: an unset shell variable wrote a whole run there
            raise ConfigError(f"--{f.name.replace('_', '-')} is empty (an unset variable?): give a path")
        if isinstance(value, str) and not value.strip() and _base_type(tp) == (str, True):
            # an optional path or name given empty: --eval-data "" read the working directory
            raise ConfigError(f"--{f.name.replace('_', '-')} is empty (an unset variable?): give a value, or leave "
                              "the option out")
        if choices and value is not None and value not in choices:
            raise ConfigError(f"--{f.name.replace('_', '-')}: unknown value {value!r}"
                              f"{suggest(str(value), [str(c) for c in choices])}; choose from {list(choices)}")
    if hasattr(cfg, "validate"):
        cfg.validate()
    if id(cfg) not in _CHECKED:
        weakref.finalize(cfg, _CHECKED.pop, id(cfg), None)
    _CHECKED[id(cfg)] = _snapshot(cfg)
    return cfg


# the values each live config had when it was checked, by id (kept off the object: vars(cfg) is
# printed by --dry-run and written to model cards)
_CHECKED: dict[int, str] = {}


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
