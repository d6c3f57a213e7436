"""``final/README.md``: a model card in the Hugging Face Hub's format, so a model pushed to the Hub or
shared in a lab says how it was made.

YAML front matter (``base_model``, ``library_name: dpolab``, ``tags``, ``datasets``, and a ``dpolab``
block with the command, the final metrics and the data report), then the method, the final
evaluation, the data report, the resolved configuration and the command that reproduces the run.
``huggingface_hub.ModelCard.load`` reads it (tests/test_model_card.py).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from dpolab.runs.rundir import atomic_write_text, without_resume


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)


def _dataset_names(config: dict[str, Any]) -> list[str]:
    """Hub dataset ids among the data options (local files are named in the text, not as datasets)."""
    out = []
    for key in ("data", "eval_data"):
        value = config.get(key)
        if isinstance(value, str) and value and not Path(value).exists() and "/" in value and \
                not value.startswith((".", "/")):
            out.append(value)
    return out


def write_model_card(folder: str | Path, *, command: str, method: str, config: dict[str, Any],
                     metrics: dict[str, Any], report: dict[str, Any] | None = None,
                     base_model: str | None = None) -> Path:
    """Write ``folder/README.md`` (atomically). ``command``: the dpolab command (``dpo``, ``rl ppo``);
    ``method``: a paragraph on what the run optimised; ``metrics``: the summary (eval metrics are
    its ``eval/`` keys)."""
    config = _clean(without_resume(dict(config)))
    metrics, report = _clean(dict(metrics)), _clean(dict(report or {}))
    base = base_model if base_model is not None else config.get("model")
    meta = {"library_name": "dpolab", "tags": ["dpolab", command.replace(" ", "-")],
            **({"base_model": base} if base else {}), **({"datasets": _dataset_names(config)}
                                                          if _dataset_names(config) else {}),
            "dpolab": {"command": f"dpolab {command}", "metrics": metrics,
                       **({"data_report": {k: v for k, v in report.items() if not isinstance(v, list)}}
                          if report else {})}}
    evals = {k: v for k, v in metrics.items() if k.startswith("eval/")}
    shown = evals or {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    rows = "\n".join(f"| `{k}` | {v:.4g} |" if isinstance(v, float) else f"| `{k}` | {v} |" for k, v in shown.items())
    data = "\n".join(f"- {k}: {v}" for k, v in report.items() if not isinstance(v, (list, dict)))
    text = f"""---
{yaml.safe_dump(meta, sort_keys=False).rstrip()}
---

# {Path(str(config.get("output_dir", folder))).name}

Trained with dpolab: `dpolab {command}`{f" from `{base}`" if base else ""}.

## Method

{method}

## {"Final evaluation" if evals else "Final metrics"}

| metric | value |
|---|---|
{rows}

## Data

{data or "(no data report)"}

## Configuration

```yaml
{yaml.safe_dump(config, sort_keys=False).rstrip()}
```

## Reproduce

```bash
dpolab {command} --config config.yaml   # the configuration above, saved as config.yaml
```
"""
    path = Path(folder) / "README.md"
    atomic_write_text(path, text)
    return path


def method_text(algorithm: Any) -> str:
    """The first paragraph of the docstring of the module that defines ``algorithm``'s class."""
    import sys

    doc = sys.modules[type(algorithm).__module__].__doc__ or ""
    return " ".join(doc.strip().split("\n\n")[0].split()) or type(algorithm).__name__
