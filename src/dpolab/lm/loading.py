"""Loading models and tokenizers from the Hugging Face hub or local folders, and wrapping them in
LoRA adapters: safetensors weights only (never a pickle), errors as one clear line."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from dpolab.errors import ConfigError, DpolabError
from dpolab.hub import check_local_folder

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False):
    """``AutoTokenizer.from_pretrained``; a missing pad token falls back to EOS. A PEFT adapter folder
    without tokenizer files (what ``save_pretrained`` of a PEFT model writes) has its base's."""
    from transformers import AutoTokenizer

    if is_adapter_folder(name_or_path) and not any((Path(name_or_path) / f).is_file() for f in TOKENIZER_FILES):
        name_or_path = adapter_base(name_or_path)
    check_local_folder(name_or_path, "tokenizer", TOKENIZER_FILES)
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise DpolabError(f"cannot load tokenizer '{name_or_path}': "
                          f"{_not_local(name_or_path)}{first_line(err)}{_remote_code_hint(err)}") from None
    if tok.eos_token is None:
        raise DpolabError(f"tokenizer '{name_or_path}' has no EOS token; responses need one")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(name_or_path: str, *, dtype: str = "auto", trust_remote_code: bool = False,
                   head: bool = True):
    """``AutoModelForCausalLM.from_pretrained`` with safetensors weights only (no pickle). A model saved
    as a sequence classifier (a reward model) is refused, since its language-model head would be
    random, unless ``head`` is False (a value network reads only the hidden states)."""
    from transformers import AutoModelForCausalLM

    if is_adapter_folder(name_or_path):
        return merged_adapter(name_or_path, dtype=dtype, trust_remote_code=trust_remote_code)
    model = load_pretrained(AutoModelForCausalLM, name_or_path, dtype=dtype, trust_remote_code=trust_remote_code)
    saved_as = [a for a in (getattr(model.config, "architectures", None) or []) if isinstance(a, str)]
    if head and saved_as and all(a.endswith("ForSequenceClassification") for a in saved_as):
        raise DpolabError(f"'{name_or_path}' is a {saved_as[0]} (a reward model), not a causal LM: its language-model "
                          "head would be random; give the causal LM it was trained from")
    return model


def vocabulary_size(model_or_name, *, trust_remote_code: bool = False) -> int | None:
    """The rows of a loaded model's input embeddings, or the ``vocab_size`` of a named model's config
    (what ``from_pretrained`` would build); None when the config cannot be read (the load reports it)."""
    if not isinstance(model_or_name, (str, Path)):
        return int(model_or_name.get_input_embeddings().num_embeddings)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(model_or_name), trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    size = getattr(config, "vocab_size", None)
    return int(size) if isinstance(size, int) else None


def check_reference_vocabulary(ref, policy, *, ref_name: str, policy_name: str, tokenizer=None,
                               trust_remote_code: bool = False, flag: str = "--ref-model") -> None:
    """A reference scores the policy's token ids, so its vocabulary must hold every id of the policy's:
    a smaller one failed with an IndexError at the first step. (A larger one is allowed: the sizes of
    one family may pad their embeddings differently, e.g. Qwen2.5-0.5B's 151,936 rows and 7B's
    152,064, for one tokenizer.) ``ref``: the loaded reference; ``policy``: the loaded policy, or its
    name (its config's ``vocab_size``; not checked where that cannot be read; ``ref`` may be a name
    too). ``tokenizer``: the
    run's; where given and ``ref_name`` is a local folder with a tokenizer of its own, a token both
    tokenizers hold must have one id in both (another tokenizer of the same size scored other
    tokens silently; tokens added to one of them, such as chat markers, are allowed)."""
    have = vocabulary_size(ref, trust_remote_code=trust_remote_code)
    want = vocabulary_size(policy, trust_remote_code=trust_remote_code)
    if want is not None and have is not None and have < want:
        unset = "leave --ref-model unset (a frozen copy of --model)" if flag == "--ref-model" else f"leave {flag} unset"
        raise ConfigError(f"{flag} {ref_name} has a vocabulary of {have} tokens (input embedding rows), fewer "
                          f"than the policy {policy_name}'s {want}: it must share the policy's tokenizer; "
                          f"give one that does, or {unset}")
    if tokenizer is None:
        return
    ref_tokenizer = _own_tokenizer(ref_name, trust_remote_code=trust_remote_code)
    if ref_tokenizer is None:
        return
    ours, theirs = tokenizer.get_vocab(), ref_tokenizer.get_vocab()
    clash = sorted((ours[t], t) for t in ours.keys() & theirs.keys() if ours[t] != theirs[t])
    if clash:
        token_id, token = clash[0]
        raise ConfigError(f"{flag} {ref_name} has another tokenizer than the run's: {len(clash)} tokens have other "
                          f"ids (e.g. {token!r} is {token_id} here, {theirs[token]} there), so its log-probs would "
                          "score other tokens; give a reference with the policy's tokenizer, or leave --ref-model "
                          "unset (a frozen copy of --model)")


