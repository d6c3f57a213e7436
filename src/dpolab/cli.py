"""The `dpolab` command line: a thin dispatcher.

Each command lives in its own module exposing ``cli_main(argv: list[str], prog: str) -> int``;
the dispatcher imports only the module of the command that runs, so ``dpolab --help`` is instant
and a command's heavy imports (torch, transformers) are paid only when it is used.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

from dpolab import __version__
from dpolab.errors import DpolabError

# name -> (module, one-line help); a dict value is a command group.
COMMANDS: dict[str, tuple[str, str] | dict[str, tuple[str, str]]] = {
    "demo": ("dpolab.experiments.sentiment", "the DPO paper's controlled-sentiment experiment (main job)"),
    "dpo": ("dpolab.train.dpo", "Direct Preference Optimization (and IPO, SimPO, ...) on preference pairs"),
    "sft": ("dpolab.train.sft", "supervised fine-tuning of a causal LM"),
    "rm": ("dpolab.train.rm", "train a Bradley-Terry reward model on preference pairs"),
    "ppo": ("dpolab.train.ppo", "PPO for a language model against a KL-penalised reward"),
    "grpo": ("dpolab.train.grpo", "GRPO: group-relative policy optimization against rewards (no critic)"),
    "rloo": ("dpolab.train.rloo", "RLOO: REINFORCE with a leave-one-out baseline against rewards"),
    "online-dpo": ("dpolab.train.online_dpo", "online DPO: pairs sampled from the policy, ranked by a reward"),
    "kto": ("dpolab.train.kto", "KTO on unpaired desirable/undesirable completions (or split pairs)"),
    "generate": ("dpolab.commands.generate", "sample completions of a causal LM for prompts, as JSONL"),
    "eval": ("dpolab.commands.evaluate", "reward, KL to a reference and win rates of models on prompts"),
    "task": ("dpolab.commands.task", "write a built-in verifiable task (prompts, answers, noisy SFT data)"),
    "rl": {
        "solve": ("dpolab.rl.cli", "solve a finite MDP exactly (policy or value iteration)"),
        "evaluate": ("dpolab.rl.cli", "Monte Carlo and TD(0) policy evaluation, with learning curves"),
        "ppo": ("dpolab.rl.gym_ppo", "PPO on a Gymnasium environment"),
        "a2c": ("dpolab.rl.gym_a2c", "advantage actor-critic on a Gymnasium environment"),
    },
}


def available_commands(table: dict) -> dict:
    """The commands whose module is there, found on disk: ``importlib.util.find_spec`` would import
    each command's packages (and their heavy dependencies) just to list them."""
    root = Path(__file__).resolve().parent.parent
    out = {}
    for name, entry in table.items():
        if isinstance(entry, dict):
            sub = available_commands(entry)
            if sub:
                out[name] = sub
        elif (root / (entry[0].replace(".", "/") + ".py")).is_file():
            out[name] = entry
    return out


def _usage(prog: str, table: dict) -> str:
    lines = [f"usage: {prog} COMMAND [options]   ({prog} COMMAND --help for a command's options)", "",
             "commands:"]
    for name, entry in table.items():
        if isinstance(entry, dict):
            for sub, (_, help_) in entry.items():
                lines.append(f"  {name + ' ' + sub:<14} {help_}")
        else:
            lines.append(f"  {name:<14} {entry[1]}")
    return "\n".join(lines)


def _quiet_libraries() -> None:
    """Our own progress bars and messages say what is happening; keep the libraries' per-file loading
    bars and load reports out of the way unless the user asked for them (env vars win)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_libraries()
    table = available_commands(COMMANDS)
    prog = "dpolab"
    while True:
        if not argv or argv[0] in ("-h", "--help"):
            print(_usage(prog, table))
            return 0
        if argv[0] == "--version":
            print(f"dpolab {__version__}")
            return 0
        name, argv = argv[0], argv[1:]
        if name not in table:
            print(f"{prog}: error: unknown command '{name}'\n\n{_usage(prog, table)}", file=sys.stderr)
            return 2
        entry, prog = table[name], f"{prog} {name}"
        if isinstance(entry, dict):
            table = entry
            continue
        module = importlib.import_module(entry[0])
        try:
            return _run(module, entry[0], argv, prog, name)
        finally:
            if _close_process_group():
                _RAN_IN_GROUP.append(True)


def _run(module, module_name: str, argv: list[str], prog: str, name: str) -> int:
    try:
        if module_name == "dpolab.rl.cli":  # one module serves several rl subcommands
            return int(module.cli_main(argv, prog, command=name) or 0)
        return int(module.cli_main(argv, prog) or 0)
    except DpolabError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout went away (`| head`): stop quietly, as Unix tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's last flush would raise it again
        return 141
    except RuntimeError as err:
        if not _peer_failure(err):
            raise
        # another process ended (its own error is above): this one's traceback would bury it
        print(f"{prog}: error: another process of this run stopped (its error is above), so this one stops "
              f"too ({type(err).__name__} in a collective)", file=sys.stderr)
        return 1


def _peer_failure(err: RuntimeError) -> bool:
    """An error of a multi-process run's collective because another process exited (gloo: the
    connection reset or closed; NCCL/the store: a DistBackendError or DistNetworkError)."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return False
    text = str(err)
    return (type(err).__name__ in ("DistBackendError", "DistNetworkError")
            or any(s in text for s in ("Connection reset by peer", "Connection closed by peer", "Broken pipe")))


_RAN_IN_GROUP: list[bool] = []


def entry() -> int:
    """The ``dpolab`` executable and ``python -m dpolab``: :func:`main`, then, for a rank of a
    multi-process run, an exit without the interpreter's finalisation (:func:`_exit_process`)."""
    code = main()
    _ignore_late_signals()
    if _RAN_IN_GROUP:
        _exit_process(code)
    return code


def _ignore_late_signals() -> None:
    """The command has ended and written everything: a SIGTERM/SIGINT now (a scheduler's time limit,
    a launcher's forward, arriving as the process exits) would only turn its status into 143/130."""
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def _close_process_group() -> bool:
    """Multi-process runs (accelerate launch, torchrun): leave the process group before exiting;
    exiting with a live gloo/NCCL group can abort a rank (exit -6) after a finished run. True if
    there was a group."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        return True
    return False


def _exit_process(code: int) -> None:
    """End a rank of a multi-process run without the interpreter's finalisation: even with its group
    destroyed, a gloo rank could still abort there ("terminate called without an active exception",
    exit -6, seen in about 1 of 15 two-process DPO runs on CPU) as C++ objects holding threads are torn
    down in arbitrary order. Everything the run writes is closed by now; the streams are flushed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    raise SystemExit(entry())
