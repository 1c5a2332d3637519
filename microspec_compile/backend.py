"""The ``microspec`` torch.compile backend.

``torch.compile(draft, backend="microspec")`` (registered through the
``torch_dynamo_backends`` entry point) receives each Dynamo graph and:

1. finds the LM head (``passes.match_head``); none found -> plain Inductor and one
   warning;
2. clones the graph (Dynamo keeps using the original) and appends the vocabulary
   state tensors as extra placeholders;
3. rewrites the head into ``microspec::sparse_topk`` / ``sparse_full`` and inserts
   ``microspec::observe_start`` on the ids feeding the embedding and
   ``microspec::observe_wait`` immediately before the head (``async_gather``, the
   default: on CUDA the gather overlaps the decoder layers), or the synchronous
   ``microspec::observe`` (``async_gather=False``) (``passes.sparse_head``);
4. hands the graph to Inductor and returns a wrapper that appends the state tensors
   to every call. The state is updated in place, never reallocated, so the
   compiled code sees a changing vocabulary with no guards and no recompiles.

CUDA graphs (``torch.compile(..., mode="reduce-overhead")``): the state placeholders
are static inputs (captured at their own addresses, mutation allowed) and the
gather's fork / join is by events, which capture accepts.  Before the first such
graph on a device the backend captures the asynchronous gather once on a tiny state
(``kernels.async_gather.capture_problem``); if that fails it warns once, naming the
failure, and those graphs use the synchronous observe instead.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import warnings
from typing import Callable, Optional, Sequence

import torch.fx as fx
from torch._dynamo.utils import counters

from .config import MicrospecConfig
from .graph import clone_graph, compile_graph, fake_tensor, real_values, warn_no_head
from .kernels.async_gather import capture_problem
from .kernels.dispatch import decomposes
from .passes.match_head import find_embedding_ids, find_heads
from .passes.sparse_head import (
    add_state_placeholders,
    insert_observe,
    insert_wait,
    remove_replaced,
    rewrite_head,
)
from .vocab import ActiveVocab, vocab_for_weight

log = logging.getLogger(__name__)


def compile_config(gm: fx.GraphModule, example_inputs: list, config: MicrospecConfig) -> Callable:
    """``graph.compile_graph`` with the settings of ``config`` (its kernel path included)."""
    return compile_graph(gm, example_inputs, inductor=config.inductor,
                         decompose=decomposes(config.path), mode=config.mode)


def use_async_gather(config: MicrospecConfig, device) -> bool:
    """Whether graphs with a vocabulary on ``device`` get ``observe_start`` / ``observe_wait``.

    ``config.async_gather``, unless the mode captures CUDA graphs and the capture of
    the asynchronous gather fails on this device (one warning per device and cause).
    """
    if not config.async_gather:
        return False
    if not config.cuda_graphs:
        return True
    problem = capture_problem(device, config.path)
    if problem is None:
        return True
    warn_capture_fallback(str(device), problem)
    counters["microspec"]["async_gather_capture_fallbacks"] += 1
    return False


@functools.cache
def warn_capture_fallback(device: str, problem: str) -> None:
    warnings.warn(
        f"microspec: the asynchronous gather (side-stream fork / join by events) could not be "
        f"captured in a CUDA graph on {device} ({problem}); graphs compiled with CUDA graphs "
        "use the synchronous observe instead (as async_gather=False)", stacklevel=3)


def rewrite_graph(gm: fx.GraphModule, example_inputs: Sequence, config: MicrospecConfig):
    """Rewrite every LM head of ``gm``.

    Returns ``(new_gm, vocabularies, observes_inputs)`` or None (no head);
    ``observes_inputs`` says whether the graph observes the ids feeding an embedding.
    """
    clone = clone_graph(gm)
    values = real_values(clone, example_inputs)
    heads = find_heads(clone, values, config.min_vocab_size, config.head)
    if not heads:
        return None
    graph = clone.graph
    states, starts, vocabs, observes_inputs = {}, {}, [], False
    for head in heads:
        weight = values[head.weight]
        vocab = vocab_for_weight(weight, config.capacity, config.pinned_ids)
        if id(vocab) not in states:
            fakes = [fake_tensor(t) for t in vocab.state()]
            states[id(vocab)] = add_state_placeholders(graph, f"microspec{len(vocabs)}", fakes)
            vocab.in_graph = True  # its capacity is final from now on (ActiveVocab.merge)
            vocabs.append(vocab)
            starts[id(vocab)] = []
            if config.observe_inputs:
                asynchronous = use_async_gather(config, weight.device)
                for ids, embedding in find_embedding_ids(clone, values, weight.shape[0]):
                    node = insert_observe(graph, ids, embedding, states[id(vocab)], head.weight,
                                          config.path, asynchronous)
                    counters["microspec"]["observe_inserted"] += 1
                    if asynchronous:
                        starts[id(vocab)].append(node)
                        counters["microspec"]["observe_start_inserted"] += 1
                    observes_inputs = True
        op = rewrite_head(graph, head, states[id(vocab)], weight.shape[0], config.path)
        for start in starts[id(vocab)]:  # the head reads the rows only after the gather
            insert_wait(graph, op, start, states[id(vocab)])
            counters["microspec"]["observe_wait_inserted"] += 1
        remove_replaced(graph, head)
        counters["microspec"]["heads_rewritten"] += 1
        counters["microspec"][f"heads_{head.kind}_{head.normalize}"] += 1
    graph.lint()
    clone.recompile()
    return clone, vocabs, observes_inputs


def compile_microspec(gm: fx.GraphModule, example_inputs: Sequence, config: MicrospecConfig,
                      mode: Optional[str] = None, options: Optional[dict] = None):
    """Compile one Dynamo graph (the body of the backend).

    ``mode`` / ``options`` are what ``torch.compile(..., mode=..., options=...)`` passes
    to a backend: ``mode`` replaces ``config.mode``; ``options`` is not supported.
    """
    if options:
        raise ValueError("microspec: torch.compile(options=...) is not supported by this "
                         "backend; give mode=... (or MicrospecConfig settings) instead")
    if mode is not None:
        config = dataclasses.replace(config, mode=mode)
    rewritten = rewrite_graph(gm, example_inputs, config)
    if rewritten is None:
        warn_no_head(config.min_vocab_size, config)
        counters["microspec"]["fallback_no_head"] += 1
        return compile_config(gm, list(example_inputs), config)
    clone, vocabs, observes_inputs = rewritten
    extra = [t for vocab in vocabs for t in vocab.state()]
    compiled = compile_config(clone, list(example_inputs) + extra, config)
    # A graph that observes its own input ids never meets an empty vocabulary; a
    # head compiled on its own can, before anything is observed.  It then scores the
    # full vocabulary with the original graph (exact, slower) instead of failing.
    may_be_empty = [] if observes_inputs else vocabs

    def run(*args):
        if any(vocab.is_empty() for vocab in may_be_empty):
            warn_empty_vocabulary()
            counters["microspec"]["dense_fallback_calls"] += 1
            return gm(*args)
        counters["microspec"]["sparse_calls"] += 1
        return compiled(*args, *extra)

    run._microspec_vocabs = vocabs
    run.rewritten = clone  # the rewritten FX graph module (tests inspect it)
    return run


@functools.cache
def warn_empty_vocabulary() -> None:
    warnings.warn(
        "microspec: the active vocabulary is empty (no id observed, no pinned id), so this call "
        "scores the full vocabulary (dense). Observe ids first with "
        "microspec_compile.vocab_of(module).observe(ids), or pin ids (pinned_ids=[eos_id])",
        stacklevel=3)


def microspec(gm: fx.GraphModule, example_inputs: Sequence, options: Optional[dict] = None,
              **config) -> Callable:
    """The ``backend="microspec"`` entry point, default configuration (``mode`` accepted)."""
    return compile_microspec(gm, example_inputs, MicrospecConfig(**config), options=options)


def backend(**config) -> Callable:
    """A configured backend: ``torch.compile(m, backend=microspec_compile.backend(capacity=2048))``."""
    cfg = MicrospecConfig(**config)
    return functools.partial(compile_microspec, config=cfg)


__all__ = ["ActiveVocab", "MicrospecConfig", "backend", "microspec", "compile_microspec"]
