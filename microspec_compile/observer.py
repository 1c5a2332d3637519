"""The paper's target signal: the target's top-k tokens feed the draft's vocabulary.

``target.compile(backend=microspec_compile.observer(draft))`` compiles the target
with plain Inductor after one addition to its graph: right after the target's LM
head, its top-3 ids at every position it scores (``policy.target_top_ids``, the
policy's one definition) become an extra output of the compiled graph, which the
wrapper observes into the draft's active vocabulary (``microspec::observe``, in
place) and strips before returning. The target's outputs are untouched, so they
stay bit-identical.

The target's graph does not take the vocabulary's state tensors as inputs, so a
capacity the draft's backend asks for later, when the target ran first, can still
reallocate the state (``ActiveVocab.merge``): the compile order does not matter.

Why it helps, and the same policy in the tree loops: ``microspec_compile.policy``.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import torch
import torch.fx as fx
from torch._dynamo.utils import counters

from .config import MicrospecConfig
from .graph import clone_graph, compile_graph, real_values, warn_no_head
from .passes.match_head import find_heads
from .policy import TARGET_TOPK, target_top_ids
from .vocab import ActiveVocab, head_weight, vocab_for_weight

# The MicrospecConfig fields the observer uses; the others (head, observe_inputs,
# path) concern the draft's own graph and are refused rather than ignored.
OBSERVER_SETTINGS = ("capacity", "pinned_ids", "min_vocab_size", "inductor")


def add_target_topk(gm: fx.GraphModule, example_inputs: Sequence, vocab: ActiveVocab, k: int,
                    config: MicrospecConfig):
    """Clone ``gm`` and append the top-``k`` ids of each of its LM heads to its outputs.

    Returns ``(new_gm, heads)``, ``heads`` the number of id outputs appended after the
    original ones, or None when the graph has no head of the draft's vocabulary size.
    """
    clone = clone_graph(gm)
    values = real_values(clone, example_inputs)
    heads = [h for h in find_heads(clone, values, config.min_vocab_size)
             if values[h.weight].shape[0] == vocab.vocab_size]
    if not heads:
        return None
    graph = clone.graph
    top_ids = []
    for head in heads:
        with graph.inserting_after(head.linear):
            top_ids.append(graph.call_function(target_top_ids, (head.linear, k)))
        counters["microspec"]["target_topk_inserted"] += 1
    output = graph.find_nodes(op="output")[0]
    outs = output.args[0]
    if not isinstance(outs, (tuple, list)):
        raise TypeError(f"microspec observer: a graph output that is not a tuple ({type(outs)})")
    output.args = ((*outs, *top_ids),)
    graph.lint()
    clone.recompile()
    return clone, len(top_ids)


def observer(draft: torch.nn.Module, k: int = TARGET_TOPK, **config) -> Callable:
    """A backend for the *target* that adds its top-``k`` to ``draft``'s vocabulary.

    Parameters
    ----------
    draft : the draft module (compiled with ``backend="microspec"``, now or later)
    k : how many of the target's best tokens per scored position; 0 compiles the
        target the same way with no top-k (to measure what the signal adds)
    **config : the ``MicrospecConfig`` fields in ``OBSERVER_SETTINGS``: ``capacity`` /
        ``pinned_ids`` configure the draft's vocabulary like the draft's backend does
        (given on both sides they must agree; left out on one side, the other's
        apply, whichever compiles first: ``ActiveVocab.merge``), ``min_vocab_size``
        finds the target's head, ``inductor`` compiles the target's graph

    Raises
    ------
    TypeError
        For any other keyword (``head``, ``observe_inputs``, ``path`` set the draft's
        backend, not the target's).
    """
    unknown = [name for name in config if name not in OBSERVER_SETTINGS]
    if unknown:
        raise TypeError(f"observer() got an unexpected keyword argument {unknown[0]!r} "
                        f"(it takes k and {', '.join(OBSERVER_SETTINGS)})")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    cfg = MicrospecConfig(**config)
    weight = head_weight(draft, cfg.min_vocab_size)
    vocab = vocab_for_weight(weight, cfg.capacity, cfg.pinned_ids)
    return functools.partial(_compile_target, vocab=vocab, k=k, config=cfg)


def _compile_target(gm, example_inputs, *, vocab: ActiveVocab, k: int, config: MicrospecConfig):
    # The target's head stays dense: no decomposition table, plain Inductor (or eager).
    compile_target = functools.partial(compile_graph, inductor=config.inductor)
    if k == 0:
        return compile_target(gm, list(example_inputs))
    rewritten = add_target_topk(gm, example_inputs, vocab, k, config)
    if rewritten is None:
        warn_no_head(config.min_vocab_size, config)
        return compile_target(gm, list(example_inputs))
    clone, heads = rewritten
    compiled = compile_target(clone, list(example_inputs))

    def run(*args):
        counters["microspec"]["target_observe_calls"] += 1
        outs = compiled(*args)
        for ids in outs[len(outs) - heads:]:
            vocab.observe(ids)
        return outs[: len(outs) - heads]

    return run
