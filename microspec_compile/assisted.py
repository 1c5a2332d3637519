"""Hugging Face assisted generation with a microspec draft, set up in one call.

>>> vocab = microspec_compile.assisted(target, draft, pinned_ids=[eos])
>>> target.generate(**inputs, assistant_model=draft, do_sample=False)

What the call does, each a trap when done by hand:

* compiles both models **in place** (``model.compile``): ``generate`` reached through the
  ``OptimizedModule`` that ``torch.compile(model)`` returns runs the uncompiled module;
* the draft with the microspec backend over one ``ActiveVocab`` of its LM head, the target
  with the observer feeding that vocabulary its top-k, both with ``dynamic=True`` (prompt
  and cache lengths symbolic from the first call: no recompile per length);
* raises ``torch._dynamo.config.recompile_limit`` to 16: both models' forwards go through one
  transformers wrapper, whose graphs Dynamo counts together (about 10), and past the limit
  Dynamo runs them uncompiled with a log line only.
"""
from __future__ import annotations

from typing import Iterable

import torch

from .backend import backend
from .config import DEFAULT_CAPACITY
from .observer import observer
from .policy import TARGET_TOPK
from .vocab import ActiveVocab, draft_head_weight

__all__ = ["assisted", "ASSISTED_RECOMPILE_LIMIT"]

#: Dynamo's recompile limit the pair needs (``tests/test_hf_recompiles.py``), with room to spare.
ASSISTED_RECOMPILE_LIMIT = 16


def assisted(target: torch.nn.Module, draft: torch.nn.Module, *, vocab: ActiveVocab | None = None,
             capacity: int | None = None, pinned_ids: int | Iterable[int] | None = None,
             k: int = TARGET_TOPK) -> ActiveVocab:
    """Compile ``target`` and ``draft`` (Hugging Face causal LMs sharing a tokenizer) in place
    for ``target.generate(..., assistant_model=draft)`` with a microspec draft head.

    Parameters
    ----------
    vocab : the draft's vocabulary; None: a new ``ActiveVocab`` of its LM head with
        ``capacity`` (None: ``DEFAULT_CAPACITY``) and ``pinned_ids``
    pinned_ids : ids always active; None: the draft's ``eos_token_id`` (if it has one)
    k : the target's top-k per scored position fed to the vocabulary (the observer's)

    Returns
    -------
    ActiveVocab
        The vocabulary the draft's head reads (``reset()`` it between requests).

    Raises
    ------
    TypeError : a model already wrapped by ``torch.compile`` (pass the module itself)
    ValueError : ``capacity`` / ``pinned_ids`` given with a ``vocab`` (they are its own)
    """
    for name, model in (("target", target), ("draft", draft)):
        if hasattr(model, "_orig_mod"):
            raise TypeError(f"the {name} is an OptimizedModule (torch.compile's wrapper): pass "
                            f"the module itself, assisted() compiles it in place")
    if vocab is not None and (capacity is not None or pinned_ids is not None):
        raise ValueError("give capacity / pinned_ids to ActiveVocab(...) when you pass "
                         "vocab=..., not to assisted() as well")
    if vocab is None:
        if pinned_ids is None:
            eos = getattr(getattr(draft, "config", None), "eos_token_id", None)
            pinned_ids = () if eos is None else eos
        vocab = ActiveVocab(draft_head_weight(draft),
                            DEFAULT_CAPACITY if capacity is None else capacity, pinned_ids)
    dynamo = torch._dynamo.config
    dynamo.recompile_limit = max(dynamo.recompile_limit, ASSISTED_RECOMPILE_LIMIT)
    draft.compile(backend=backend(vocab=vocab), dynamic=True)
    target.compile(backend=observer(vocab, k=k), dynamic=True)
    return vocab
