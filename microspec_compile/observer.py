"""The paper's target signal: the target's top-k tokens feed the draft's vocabulary.

``target.compile(backend=microspec_compile.observer(draft))`` compiles the target
with plain Inductor after one addition to its graph: right after the target's LM
head, ``topk(logits, k=3).indices`` at every position it scores is observed into
the draft's active vocabulary (``microspec::observe``, in place, inside the
graph). The target's outputs are untouched, so they stay bit-identical (unless
``small_batch_linear`` is set: a faster CPU verification that rounds differently,
see ``kernels/small_batch_linear.py``).

Why it helps (MicroSpec, section 1 of DESIGN.md): the token after a verified one
is very often among the target's own top-3 at a nearby position, so tokens the
draft has never seen in the context still enter its vocabulary one step early.
"""
from __future__ import annotations

import dataclasses
import functools
import operator
from typing import Callable, Sequence

import torch
import torch.fx as fx
from torch._dynamo.utils import counters

from .backend import MicrospecConfig, _clone, _fake, _inductor, _real_values, _warn_no_head, op_impl
from .passes.match_head import find_heads
from .passes.sparse_head import STATE_NAMES, StateNodes, add_placeholders
from .vocab import ActiveVocab, vocab_for_weight


def draft_head_weight(draft: torch.nn.Module, min_vocab_size: int = 1000) -> torch.Tensor:
    """The draft's LM-head weight ``[V, H]``: HF's output embeddings, else the widest 2-D parameter."""
    get = getattr(draft, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is not None and getattr(head, "weight", None) is not None:
        return head.weight
    candidates = [p for p in draft.parameters() if p.dim() == 2 and p.shape[0] >= min_vocab_size]
    if not candidates:
        raise ValueError(f"no LM-head weight (>= {min_vocab_size} rows) found in the draft")
    return max(candidates, key=lambda p: p.shape[0])


def add_target_topk(gm: fx.GraphModule, example_inputs: Sequence, vocab: ActiveVocab, k: int,
                    config: MicrospecConfig):
    """Clone ``gm`` and observe the top-``k`` ids of its LM head into ``vocab``.

    Returns the new graph module, or None when the graph has no head.
    """
    clone = _clone(gm)
    values = _real_values(clone, example_inputs)
    heads = [h for h in find_heads(clone, values, config.min_vocab_size)
             if values[h.weight].shape[0] == vocab.vocab_size]
    if not heads:
        return None
    graph = clone.graph
    tensors = (*vocab.state(), vocab.weight)
    names = [f"draft_{n}" for n in STATE_NAMES] + ["draft_weight"]
    nodes = add_placeholders(graph, names, [_fake(t) for t in tensors])
    state, weight = StateNodes(*nodes[:-1]), nodes[-1]
    for head in heads:
        logits = head.linear
        with graph.inserting_after(logits):
            top = graph.call_method("topk", (logits, k), {"dim": -1})
        with graph.inserting_after(top):
            ids = graph.call_function(operator.getitem, (top, 1))
        with graph.inserting_after(ids):
            graph.call_function(torch.ops.microspec.observe.default,
                                (*state.all(), weight, ids, False, op_impl(config)))
        counters["microspec"]["target_topk_inserted"] += 1
    graph.lint()
    clone.recompile()
    return clone, list(tensors)


def observer(draft: torch.nn.Module, k: int = 3, **config) -> Callable:
    """A backend for the *target* that adds its top-``k`` to ``draft``'s vocabulary.

    Parameters
    ----------
    draft : the draft module (compiled with ``backend="microspec"``, now or later)
    k : how many of the target's best tokens per scored position; 0 compiles the
        target the same way with no top-k (to measure what the signal adds)
    **config : ``MicrospecConfig`` fields; ``capacity`` / ``pinned_ids`` size the
        draft's vocabulary if the observer creates it first
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    cfg = MicrospecConfig(**config)
    weight = draft_head_weight(draft, cfg.min_vocab_size)
    vocab = vocab_for_weight(weight, cfg.capacity, cfg.pinned_ids)
    return functools.partial(_compile_target, vocab=vocab, k=k, config=cfg)


def _compile_target(gm, example_inputs, *, vocab: ActiveVocab, k: int, config: MicrospecConfig):
    plain = dataclasses.replace(config, path="torch")  # the target's head stays dense
    if k == 0:
        return _inductor(gm, list(example_inputs), plain)
    rewritten = add_target_topk(gm, example_inputs, vocab, k, config)
    if rewritten is None:
        _warn_no_head(config)
        return _inductor(gm, list(example_inputs), plain)
    clone, extra = rewritten
    compiled = _inductor(clone, list(example_inputs) + extra, plain)

    def run(*args):
        counters["microspec"]["target_observe_calls"] += 1
        return compiled(*args, *extra)

    return run
