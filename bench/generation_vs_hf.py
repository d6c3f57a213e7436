"""Benchmark: dpolab's sampling loop (``dpolab.lm.generation.generate``) against Hugging Face
``model.generate``, side by side on the same model, prompts and lengths (CPU, fp32).

One command (``.venv`` also works: only transformers is needed)::

    .venv-bench/bin/python bench/generation_vs_hf.py --threads 1 --json bench/generation_vs_hf_results.json
                                                                # make bench-generation: 3 models x 2 shapes
    .venv-bench/bin/python bench/generation_vs_hf.py            # 3 models x 2 shapes x 1, 2 threads, no file
    .venv-bench/bin/python bench/generation_vs_hf.py --quick    # small model, one shape, 1 thread

Models: Llama-style, random weights from ``dpolab.lm.tiny.tiny_llama`` (seed 0, so every process
builds the same weights): ``tiny`` (vocab 4096, hidden 64, 2 layers), ``small`` (4096, 192, 4) and
``v32k`` (vocab 32000, hidden 512, 4 layers). Prompts: B random token sequences of 8-40 tokens
(seeded), left-padded. Shapes (batch B, new tokens N): (16, 128) and (64, 32).

Sides, for greedy and for sampling at temperature 1 (no top-k, no top-p):

* ours: ``generate(model, tok, prompts, max_new_tokens=N, temperature=..., seeds=range(B),
  eos_token_id=[])``: the per-row-seeded path the on-policy trainers use (on these Llama models
  through the direct decoder of ``dpolab.lm.decode``; ``--ablations`` also times it with the
  model's own forward, ``fast=False``);
* HF: ``model.generate(ids, attention_mask=mask, max_new_tokens=N, do_sample=..., top_k=0,
  top_p=1.0, temperature=1.0, pad_token_id=0)`` with EOS disabled (``eos_token_id=None`` there and
  in the model's generation config). ``top_k=0`` matters: HF's default sampling applies top-k 50.

Both produce exactly B x N tokens (checked on every measured call). Greedy tokens must be identical
on both sides (checked on the warm-up call; the run stops otherwise); sampled tokens differ by
design (different random schemes), their counts match.

Protocol: one fresh subprocess per (model, threads), with ``torch.set_num_threads`` and
``OMP_NUM_THREADS`` set; inside it, per shape and mode, one untimed warm-up call of each side,
then ``--repeats`` pairs alternating the order (ours first, then HF first). Reported per row:
median tokens/s (B x N / wall time of one ``generate`` call, prefill included) of each side and
the speed ratio ours/HF of each adjacent pair: its median, interquartile range and min-max.
Results go to a JSON file where ``--json PATH`` is given, as in the other benchmarks (``make
bench-generation`` writes ``bench/generation_vs_hf_results.json``); no run writes it otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODELS = {  # name: (vocab, hidden, layers, heads, intermediate)
    "tiny": (4096, 64, 2, 4, 256),
    "small": (4096, 192, 4, 6, 512),
    "v32k": (32000, 512, 4, 8, 1376),
}
SHAPES = [(16, 128), (64, 32)]  # (batch, new tokens)
PAD, EOS = 0, 2


def build(model: str):
    from dpolab.lm.tiny import tiny_llama

    V, h, layers, heads, inter = MODELS[model]
    m = tiny_llama(V, hidden_size=h, layers=layers, heads=heads, intermediate_size=inter, max_positions=512, seed=0)
    m.generation_config.eos_token_id = None  # EOS disabled on the HF side: every row runs N steps
    return m.eval()


def prompts_for(V: int, B: int, seed: int = 0) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, 41, (B,), generator=g).tolist()
    return [torch.randint(4, V, (n,), generator=g).tolist() for n in lengths]


def run_ours(model, tok, prompts: list[list[int]], N: int, greedy: bool, **kw):
    from dpolab.lm.generation import generate

    g = generate(model, tok, prompts, max_new_tokens=N, temperature=0.0 if greedy else 1.0,
                 seeds=list(range(len(prompts))), eos_token_id=[], **kw)
    assert int(g.response_mask.sum()) == len(prompts) * N
    return g.response_ids


def run_hf(model, ids, mask, N: int, greedy: bool):
    import torch

    with torch.no_grad():
        seq = model.generate(ids, attention_mask=mask.long(), max_new_tokens=N, do_sample=not greedy,
                             top_k=0, top_p=1.0, temperature=1.0, pad_token_id=PAD, eos_token_id=None)
    assert seq.shape == (ids.shape[0], ids.shape[1] + N)
    return seq[:, ids.shape[1]:]


def run_static(model, ids, mask, N: int, step):
    """Greedy with transformers' StaticCache (fixed-size buffers, attention over all P + N slots
    under the mask) and ``step`` as the decode forward (the model, or its torch.compile)."""
    import torch
    from transformers import StaticCache

    from dpolab.lm.generation import position_ids_from_mask

    B, P = ids.shape
    with torch.no_grad():
        cache = StaticCache(model.config, max_cache_len=P + N)
        attn = torch.zeros(B, P + N, dtype=torch.long)
        attn[:, :P] = mask
        pos = position_ids_from_mask(mask)
        tokens = torch.zeros(B, N, dtype=torch.long)
        out = model(input_ids=ids, attention_mask=attn, position_ids=pos, cache=cache, use_cache=True, logits_to_keep=1)
        for t in range(N):
            tokens[:, t] = out.logits[:, -1].argmax(-1)
            if t + 1 == N:
                break
            attn[:, P + t] = 1
            out = step(input_ids=tokens[:, t:t + 1], attention_mask=attn, position_ids=pos[:, -1:] + 1 + t,
                       cache=cache, use_cache=True)
    return tokens


@contextlib.contextmanager
def patched(module, name: str, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def ablation_sides(model, tok, prompts, ids, mask, N: int, greedy: bool, compile_static: bool) -> dict:
    """Our loop with one piece switched back to the plain way, and StaticCache (greedy only)."""
    import torch

    from dpolab.lm import generation

    def without(name, value, **kw):
        def side():
            with patched(generation, name, value):
                return run_ours(model, tok, prompts, N, greedy, **kw)
        return side

    # the prompt-pass and cache pieces belong to the model-forward path (fast=False); the direct
    # decoder (dpolab.lm.decode) has its own
    sides = {"model's own forward (no direct decoder)": lambda: run_ours(model, tok, prompts, N, greedy, fast=False),
             "model's forward, full prompt logits": without("_prefill_kwargs", lambda m: {}, fast=False),
             "model's forward, growing KV cache (torch.cat)": without("_preallocated_cache_kwargs", lambda m, c: {},
                                                                      fast=False),
             "EOS check every 8 steps": lambda: run_ours(model, tok, prompts, N, greedy, eos_check_every=8)}
    if not greedy:
        sides["torch.multinomial"] = without("inverse_cdf_draw", lambda p, u: torch.multinomial(p, 1).squeeze(1))
    else:
        sides["StaticCache"] = lambda: run_static(model, ids, mask, N, model)
        if compile_static:
            compiled = torch.compile(model.forward, dynamic=False)
            sides["StaticCache + torch.compile"] = lambda: run_static(model, ids, mask, N, compiled)
    return sides


def alternate(sides: dict, repeats: int) -> dict[str, list[float]]:
    """Wall time of each side, ``repeats`` rounds, the order rotated every round."""
    names, times = list(sides), {k: [] for k in sides}
    for r in range(repeats):
        for k in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            sides[k]()
            times[k].append(time.perf_counter() - t0)
    return times


def worker(a: argparse.Namespace) -> dict:
    from types import SimpleNamespace

    import torch

    from dpolab.lm.generation import left_pad

    torch.set_num_threads(a.threads)
    model = build(a.model)
    V = MODELS[a.model][0]
    tok = SimpleNamespace(pad_token_id=PAD, eos_token_id=EOS)
    out = {"model": a.model, "threads": a.threads, "rows": []}
    for B, N in a.shapes:
        prompts = prompts_for(V, B)
        ids, mask = left_pad(prompts, PAD)
        for mode in a.modes:
            greedy = mode == "greedy"
            sides = {"ours": lambda: run_ours(model, tok, prompts, N, greedy),  # noqa: B023 (called in this iteration)
                     "hf": lambda: run_hf(model, ids, mask, N, greedy)}  # noqa: B023
            ours_ids = sides["ours"]()  # warm-up, and the checks
            identical = bool(torch.equal(ours_ids, sides["hf"]()))
            if greedy and not identical:
                raise SystemExit(f"{a.model} B={B} N={N}: greedy tokens differ between ours and HF")
            row = {"batch": B, "new_tokens": N, "prompt_width": ids.shape[1], "mode": mode,
                   "greedy_identical": identical if greedy else None, "tokens": B * N}
            if a.ablations:
                variants = ablation_sides(model, tok, prompts, ids, mask, N, greedy, a.compile)
                first = {}
                for k, f in variants.items():  # warm-up (compiles), and: greedy variants must be exact
                    t0 = time.perf_counter()
                    got = f()
                    first[k] = bool(torch.equal(got, ours_ids)) if greedy else None
                    row.setdefault("first_call_s", {})[k] = time.perf_counter() - t0
                row["same_tokens_as_ours"] = first
                row["times"] = alternate({"ours": sides["ours"], **variants}, a.repeats)
            else:
                row["times"] = alternate(sides, a.repeats)
            out["rows"].append(row)
    return out


def quartiles(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def ratio_stats(base: list[float], other: list[float]) -> dict:
    """other's time over base's, per round: median, IQR, min-max (> 1: other is slower)."""
    ratios = [o / b for b, o in zip(base, other)]
    q1, q3 = quartiles(ratios)
    return {"median": statistics.median(ratios), "iqr": [q1, q3], "min_max": [min(ratios), max(ratios)]}


def summarise(row: dict) -> dict:
    t = row["times"]
    if "hf" in t:  # speed ratio ours/HF = HF's time over ours
        r = ratio_stats(t["ours"], t["hf"])
        return {"ours_tok_s": statistics.median(row["tokens"] / x for x in t["ours"]),
                "hf_tok_s": statistics.median(row["tokens"] / x for x in t["hf"]),
                "ratio_median": r["median"], "ratio_iqr": r["iqr"], "ratio_min_max": r["min_max"]}
    return {"ours_tok_s": statistics.median(row["tokens"] / x for x in t["ours"]),
            "time_vs_ours": {k: ratio_stats(t["ours"], v) for k, v in t.items() if k != "ours"}}


def spawn(a: argparse.Namespace, model: str, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--model", model, "--threads", str(threads),
           "--repeats", str(a.repeats), "--shapes", ",".join(f"{b}x{n}" for b, n in a.shapes),
           "--modes", ",".join(a.modes)] + ["--ablations"] * a.ablations + ["--compile"] * a.compile
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"{model} with {threads} threads failed:\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parse_shapes(s: str) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in part.split("x")) for part in s.split(",")]  # type: ignore[misc]


def shapes_arg(s: str) -> str:
    """``--shapes``, checked as it is parsed: BATCHxNEW_TOKENS,... with positive integers."""
    try:
        shapes = parse_shapes(s)
    except ValueError:
        shapes = []
    if not shapes or any(len(x) != 2 or min(x) < 1 for x in shapes):
        raise argparse.ArgumentTypeError(f"expected BATCHxNEW_TOKENS,... (e.g. 16x128,64x32), got {s!r}")
    return s


def _name_list(choices):
    """``dpo_vs_trl.name_list``: a comma-separated list of names out of ``choices``, an argument error
    naming them otherwise."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("dpo_vs_trl", Path(__file__).with_name("dpo_vs_trl.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.name_list(choices)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    full = {"models": ",".join(MODELS), "shapes": ",".join(f"{b}x{n}" for b, n in SHAPES), "threads": "1,2",
            "repeats": 6}
    quick = {"models": "small", "shapes": "16x64", "threads": "1", "repeats": 3}
    ap.add_argument("--quick", action="store_true",
                    help="defaults for a short run: small model, 16 x 64 tokens, 1 thread, 3 repeats (options given "
                         "explicitly still apply)")
    ap.add_argument("--models", type=_name_list(MODELS), help=f"comma-separated, of {', '.join(MODELS)} "
                    f"(default: {full['models']})")
    ap.add_argument("--shapes", type=shapes_arg, help=f"BATCHxNEW_TOKENS,... (default: {full['shapes']})")
    ap.add_argument("--modes", default="greedy,sampled", type=_name_list(("greedy", "sampled")))
    ap.add_argument("--threads", help="thread counts, one fresh process each (default: 1,2)")
    ap.add_argument("--repeats", type=int, help="timed calls per side, alternating order (default: 6)")
    ap.add_argument("--ablations", action="store_true",
                    help="instead of HF: our loop with each speed-up switched off, and StaticCache, against ours")
    ap.add_argument("--compile", action="store_true", help="with --ablations: also StaticCache + torch.compile")
    ap.add_argument("--json", help="write the results here (nothing is written without it; the committed "
                    "bench/generation_vs_hf_results.json is `make bench-generation`'s)")
    a = ap.parse_args()
    for key, value in (quick if a.quick else full).items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    a.shapes, a.modes = parse_shapes(a.shapes), a.modes.split(",")
    if a.worker:
        a.threads = int(a.threads)
        print(json.dumps(worker(a)))
        return
    import torch
    import transformers

    results: dict = {"date": datetime.date.today().isoformat(), "machine": cpu_name(),
                     "cpus": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version(), "repeats": a.repeats, "rows": []}
    if not a.ablations:
        print(f"{'model':6s} {'thr':>3s} {'B':>3s} {'N':>4s} {'mode':8s} {'ours tok/s':>10s} {'HF tok/s':>9s} "
              f"{'ratio':>6s} {'IQR':>13s} {'min-max':>13s}")
    for model in a.models.split(","):
        for threads in (int(t) for t in a.threads.split(",")):
            res = spawn(a, model, threads)
            for row in res["rows"]:
                s = summarise(row)
                results["rows"].append({"model": model, "threads": threads, **row, **s})
                head = f"{model:6s} {threads:3d} {row['batch']:3d} {row['new_tokens']:4d} {row['mode']:8s}"
                if a.ablations:
                    for k, r in s["time_vs_ours"].items():
                        same = row["same_tokens_as_ours"][k]
                        print(f"{head} {k:46s} time x{r['median']:.2f} [{r['iqr'][0]:.2f}, {r['iqr'][1]:.2f}] "
                              f"first call {row['first_call_s'][k]:.1f} s" + ("" if same is None else f" same tokens: {same}"),
                              flush=True)
                    continue
                print(f"{head} {s['ours_tok_s']:10.0f} {s['hf_tok_s']:9.0f} {s['ratio_median']:5.2f}x "
                      f"[{s['ratio_iqr'][0]:.2f}, {s['ratio_iqr'][1]:.2f}] [{s['ratio_min_max'][0]:.2f}, "
                      f"{s['ratio_min_max'][1]:.2f}]", flush=True)
    if not a.ablations:
        print(markdown_table(results["rows"]))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


def markdown_table(rows: list[dict]) -> str:
    lines = ["| model | threads | batch × new tokens | mode | ours tok/s | HF tok/s | ratio (median) | IQR | min–max |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['threads']} | {r['batch']} × {r['new_tokens']} | {r['mode']} | "
                     f"{r['ours_tok_s']:.0f} | {r['hf_tok_s']:.0f} | {r['ratio_median']:.2f}× | "
                     f"{r['ratio_iqr'][0]:.2f}–{r['ratio_iqr'][1]:.2f} | {r['ratio_min_max'][0]:.2f}–"
                     f"{r['ratio_min_max'][1]:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
