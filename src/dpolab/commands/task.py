"""`dpolab task`: write the prompt and SFT files of a built-in verifiable task (docs/grpo.md)."""

from __future__ import annotations

from dataclasses import dataclass

from dpolab.config import opt, parse_config
from dpolab.errors import ConfigError

DESCRIPTION = """Write a built-in task with a checkable answer: OUTPUT_DIR/train.jsonl and eval.jsonl (prompt/answer
rows, disjoint prompts for one --seed) and sft.jsonl (prompt/completion rows, wrong with probability --noise), for
`dpolab sft` (a partly competent start) then `dpolab grpo|rloo --reward dpolab.rewards.tasks:exact_match`.

tasks: reverse ("reverse: 3 1 4 =" -> "4 1 3"), copy ("copy: 3 1 4 =" -> "3 1 4"), add ("12+7=" -> "19")

example:
  dpolab task reverse --output-dir data/reverse
"""


@dataclass
class TaskConfig:
    task: str = opt("reverse", "which task", choices=("reverse", "copy", "add"))
    output_dir: str = opt("data/task", "where the files go")
    train: int = opt(512, "training prompts")
    eval: int = opt(128, "held-out evaluation prompts (none of them in train.jsonl or sft.jsonl of the same --seed)")
    sft: int = opt(2048, "SFT rows (0: no sft.jsonl, and an earlier one in --output-dir is removed)")
    noise: float = opt(0.5, "probability that an SFT completion is wrong (a same-shape corruption)")
    seed: int = opt(0, "random seed; the files of different seeds share prompts (seed s+1's train.jsonl repeats "
                    "seed s's eval prompts): use one seed's files together")

    def validate(self) -> None:
        if self.train < 1 or self.eval < 1 or self.sft < 0:
            raise ConfigError("need --train >= 1, --eval >= 1 and --sft >= 0")
        if not 0 <= self.noise <= 1:
            raise ConfigError("--noise must be in [0, 1]")


def cli_main(argv: list[str], prog: str) -> int:
    from dpolab.rewards.tasks import write_task
    from dpolab.runs.rundir import check_writable

    if argv and not argv[0].startswith("-"):  # `dpolab task reverse ...`
        if any(a == "--task" or a.startswith("--task=") for a in argv[1:]):
            raise ConfigError(f"the task is given twice: '{argv[0]}' and --task; give one")
        argv = ["--task", argv[0], *argv[1:]]
    cfg = parse_config(TaskConfig, argv, prog=prog, description=DESCRIPTION)
    check_writable("--output-dir", cfg.output_dir, folder=True)
    try:
        files = write_task(cfg.task, cfg.output_dir, train=cfg.train, eval=cfg.eval, sft=cfg.sft, noise=cfg.noise,
                           seed=cfg.seed)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    for name, path in files.items():
        print(f"{name}: {path}")
    return 0