def _own_tokenizer(folder: str, *, trust_remote_code: bool):
    """The tokenizer saved in a local model folder, or None (no folder, no tokenizer files in it, or
    one that does not load: the reference's tokenizer is then not compared)."""
    path = Path(folder)
    if not path.is_dir() or not any((path / f).is_file() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - a tokenizer that will not load is only not compared
        return None


def is_adapter_folder(name_or_path) -> bool:
    """A local PEFT adapter folder (``adapter_config.json``, no ``config.json`` of a whole model)."""
    path = Path(name_or_path)
    return path.is_dir() and (path / "adapter_config.json").is_file() and not (path / "config.json").is_file()


def adapter_base(folder) -> str:
    """The base model a PEFT adapter folder names (``base_model_name_or_path`` of adapter_config.json)."""
    import json

    try:
        base = json.loads((Path(folder) / "adapter_config.json").read_text(encoding="utf-8"))["base_model_name_or_path"]
        if not isinstance(base, str) or not base:
            raise ValueError(f"base_model_name_or_path is {base!r}")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DpolabError(f"{folder}: a PEFT adapter folder whose adapter_config.json names no base model "
                          f"(base_model_name_or_path): {first_line(err) or type(err).__name__}") from None
    return base


def merged_adapter(folder, *, dtype: str = "auto", trust_remote_code: bool = False):
    """The causal LM of a PEFT adapter folder: its base (``base_model_name_or_path``) with the adapter
    merged into the weights, a plain model to train, score with or save whole. (transformers' own
    loading of such a folder keeps the adapter apart and every weight frozen: training found no
    parameter, and saving wrote the adapter alone.)"""
    base = adapter_base(folder)
    from peft import PeftModel

    model = load_causal_lm(str(base), dtype=dtype, trust_remote_code=trust_remote_code)
    try:
        with warnings.catch_warnings():  # PEFT reads an attribute transformers 5 deprecates: not the user's to fix
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            merged = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise DpolabError(f"cannot apply the adapter {folder} to its base {base}: {first_line(err)}") from None
    return merged.requires_grad_(True)  # peft loads for inference (every weight frozen); trainable as any model


def load_pretrained(auto_cls, name_or_path: str, *, dtype: str, trust_remote_code: bool, **kwargs):
    import transformers

    if dtype not in DTYPES:
        raise DpolabError(f"unknown dtype '{dtype}'; choose from {list(DTYPES)}")
    check_local_folder(name_or_path, "model", ("config.json", "adapter_config.json"))
    major = int(transformers.__version__.split(".")[0])
    dtype_kw = "dtype" if major >= 5 else "torch_dtype"
    if DTYPES[dtype] is not None:
        kwargs[dtype_kw] = DTYPES[dtype]
    try:
        return auto_cls.from_pretrained(name_or_path, trust_remote_code=trust_remote_code,
                                        use_safetensors=_has_safetensors(name_or_path), **kwargs)
    except (OSError, ValueError) as err:
        raise DpolabError(f"cannot load model '{name_or_path}': "
                          f"{_not_local(name_or_path)}{first_line(err)}{_remote_code_hint(err)}") from None
    except Exception as err:
        if type(err).__name__ != "SafetensorError":
            raise
        raise DpolabError(f"cannot load model '{name_or_path}': its safetensors weights are damaged (a truncated "
                          f"or interrupted copy?): {first_line(err)}") from None


def _remote_code_hint(err: BaseException) -> str:
    """transformers asks for ``trust_remote_code=True`` on a line after the first, which is all an
    error here shows: the flag that does it, named."""
    return " Pass --trust-remote-code to run it (only if you trust it)." if "trust_remote_code" in str(err) else ""


def _has_safetensors(name_or_path: str) -> bool | None:
    """Local folders must hold safetensors weights (never unpickle a .bin); hub names: prefer them."""
    path = Path(name_or_path)
    if path.is_dir():
        if any(path.glob("*.safetensors")):
            return True
        if any(path.glob("*.bin")):
            raise DpolabError(f"{path}: only pickle (.bin) weights found; dpolab loads safetensors only. "
                              "Convert with `model.save_pretrained(dir, safe_serialization=True)`.")
    return None


def _not_local(name_or_path: str) -> str:
    return "" if Path(str(name_or_path)).expanduser().exists() else "not a local folder, and from the Hub: "


def first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def model_fingerprint(name_or_path: str) -> str:
    """A cheap identity of a model for cache keys: the names, sizes and mtimes of its folder's files
    (weights, configs and every tokenizer file: a ``chat_template.jinja``, ``merges.txt``, a
    SentencePiece model), or the name."""
    import hashlib

    h = hashlib.sha256(str(name_or_path).encode())
    path = Path(name_or_path)
    if path.is_dir():
        for f in sorted(path.glob("*")):
            if f.is_file() and not f.name.startswith("."):
                st = f.stat()
                h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def load_trainable_lm(cfg):
    """The policy a trainer fine-tunes: ``--model`` loaded, gradient checkpointing and LoRA applied as
    configured (``cfg`` has the model and LoRA option groups of ``dpolab.train.options``)."""
    model = load_causal_lm(cfg.model, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    if cfg.lora:
        model = apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                           target_modules=cfg.lora_target_modules)
    return model


def enable_checkpointing(model) -> None:
    """transformers' activation checkpointing (for the modules in training mode; a model kept in
    eval mode is checkpointed by :mod:`dpolab.lm.checkpointing`)."""
    # the name since transformers 5, where the old one warns
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


def apply_lora(model, *, r: int, alpha: int, dropout: float, target_modules: str):
    """Wrap ``model`` with LoRA adapters (peft). The reference is then the base with adapters off."""
    from peft import LoraConfig, get_peft_model

    targets: Any = target_modules if target_modules == "all-linear" else [
        t.strip() for t in target_modules.split(",") if t.strip()]
    if isinstance(targets, list):  # peft matches a name or a dotted suffix of one
        names = [n for n, _ in model.named_modules() if n]
        missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
        if missing:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                             if isinstance(m, torch.nn.Linear) and n})
            raise ConfigError(f"--lora-target-modules: the model has no module named {', '.join(missing)}; its "
                              f"linear layers are {', '.join(linear)} (or give all-linear)")
        inp, out = model.get_input_embeddings(), model.get_output_embeddings()
        if inp is not None and out is not None and out.weight is inp.weight:  # tied: one matrix for both
            shared = [n for n, m in model.named_modules() if m is inp or m is out]
            tied = [t for t in targets if any(n == t or n.endswith("." + t) for n in shared)]
            if tied:  # the merge writes the adapter into the shared matrix: the other side changes too
                raise ConfigError(f"--lora-target-modules {', '.join(tied)}: the model ties its input embeddings and "
                                  "output head (one matrix), so the merged final/ would change both, not the model "
                                  "that was trained; leave them out of the targets")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        # peft reads the attribute transformers 5 renamed; the warning is not the user's to act on
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        try:
            return get_peft_model(model, config)
        except ValueError as err:  # e.g. a target that is no layer LoRA can wrap
            raise ConfigError(f"--lora-target-modules {target_modules}: {first_line(err)}") from None


def pad_token_id_for(tokenizer) -> int:
    """The id that pads batches: the tokenizer's pad token, else its EOS (``load_tokenizer`` sets it)."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has neither a pad_token nor an eos_token")
    return int(tokenizer.eos_token_id)
