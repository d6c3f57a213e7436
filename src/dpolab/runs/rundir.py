"""The run-directory contract shared by every training command (docs/run-directory.md).

    OUTPUT_DIR/
      config.yaml         resolved configuration
      metrics.jsonl       one JSON object per logged step
      summary.json        final flat metrics ("eval/..." prefixed), "steps", "wall_seconds"
      checkpoints/step-N  resumable checkpoints, written atomically; checkpoints/latest names the newest
      final/              the final model (Hugging Face format for LMs)

Everything is written atomically (temporary name, then ``os.replace``), so an interrupted process
never leaves a half-written file or checkpoint that looks complete.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dpolab.errors import DpolabError

LATEST = "latest"
EARLIER_RUN = ("metrics.jsonl", "summary.json", "checkpoints", "final")  # what a run leaves
LOCK_FILE = ".dpolab-run.lock"
CONFIG_HEADER = "# dpolab: this run's resolved configuration (--config FILE repeats the run)\n"
_HELD: dict[str, int] = {}  # the lock files this process holds, and their descriptors


def atomic_write_text(path: Path, text: str | bytes) -> None:
    """Write ``text`` (or bytes) to ``path`` through a temporary file and a rename; an error (no space,
    no permission) is one line naming the file, and leaves neither a partial file nor the temporary
    one. A path that is not a plain file (``/dev/null``, ``/dev/stdout``, a FIFO) is written as it is,
    and a symbolic link's file is replaced, the link kept (the rename replaced the device, the pipe
    or the link itself)."""
    path = Path(path)
    mode = {"mode": "wb"} if isinstance(text, bytes) else {"mode": "w", "encoding": "utf-8"}
    if path.exists() and not path.is_file() and not path.is_dir():
        try:
            with open(path, **mode) as fh:
                fh.write(text)
        except OSError as err:
            raise DpolabError(f"cannot write {path}: {err.strerror or err}") from None
        return
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, **mode) as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:  # also text that cannot be encoded, or Ctrl-C: no temporary file left
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise DpolabError(f"cannot write {path}: {err.strerror or err}") from None
        raise


def check_writable(flag: str, path: str | Path, *, folder: bool = False) -> None:
    """Refuse, before any work, an output ``path`` that cannot be written: a folder where a file is
    meant (or a file where a folder is), a file on its way, or a folder this user may not write in."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        raise DpolabError(f"{flag} {path}: is a {'file' if folder else 'folder'}; give a "
                          f"{'folder' if folder else 'file'} name")
    parent = path if folder and path.exists() else path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise DpolabError(f"{flag} {path}: {parent} is a file, not a folder")
    target = path if path.exists() else parent
    if not os.access(target, os.W_OK):
        raise DpolabError(f"{flag} {path}: {target} is not writable")


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def without_resume(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with its ``resume`` option unset: a saved configuration repeats a run, it does not
    continue one (with ``resume: latest`` it would fail in a new folder and resume in its own)."""
    return {**config, "resume": None} if config.get("resume") is not None else config


class RunDir:
    """A run's output directory. Created on first write, never before (bad input leaves nothing)."""

    def __init__(self, path: str | Path, *, keep_last: int = 2):
        self.path = Path(path)
        self.keep_last = keep_last
        self.start = time.time()
        self.made = False  # this run created the folder (abandon() may then remove it whole)

    # -- layout -------------------------------------------------------------------------------
    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def final(self) -> Path:
        return self.path / "final"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def earlier_run(self) -> list[str]:
        """What a run left in the folder (the names of :data:`EARLIER_RUN` that exist)."""
        return [name for name in EARLIER_RUN if (self.path / name).exists()]

    def check_new_run(self, resume: str | None) -> None:
        """Before any work: the path must be a folder (or not exist yet) and, unless resuming, hold no
        earlier run, whose metrics and checkpoints a new run would mix with its own."""
        if self.path.exists() and not self.path.is_dir():
            raise DpolabError(f"--output-dir {self.path} is a file, not a folder")
        self.check_not_in_use()  # first: a live run's folder is not one to remove or resume
        if resume is None:
            found = self.earlier_run()
            if found and self.list_checkpoints():
                raise DpolabError(f"{self.path} already holds a run ({', '.join(found)}); pass --resume latest to "
                                  "continue it or choose another --output-dir")
            if found:  # e.g. stopped before its first checkpoint: nothing to resume
                raise DpolabError(f"{self.path} already holds a run ({', '.join(found)}) that left no checkpoint to "
                                  "resume; remove the folder or choose another --output-dir")
            config = self.path / "config.yaml"
            if config.is_file() and not _written_by_a_run(config):  # the user's own file, e.g. --output-dir .
                raise DpolabError(f"--output-dir {self.path} holds a config.yaml that this run would replace "
                                  "with its own; choose another --output-dir (a run writes config.yaml there)")

    def create(self) -> RunDir:
        try:
            if not self.path.exists():
                self.path.mkdir(parents=True, exist_ok=True)
                self.made = True
        except OSError as err:  # a path under a file, a read-only or special file system
            raise DpolabError(f"--output-dir {self.path}: cannot create it: {err.strerror or err}") from None
        return self

    def check_not_in_use(self) -> None:
        """Refuse a folder whose lock another live process holds (:meth:`lock`), before anything
        else is said of it: a run that had not checkpointed yet was taken for one that stopped, and
        the user told to remove its folder."""
        import errno
        import fcntl

        path = self.path / LOCK_FILE
        if str(path) in _HELD or not path.is_file():
            return
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError as err:
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                holder = os.read(fd, 200).decode("utf-8", "replace").split() or ["?", "?"]
                raise DpolabError(f"--output-dir {self.path} is in use by another run (process {holder[-1]} on "
                                  f"{holder[0]}); wait for it to end, or give another --output-dir") from None
        finally:
            os.close(fd)

    def lock(self) -> None:
        """Claim the folder for this process until the run ends (an exclusive ``flock`` on
        ``.dpolab-run.lock``, which names the host and process), so that a second run started into
        the same ``--output-dir`` is refused instead of mixing its metrics and checkpoints with the
        first's. The kernel drops the claim when its process dies, however it dies, so a stale file
        is simply claimed again; this process may claim its own folder again (a second run in one
        Python process)."""
        import errno
        import fcntl
        import socket
        import sys

        path = self.path / LOCK_FILE
        if str(path) in _HELD:
            return
        for _ in range(3):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):  # a file system without flock
                    os.close(fd)
                    print(f"dpolab: cannot lock {path} ({err.strerror}): this run does not keep others out of "
                          "its --output-dir", file=sys.stderr)
                    return
                holder = os.read(fd, 200).decode("utf-8", "replace").split() or ["?", "?"]
                os.close(fd)
                raise DpolabError(f"--output-dir {self.path} is in use by another run (process {holder[-1]} on "
                                  f"{holder[0]}); wait for it to end, or give another --output-dir") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the file was removed by the run that held it, after we opened it: again
        else:
            return
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
        _HELD[str(path)] = fd

    def unlock(self) -> None:
        """Release :meth:`lock` (at the end of a run, stopped or failed too)."""
        path = self.path / LOCK_FILE
        fd = _HELD.pop(str(path), None)
        if fd is not None:
            with contextlib.suppress(OSError):
                path.unlink()
            os.close(fd)  # closing drops the flock

    def abandon(self) -> None:
        """Undo a new run that failed before its first step (a tracker that cannot start): remove the
        folder if this run made it, else the files it wrote there; a resumed run is never abandoned."""
        self.unlock()
        if self.made:
            shutil.rmtree(self.path, ignore_errors=True)
        else:
            for name in ("config.yaml", "data_report.json"):
                with contextlib.suppress(OSError):
                    (self.path / name).unlink()

    # -- files --------------------------------------------------------------------------------
    def write_config(self, cfg: Any) -> None:
        """``config.yaml``: the resolved configuration (every field of the config dataclass), with
        ``resume`` unset: the file repeats the run (``--config``), and a resume says so itself."""
        import yaml

        from dpolab.config import config_to_dict

        text = CONFIG_HEADER + yaml.safe_dump(without_resume(config_to_dict(cfg)), sort_keys=False)
        atomic_write_text(self.path / "config.yaml", text)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self.create()
        row = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        try:
            with open(self.metrics_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")
        except OSError as err:  # a full disk, a folder made read-only mid-run
            raise DpolabError(f"cannot write {self.metrics_path}: {err.strerror or err}") from None

    def metrics_rows(self) -> int:
        """The rows in ``metrics.jsonl`` now (a checkpoint records it, for :meth:`truncate_metrics`)."""
        if not self.metrics_path.exists():
            return 0
        return sum(1 for ln in self.metrics_path.read_text(encoding="utf-8", errors="replace").splitlines()
                   if ln.strip())

    def truncate_metrics(self, step: int, rows: int | None = None) -> None:
        """On resume: drop the rows logged after the checkpoint, so the log equals an uninterrupted run:
        those after its first ``rows`` rows (the count it recorded; a row can follow a checkpoint at
        the same step, as the end-of-run evaluation does) and those of a later step."""
        if not self.metrics_path.exists():
            return
        lines = [ln for ln in self.metrics_path.read_text(encoding="utf-8", errors="replace").splitlines()
                 if ln.strip()]
        kept = []
        for ln in lines[:rows] if rows is not None else lines:
            try:  # a line cut short by a killed process is dropped, not a crash
                row = json.loads(ln)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step", 0), int) and row.get("step", 0) <= step:
                kept.append(ln)
        atomic_write_text(self.metrics_path, "".join(ln + "\n" for ln in kept))

    def unfinish(self) -> None:
        """On resume: remove ``summary.json``, written last by a finished run, so that a continuation
        that stops or fails is not taken for finished (``final/`` stays until it writes its own)."""
        (self.path / "summary.json").unlink(missing_ok=True)

    def write_summary(self, metrics: dict[str, Any], *, steps: int,
                      before: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Write ``summary.json``, the last file of a finished run; ``before(summary)`` runs first
        (the model card, which shows it), so a run with a summary has everything else."""
        summary = {k: _jsonable(v) for k, v in metrics.items()}
        summary["steps"] = steps
        summary["wall_seconds"] = round(time.time() - self.start, 3)
        if before is not None:
            before(summary)
        atomic_write_text(self.path / "summary.json", json.dumps(summary, indent=2) + "\n")
        return summary

    # -- checkpoints --------------------------------------------------------------------------
    def save_checkpoint(self, step: int, write: Callable[[Path], None]) -> Path:
        """Write checkpoint ``step-N`` through ``write(tmp_dir)``, then rename it into place and
        point ``latest`` at it. A crash at any moment leaves the previous checkpoint and ``latest``
        intact: the new folder only gets its ``step-N`` name once every file in it is written and
        fsynced, and ``latest`` is replaced atomically after that. Temporary folders left behind
        by a killed process are removed here (and never listed or resolved)."""
        final = self.checkpoints / f"step-{step}"
        tmp = self.checkpoints / f"{_TMP_PREFIX}{step}-{os.getpid()}"
        try:
            self.checkpoints.mkdir(parents=True, exist_ok=True)
            self._remove_stale_tmp()
            tmp.mkdir()
            write(tmp)
            _fsync_tree(tmp)
        except BaseException as err:
            shutil.rmtree(tmp, ignore_errors=True)
            if why := write_failure(err):
                earlier = [p for p in self.list_checkpoints() if p != final]
                left = (f"the previous checkpoint is intact ({self.checkpoints / LATEST})" if earlier
                        else "nothing of it is left (the run had no earlier checkpoint)")
                raise DpolabError(f"cannot write checkpoint {final}: {why}{free_space(self.path)}; {left}") from err
            raise
        if final.exists():  # the same step again (a resumed run): move the old one aside first
            old = self.checkpoints / f"{_TMP_PREFIX}old-{step}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(self.checkpoints)
        atomic_write_text(self.checkpoints / LATEST, final.name + "\n")
        self._rotate(keep=final)
        return final

    def _remove_stale_tmp(self) -> None:
        for p in self.checkpoints.iterdir():
            if p.name.startswith(_TMP_PREFIX) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)

    def _rotate(self, keep: Path) -> None:
        """Keep the newest ``keep_last`` checkpoints by step; never the one just written."""
        if self.keep_last <= 0:
            return
        others = sorted((p for p in self.list_checkpoints() if p != keep), key=_step_of)
        for old in others[: max(0, len(others) - (self.keep_last - 1))]:
            shutil.rmtree(old, ignore_errors=True)

    def discard_checkpoints_after(self, step: int) -> None:
        """Remove the checkpoints of a step after ``step`` (a resume from checkpoint ``step``; used by
        ``rl ppo``/``rl a2c``): they belong to the abandoned continuation, whose metrics rows are cut,
        and kept they would outrank the resumed run's in the rotation and in ``latest``'s fallback to
        the highest step. ``latest`` is pointed at the newest one left if it named a removed one."""
        later = [p for p in self.list_checkpoints() if _step_of(p) > step]
        if not later:
            return
        pointer = self.checkpoints / LATEST
        named = pointer.read_text(encoding="utf-8").strip() if pointer.is_file() else ""
        left = [p for p in self.list_checkpoints() if _step_of(p) <= step]
        if left and named in {p.name for p in later}:  # first, so a stop in between leaves a valid latest
            atomic_write_text(pointer, left[-1].name + "\n")
        for p in later:
            shutil.rmtree(p, ignore_errors=True)

    def list_checkpoints(self) -> list[Path]:
        """Complete checkpoints (``step-N`` folders), sorted by step."""
        if not self.checkpoints.is_dir():
            return []
        return sorted((p for p in self.checkpoints.iterdir() if p.is_dir() and p.name.startswith("step-")
                       and p.name[5:].isdigit()), key=_step_of)

    def resolve_checkpoint(self, spec: str) -> Path:
        """``latest`` -> the checkpoint named by checkpoints/latest; otherwise a path.

        Should the pointer be missing or name a folder that is gone (a crash between renames),
        ``latest`` falls back to the highest-numbered complete checkpoint."""
        if spec == LATEST:
            pointer = self.checkpoints / LATEST
            path = None
            if pointer.is_file():
                name = pointer.read_text(encoding="utf-8").strip()
                if name.startswith("step-") and (self.checkpoints / name).is_dir():
                    path = self.checkpoints / name
            if path is None:
                found = self.list_checkpoints()
                if not found:
                    raise DpolabError(f"--resume latest: no checkpoint in {self.checkpoints} (the run stopped "
                                      "before its first one: start it again in a new or emptied --output-dir)")
                path = found[-1]
        else:
            path = Path(spec)
        if not path.is_dir():
            raise DpolabError(f"--resume: checkpoint not found: {path}")
        found = self.earlier_run()
        # the folder the checkpoint sits in, not where a symlinked step folder points
        if spec != LATEST and found and path.absolute().parent.resolve() != self.checkpoints.resolve():
            # the resumed run would cut this folder's metrics back and overwrite its final/
            raise DpolabError(f"--resume {path} is not a checkpoint of --output-dir {self.path}, which holds a run "
                              f"of its own ({', '.join(found)}); continue the checkpoint's run with --output-dir "
                              f"{path.parent.parent}, or branch from it into a new --output-dir")
        return path


_TMP_PREFIX = ".tmp-step-"


def _written_by_a_run(path: Path) -> bool:
    """A config.yaml a run wrote (its header; before the header, a start-up that stopped left one
    with the lock file beside it)."""
    try:
        with path.open("rb") as f:
            head = f.read(len(CONFIG_HEADER.encode()))
    except OSError:
        return False
    return head == CONFIG_HEADER.encode() or (path.parent / LOCK_FILE).exists()


def write_failure(err: BaseException) -> str | None:
    """Why a write failed, if ``err`` is the file system's refusal (a full disk, no permission) as
    the OS, torch's writer or safetensors says it; None for any other error."""
    if isinstance(err, OSError):
        return err.strerror or str(err)
    if not isinstance(err, Exception):  # Ctrl-C, SystemExit
        return None
    text = str(err)
    if any(m in text for m in ("No space left", "os error 28", "unexpected pos")):
        return "no space left on the device"
    if any(m in text for m in ("file write failed", "Permission denied")):
        return text.strip().splitlines()[-1]
    return None


def free_space(path: Path) -> str:
    try:
        free = shutil.disk_usage(path).free
        amount = f"{free / 2**20:.0f} MiB" if free >= 10 * 2**20 else f"{free / 2**10:.0f} KiB"
        return f" ({amount} free on its disk)"
    except OSError:
        return ""


def _step_of(path: Path) -> int:
    return int(path.name.split("-")[1])


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as fh:
                os.fsync(fh.fileno())
