"""The ``microspec`` torch.compile backend.

``torch.compile(draft, backend="microspec")`` (registered through the
``torch_dynamo_backends`` entry point) receives each Dynamo graph and:

1. finds the LM head (``passes.match_head``); none found -> plain Inductor and one
   warning;
2. clones the graph (Dynamo keeps using the original) and appends the vocabulary
   state tensors as extra placeholders;
3. rewrites the head into ``microspec::sparse_topk`` / ``sparse_full`` and inserts
   the synchronous ``microspec::observe`` on the ids feeding the embedding (the
   default), or ``microspec::observe_start`` there and ``microspec::observe_wait``
   immediately before the head (``async_gather=True``: on CUDA the gather overlaps
   the decoder layers) (``passes.sparse_head``);
4. hands the graph to Inductor and returns a wrapper that appends to every call the
   state tensors of the vocabulary in force for it (``vocab.py``: bound by ``using``,
   given as ``vocab=``, or the head's default). A state is updated in place, never
   reallocated, so the compiled code sees a changing vocabulary, or another
   vocabulary of the same capacity, with no guards and no recompiles.

CUDA graphs (``torch.compile(..., mode="reduce-overhead")``): the state placeholders
are static inputs (captured at their own addresses, mutation allowed) and the
gather's fork / join is by events, which capture accepts.  Before the first such
graph on a device the backend captures the asynchronous gather once on a tiny state
(``kernels.async_gather.capture_problem``); if that fails it warns once, naming the
failure, and those graphs use the synchronous observe instead.  A graph captured
with one vocabulary's state sees another vocabulary's tensors at other addresses:
under CUDA graphs keep one vocabulary per compiled graph.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import warnings
from typing import Callable, NamedTuple, Optional, Sequence

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
from .vocab import ActiveVocab, bound_vocab, default_vocab

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


def compile_vocab(weight, config: MicrospecConfig) -> ActiveVocab:
    """The vocabulary a graph is compiled with for the head ``weight`` (``vocab.py``'s
    order: bound by ``using``, given to the backend, else the head's default)."""
    vocab = bound_vocab(weight) or config.vocab
    if vocab is None:
        return default_vocab(weight, config.capacity, config.pinned_ids)
    vocab.check_serves(weight, vocab.capacity)
    return vocab


class HeadSlot(NamedTuple):
    """One head weight of a rewritten graph: the capacity its state placeholders were made
    for, the weight's index among the graph's inputs, or the weight itself when the graph
    holds it as an attribute (index None).  No vocabulary: each call chooses one."""

    capacity: int
    index: Optional[int]
    weight: Optional[object]


def call_vocab(slot: HeadSlot, args: Sequence, config: MicrospecConfig) -> ActiveVocab:
    """The vocabulary a call with ``args`` reads for the head of ``slot``, in ``vocab.py``'s
    order: bound by ``using``, given to the backend, else the head's default (created,
    if need be, with the graph's capacity unless ``config`` gives one).

    Raises
    ------
    ValueError
        The vocabulary belongs to another weight, or has another capacity than the
        graph's state inputs.
    """
    weight = args[slot.index] if slot.index is not None else slot.weight
    vocab = bound_vocab(weight) or config.vocab
    if vocab is None:
        vocab = default_vocab(weight, create=False) or default_vocab(
            weight, slot.capacity if config.capacity is None else config.capacity,
            config.pinned_ids)
    vocab.check_serves(weight, slot.capacity)
    return vocab


def rewrite_graph(gm: fx.GraphModule, example_inputs: Sequence, config: MicrospecConfig):
    """Rewrite every LM head of ``gm``.

    Returns ``(new_gm, slots, states, observes_inputs)`` or None (no head): one
    :class:`HeadSlot` per head weight, in the order of the state placeholders; the state
    tensors the graph was compiled with (its example inputs); ``observes_inputs`` says
    whether the graph observes the ids feeding an embedding.
    """
    clone = clone_graph(gm)
    values = real_values(clone, example_inputs)
    heads = find_heads(clone, values, config.min_vocab_size, config.head)
    if not heads:
        return None
    graph = clone.graph
    placeholders = list(graph.find_nodes(op="placeholder"))
    states, starts, slots, examples, observes_inputs = {}, {}, [], [], False
    for head in heads:
        weight = values[head.weight]
        if head.weight not in states:
            vocab = compile_vocab(weight, config)
            fakes = [fake_tensor(t) for t in vocab.state()]
            states[head.weight] = add_state_placeholders(graph, f"microspec{len(slots)}", fakes)
            index = placeholders.index(head.weight) if head.weight in placeholders else None
            slots.append(HeadSlot(vocab.capacity, index, weight if index is None else None))
            examples += vocab.state()
            starts[head.weight] = []
            if config.observe_inputs:
                asynchronous = use_async_gather(config, weight.device)
                for ids, embedding in find_embedding_ids(clone, values, weight.shape[0]):
                    node = insert_observe(graph, ids, embedding, states[head.weight],
                                          head.weight, config.path, asynchronous)
                    counters["microspec"]["observe_inserted"] += 1
                    if asynchronous:
                        starts[head.weight].append(node)
                        counters["microspec"]["observe_start_inserted"] += 1
                    observes_inputs = True
        state = states[head.weight]
        op = rewrite_head(graph, head, state, weight.shape[0], config.path)
        for start in starts[head.weight]:  # the head reads the rows only after the gather
            insert_wait(graph, op, start, state)
            counters["microspec"]["observe_wait_inserted"] += 1
        remove_replaced(graph, head)
        counters["microspec"]["heads_rewritten"] += 1
        counters["microspec"][f"heads_{head.kind}_{head.normalize}"] += 1
    graph.lint()
    clone.recompile()
    return clone, slots, examples, observes_inputs


def compile_microspec(gm: fx.GraphModule, example_inputs: Sequence, config: MicrospecConfig,
                      mode: Optional[str] = None, options: Optional[dict] = None):
    """Compile one Dynamo graph (the body of the backend).

    ``mode`` / ``options`` are what ``torch.compile(..., mode=..., options=...)`` passes
    to a backend: ``mode`` replaces ``config.mode``; ``options`` is not supported.
    """
    try:  # a settings error reaches the user as a ValueError (raise_on_call)
        if options:
            raise ValueError("microspec: torch.compile(options=...) is not supported by this "
                             "backend; give mode=... (or MicrospecConfig settings) instead")
        if mode is not None:
            config = dataclasses.replace(config, mode=mode)
        rewritten = rewrite_graph(gm, example_inputs, config)
    except ValueError as error:
        return raise_on_call(error)
    if rewritten is None:
        warn_no_head(config.min_vocab_size, config.head)
        counters["microspec"]["fallback_no_head"] += 1
        return compile_config(gm, list(example_inputs), config)
    clone, slots, examples, observes_inputs = rewritten
    compiled = compile_config(clone, list(example_inputs) + examples, config)
    del examples  # the graph keeps no vocabulary: each call chooses one
    last = []  # under CUDA graphs: the vocabularies of the last call

    def vocabularies(args) -> list[ActiveVocab]:
        """The vocabulary of each head weight for a call with ``args``."""
        return [call_vocab(slot, args, config) for slot in slots]

    def run(*args):
        vocabs = vocabularies(args)
        if config.cuda_graphs and last != vocabs:
            if last:
                warn_vocabulary_switch_under_cuda_graphs()
            last[:] = vocabs
        # A graph that observes its own input ids never meets an empty vocabulary; a
        # head compiled on its own can, before anything is observed.  It then scores the
        # full vocabulary with the original graph (exact, slower) instead of failing.
        if not observes_inputs and any(vocab.is_empty() for vocab in vocabs):
            warn_empty_vocabulary()
            counters["microspec"]["dense_fallback_calls"] += 1
            return gm(*args)
        counters["microspec"]["sparse_calls"] += 1
        return compiled(*args, *(t for vocab in vocabs for t in vocab.state()))

    run.vocabularies = vocabularies  # the vocabularies a call would read (tests)
    run.rewritten = clone  # the rewritten FX graph module (tests inspect it)
    return run


def raise_on_call(error: ValueError) -> Callable:
    """A compiled function that raises a ValueError with ``error``'s message when called.

    Dynamo wraps an exception raised while compiling in ``BackendCompilerFailed``, so
    ``except ValueError`` would miss a settings error found in the graph (a vocabulary
    of another weight, a default vocabulary's other capacity); raised by the compiled
    function, it reaches the caller as it is.  Only the message is kept (not the error's
    frames, which hold the graph).  Compiling with other settings makes a new graph.
    """
    message = str(error)

    def run(*args):
        raise ValueError(message)

    return run


@functools.cache
def warn_vocabulary_switch_under_cuda_graphs() -> None:
    warnings.warn(
        "microspec: a graph captured with CUDA graphs was called with another vocabulary than "
        "its last call (microspec_compile.using): the capture is made for the state tensors' "
        "addresses, so each switch re-records it; keep one vocabulary per compiled graph "
        "under mode='reduce-overhead'", stacklevel=3)


@functools.cache
def warn_empty_vocabulary() -> None:
    warnings.warn(
        "microspec: the active vocabulary is empty (no id observed, no pinned id), so this call "
        "scores the full vocabulary (dense). Observe ids into the vocabulary first "
        "(vocab.observe(ids)), or pin ids (ActiveVocab(..., pinned_ids=[eos_id]))",
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
