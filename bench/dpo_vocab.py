"""Benchmark: DPO on real HH-RLHF pairs at the vocabulary sizes of Llama-2 (32k) and Qwen (152k), against TRL.

With a large vocabulary the LM head (and the input embedding) dominate a small model: at hidden 256
the 151,936-row head alone holds 39M weights, ten times the transformer blocks. This benchmark
measures what that does to each side's step time and memory. One command::

    .venv-bench/bin/python bench/dpo_vocab.py          # both vocabularies (make bench-vocab)
    .venv-bench/bin/python bench/dpo_vocab.py --quick  # 32k only, one round

Data: the harmless-base test split of Anthropic HH-RLHF, read from ``../shared/data/`` next to the
repository (``--hh`` elsewhere; the run is skipped, saying why, where the file is absent; it is
never copied into the repository). Each dialogue pair is split into an explicit prompt (up to the
last "\\n\\nAssistant:" the two share) and the two final replies; the first 256 pairs in file order
whose replies start with a space (so both sides' tokenisations agree), are not empty, and fit in
max length 512 with at most 256 prompt tokens under both tokenizers (so neither side truncates:
the two truncate differently) are used.

Tokenizers: byte-level BPE trained here on all 2,312 HH dialogues, asked for 32,000 and 151,936
tokens (the vocabulary sizes of the Llama-2 and Qwen2 model configs). On this little text BPE runs
out of merges before either size; the models then get the full 32,000- or 151,936-row embedding
and LM head, the rows past the tokenizer's unused (their memory, the point of this benchmark, is
all there: weights, gradients and AdamW moments of every row). The sizes reached are printed and
stored in the JSON.

Models: Llama-style, hidden 256, 4 layers, 4 heads, MLP 1024, untied embeddings, random weights:
4.2M block parameters plus 2·V·256 in the embedding and head (20.6M in all at 32k, 82.0M at 152k).

Sides (fresh subprocess per run; ``--repeats`` rounds alternating ours/TRL after the loss check, whose
process loads the same libraries and model files and serves as the warm-up: a TRL run at 152k takes
many minutes on a busy 2-core machine, ``--warmup-runs 1`` adds a discarded run of each; ``--run-steps``
optimizer steps per run, the first ``--warmup-steps`` untimed):
``ours``: ``dpolab.train.dpo.train`` with its defaults (reference log-probs precomputed, its time
charged to the timed steps, as TRL runs its reference inside each step; prefix sharing; bucketing;
token budget); ``trl``: ``trl.DPOTrainer`` with its defaults (a live reference copy, gradient
checkpointing), both in float32 (TRL's ``bf16`` default off), batch 8 pairs, AdamW lr 1e-5,
clipping 1.0, max length 512. Tokens: pair tokens ``2·|prompt| + |chosen| + |rejected|`` of the
timed steps. Memory as in ``sft_rm_vs_trl.py``: the baseline after the side's imports and tokenizer,
the whole-process resident peak (baseline included) and the peak over the baseline.

MFU, head included (at these sizes the head holds most of the weights): per timed step ``8·N`` FLOPs
per token through the transformer blocks (policy forward and backward, reference forward; ``N`` the
block parameters; prefix sharing runs fewer tokens, so its saving does not inflate our MFU) plus
``8·V·H`` per response token, the positions whose log-probs the loss reads (logits of prompt
positions, which TRL also computes, are not counted on either side; attention scores ignored), over
the step time, against the best matmul rate in the run's precision measured before and after each
vocabulary with the same threads. The table also gives the head's share of those FLOPs.

Correctness first, at each vocabulary: TRL's first-batch DPO loss and ours (plain and
prefix-shared), with a reference that differs from the policy, agree to 1e-4, and the two
tokenisations give identical ids (``dpo_vs_trl.run_check``).

``--gpu``: the GPU preset of ``bench/gpu.sh``: the Qwen2-0.5B-shaped model of ``sft_rm_vs_trl.py``
in bfloat16 on CUDA, generated pairs (the HH file is not on a lent machine), peak GPU memory
(``torch.cuda.max_memory_allocated``) besides the resident memory.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


dvt = _load("dpo_vs_trl")       # the DPO protocol: data generator, loss check
srt = _load("sft_rm_vs_trl")    # the measurement: baseline, step clock, spawning, summaries

HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
VOCABS = {"32k": 32000, "152k": 151936}
SHAPE = dict(hidden_size=256, layers=4, heads=4, intermediate_size=1024)
MARKER = "\n\nAssistant:"
PAIRS, MAX_PROMPT = 256, 256
LR = dvt.LR


# -- data and models -------------------------------------------------------------------------------
def split_pair(chosen: str, rejected: str) -> dict | None:
    """Explicit prompt and replies: the prompt ends at the last "\\n\\nAssistant:" before the first
    character where the two dialogues differ."""
    differ = next((i for i, (x, y) in enumerate(zip(chosen, rejected)) if x != y), min(len(chosen), len(rejected)))
    at = chosen[:differ].rfind(MARKER)
    if at < 0:
        return None
    cut = at + len(MARKER)
    return {"prompt": chosen[:cut], "chosen": chosen[cut:], "rejected": rejected[cut:]}


def fits(row: dict, tok, max_length: int) -> bool:
    p, c, r = (len(x) for x in tok([row["prompt"], row["chosen"], row["rejected"]],
                                   add_special_tokens=False)["input_ids"])
    return p <= MAX_PROMPT and p + max(c, r) + 1 <= max_length  # + EOS


def setup(workdir: Path, hh: Path, vocabs: list[str], max_length: int) -> dict:
    from dpolab.lm.tiny import tiny_llama, train_tokenizer

    with gzip.open(hh, "rt", encoding="utf-8") as fh:
        raw = [json.loads(line) for line in fh if line.strip()]
    texts = [t for r in raw for t in (r["chosen"], r["rejected"])]
    split = [s for s in (split_pair(r["chosen"], r["rejected"]) for r in raw) if s is not None
             and all(s[k][:1] == " " and s[k].strip() for k in ("chosen", "rejected"))]
    # min_frequency 1: as many merges as the text allows
    toks = {v: train_tokenizer(texts, vocab_size=VOCABS[v], min_frequency=1) for v in vocabs}
    rows = [s for s in split if all(fits(s, t, max_length) for t in toks.values())][:PAIRS]
    (workdir / "hh.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    info = {"hh_rows": len(raw), "pairs": len(rows), "tokenizer_vocab": {}}
    for v, tok in toks.items():
        info["tokenizer_vocab"][v] = len(tok)
        for role, seed in (("policy", 0), ("ref", 1)):  # the ref differs: only for the loss check
            d = workdir / f"{v}-{role}"
            tiny_llama(VOCABS[v], **SHAPE, max_positions=1024, seed=seed, tokenizer=tok).save_pretrained(d)
            tok.save_pretrained(d)
    return info


def setup_gpu(workdir: Path) -> dict:
    """The GPU preset: generated pairs, a locally trained tokenizer, the Qwen2-0.5B-shaped model."""
    from dpolab.lm.tiny import train_tokenizer

    rows = dvt.make_data(PAIRS, seed=0)
    (workdir / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = train_tokenizer([r["prompt"] + r["chosen"] + r["rejected"] for r in rows], vocab_size=dvt.VOCAB)
    srt.build_qwen(workdir / "qwen0.5b", tok, "cuda")
    return {"pairs": len(rows), "tokenizer_vocab": {"qwen0.5b": len(tok)}}


# -- the sides -------------------------------------------------------------------------------------
def ours_config(a: argparse.Namespace, out: str):
    from dpolab.config import make_config
    from dpolab.train.dpo import DPOConfig

    extra = dict(dtype="bfloat16", mixed_precision="bf16") if a.precision == "bf16" else {}
    return make_config(DPOConfig, dict(model=a.model_dir, data=a.data, eval_fraction=0.0, output_dir=out,
                                       batch_size=a.batch_size, max_length=a.max_length, learning_rate=LR,
                                       max_grad_norm=1.0, max_steps=a.steps, logging_steps=10**6, progress=False,
                                       seed=0, **extra))


def trl_config(a: argparse.Namespace, out: str):
    import torch
    from trl import DPOConfig

    cpu = a.device == "cpu" or not torch.cuda.is_available()  # the dry run builds it on any machine
    return DPOConfig(output_dir=out, per_device_train_batch_size=a.batch_size, max_length=a.max_length,
                     learning_rate=LR, max_steps=a.steps, logging_steps=10**6, save_strategy="no", report_to="none",
                     use_cpu=cpu, bf16=a.precision == "bf16", dataloader_num_workers=0, seed=0, disable_tqdm=True,
                     max_grad_norm=1.0)


def run_ours(a: argparse.Namespace) -> dict:
    """``dpolab.train.dpo.train`` as shipped; pair tokens counted where it collates its batches."""
    srt.preimport(srt.OURS_IMPORTS + [srt.modeling_module(a.model_dir), "dpolab.train.dpo"])
    from dpolab.lm.loading import load_tokenizer
    from dpolab.train import pair_layout
    from dpolab.train.dpo import train

    load_tokenizer(a.model_dir)
    mem = srt.start_memory()
    tokens, run, resp = [0], [0], [0]  # per step: pair tokens, tokens through the blocks, response tokens
    clock = srt.StepClock(on_step=lambda: (tokens.append(0), run.append(0), resp.append(0)))
    collate = pair_layout.collate_pairs

    def counting(prefix, pairs, pad_id):
        batch = collate(prefix, pairs, pad_id)
        tokens[-1] += sum(p.num_tokens for p in pairs)
        run[-1] += pair_layout.batch_tokens(batch)
        resp[-1] += sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
        return batch

    pair_layout.collate_pairs = counting
    with tempfile.TemporaryDirectory() as out:
        summary = train(ours_config(a, out))
    # step 1's counts also hold the precompute pass (it runs before the first step): never timed
    res = clock.result(tokens, 0.0, a.warmup_steps, mem)
    res.update(step_flops(a.model_dir, run, resp, a.warmup_steps, len(tokens) - 1))
    res["ref_precompute_s"] = summary["ref_precompute_seconds"]
    res["seconds"] += summary["ref_precompute_seconds"] * len(res["step_times"]) / a.steps  # charged
    res["prefix_sharing"], res["micro_batch_tokens"] = summary["prefix_sharing"], summary["micro_batch_tokens"]
    return res


def run_trl(a: argparse.Namespace) -> dict:
    from datasets import Dataset
    from trl import DPOTrainer

    tok, mem, rows, model = srt.trl_start(a)
    tokens: list[int] = []
    resp: list[int] = []

    class Counting(DPOTrainer):
        def training_step(self, model, inputs, *args, **kwargs):
            tokens.append(int(inputs["attention_mask"].sum()))
            resp.append(int(inputs["completion_mask"].sum()))
            return super().training_step(model, inputs, *args, **kwargs)

    with tempfile.TemporaryDirectory() as out:
        trainer = Counting(model=model, args=trl_config(a, out), train_dataset=Dataset.from_list(rows),
                           processing_class=tok)
        clock = srt.StepClock()
        trainer.train()
    res = clock.result(tokens, 0.0, a.warmup_steps, mem)
    res.update(step_flops(a.model_dir, tokens, resp, a.warmup_steps, len(tokens)))  # both rows run whole
    return res


def step_flops(model_dir: str, run: list[int], resp: list[int], warmup: int, steps: int) -> dict:
    """Model FLOPs of the timed steps, head included: ``8·N`` per token through the blocks (the
    policy's forward and backward, ``6N``, and the reference's forward, ``2N``; ``N`` the block
    parameters) and ``8·V·H`` per response token, the only positions whose logits a DPO loss needs
    (the head's ``V×H`` product; its FLOPs on prompt positions are not counted, on either side)."""
    c = json.loads((Path(model_dir) / "config.json").read_text())
    n, head = srt.block_params(model_dir), c["vocab_size"] * c["hidden_size"]
    run_t, resp_t = sum(run[warmup:steps]), sum(resp[warmup:steps])
    return {"run_tokens": run_t, "response_tokens": resp_t, "model_flops": 8.0 * (n * run_t + head * resp_t),
            "head_flop_share": head * resp_t / (n * run_t + head * resp_t)}


SIDES = {"ours": run_ours, "trl": run_trl, "check": dvt.run_check}


# -- driver ----------------------------------------------------------------------------------------
def summary_row(o_runs: list[dict], t_runs: list[dict], peak: float) -> dict:
    row = srt.compare(o_runs, t_runs, peak)
    for side, runs in (("ours", o_runs), ("trl", t_runs)):
        row[side]["head_flop_share"] = srt.spread([r["head_flop_share"] for r in runs])
    if o_runs[0].get("gpu_peak_mb") is not None:
        o, t = (srt.spread([r["gpu_peak_mb"] for r in runs]) for runs in (o_runs, t_runs))
        row["ours"]["gpu_peak_mb"], row["trl"]["gpu_peak_mb"] = o, t
        row["gpu_memory_ratio"] = o["median"] / t["median"]
    return row


def markdown_table(results: dict) -> str:
    fmt = srt.fmt
    lines = ["| vocab (model rows / tokenizer) | ours tok/s | TRL tok/s | speed ratio | ours peak RSS MB | "
             "TRL peak RSS MB | memory ratio | ours over baseline MB | TRL over baseline MB | over-baseline ratio | "
             "baselines MB (ours / TRL) | ours MFU | TRL MFU | head share of the FLOPs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for v, r in results["rows"].items():
        o, t = r["ours"], r["trl"]
        lines.append(
            f"| {v} ({r['model_vocab']:,} / {r['tokenizer_vocab']:,}) | {fmt(o['tokens_per_s'])} | "
            f"{fmt(t['tokens_per_s'])} | {r['speedup']:.2f}× ({r['speedup_rounds']['min']:.2f}–"
            f"{r['speedup_rounds']['max']:.2f}) | {fmt(o['peak_rss_mb'])} | {fmt(t['peak_rss_mb'])} | "
            f"{r['memory_ratio']:.2f}× | {fmt(o['peak_mb'])} | {fmt(t['peak_mb'])} | {r['over_baseline_ratio']:.2f}× | "
            f"{o['baseline_mb']['median']:.0f} / {t['baseline_mb']['median']:.0f} | {o['mfu']['median']:.1%} | "
            f"{t['mfu']['median']:.1%} | {o['head_flop_share']['median']:.0%} / {t['head_flop_share']['median']:.0%} |"
            + (f" GPU peak {o['gpu_peak_mb']['median']:.0f} / {t['gpu_peak_mb']['median']:.0f} MB "
               f"({r['gpu_memory_ratio']:.2f}×) |" if "gpu_memory_ratio" in r else ""))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", choices=sorted(SIDES), help=argparse.SUPPRESS)
    ap.add_argument("--ref-dir", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="defaults for a short run: 32k vocabulary only, one round "
                    "(options given explicitly still apply)")
    ap.add_argument("--vocabs", default="32k,152k", type=dvt.name_list(VOCABS),
                    help=f"comma-separated, of {', '.join(VOCABS)} (default: 32k,152k)")
    ap.add_argument("--hh", type=Path, default=HH, help="the HH-RLHF harmless-base test file (.jsonl.gz)")
    ap.add_argument("--run-steps", type=int, default=6, help="optimizer steps per run")
    srt.add_common_args(ap, dry_run_help="with --gpu only: write a few pairs, build every side's config and the "
                        "model config on the meta device, print the worker commands, run nothing")
    # the loss check before the rounds loads the same libraries and model files: it is the warm-up run
    ap.set_defaults(warmup_runs=0)
    a = srt.parse_args_with_quick(ap, {"vocabs": "32k", "repeats": 1})
    if a.warmup_steps < 1:
        ap.error("--warmup-steps must be >= 1 (the first step's counts include the reference precompute)")
    if a.worker:
        srt.run_worker(a, SIDES)
        return
    os.environ.update({k: v for k, v in srt.worker_env(a.threads).items() if k.startswith(("HF_", "TRANSFORMERS", "TOK"))})
    if a.dry_run and not a.gpu:  # the CPU run's models and data are built by the run itself
        ap.error("--dry-run checks the GPU preset (bench/gpu.sh): give --gpu with it")
    if a.gpu:
        a.device, a.precision, a.warmup_runs, a.warmup_steps = "cuda", "bf16", 0, 5
        a.repeats, a.run_steps, vocabs = min(a.repeats, 2), 30, ["qwen0.5b"]
    dvt.check_timed_steps(ap, a.warmup_steps, {"a run (--run-steps)": a.run_steps})
    if not a.gpu:
        vocabs = a.vocabs.split(",")
        if not a.hh.is_file():
            print(f"skipped: the HH-RLHF file is not at {a.hh} (it lives in the shared data folder next to the "
                  "repository, ../shared/data/; pass --hh PATH)")
            return
    repeats = a.repeats
    results: dict = {"date": datetime.date.today().isoformat(), "versions": srt.versions(),
                     "source": srt.source_state(), "threads": a.threads,
                     "device": a.device, "precision": a.precision, "batch_size": a.batch_size,
                     "max_length": a.max_length, "steps": a.run_steps, "repeats": repeats, "shape": SHAPE,
                     "load_average": {"start": srt.load_average()}, "rows": {}}
    with tempfile.TemporaryDirectory() as d:
        workdir = Path(a.workdir or d)
        workdir.mkdir(parents=True, exist_ok=True)
        if a.dry_run:  # only the GPU preset has one: it builds nothing large
            return dry_run(ap, a, workdir)
        info = setup_gpu(workdir) if a.gpu else setup(workdir, a.hh, vocabs, a.max_length)
        results["data"] = info
        print(f"data: {info}", flush=True)
        data = workdir / ("pairs.jsonl" if a.gpu else "hh.jsonl")

        def args_for(v: str, steps: int) -> list[str]:
            model = workdir / (v if a.gpu else f"{v}-policy")
            return ["--model-dir", str(model), "--ref-dir", str(workdir / f"{v}-ref"), "--data", str(data),
                    "--steps", str(steps), *srt.worker_args(a)]

        raw = {}
        peak = srt.matmul_peak(a.threads, a.device, a.precision)  # re-measured after every vocabulary: best kept
        print(f"{a.precision} matmul peak: {peak:.1f} GFLOP/s ({a.device}, {a.threads} threads)", flush=True)
        for v in vocabs:
            if not a.gpu:
                c = srt.spawn(__file__, "check", args_for(v, 1), a.threads)
                ok = (abs(c["trl_loss"] - c["ours_loss"]) <= 1e-4 and abs(c["trl_loss"] - c["ours_prefix_loss"]) <= 1e-4
                      and c["same_token_ids"])
                results.setdefault("checks", {})[v] = {**c, "ok": ok}
                print(f"{v} first-batch loss: TRL {c['trl_loss']:.6f}  ours {c['ours_loss']:.6f}  ours prefix-shared "
                      f"{c['ours_prefix_loss']:.6f}  same token ids: {c['same_token_ids']}", flush=True)
                if not ok:
                    raise SystemExit(f"{v}: loss check FAILED: the two sides do not compute the same thing")
            for _ in range(a.warmup_runs):
                for side in ("ours", "trl"):
                    srt.spawn(__file__, side, args_for(v, a.run_steps), a.threads)
            runs: dict[str, list[dict]] = {"ours": [], "trl": []}
            for _ in range(repeats):
                for side in ("ours", "trl"):
                    runs[side].append(srt.spawn(__file__, side, args_for(v, a.run_steps), a.threads))
            peak = max(peak, srt.matmul_peak(a.threads, a.device, a.precision))
            row = summary_row(runs["ours"], runs["trl"], peak)
            row.update(model_vocab=srt.QWEN_05B["vocab_size"] if a.gpu else VOCABS[v],
                       tokenizer_vocab=info["tokenizer_vocab"][v])
            results["rows"][v] = row
            raw[v] = runs
            results["load_average"][v] = srt.load_average()
            srt.print_row(v, row)
    for v, row in results["rows"].items():  # every MFU against the best peak of the whole run
        row.update(summary_row(raw[v]["ours"], raw[v]["trl"], peak))
    results["matmul_peak_gflops"] = peak
    results["runs"] = raw
    srt.finish(a, results, peak, markdown_table(results))


def dry_run(ap: argparse.ArgumentParser, a: argparse.Namespace, workdir: Path) -> None:
    """The GPU preset without a GPU: every side's arguments parse and its config builds, the model
    config instantiates on the meta device; the commands are printed."""
    (workdir / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dvt.make_data(8, seed=0)))
    configs = []
    for side in ("ours", "trl"):
        args = ["--model-dir", str(workdir / "qwen0.5b"), "--data", str(workdir / "pairs.jsonl"), "--steps",
                str(a.run_steps), *srt.worker_args(a)]
        ns = ap.parse_args(["--worker", side, *args])
        print("would run:", sys.executable, __file__, "--worker", side, *args)
        out = str(workdir / f"out-{side}")
        build = (lambda ns=ns, out=out: ours_config(ns, out)) if side == "ours" else \
            (lambda ns=ns, out=out: trl_config(ns, out))
        configs.append((f"dpo {side}", build))
    srt.gpu_dry_run_checks(a, workdir, configs)


if __name__ == "__main__":
    main()
