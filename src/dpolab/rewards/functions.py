"""Reward functions: what on-policy trainers and evaluations score completions with.

A *reward function* is any ``f(prompts: list[str], completions: list[str]) -> list[float]`` (one
finite number per pair; TRL's ``f(completions, **kwargs)`` and ``async def`` functions too). It can be a Python callable named ``module:function`` (or
``path/to/file.py:function``), see :func:`load_reward_function`, or a trained reward model folder,
see :func:`reward_model_function` and :func:`score`. :func:`compute_rewards` calls one and checks
its answer.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import math
import os
import sys
import sysconfig
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from dpolab.errors import DpolabError

RewardFn = Callable[[list[str], list[str]], Sequence[float]]

__all__ = ["RewardFn", "WeightedRewards", "compute_rewards", "load_reward_function", "reward_model_function", "score"]


def load_reward_function(spec: str) -> RewardFn:
    """Import ``module:function`` (the current directory and PYTHONPATH are searched) or
    ``path/to/file.py:function``. Raises :class:`DpolabError` for a malformed spec, a module that
    cannot be imported, or a missing / non-callable attribute."""
    module_name, sep, attr = str(spec).rpartition(":")
    if not sep or not module_name or not attr:
        raise DpolabError(f"--reward {spec!r}: expected 'module:function' or 'file.py:function'")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise DpolabError(f"--reward {spec!r}: file not found: {path}")
            folder = str(path.resolve().parent)  # its own imports find the modules beside it, as `python file.py`'s do
            if folder not in sys.path:
                sys.path.insert(0, folder)
            mod_spec = importlib.util.spec_from_file_location(f"_dpolab_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(mod_spec)  # type: ignore[arg-type]
            mod_spec.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except DpolabError:
        raise
    except (Exception, SystemExit) as err:  # an import error, or any error (or exit) from the module's own code
        raise DpolabError(f"--reward {spec!r}: cannot import '{module_name}': "
                          f"{type(err).__name__}: {err}") from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise DpolabError(f"--reward {spec!r}: module '{module_name}' has no attribute '{attr}'")
    if not callable(fn):
        raise DpolabError(f"--reward {spec!r}: '{attr}' is not callable")
    return fn


def reward_model_function(model, tokenizer, *, batch_size: int = 16, max_length: int | None = None,
                          max_prompt_length: int | None = None, name: str | None = None) -> RewardFn:
    """A reward function scoring with a trained reward model through :func:`score`; ``max_length`` and
    ``max_prompt_length`` truncate as the reward model's training did (the prompt keeps its end).
    ``name`` (e.g. its folder) is what errors call it."""
    def scorer(prompts: list[str], completions: list[str]) -> list[float]:
        out = score(model, prompts, completions, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                    max_prompt_length=max_prompt_length, name=name)
        return [float(x) for x in (out.tolist() if hasattr(out, "tolist") else out)]

    if name:
        scorer.__qualname__ = f"(reward model {name})"
    return scorer


_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def compute_rewards(fn: RewardFn, prompts: list[str], completions: list[str],
                    columns: dict[str, list] | None = None, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Call ``fn`` and check its answer: one finite real number per completion. Returns (B,) ``dtype``
    (float32 for training; evaluation compares rewards in float64, where float32 would round
    close values into ties).

    ``columns``: the prompt rows' other fields (e.g. a reference ``answer``), one list per field
    aligned with ``prompts``, passed as keyword arguments to a function that names them (or takes
    ``**kwargs``): ``f(prompts, completions, answer)`` receives the answers.

    Raises :class:`DpolabError` naming the function for an exception inside it, a non-sequence, a
    wrong length, a non-number or a NaN/inf."""
    name = getattr(fn, "__qualname__", repr(fn))
    prompts, completions = list(prompts), list(completions)  # any iterables, as before
    sizes = {"prompts": len(prompts), "completions": len(completions),
             **{f"column '{k}'": len(v) for k, v in (columns or {}).items()}}
    if len(set(sizes.values())) > 1:  # a caller's bug: the reward would score misaligned rows
        raise DpolabError("compute_rewards needs one prompt (and column value) per completion, got "
                          + ", ".join(f"{n} {k}" for k, n in sizes.items()))
    try:
        signature = _signature(fn)
        given = _accepted(signature, columns or {})
        if signature[0]:  # TRL's form, f(completions, **kwargs): the texts by name
            out = fn(prompts=list(prompts), completions=list(completions), **given)
        else:
            out = fn(list(prompts), list(completions), **given)
        if inspect.isawaitable(out):  # an async reward (e.g. one that asks a server)
            out = asyncio.run(_awaited(out))
    except DpolabError:  # already says which reward and what (a combination of rewards calls this per reward)
        raise
    except (Exception, SystemExit) as err:  # sys.exit() in a reward would end the run with its code
        raise DpolabError(f"reward function {name} raised {type(err).__name__}{_where(err)}"
                          + (f": {err}" if str(err) else "")) from None
    if isinstance(out, torch.Tensor):
        out = out.detach().cpu().reshape(-1).tolist() if out.dim() <= 1 else out
    elif hasattr(out, "tolist") and getattr(out, "ndim", 1) <= 1:
        out = out.tolist()
    if not isinstance(out, (list, tuple)):
        raise DpolabError(f"reward function {name} must return a list of floats, got {type(out).__name__}")
    if len(out) != len(completions):
        raise DpolabError(f"reward function {name} returned {len(out)} values for {len(completions)} completions")
    values = []

    def at(i: int) -> str:  # which completion: a bad value is usually about its text
        return f"at position {i} (prompt {_short(prompts[i])}, completion {_short(completions[i])})"

    for i, v in enumerate(out):
        if hasattr(v, "item") and getattr(v, "ndim", None) == 0:  # a numpy scalar or 0-d tensor
            v = v.item()
        if not isinstance(v, (int, float)):  # (a bool is an int: True is 1.0, as for an exact-match reward)
            raise DpolabError(f"reward function {name} returned {type(v).__name__} {at(i)}; expected a float")
        try:
            number = float(v)
        except OverflowError:  # an int beyond any float
            number = math.inf
        if not math.isfinite(number):
            raise DpolabError(f"reward function {name} returned a non-finite value ({_short(v)}) {at(i)}")
        if dtype == torch.float32 and abs(number) > _FLOAT32_MAX:  # would be inf in the float32 rewards
            raise DpolabError(f"reward function {name} returned {_short(v)} {at(i)}, beyond float32's "
                              f"range (±{_FLOAT32_MAX:.3g}); scale the reward down")
        values.append(number)
    return torch.tensor(values, dtype=dtype)


