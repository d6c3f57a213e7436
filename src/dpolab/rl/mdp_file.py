"""MDP files: an MDP described in YAML or JSON (format: examples/student_mdp.yaml), read with every
mistake a one-line error naming the file, the line where known, the state and the action."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from dpolab.errors import DataError
from dpolab.rl.mdp import ATOL, MDP, MDPError


def load_mdp_file(path: str | Path, gamma: float | None = None) -> MDP:
    """An MDP from YAML or JSON (format: examples/student_mdp.yaml); ``gamma`` overrides the file's.
    A key given twice in one mapping is an error naming its line (both readers would keep the last)."""
    import yaml

    path = Path(path)
    if path.is_dir():
        raise DataError("is a folder, not an MDP file", path=str(path))
    if not path.is_file():
        raise DataError("file not found", path=str(path))
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".json":
            try:
                raw = json.loads(text, object_pairs_hook=_json_pairs_once, parse_int=_WrittenInt.parse,
                                 parse_float=_WrittenFloat.parse)
            except _GivenTwice as dup:
                try:
                    _yaml_load_once(text)  # JSON is YAML: its nodes locate the key (raising _GivenTwice)
                except (yaml.YAMLError, RecursionError):  # JSON YAML cannot read (tabs): no line then
                    pass
                raise DataError(str(dup), path=str(path)) from None
        else:
            raw = _yaml_load_once(text)
    except _GivenTwice as dup:
        raise DataError(str(dup), path=str(path), line=dup.line) from None
    except yaml.MarkedYAMLError as err:  # the line, column and problem, not only what was being parsed
        mark = err.problem_mark or err.context_mark
        what = "; ".join(x for x in (err.context, err.problem) if x) or str(err).splitlines()[0]
        raise DataError(f"malformed MDP file: {what}" + (f" (column {mark.column + 1})" if mark else ""),
                        path=str(path), line=mark.line + 1 if mark else None) from None
    except json.JSONDecodeError as err:
        raise DataError(f"malformed MDP file: {err.msg} (column {err.colno})", path=str(path),
                        line=err.lineno) from None
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as err:
        raise DataError(f"malformed MDP file: {str(err).splitlines()[0]}", path=str(path)) from None
    if not isinstance(raw, dict):
        raise DataError("expected a mapping with 'states' and 'transitions'", path=str(path))
    if gamma is not None:
        raw = {**raw, "gamma": gamma}
    try:
        return mdp_from_dict(raw)
    except MDPError as err:
        raise DataError(str(err), path=str(path)) from None


class _GivenTwice(Exception):
    """A key given twice in one mapping of an MDP file; ``line`` is 1-based, None where unknown."""

    def __init__(self, message: str, line: int | None = None):
        super().__init__(message)
        self.line = line


def _json_pairs_once(pairs: list) -> dict:
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise _GivenTwice(f"'{key}' is given twice")
        seen.add(key)
    return dict(pairs)


def _yaml_load_once(text: str):
    """``yaml.load`` with the MDP loader, after checking that no mapping gives a key twice (the
    approach of dpolab.config's ``_key_lines``, on every mapping rather than the top level only)."""
    loader = _mdp_loader()(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _names_as_written(node, (), set())  # first: the key check compares the names a run will use
        _check_keys_once(node, loader, (), set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_keys_once(node, loader, path: tuple, seen: set) -> None:
    import yaml

    if id(node) in seen:  # an alias: checked where it was anchored (and a recursive one would not end)
        return
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_keys_once(item, loader, (*path, str(i)), seen)
    if not isinstance(node, yaml.MappingNode):
        return
    first: dict[str, int] = {}
    for key, value in node.value:
        # merge keys (<<) are resolved later, and may rightly be overridden; complex keys are no names
        if not isinstance(key, yaml.ScalarNode) or key.tag.endswith((":merge", ":value")):
            continue
        name, line = _name(loader.construct_object(key)), key.start_mark.line + 1
        if name in first:
            raise _GivenTwice(f"{_twice(path, name)} (first on line {first[name]})", line)
        first[name] = line
        _check_keys_once(value, loader, (*path, name), seen)


_STR = "tag:yaml.org,2002:str"


def _names_as_written(node, path: tuple, seen: set) -> None:
    """Read every name as the text written: mapping keys (states, actions, next states), the items of
    ``states`` and ``actions``, a single ``next`` state and ``initial``. YAML would read a plain
    ``010``, ``12:30`` or ``2.50`` as the numbers 8, 750 (YAML 1.1) and 2.5."""
    import yaml

    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            if path in (("states",), ("actions",)) and isinstance(item, yaml.ScalarNode):
                item.tag = _STR
            _names_as_written(item, (*path, "-"), seen)
    if not isinstance(node, yaml.MappingNode):
        return
    for key, value in node.value:
        if not isinstance(key, yaml.ScalarNode) or key.tag.endswith((":merge", ":value")):
            continue
        key.tag = _STR
        sub = (*path, key.value)
        if isinstance(value, yaml.ScalarNode) and (sub == ("initial",) or (len(sub) == 4 and sub[0] == "transitions"
                                                                          and sub[3] == "next")):
            value.tag = _STR
        _names_as_written(value, sub, seen)


class _Written:
    """A JSON number that remembers its text (``2.50``, ``1e2``), so that it names the state written."""

    written: str

    @classmethod
    def parse(cls, text: str):
        x = cls(text)
        x.written = text
        return x


class _WrittenInt(_Written, int):
    pass


class _WrittenFloat(_Written, float):
    pass


def _name(value) -> str:
    """A state or action name from a file's value: the text written where it was a number."""
    if isinstance(value, bool):  # a JSON true/false (YAML names are text already)
        return "true" if value else "false"
    return getattr(value, "written", None) or str(value)


def _twice(path: tuple, key: str) -> str:
    """'... is given twice', worded by where the mapping sits in the MDP file."""
    if path[:1] == ("transitions",):
        if len(path) == 1:
            return f"transitions: state '{key}' is given twice"
        if len(path) == 2:
            return f"state '{path[1]}': action '{key}' is given twice"
        if len(path) == 3:
            return f"state '{path[1]}' action '{path[2]}': '{key}' is given twice"
        if len(path) == 4 and path[3] == "next":
            return f"state '{path[1]}' action '{path[2]}': next state '{key}' is given twice"
    return (f"{'.'.join(path)}: " if path else "") + f"'{key}' is given twice"


def _mdp_loader():
    """YAML's safe loader with YAML 1.2's booleans only (true/false): state and action names such as
    ``on``, ``off``, ``yes``, ``no`` stay the text written, not True/False."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    bool_tag = "tag:yaml.org,2002:bool"
    Loader.yaml_implicit_resolvers = {first: [(tag, rx) for tag, rx in resolvers if tag != bool_tag]
                                      for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    Loader.add_implicit_resolver(bool_tag, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
    return Loader


def mdp_from_dict(raw: dict) -> MDP:
    """Build an MDP from ``{gamma, states, [actions], [initial], transitions: {state: {action:
    {reward: r, next: state | {state: prob}}}}}``. A state without transitions is terminal."""
    unknown = set(raw) - {"gamma", "states", "actions", "initial", "transitions"}
    if unknown:
        raise MDPError(f"unknown key(s) {sorted(unknown)}; expected gamma, states, actions, initial, transitions")
    for key in ("gamma", "states", "transitions"):
        if key not in raw:
            raise MDPError(f"missing key '{key}'")
    states, trans = raw["states"], raw["transitions"]
    if not isinstance(states, list) or not states:
        raise MDPError("'states' must be a non-empty list of names")
    states = [_name(s) for s in states]
    if not isinstance(trans, dict):
        raise MDPError("'transitions' must map states to {action: {reward, next}}")
    ix = {s: i for i, s in enumerate(states)}
    actions = [_name(a) for a in raw.get("actions") or []]
    for s, acts in trans.items():
        if _name(s) not in ix:
            raise MDPError(f"transitions: unknown state '{s}'")
        if not isinstance(acts, dict):
            raise MDPError(f"transitions of '{s}' must map actions to {{reward, next}}")
        for a in acts:
            if _name(a) not in actions:
                if raw.get("actions"):
                    raise MDPError(f"state '{s}': action '{a}' is not in 'actions'")
                actions.append(_name(a))
    if not actions:
        raise MDPError("no actions: every state is terminal")
    S, A = len(states), len(actions)
    P, R, mask = np.zeros((S, A, S)), np.zeros((S, A)), np.zeros((S, A), dtype=bool)
    for s, acts in trans.items():
        i = ix[_name(s)]
        for a, spec in acts.items():
            j = actions.index(_name(a))
            where = f"state '{s}' action '{a}'"
            if not isinstance(spec, dict) or "next" not in spec:
                raise MDPError(f"{where}: expected {{reward: number, next: state or {{state: prob}}}}")
            if extra := sorted(map(str, set(spec) - {"reward", "next"})):  # a misspelt reward would read as 0
                raise MDPError(f"{where}: unknown key(s) {extra}; expected reward and next")
            nxt = spec["next"]
            # a name YAML reads as a number (states: [1, 2.5]) names a state too, as in 'states'
            nxt = {nxt: 1.0} if isinstance(nxt, (str, int, float)) and not isinstance(nxt, bool) else nxt
            if not isinstance(nxt, dict) or not nxt:
                raise MDPError(f"{where}: 'next' must be a state name or a mapping of state -> probability")
            for t, p in nxt.items():
                if _name(t) not in ix:
                    raise MDPError(f"{where}: unknown next state '{t}'")
                P[i, j, ix[_name(t)]] += _number(p, f"{where}: probability of '{t}'")
            total = P[i, j].sum()
            if P[i, j].min() < 0:
                raise MDPError(f"{where}: negative probability")
            if abs(total - 1.0) > ATOL:
                raise MDPError(f"{where}: probabilities sum to {total:.6g}, not 1")
            if "reward" not in spec:  # as with a misspelt 'rewrd': an omitted reward is no reward of 0
                raise MDPError(f"{where}: reward missing")
            R[i, j] = _number(spec["reward"], f"{where}: reward")
            mask[i, j] = True
    for i in range(S):
        if not mask[i].any():  # terminal: absorbing, zero reward, every action allowed
            P[i, :, i], mask[i] = 1.0, True
        else:
            P[i, ~mask[i], i] = 1.0  # placeholder rows for unavailable actions (never chosen)
    initial = raw.get("initial")
    if initial is not None:
        if _name(initial) not in ix:
            raise MDPError(f"initial: unknown state '{initial}'")
        initial = ix[_name(initial)]
    return MDP(P, R, raw["gamma"], states, actions, mask, initial)


def _number(value, what: str) -> float:
    """A finite float from a file's value (numbers, or text such as YAML 1.1's unquoted ``1e3``)."""
    try:
        if isinstance(value, bool):  # float(True) is 1.0: `reward: true` is a slip, not a reward of 1
            raise TypeError
        x = float(value)
    except (TypeError, ValueError):
        raise MDPError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(x):  # NaN would also pass the sum-to-1 check (NaN comparisons are False)
        raise MDPError(f"{what} must be a finite number, got {value!r}")
    return x
