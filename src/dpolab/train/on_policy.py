"""What the on-policy trainers share (``dpolab ppo``, ``grpo``, ``rloo``, ``online-dpo``): the opening
(prompts, rewards, dry run), the reward functions, the reference model, the evaluation prompts and
protocol, per-step sampling seeds, the ``samples.jsonl`` log of sampled completions, and the
:class:`OnPolicy` base of their algorithms."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dpolab.runs.rundir import RunDir, atomic_write_text
from dpolab.train.algorithm import Algorithm
from dpolab.train.options import eval_split_of


class OnPolicy(Algorithm):
    """An algorithm that samples from its policy: dropout off throughout (eval mode, so the first
    ratio is exactly 1), evaluation by :func:`evaluate_samples`, ``samples.jsonl`` kept in step with
    resume. Subclasses set ``self.samples`` (the last step's rows to log) and may redefine ``policy``
    (the causal LM inside what the engine trains)."""

    train_mode = False

    def __init__(self, cfg, engine, prompts, eval_set, rewards, ref_model):
        from dpolab.lm.sampling import LocalSampler
        from dpolab.train.memory import resolve_micro_batch_tokens

        self.cfg, self.engine, self.prompts, self.eval_set = cfg, engine, prompts, eval_set
        self.rewards, self.ref_model, self.lora = rewards, ref_model, cfg.lora
        # the policy itself: nothing to copy
        self.sampler = LocalSampler(self.policy, engine.tokenizer, fast=cfg.direct_decoder)
        self.samples: list[dict] = []
        # padded tokens a training pass may hold (0: no limit, as with --gradient-checkpointing);
        # the rows of a pass are cut to fit
        self.pass_tokens = resolve_micro_batch_tokens(cfg, self.policy)

    @property
    def policy(self):
        return self.engine.unwrapped

    def evaluate(self):
        return evaluate_samples(self.cfg, self.policy, self.engine.tokenizer, self.eval_set, self.rewards,
                                self.ref_model, getattr(self.cfg, "micro_batch_size", 16))

    def on_log(self, engine, step, logged):
        from dpolab.train import distributed

        n = self.cfg.log_samples
        # every process's rows in process order: the order of the same global batch on one process
        rows = distributed.gather_rows(engine.accelerator, self.samples[:n]) if n > 0 else []
        if engine.is_main:
            log_samples(engine.run_dir, step, rows, n)
            engine.trackers.log_samples([{"step": step, **r} for r in rows[:n]], step)

    def on_resume(self, engine, step):
        truncate_samples(engine.run_dir, step)

    def summary(self, engine):
        return {"data/prompts": len(self.prompts), "data/truncated_prompts": self.prompts.truncated}


class ActorCritic(OnPolicy):
    """An on-policy algorithm whose engine trains a policy with a value head
    (:class:`dpolab.lm.value_head.PolicyWithValue`): checkpoints hold the critic too, and ``final/``
    the policy with its head beside it."""

    @property
    def core(self):
        return self.engine.unwrapped

    def evaluate(self):
        # the policy inside the value-head wrapper, whose forward alone the launcher autocasts: under
        # the same autocast as the prepared reference (eval/kl read 3e-3 at learning rate 0 under bf16)
        with self.engine.accelerator.autocast():
            return super().evaluate()

    @property
    def policy(self):
        return self.engine.unwrapped.policy

    def checkpoint_files(self, state_dict):
        from dpolab.lm import value_head

        return value_head.checkpoint_files(state_dict, self.lora)

    def load_checkpoint(self, engine, directory):
        from dpolab.lm import value_head

        value_head.load_checkpoint(self.core, directory, self.lora)

    def save_final(self, engine, path, state_dict) -> None:
        from dpolab.lm import value_head

        value_head.save_policy_with_value(self.core, self.engine.tokenizer, path, merge_lora=self.lora)


def open_run(cfg, name: str):
    """The opening every on-policy trainer shares: the accelerator (sharded set-ups refused: sampling
    needs the whole model on each process), seeded RNGs, the tokenizer, the prompts, the evaluation
    prompts, the rewards and the data report. With ``--dry-run`` returns the summary instead (after
    probing the reward on empty completions); else ``(accelerator, tokenizer, prompts, eval_set,
    rewards, report)``."""
    import json

    from dpolab.data.prompts import load_prompts
    from dpolab.errors import ConfigError
    from dpolab.rewards.functions import compute_rewards
    from dpolab.train import distributed

    accelerator, tokenizer = distributed.start_run(cfg, name)
    if distributed.is_sharded(accelerator):
        raise ConfigError(f"dpolab {name} samples with the whole model on each process: use DDP (FSDP/DeepSpeed "
                          "sharding is not supported for on-policy trainers yet; docs/scaling.md)")
    prompts = load_prompts(cfg.data, tokenizer, max_prompt_length=cfg.max_prompt_length, split=cfg.data_split)
    check_prompt_room(cfg, prompts)
    check_side_models(cfg, prompts)
    rewards = reward_function(cfg, accelerator.device, tokenizer)
    check_reward_fields(rewards, prompts)
    eval_set = eval_prompt_set(cfg, prompts, tokenizer, rewards)
    report = {**prompts.report(), "eval_prompts": len(eval_set[0]) if eval_set is not None else 0,
              "eval_truncated": eval_set[3] if eval_set is not None else 0}
    if cfg.dry_run:
        rows = list(range(min(2, len(prompts))))
        probe = compute_rewards(rewards, [prompts.texts[i] for i in rows], [""] * len(rows), prompts.columns(rows))
        if accelerator.is_main_process:  # one JSON document on stdout, however many processes
            print(json.dumps({"data": report, "reward_probe_on_empty_completions": probe.tolist(),
                              "config": vars(cfg)}, indent=2))
        return {"dry_run": True, "data/prompts": len(prompts), "data/truncated_prompts": prompts.truncated}
    return accelerator, tokenizer, prompts, eval_set, rewards, report


def check_room(cfg, longest_prompt: int, model: str | None = None, where: str | None = None) -> None:
    """Refuse, before loading any weights, prompts that leave no room for ``--max-new-tokens`` in the
    positions of ``model`` (default ``--model``; ``max_position_embeddings`` of its config, where it
    has one). ``where``: the file and line (or row) of the longest prompt, named by the error."""
    from dpolab.errors import ConfigError
    from dpolab.train.options import model_positions

    model = model or cfg.model
    limit = model_positions(model, cfg.trust_remote_code)
    if limit is not None and longest_prompt + cfg.max_new_tokens > limit:
        what = (f"{where}: the longest prompt, {longest_prompt} tokens, plus --max-new-tokens {cfg.max_new_tokens} "
                "exceeds" if where else
                f"prompts of up to {longest_prompt} tokens plus --max-new-tokens {cfg.max_new_tokens} exceed")
        raise ConfigError(f"{what} the {limit} positions of {model}: no room for the completions; lower (or set) "
                          "--max-prompt-length, or lower --max-new-tokens")


def check_prompt_room(cfg, data, model: str | None = None) -> None:
    """:func:`check_room` for the longest prompt of ``data`` (a :class:`dpolab.data.prompts.PromptData`,
    as cut to ``--max-prompt-length``) in ``model``'s positions, the error naming its file and line
    (or row)."""
    if len(data):
        i = max(range(len(data)), key=lambda r: len(data.ids[r]))  # the first of the longest
        check_room(cfg, len(data.ids[i]), model=model, where=data.locations[i] if data.locations else data.source)


def check_side_models(cfg, data) -> None:
    """``--ref-model`` and ``--value-model`` read the policy's token ids at the policy's positions: a
    smaller vocabulary or fewer positions failed with an IndexError traceback at step 1. Checked from
    their configs before any weights load (a ``--dry-run`` too; a missing folder is refused with the
    options)."""
    from dpolab.lm.loading import check_reference_vocabulary

    for flag, name in (("--ref-model", getattr(cfg, "ref_model", None)),
                       ("--value-model", getattr(cfg, "value_model", None))):
        if not name:
            continue
        check_reference_vocabulary(name, cfg.model, ref_name=name, policy_name=cfg.model, flag=flag,
                                   trust_remote_code=cfg.trust_remote_code)
        check_prompt_room(cfg, data, model=name)


def prompt_order(cfg, prompts, accelerator, batch_size: int):
    """The seeded, resumable order of the prompts: ``batch_size`` per process and step."""
    from dpolab.data.batching import BatchOrder

    return BatchOrder(len(prompts), batch_size, cfg.seed, world_size=accelerator.num_processes,
                      rank=accelerator.process_index)


def step_seed(seed: int, step: int) -> int:
    """The sampling seed of step ``step``: a resumed run draws exactly what an uninterrupted one does."""
    return (seed * 1_000_003 + step * 7_919) % (2**63 - 1)


def reward_function(cfg, device, tokenizer=None):
    """The rewards ``--reward``/``--reward-model`` name, weighted by ``--reward-weights``, as one
    :class:`dpolab.rewards.functions.WeightedRewards` (callable as a reward function; its
    ``score`` method also returns each reward's values). Reward models load frozen on ``device``.

    A reward model with the policy's ``tokenizer`` (the same token ids) reads the prompt cut to
    ``--max-prompt-length`` as the policy does, in the same tokens; one with another tokenizer reads
    the prompt and the completion whole (a count of the policy's tokens is not one of its own: it cut
    the prompt's start and the completion's end that the policy had)."""
    from pathlib import Path

    from dpolab.rewards.functions import WeightedRewards, load_reward_function, reward_model_function

    def listed(x) -> list[str]:  # a config built in Python may hold one string
        return [x] if isinstance(x, str) else list(x or [])

    named = [(spec.rpartition(":")[2], load_reward_function(spec)) for spec in listed(cfg.reward)]
    for folder in listed(cfg.reward_model):
        from dpolab.lm.loading import load_tokenizer
        from dpolab.lm.reward_model import load_reward_model

        rm_tokenizer = load_tokenizer(folder, trust_remote_code=cfg.trust_remote_code)
        rm = load_reward_model(folder, rm_tokenizer, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code,
                               trained=True)
        rm = rm.requires_grad_(False).eval().to(device)
        cut = (cfg.max_prompt_length is not None  # unset in `dpolab eval`: prompts are not cut
               and tokenizer is not None and rm_tokenizer.get_vocab() == tokenizer.get_vocab())
        path = Path(folder).expanduser().resolve() if Path(folder).expanduser().exists() else Path(folder)
        # a dpolab run's model is its final/ folder: the run's name tells one from another
        name = path.parent.name if path.name == "final" and path.parent.name else path.name
        named.append((name or "reward_model", reward_model_function(
            rm, rm_tokenizer, batch_size=getattr(cfg, "rollout_batch_size", 16), name=folder,
            max_prompt_length=cfg.max_prompt_length if cut else None,
            max_length=cfg.max_prompt_length + cfg.max_new_tokens + 1 if cut else None)))
    return WeightedRewards(distinct_names(named), cfg.reward_weights)


def distinct_names(named: list[tuple[str, object]]) -> list[tuple[str, object]]:
    """Metric names must be distinct: names that coincide get ``_0``, ``_1``, ... in their order; the
    others keep theirs (a second reward model folder named ``final`` must not rename the rest)."""
    from collections import Counter

    counts, seen, out = Counter(n for n, _ in named), Counter(), []
    for n, fn in named:
        out.append((f"{n}_{seen[n]}", fn) if counts[n] > 1 else (n, fn))
        seen[n] += 1
    if len({n for n, _ in out}) < len(out):  # a suffixed name met another reward's own name
        out = [(f"{n}_{i}", fn) for i, (n, fn) in enumerate(named)]
    return out


def reference_model(cfg, accelerator, tokenizer=None):
    """A frozen copy of ``--ref-model`` (default ``--model``) prepared as the policy is for its forward
    (under mixed precision the same autocast: a float32 reference against a bf16 policy made the KL
    of the policy to itself non-zero); None with ``--lora`` and no ``--ref-model``, where the
    reference is the policy's base with its adapters disabled. A ``--ref-model`` must have the
    policy's vocabulary and agree with the run's ``tokenizer`` (checked here, before the policy loads)."""
    from dpolab.lm.loading import check_reference_vocabulary, load_causal_lm
    from dpolab.train.distributed import prepare_reference

    if cfg.lora and not cfg.ref_model:
        return None
    ref = load_causal_lm(cfg.ref_model or cfg.model, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
    if cfg.ref_model:
        check_reference_vocabulary(ref, cfg.model, ref_name=cfg.ref_model, policy_name=cfg.model,
                                   tokenizer=tokenizer, trust_remote_code=cfg.trust_remote_code)
    return prepare_reference(accelerator, ref)


def check_reward_fields(rewards, prompts) -> None:
    """Every prompt row holds the fields the rewards take as arguments (e.g. ``answer``)."""
    from dpolab.rewards.functions import required_columns

    for column, name in required_columns(rewards).items():
        prompts.require_field(column, f"the reward {name} takes it as an argument")


def eval_prompt_set(cfg, prompts, tokenizer,
                    rewards=None) -> tuple[list[str], list[list[int]], dict[str, list], int] | None:
    """(texts, ids, other columns, how many were cut to ``--max-prompt-length``) of the evaluation
    prompts: ``--eval-data`` (its rows checked to leave room for the completions and to hold the
    fields ``rewards`` take), else a seeded sample of the training prompts (checked as training
    prompts); None with ``--eval-prompts 0``."""
    import torch

    if cfg.eval_prompts == 0:
        return None
    if cfg.eval_data:
        from dpolab.data.prompts import load_prompts

        data = load_prompts(cfg.eval_data, tokenizer, max_prompt_length=cfg.max_prompt_length, split=eval_split_of(cfg))
        data = data.subset(list(range(min(cfg.eval_prompts, len(data)))))  # the rows evaluated, and their fields
        rows = list(range(len(data)))
        # here, not at the final evaluation: a prompt past the positions would fail after all training
        check_prompt_room(cfg, data)
        if rewards is not None:
            check_reward_fields(rewards, data)
    else:
        data = prompts
        perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(cfg.seed + 1)).tolist()
        rows = perm[:cfg.eval_prompts]
    return ([data.texts[i] for i in rows], [data.ids[i] for i in rows], data.columns(rows),
            sum(data.cut[i] for i in rows) if data.cut else 0)


def evaluate_samples(cfg, policy, tokenizer, eval_set, reward_fn, ref_model, batch_size: int) -> dict[str, float]:
    """Mean reward, its spread, sequence KL to the reference, response length and EOS fraction of one
    seeded sample per evaluation prompt (the same draws at every evaluation of a run). Prompt ``i`` of
    the set draws from its own seed (of ``--seed`` and ``i``: ``sample_completions``), so the result
    depends on the model and the seed, not on ``batch_size`` (a memory setting) or the processes
    (each evaluates the whole set)."""
    from dpolab.rewards.evaluation import evaluate_policy

    if eval_set is None:
        return {}
    texts, ids, columns, _ = eval_set
    return evaluate_policy(policy, tokenizer, texts, ids, reward_fn, ref_model=ref_model,
                           max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                           top_p=cfg.top_p, seed=cfg.seed + 7919, batch_size=batch_size, columns=columns,
                           fast=cfg.direct_decoder)


def log_samples(run: RunDir, step: int, rows: list[dict], n: int) -> None:
    """Append the first ``n`` sample rows ({"prompt", "completion", "score", ...}) of ``step`` to
    ``samples.jsonl``; print two, of two prompts where the rows hold more than one (a group's
    completions of one prompt, printed together, read as one line printed twice once they agree)."""
    if n <= 0:
        return
    rows = [{"step": step, **r} for r in rows[:n]]
    with open(run.path / "samples.jsonl", "a", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    other = next((r for r in rows[1:] if r.get("prompt") != rows[0].get("prompt")), rows[1] if len(rows) > 1 else None)
    for r in [rows[0], *([other] if other is not None else [])]:
        extra = f" kl={r['kl']:+.3f}" if "kl" in r else ""
        print(f"[step {step}] score={r['score']:+.3f}{extra} | {r['prompt'][-40:]!r} -> {r['completion'][:60]!r}",
              file=sys.stderr)


def truncate_samples(run: RunDir, step: int) -> None:
    """On resume: drop the sample rows logged after ``step``."""
    path = Path(run.path) / "samples.jsonl"
    if path.is_file():
        kept = []
        for ln in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:  # a line cut short by a killed process is dropped, as metrics.jsonl's are
                row = json.loads(ln)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step", 0), int) and row.get("step", 0) <= step:
                kept.append(ln)
        atomic_write_text(path, "".join(ln + "\n" for ln in kept))
