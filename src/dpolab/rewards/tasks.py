"""Built-in tasks with a checkable answer: prompts whose reward is exact match, for the critic-free
trainers (``dpolab grpo``, ``dpolab rloo``) and their tests, learnable by a tiny model on a CPU.

Each task maps a seeded random generator to ``(prompt, answer)``:

* ``reverse``: ``"reverse: 3 1 4 ="`` → ``"4 1 3"`` (3 to 5 digits);
* ``copy``: ``"copy: 3 1 4 ="`` → ``"3 1 4"``;
* ``add``: ``"12+7="`` → ``"19"`` (two numbers below 50).

:func:`write_task` writes prompt files (``train.jsonl``, ``eval.jsonl``: rows ``{"prompt", "answer"}``,
disjoint prompts) and an SFT file (``sft.jsonl``: ``{"prompt", "completion"}``) whose completions
are right with probability ``1 − noise`` and otherwise a corruption of the same shape, so a model
fine-tuned on it starts with partial accuracy for RL to raise. :func:`exact_match` is the reward:
``--reward dpolab.rewards.tasks:exact_match`` (it receives the rows' ``answer`` field).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

__all__ = ["TASKS", "exact_match", "make_examples", "write_task"]


def _digits(rng: random.Random) -> list[str]:
    return [str(rng.randrange(10)) for _ in range(rng.randint(3, 5))]


def _reverse(rng: random.Random) -> tuple[str, str]:
    d = _digits(rng)
    return f"reverse: {' '.join(d)} =", " ".join(reversed(d))


def _copy(rng: random.Random) -> tuple[str, str]:
    d = _digits(rng)
    return f"copy: {' '.join(d)} =", " ".join(d)


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(50), rng.randrange(50)
    return f"{a}+{b}=", str(a + b)


TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {"reverse": _reverse, "copy": _copy, "add": _add}
# distinct prompts each can draw: 3 to 5 digits; two numbers below 50
SIZES = {"reverse": 10**3 + 10**4 + 10**5, "copy": 10**3 + 10**4 + 10**5, "add": 50 * 50}


def _corrupt(answer: str, rng: random.Random) -> str:
    """A wrong answer of the same shape: every digit redrawn, at least one changed."""
    while True:
        wrong = "".join(str(rng.randrange(10)) if ch.isdigit() else ch for ch in answer)
        if wrong != answer:
            return wrong


def make_examples(task: str, n: int, seed: int, *, exclude: set[str] | frozenset = frozenset(),
                  flag: str = "") -> list[tuple[str, str]]:
    """``n`` distinct (prompt, answer) pairs of ``task`` whose prompts are not in ``exclude``; ``flag``
    names the option that asked for ``n`` in the error when there are fewer."""
    if task not in TASKS:
        raise ValueError(f"unknown task '{task}'; choose from {', '.join(TASKS)}")
    rng, seen, out = random.Random(seed), set(exclude), []
    held = f" besides the {len(exclude)} evaluation prompts (--eval), which it never reuses" if exclude else ""
    # more than the task holds is said at once (drawing 100·n times first took minutes, or forever)
    for _ in range(100 * n + 1000 if n <= SIZES[task] - len(exclude) else 0):
        if len(out) == n:
            return out
        prompt, answer = TASKS[task](rng)
        if prompt not in seen:
            seen.add(prompt)
            out.append((prompt, answer))
    raise ValueError(f"task '{task}' has fewer than {n} distinct prompts{held}; ask for fewer"
                     + (f" ({flag} {n})" if flag else ""))


def write_task(task: str, output_dir: str | Path, *, train: int = 512, eval: int = 128, sft: int = 2048,
               noise: float = 0.5, seed: int = 0) -> dict[str, Path]:
    """Write ``train.jsonl``, ``eval.jsonl`` (prompt/answer rows; eval prompts disjoint from the others)
    and ``sft.jsonl`` (prompt/completion, wrong with probability ``noise``; when ``sft`` is 0, none, and
    an earlier one in ``output_dir`` is removed). Returns the paths written.

    The eval prompts are held out only from the files of the same ``seed``: eval, train, the SFT
    corruptions and the SFT prompts are drawn with generators seeded ``seed + 1``, ``seed``,
    ``seed + 2`` and ``seed + 3``, so another seed's files share draws (``seed + 1``'s train.jsonl
    repeats this eval.jsonl's prompts). Use one seed's files together."""
    out = Path(output_dir)
    evals = make_examples(task, eval, seed + 1, flag="--eval")
    held = {p for p, _ in evals}
    trains = make_examples(task, train, seed, exclude=held, flag="--train")
    rng = random.Random(seed + 2)
    sfts = [(p, a if rng.random() >= noise else _corrupt(a, rng))
            for p, a in make_examples(task, sft, seed + 3, exclude=held, flag="--sft")] if sft else []
    out.mkdir(parents=True, exist_ok=True)  # only once every row is made: a bad size leaves no folder
    files = {"train": out / "train.jsonl", "eval": out / "eval.jsonl"}
    _write(files["train"], [{"prompt": p, "answer": a} for p, a in trains])
    _write(files["eval"], [{"prompt": p, "answer": a} for p, a in evals])
    if sfts:  # an empty sft.jsonl would only fail later, in `dpolab sft`, as a file without rows
        files["sft"] = out / "sft.jsonl"
        _write(files["sft"], [{"prompt": p, "completion": " " + c} for p, c in sfts])
    else:  # an earlier task's file would share prompts with this eval.jsonl
        (out / "sft.jsonl").unlink(missing_ok=True)
    return files


def _write(path: Path, rows: list[dict]) -> None:
    from dpolab.runs.rundir import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def exact_match(prompts: list[str], completions: list[str], answer: list[str]) -> list[float]:
    """1.0 where the completion, stripped of surrounding white space, is the answer; else 0.0."""
    return [float(c.strip() == str(a).strip()) for c, a in zip(completions, answer)]
