"""`dpolab generate`: completions of any causal LM for a prompt file or ``--prompt`` texts, as JSONL.

One output row per completion, prompt-major (every sample of prompt 0, then of prompt 1, ...)::

    {"prompt": ..., "completion": ..., "sample": 0, "response_tokens": 12, "finished": true, <row fields>}

Seeding: completion ``j`` of prompt ``i`` draws its tokens from its own generator, seeded with
:func:`row_seed` ``(seed, i, j)``, so the same command writes the same file, whatever ``--batch-size``
(up to floating-point effects of batched forwards), and ``dpolab eval`` gives every model the same
seeds on the same prompts. ``--temperature 0`` is greedy (no draws at all).

The helpers below (parsing with multi-value options, devices, model loading, prompt rows, seeded
sampling in batches) are shared with ``dpolab.commands.evaluate``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from dpolab.config import opt, parse_config
from dpolab.errors import ConfigError, DpolabError
from dpolab.train.options import SamplingOptions, validate_sampling

DESCRIPTION = """Sample completions from a causal LM for a prompt file (--data) or texts (--prompt).

Writes one JSON object per completion (JSONL) to --output, or to stdout: prompt, completion, sample
(index), response_tokens (EOS included), finished (EOS seen) and, for prompts from a file, the row's
other fields. Seeded per (prompt, sample): the same command gives the same file.

examples:
  dpolab generate --model runs/ppo/final --data prompts.jsonl --num-samples 4 --output samples.jsonl
  dpolab generate --model MODEL --prompt "The movie was" --prompt "I hated" --temperature 0
"""

# Output fields of a completion row; a prompt row's field of the same name is kept as "input_<name>".
OUTPUT_FIELDS = ("prompt", "completion", "sample", "response_tokens", "finished")


@dataclass
class RuntimeOptions:
    """Options of the commands that load models to sample from them (generate, eval)."""

    batch_size: int = opt(8, "completions sampled per forward batch (results do not depend on it)")
    seed: int = opt(0, "random seed: completion j of prompt i is drawn with a seed made from (seed, i, j)")
    dtype: str = opt("auto", "weight dtype when loading", choices=("auto", "float32", "bfloat16", "float16"))
    device: str = opt("auto", "device to run on: auto (cuda if available, else cpu), cpu, cuda, cuda:1, mps")
    trust_remote_code: bool = opt(False, "allow model code from the hub (off unless you trust it)")
    progress: bool = opt(True, "show progress bars (on stderr)")


@dataclass
class GenerateConfig(SamplingOptions, RuntimeOptions):
    model: str = opt("", "causal LM: a Hugging Face name or a local folder (required)")
    data: str | None = opt(None, "prompt file (JSONL, JSON, Parquet, CSV), save_to_disk folder or hub name; rows "
                           "with 'prompt' or 'messages' (give this or --prompt)")
    prompt: list[str] | None = opt(None, "prompt text(s): --prompt A B, or --prompt A --prompt B (instead of --data)")
    split: str = opt("train", "split of a DatasetDict folder or hub dataset")
    max_prompt_length: int | None = opt(None, "truncate longer prompts to this many tokens, keeping their end "
                                        "(None: no limit)")
    num_samples: int = opt(1, "completions per prompt")
    output: str | None = opt(None, "output JSONL file, written atomically (None: stdout)")
    temperature: float = opt(1.0, "sampling temperature; 0 is greedy decoding")

    def check(self) -> None:
        if isinstance(self.prompt, str):  # GenerateConfig(prompt="...") in Python: one prompt, not its characters
            self.prompt = [self.prompt]
        if not self.model:
            raise ConfigError("--model is required (a Hugging Face name or a local folder)")
        if (self.data is None) == (not self.prompt):
            raise ConfigError("give exactly one of --data FILE and --prompt TEXT")
        from dpolab.data.loading import text_problem

        for i, text in enumerate(self.prompt or []):
            if text_problem(text):  # a byte the locale cannot decode arrives as a lone surrogate
                raise ConfigError(f"--prompt {i + 1}: not valid UTF-8 text ({text!r})")
        check_counts(self)
        check_output_file("--output", self.output)


def check_counts(cfg) -> None:
    """Checks the sampling and runtime options share (generate and eval)."""
    for name in ("batch_size", "num_samples", "max_new_tokens"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
    if cfg.max_prompt_length is not None and cfg.max_prompt_length < 1:
        raise ConfigError("--max-prompt-length must be >= 1")
    validate_sampling(cfg, greedy=True)


def check_output_file(flag: str, path: str | None) -> None:
    """Refuse, before any work, an output path that cannot be written (found only at the end otherwise)."""
    from dpolab.runs.rundir import check_writable

    if path is not None:
        check_writable(flag, path)


# -- parsing -------------------------------------------------------------------------------------
class _MultiParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, like every other option error
        raise ConfigError(message)


def parse_command(cls: type, argv: list[str], prog: str, description: str, *, multi: Sequence[str]):
    """``parse_config`` with list options that take several values (``--models A B C``) and may be
    repeated (``--prompt A --prompt B``), which the generated CLI's comma lists cannot express for
    texts that contain commas. The config's ``check()`` runs once everything is merged."""
    pre = _MultiParser(add_help=False, allow_abbrev=False, argument_default=argparse.SUPPRESS)
    for name in multi:
        pre.add_argument("--" + name.replace("_", "-"), dest=name, nargs="+", action="extend")
    given, rest = pre.parse_known_args(argv)
    cfg = parse_config(cls, rest, prog=prog, description=description)  # --help, --config, the other flags
    cfg = dataclasses.replace(cfg, **vars(given))  # flags override the YAML file's lists
    cfg.check()
    return cfg


