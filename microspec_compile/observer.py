"""The paper's target signal: the target's top-k tokens feed the draft's vocabulary.

``target.compile(backend=microspec_compile.observer(draft))`` compiles the target
with plain Inductor after one addition to its graph: right after the target's LM
head, its top-3 ids at every position it scores (``policy.target_top_ids``, the
policy's one definition) become an extra output of the compiled graph, which the
wrapper observes into the draft's active vocabulary (``microspec::observe``, in
place) and strips before returning. The target's outputs are untouched, so they
stay bit-identical.

The vocabulary it feeds is the one the draft's head reads: the ``ActiveVocab`` you
pass, or the default vocabulary of the draft's head weight (``vocab.py``); a
vocabulary bound with ``microspec_compile.using`` around a target call takes that
call's ids instead.

Why it helps, and the same policy in the tree loops: ``microspec_compile.policy``.
"""
from __future__ import annotations

import functools
import warnings
from typing import Callable, Sequence

import torch.fx as fx
from torch._dynamo.utils import counters

from .config import MicrospecConfig
from .graph import clone_graph, compile_graph, real_values, warn_no_head
from .passes.match_head import find_heads
from .policy import TARGET_TOPK, target_top_ids
from .vocab import ActiveVocab, bound_vocab, default_vocab, draft_head_weight

# The MicrospecConfig fields the observer uses; the others (head, observe_inputs,
# path) concern the draft's own graph and are refused rather than ignored.
OBSERVER_SETTINGS = ("capacity", "pinned_ids", "min_vocab_size", "inductor")


def add_target_topk(gm: fx.GraphModule, example_inputs: Sequence, vocab_size: int, k: int,
                    config: MicrospecConfig):
    """Clone ``gm`` and append the top-``k`` ids of each of its LM heads to its outputs.

    Returns ``(new_gm, heads)``, ``heads`` the number of id outputs appended after the
    original ones, or None when the graph has no head of ``vocab_size`` rows (the draft's).
    """
    clone = clone_graph(gm)
    values = real_values(clone, example_inputs)
    heads = [h for h in find_heads(clone, values, config.min_vocab_size)
             if values[h.weight].shape[0] == vocab_size]
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


def observer(draft, k: int = TARGET_TOPK, **config) -> Callable:
    """A backend for the *target* that adds its top-``k`` to the draft's vocabulary.

    Parameters
    ----------
    draft : the draft's ``ActiveVocab``, or the draft module (compiled with
        ``backend="microspec"``, now or later): then the default vocabulary of its LM head
        (``vocab.draft_head_weight`` finds the head when ``observer`` is called; its
        default vocabulary, ``vocab.default_vocab``, is looked up at each target call);
        the observer creates that vocabulary only when given ``capacity`` or
        ``pinned_ids``, else target calls before the draft's first one are not observed
    k : how many of the target's best tokens per scored position; 0 compiles the
        target the same way with no top-k (to measure what the signal adds)
    **config : the ``MicrospecConfig`` fields in ``OBSERVER_SETTINGS``: ``capacity`` /
        ``pinned_ids`` for the draft's default vocabulary (as the draft's backend takes
        them), ``min_vocab_size`` finds the heads, ``inductor`` compiles the target's graph

    A vocabulary bound by ``microspec_compile.using`` around a target call receives that
    call's ids instead.

    Raises
    ------
    TypeError
        For any other keyword (``head``, ``observe_inputs``, ``path`` set the draft's
        backend, not the target's).
    LookupError
        The draft's LM head cannot be told (pass its ``ActiveVocab`` instead).
    ValueError
        Settings given with an ``ActiveVocab``, or other than its existing default
        vocabulary's.
    """
    unknown = [name for name in config if name not in OBSERVER_SETTINGS]
    if unknown:
        raise TypeError(f"observer() got an unexpected keyword argument {unknown[0]!r} "
                        f"(it takes k and {', '.join(OBSERVER_SETTINGS)})")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if isinstance(draft, ActiveVocab):
        cfg = MicrospecConfig(vocab=draft, **config)
        weight = draft.weight
    else:
        cfg = MicrospecConfig(**config)
        if hasattr(draft, "_orig_mod"):
            warn_wrapped_draft()
        weight = draft_head_weight(draft, cfg.min_vocab_size)
        default_vocab(weight, cfg.capacity, cfg.pinned_ids, create=False)  # settings clash now
    return functools.partial(_compile_target, weight=weight, k=k, config=cfg)


def _compile_target(gm, example_inputs, *, weight, k: int, config: MicrospecConfig):
    # The target's head stays dense: no decomposition table, plain Inductor (or eager).
    compile_target = functools.partial(compile_graph, inductor=config.inductor)
    if k == 0:
        return compile_target(gm, list(example_inputs))
    rewritten = add_target_topk(gm, example_inputs, weight.shape[0], k, config)
    if rewritten is None:
        warn_no_head(config.min_vocab_size, config.head)
        return compile_target(gm, list(example_inputs))
    clone, heads = rewritten
    compiled = compile_target(clone, list(example_inputs))

    # with settings of its own the observer may create the draft's default vocabulary;
    # without, it feeds it once the draft's backend has (no draft has run before that)
    creates = config.capacity is not None or bool(config.pinned_ids)

    def run(*args):
        counters["microspec"]["target_observe_calls"] += 1
        outs = compiled(*args)
        vocab = bound_vocab(weight) or config.vocab or default_vocab(
            weight, config.capacity, config.pinned_ids, create=creates)
        if vocab is None:
            counters["microspec"]["target_calls_before_draft"] += 1
        else:
            for ids in outs[len(outs) - heads:]:
                vocab.observe(ids)
        return outs[: len(outs) - heads]

    return run


def warn_wrapped_draft() -> None:
    warnings.warn(
        "microspec observer: the draft is torch.compile's wrapper (an OptimizedModule). As "
        "generate(assistant_model=...) it runs the *uncompiled* module: no sparse head. "
        "Compile the draft in place (draft.compile(backend=...)) and pass the module, or set "
        "both models up with microspec_compile.assisted(target, draft)", stacklevel=3)
