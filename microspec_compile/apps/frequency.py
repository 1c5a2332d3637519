"""Token-frequency cores from real ShareGPT text, cached on disk.

A *core* is the N most frequent token ids of a tokenizer, counted on a slice of the
ShareGPT conversations (all turns, user and assistant). The sparse head can pin a core
in its active vocabulary (context U core), and ``frequent_token_ids(name, 32768)`` is
the fixed FR-Spec-style vocabulary the coverage benchmark compares against.

Counts are cached as ``.npy`` files under ``$MICROSPEC_CACHE_DIR`` (default
``~/.cache/microspec_compile/``), one per (encoding, slice). The default slice is the
first ``FREQUENCY_LIMIT`` kept conversations; evaluate on conversations after it
(``sharegpt_conversations(skip=FREQUENCY_LIMIT)``) so the two never overlap.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .data import sharegpt_conversations

__all__ = ["FREQUENCY_LIMIT", "cache_dir", "get_encoding", "token_counts", "frequent_token_ids",
           "tokenizer_counts"]

#: Conversations [0, FREQUENCY_LIMIT) of ``sharegpt_conversations()`` are the default
#: frequency slice; about 11.1k conversations exist, so ~1.1k remain for evaluation.
FREQUENCY_LIMIT = 10_000
_BATCH = 1000  # conversations tokenized per encode_batch call (bounds memory)


def cache_dir() -> Path:
    """Directory of the on-disk caches (created on demand)."""
    root = os.environ.get("MICROSPEC_CACHE_DIR") or Path.home() / ".cache" / "microspec_compile"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def get_encoding(encoding_name: str):
    """A ``quicktok`` tokenizer (``"llama3"``, ``"qwen3"``, ``"cl100k_base"``, ...).

    Raises
    ------
    ModuleNotFoundError
        If quicktok is missing, with the pip command that installs it.
    """
    try:
        import quicktok
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "package 'quicktok' is not installed; install it with: pip install quicktok-v1"
        ) from err
    return quicktok.get_encoding(encoding_name)


def token_counts(encoding_name: str, *, skip: int = 0, limit: int = FREQUENCY_LIMIT) -> np.ndarray:
    """Occurrences of every token id in a slice of ShareGPT conversations.

    Parameters
    ----------
    encoding_name : str
        quicktok encoding name, e.g. ``"llama3"`` or ``"qwen3"``.
    skip, limit : int
        The slice: ``sharegpt_conversations(limit=limit, skip=skip)``.

    Returns
    -------
    np.ndarray
        int64 array of shape ``[n_vocab]``; entry i counts token id i. Special
        tokens never occur (text is encoded as ordinary text).
    """
    path = cache_dir() / f"counts_{encoding_name}_sharegpt_{skip}_{skip + limit}.npy"
    if path.exists():
        return np.load(path)
    enc = get_encoding(encoding_name)
    return _count_and_save(path, enc.n_vocab, sharegpt_conversations(limit=limit, skip=skip),
                           lambda texts: enc.encode_batch(texts, 0, False)[0])


def _count_and_save(path: Path, size: int, conversations, encode) -> np.ndarray:
    """Token counts ``[size]`` of every turn of ``conversations`` (``encode``: a batch of
    texts to one flat array of ids), saved atomically at ``path``."""
    counts = np.zeros(size, dtype=np.int64)
    for start in range(0, len(conversations), _BATCH):
        texts = [turn for conv in conversations[start:start + _BATCH] for turn in conv]
        counts += np.bincount(encode(texts), minlength=size)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(tmp, counts)
    os.replace(tmp, path)  # atomic: concurrent readers never see a partial file
    return counts


def frequent_token_ids(encoding_name: str, n: int, *, skip: int = 0,
                       limit: int = FREQUENCY_LIMIT) -> list[int]:
    """The ``n`` most frequent token ids of a ShareGPT slice (a frequency core).

    Parameters
    ----------
    encoding_name : str
        quicktok encoding name, e.g. ``"llama3"`` or ``"qwen3"``.
    n : int
        Core size; capped at the vocabulary size.
    skip, limit : int
        The conversation slice counted (see :func:`token_counts`).

    Returns
    -------
    list of int
        ``min(n, n_vocab)`` distinct ids, most frequent first. Ties (including
        tokens never seen in the slice) go to the lower id: BPE ids follow merge
        order, so lower ids were the more frequent in the tokenizer's own corpus.
    """
    counts = token_counts(encoding_name, skip=skip, limit=limit)
    order = np.lexsort((np.arange(counts.size), -counts))  # by count desc, then id asc
    return order[: max(0, min(n, counts.size))].tolist()


def tokenizer_counts(tokenizer, *, limit: int = FREQUENCY_LIMIT, name: str | None = None) -> np.ndarray:
    """Occurrences of every token id of a Hugging Face ``tokenizer`` in ShareGPT's first
    ``limit`` conversations (all turns, encoded as plain text): FR-Spec's corpus count for
    a model whose tokenizer quicktok does not have.

    Parameters
    ----------
    tokenizer : a Hugging Face tokenizer (``len(tokenizer)`` ids)
    limit : conversations counted
    name : the cache file's key (None: the tokenizer's ``name_or_path`` and size)

    Returns
    -------
    np.ndarray
        int64 ``[len(tokenizer)]``; cached under :func:`cache_dir`.
    """
    size = len(tokenizer)
    key = name or f"{Path(str(tokenizer.name_or_path)).name}-{size}"
    path = cache_dir() / f"counts_hf_{key}_sharegpt_0_{limit}.npy"
    if path.exists():
        return np.load(path)

    def encode(texts):
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
        return np.fromiter((i for seq in encoded for i in seq), dtype=np.int64)

    return _count_and_save(path, size, sharegpt_conversations(limit=limit), encode)