async def _awaited(awaitable):
    return await awaitable


def _where(err: BaseException) -> str:
    """`` at FILE:LINE in FUNCTION``: where in the reward's code the error was raised (its last frame)."""
    frames = traceback.extract_tb(err.__traceback__)[1:]  # after compute_rewards' own frame
    libraries = {sysconfig.get_paths()[k] for k in ("stdlib", "purelib", "platlib")}
    own = [f for f in frames if not any(f.filename.startswith(d) for d in libraries)] or frames
    if not own:
        return ""
    last = own[-1]  # the innermost line of the reward's own code (not numpy's, say)
    return f" at {last.filename}:{last.lineno} in {last.name}"


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...{text[-8:]} ({len(text)} characters)"


@torch.no_grad()
def score(model, prompts: Sequence[str], completions: Sequence[str], *, tokenizer=None, batch_size: int = 32,
          max_length: int | None = None, max_prompt_length: int | None = None, name: str | None = None) -> list[float]:
    """Rewards ``r(prompt_i, completion_i)``, one float per pair, in order.

    ``model``: a folder or hub name of a reward model (``dpolab rm``'s ``final/``), a loaded
    ``*ForSequenceClassification`` model, or a :class:`RewardModel`. ``tokenizer`` defaults to the
    one saved with the model. ``max_length``/``max_prompt_length`` truncate as in training (default:
    no truncation). A row longer than the model's positions, or a token id beyond its embedding, is
    a :class:`DpolabError` naming the model (``name``, default its path) and the row."""
    from dpolab.data.preference import encode_prompt_completions
    from dpolab.lm.loading import load_tokenizer, pad_token_id_for
    from dpolab.lm.reward_model import RewardModel, load_reward_model

    if len(prompts) != len(completions):  # before any model loads
        raise DpolabError(f"{len(prompts)} prompts but {len(completions)} completions")
    if isinstance(model, (str, Path)):
        tokenizer = tokenizer or load_tokenizer(str(model))
        model = load_reward_model(str(model), tokenizer, trained=True)
    if tokenizer is None:
        inner = model.model if isinstance(model, RewardModel) else model
        source = getattr(inner, "name_or_path", "") or getattr(getattr(inner, "config", None), "_name_or_path", "")
        if not source:
            raise DpolabError("score() needs tokenizer= for a model loaded without a name or path")
        tokenizer = load_tokenizer(source)
    if batch_size < 1:
        raise DpolabError("batch_size must be >= 1")
    rm = model if isinstance(model, RewardModel) else RewardModel(model)
    was_training = rm.training
    rm.eval()
    pad = pad_token_id_for(tokenizer)
    device = next(rm.parameters()).device
    rows = encode_prompt_completions(tokenizer, list(prompts), list(completions), max_length=max_length,
                                     max_prompt_length=max_prompt_length)
    _check_rows_fit(rm, rows, name, prompts)
    out: list[float] = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        width = max(len(r) for r in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, r in enumerate(chunk):
            ids[j, :len(r)], mask[j, :len(r)] = torch.tensor(r), 1
        out += rm(ids.to(device), mask.to(device)).tolist()
    rm.train(was_training)
    return out


#: the arguments every reward gets: a prompt row's field of one of these names is not passed as a column
TEXT_ARGUMENTS = ("prompts", "completions")


def _signature(fn) -> tuple[bool, list, bool]:
    """``(keywords, column parameters, takes **kwargs)``. ``keywords``: the texts go by name, as TRL
    passes them, for a function naming both ``prompts`` and ``completions`` or taking ``**kwargs``
    with fewer than two positional parameters (``f(completions, **kwargs)``); else they are the first
    two positional arguments, whatever their names. The column parameters are the others (no
    parameters when the signature cannot be read)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False, [], False
    var_keyword = any(p.kind is p.VAR_KEYWORD for p in params)
    named = [p for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = {p.name for p in named}
    keywords = set(TEXT_ARGUMENTS) <= names or (var_keyword and len(positional) < 2
                                               and not any(p.kind is p.VAR_POSITIONAL for p in params))
    columns = [p for p in named if p.name not in TEXT_ARGUMENTS] if keywords else named[2:]
    return keywords, columns, var_keyword


def _check_rows_fit(rm, rows: list[list[int]], name: str | None, prompts) -> None:
    """Each tokenized row within the reward model's positions and embedding rows (an IndexError deep in
    its forward otherwise)."""
    config = rm.model.config
    name = name or getattr(config, "_name_or_path", "") or "the reward model"
    positions = getattr(config, "max_position_embeddings", None)
    vocab = rm.model.get_input_embeddings().num_embeddings
    for i, r in enumerate(rows):
        if positions is not None and len(r) > positions:
            raise DpolabError(f"reward model {name}: prompt {i} ({_short(prompts[i])}) and its completion are "
                              f"{len(r)} of its tokens, more than its {positions} positions; cut them (--max-new-tokens "
                              "or --max-prompt-length; score()'s max_length/max_prompt_length), or use a reward "
                              "model with more positions")
        if r and max(r) >= vocab:
            raise DpolabError(f"reward model {name}: its tokenizer gives id {max(r)} (prompt {i}), beyond its "
                              f"{vocab} embedding rows: the folder's tokenizer and model do not belong together")


def required_columns(fn) -> dict[str, str]:
    """``{field: reward name}``: the row fields a reward cannot be called without, its parameters after
    ``(prompts, completions)`` that have no default (for :class:`WeightedRewards`, its functions')."""
    if isinstance(fn, WeightedRewards):
        return {c: n for _, f in fn.named for c, n in required_columns(f).items()}
    name = getattr(fn, "__qualname__", repr(fn))
    return {p.name: name for p in _signature(fn)[1] if p.default is p.empty}


def _accepted(signature: tuple[bool, list, bool], columns: dict[str, list]) -> dict[str, list]:
    """The columns a function of ``signature`` (:func:`_signature`) takes as keyword arguments: all of
    them for ``**kwargs``, else those it names."""
    columns = {k: v for k, v in (columns or {}).items() if k not in TEXT_ARGUMENTS}
    if not columns:
        return {}
    _, named, var_keyword = signature
    if var_keyword:
        return columns
    return {p.name: columns[p.name] for p in named if p.name in columns}


class WeightedRewards:
    """Several reward functions with weights: the score is ``Σ_k w_k·r_k(prompt, completion)``.

    ``named``: ``[(name, fn)]`` (names are metric keys: ``rewards/<name>``); ``weights``: one per
    function (default all 1)."""

    def __init__(self, named: list[tuple[str, RewardFn]], weights: Sequence[float] | None = None):
        if not named:
            raise DpolabError("no reward function given")
        weights = [1.0] * len(named) if weights is None else [float(w) for w in weights]
        if len(weights) != len(named):
            raise DpolabError(f"{len(weights)} reward weights for {len(named)} reward functions")
        self.named, self.weights = named, weights

    def score(self, prompts: list[str], completions: list[str], columns: dict[str, list] | None = None, *,
              dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(scores (B,), {name: (B,) rewards})``: the weighted sum and each function's values."""
        terms = {name: compute_rewards(fn, prompts, completions, columns, dtype=dtype) for name, fn in self.named}
        total = sum(w * terms[name] for (name, _), w in zip(self.named, self.weights))
        if not bool(torch.isfinite(total).all()):  # each term is finite: their weighted sum overflowed
            i = int((~torch.isfinite(total)).nonzero()[0])
            raise DpolabError(f"the weighted sum of the rewards ({', '.join(n for n, _ in self.named)}) is beyond "
                              f"{str(dtype).removeprefix('torch.')}'s range at position {i}; scale the rewards or "
                              "their weights down")
        return total, terms

    def __call__(self, prompts: list[str], completions: list[str], **columns) -> list[float]:
        """As a plain reward function: the weighted sum (in float64; the caller rounds)."""
        return self.score(prompts, completions, columns, dtype=torch.float64)[0].tolist()
