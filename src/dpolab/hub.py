"""Names that can be Hugging Face Hub ids rather than local paths, and a note before a Hub lookup.

Shared by the data and the model loaders: a name that cannot be a Hub id and does not exist is
"not found" at once; one that can is looked up on the Hub, which offline retries for most of a
minute before it fails, so the user is told first what is happening and how to skip it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from dpolab.errors import DpolabError

_TRUE = {"1", "ON", "YES", "TRUE"}
_noted: set[tuple[str, str]] = set()


def may_be_hub_id(name: str) -> bool:
    """A Hub id is ``name`` or ``namespace/name``: a leading ``/``, ``.`` or ``~``, a second or a
    trailing ``/``, or the platform's own separator make a local path."""
    return not (name.startswith(("/", ".", "~")) or name.count("/") > 1 or name.endswith("/")
                or (os.sep != "/" and os.sep in name))


def offline(*variables: str) -> bool:
    return any(os.environ.get(v, "").strip().upper() in _TRUE for v in ("HF_HUB_OFFLINE", *variables))


def note_hub_lookup(name: str, what: str, *offline_variables: str) -> None:
    """One line on stderr, once per name and kind, before ``name`` is looked up on the Hub."""
    if offline(*offline_variables) or (name, what) in _noted:
        return
    _noted.add((name, what))
    print(f"dpolab: {what} '{name}' is not a local path: looking it up on the Hugging Face Hub "
          "(HF_HUB_OFFLINE=1 uses only the local cache)", file=sys.stderr, flush=True)


def check_local_folder(name_or_path: str, what: str, needs: tuple[str, ...]) -> None:
    """A name that is a local path (it exists, or cannot be a hub id) must be a folder holding one
    of ``needs``; said in one line here, where transformers would take it for a hub name or fail on
    a later file."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if not path.exists() and may_be_hub_id(text):
        note_hub_lookup(text, "model")
        return
    if not path.is_dir():
        raise DpolabError(f"cannot load {what} '{name_or_path}': " +
                          ("it is a file, not a folder" if path.exists() else "no such folder"))
    if not any((path / name).is_file() for name in needs):
        raise DpolabError(f"cannot load {what} '{name_or_path}': the folder has none of {', '.join(needs)}"
                          f" ({_what_folder(path)})")
    if what == "model" and (path / "config.json").is_file() and not any(path.glob("*.safetensors")) \
            and not any(path.glob("*.bin")):  # found only as the weights load: after other models' work
        raise DpolabError(f"cannot load model '{name_or_path}': the folder has a config.json but no weights "
                          "(*.safetensors)")


def _what_folder(path: Path) -> str:
    """What a folder without a model's files is, when it is a dpolab run's, and the folder to give."""
    if (path / "final").is_dir() and (path / "config.yaml").is_file():
        return f"a run folder: its trained model is {path / 'final'}"
    if (path / "trainer_state.json").is_file() and (path / "model.safetensors").is_file():
        return ("a training checkpoint: weights without a config or tokenizer; give the run's final/ folder, "
                "or continue the run with --resume")
    return "not a Hugging Face model folder"