# -- models, devices, prompts --------------------------------------------------------------------
def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device: unknown device '{name}' (auto, cpu, cuda, cuda:N, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {name}: MPS (Apple silicon) is not available here")
    if device.type not in ("cpu", "cuda", "mps"):  # meta holds no values; xla and others need their own setup
        raise ConfigError(f"--device {name}: choose auto, cpu, cuda, cuda:N or mps")
    return device


def load_model(name: str, cfg, device):
    """A frozen causal LM on ``device`` in eval mode."""
    from dpolab.lm.loading import load_causal_lm

    model = load_causal_lm(name, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
    return model.requires_grad_(False).eval().to(device)


def read_prompt_rows(source: str, split: str = "train") -> list:
    """The raw rows (``dpolab.data.loading.Record``) of a prompt source; errors name file and line."""
    from dpolab.data.loading import load_records, record_error

    records = load_records(source, split=split)
    for rec in records:
        if not isinstance(rec.data, dict):
            raise record_error(rec, "expected a JSON object")
    return records


def _pass_through(rec) -> dict:
    """A prompt row's other fields for the output; one named like an output field is kept as
    ``input_<name>``, and a row that holds that name as well is refused (one value would be lost)."""
    from dpolab.data.loading import record_error

    out = {k: v for k, v in rec.data.items() if k != "prompt" and k not in OUTPUT_FIELDS[1:]}
    for k in OUTPUT_FIELDS[1:]:
        if k in rec.data:
            if f"input_{k}" in out:
                raise record_error(rec, f"is also the name '{k}' is kept under in the output; rename one",
                                   field=f"input_{k}")
            out[f"input_{k}"] = rec.data[k]
    for k, v in out.items():  # checked before any model loads: the output is written after all sampling
        try:
            json_line({k: v}).encode("utf-8")
        except (TypeError, ValueError) as err:  # UnicodeEncodeError: an unpaired surrogate
            raise record_error(rec, f"cannot be written to the output as JSON: {err}", field=k) from None
    return out


def render_prompts(records: list, tokenizer,
                   max_prompt_length: int | None) -> tuple[list[str], list[list[int]], int]:
    """(texts, token ids, how many were cut to ``max_prompt_length``) of prompt rows in the formats
    of ``dpolab.data.prompts`` (``prompt`` or ``messages``); a bad row raises a ``DataError`` naming
    its file, line and field."""
    from dpolab.data.prompts import render_prompt, tokenize_prompts

    rendered = [render_prompt(rec.data, tokenizer, record=rec) for rec in records]
    texts = [text for text, _ in rendered]
    ids, cut = tokenize_prompts(texts, tokenizer, max_prompt_length=max_prompt_length)
    return texts, ids, sum(cut)


def note_truncated(cut: int, total: int, max_prompt_length: int | None, model: str = "") -> None:
    """Say on stderr how many prompts the model saw only the end of (the outputs keep the whole text)."""
    if cut:
        print(f"dpolab: {cut} of {total} prompts are longer than --max-prompt-length {max_prompt_length} tokens"
              f"{' for ' + model if model else ''}: the model is given their last {max_prompt_length} "
              "(the outputs' prompt is the whole text)", file=sys.stderr)


# -- seeded sampling -----------------------------------------------------------------------------
def row_seed(seed: int, prompt_index: int, sample: int) -> int:
    """The seed of completion ``sample`` of prompt ``prompt_index``: a hash, so that nearby
    (seed, i, j) do not share streams and the seed does not depend on how rows are batched."""
    digest = hashlib.sha256(f"dpolab-row:{seed}:{prompt_index}:{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # < 2**63: a valid manual_seed


def _generate_takes_seeds() -> bool:
    import inspect

    from dpolab.lm.generation import generate

    return "seeds" in inspect.signature(generate).parameters


def iter_samples(model, tokenizer, prompts_ids: Sequence[Sequence[int]], seeds: Sequence[int], cfg) -> Iterator:
    """Sample one completion per (prompt ids, seed) row, ``cfg.batch_size`` rows at a time. Yields
    ``(start, Generation)``: the batch of rows ``start .. start + B - 1``.

    Each row draws from its own seed: through ``generate(seeds=...)`` where it exists, else one row
    at a time with a generator of its own (the same draws: a CPU generator's first uniforms).
    Greedy decoding (temperature 0) draws nothing and always runs batched."""
    import torch

    from dpolab.lm.generation import generate, stop_ids

    kw = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
              eos_token_id=stop_ids(model, tokenizer), fast=cfg.direct_decoder)
    per_row_seeds = _generate_takes_seeds()
    for start in range(0, len(prompts_ids), cfg.batch_size):
        ids = list(prompts_ids[start:start + cfg.batch_size])
        if cfg.temperature == 0:
            gen = generate(model, tokenizer, ids, **kw)
        elif per_row_seeds:
            gen = generate(model, tokenizer, ids, seeds=list(seeds[start:start + len(ids)]), **kw)
        else:
            gens = [generate(model, tokenizer, [p], generator=torch.Generator().manual_seed(int(s)), **kw)
                    for p, s in zip(ids, seeds[start:start + len(ids)])]
            gen = collate_generations(gens, tokenizer)
        yield start, gen


def collate_generations(gens: list, tokenizer):
    """One padded :class:`~dpolab.lm.generation.Generation` of single-row ones (left-padded prompts,
    right-padded responses), so that later passes (sequence KL) run batched."""
    import torch

    from dpolab.lm.generation import Generation, left_pad
    from dpolab.lm.loading import pad_token_id_for

    pad = pad_token_id_for(tokenizer)
    device = gens[0].prompt_ids.device
    prompt_ids, prompt_mask = left_pad([g.prompt_ids[0][g.prompt_mask[0]].tolist() for g in gens], pad)
    R = max(int(g.response_ids.shape[1]) for g in gens)
    response_ids = torch.full((len(gens), R), pad, dtype=torch.long)
    response_mask = torch.zeros((len(gens), R), dtype=torch.bool)
    for i, g in enumerate(gens):
        r = g.response_ids.shape[1]
        response_ids[i, :r], response_mask[i, :r] = g.response_ids[0].cpu(), g.response_mask[0].cpu()
    finished = torch.cat([g.finished.cpu() for g in gens])
    return Generation(prompt_ids, prompt_mask, response_ids, response_mask, finished).to(device)


def progress_bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="completion", dynamic_ncols=True, disable=not enabled,
                file=sys.stderr)


def jsonable(value: Any) -> Any:
    """Row fields from Parquet or ``datasets`` can be numpy scalars or arrays."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def strict_json(value: Any) -> Any:
    """``value`` with every NaN or infinite float as None: JSON has no such numbers, and a
    Parquet column's NaN written as ``NaN`` would make the line unreadable to strict parsers."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def json_line(row: dict) -> str:
    """One JSONL line of ``row``: UTF-8 text as is, non-finite numbers as null."""
    return json.dumps(strict_json(row), ensure_ascii=False, allow_nan=False, default=jsonable) + "\n"


# -- the command ---------------------------------------------------------------------------------
def run_generate(cfg: GenerateConfig) -> list[dict]:
    """The completion rows of ``cfg`` (see the module docstring), prompt-major; written to
    ``cfg.output`` as JSON lines too when it is set. The values are converted and checked as the
    command line's are (``config.check_config``)."""
    from dpolab.config import check_config
    from dpolab.data.prompts import tokenize_prompts
    from dpolab.lm.generation import decode_responses
    from dpolab.lm.loading import load_tokenizer
    from dpolab.train.on_policy import check_room

    cfg = check_config(cfg)
    cfg.check()
    from dpolab.train.distributed import hide_library_bars

    hide_library_bars(cfg.progress)
    records = read_prompt_rows(cfg.data, cfg.split) if cfg.data is not None else None
    device = resolve_device(cfg.device)
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    if records is not None:
        texts, ids, cut = render_prompts(records, tokenizer, cfg.max_prompt_length)
        extras = [_pass_through(rec) for rec in records]
    else:
        texts = list(cfg.prompt)
        ids, cut_rows = tokenize_prompts(texts, tokenizer, max_prompt_length=cfg.max_prompt_length)
        extras, cut = [{} for _ in texts], sum(cut_rows)
    note_truncated(cut, len(texts), cfg.max_prompt_length)
    check_room(cfg, max(map(len, ids)))
    model = load_model(cfg.model, cfg, device)

    k = cfg.num_samples
    rows_ids = [ids[i] for i in range(len(ids)) for _ in range(k)]
    seeds = [row_seed(cfg.seed, i, j) for i in range(len(ids)) for j in range(k)]
    out: list[dict] = []
    with progress_bar(len(rows_ids), f"generate {cfg.model}", cfg.progress) as bar:
        for start, gen in iter_samples(model, tokenizer, rows_ids, seeds, cfg):
            completions = decode_responses(tokenizer, gen)
            lengths, finished = gen.response_lengths.tolist(), gen.finished.tolist()
            for b, completion in enumerate(completions):
                i, j = divmod(start + b, k)
                out.append({**extras[i], "prompt": texts[i], "completion": completion, "sample": j,
                            "response_tokens": int(lengths[b]), "finished": bool(finished[b])})
            bar.update(len(completions))
    if cfg.output is not None:
        from dpolab.runs.rundir import atomic_write_text

        atomic_write_text(cfg.output, _jsonl(out))
        print(f"wrote {len(out)} completions to {cfg.output}", file=sys.stderr)
    return out


def _jsonl(rows: list[dict]) -> str:
    try:
        return "".join(map(json_line, rows))
    except (TypeError, ValueError) as err:
        raise DpolabError(f"a prompt row's field cannot be written as JSON: {err}") from None


def cli_main(argv: list[str], prog: str) -> int:
    cfg = parse_command(GenerateConfig, argv, prog, DESCRIPTION, multi=("prompt",))
    rows = run_generate(cfg)
    if cfg.output is None:
        sys.stdout.write(_jsonl(rows))
        sys.stdout.flush()
    return 0
