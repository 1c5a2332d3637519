"""The ``microspec`` torch.compile backend.

``torch.compile(draft, backend="microspec")`` (registered through the
``torch_dynamo_backends`` entry point) receives each Dynamo graph and:

1. finds the LM head (``passes.match_head``); none found -> plain Inductor and one
   warning;
2. clones the graph (Dynamo keeps using the original) and appends the vocabulary
   state tensors as extra placeholders;
3. rewrites the head into ``microspec::sparse_topk`` / ``sparse_full`` and inserts
   ``microspec::observe`` on the ids feeding the embedding (``passes.sparse_head``);
4. hands the graph to Inductor and returns a wrapper that appends the state tensors
   to every call. The state is updated in place, never reallocated, so the
   compiled code sees a changing vocabulary with no guards and no recompiles.
"""
from __future__ import annotations

import functools
import logging
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.fx as fx
from torch._dynamo.utils import counters

from .passes.match_head import find_embedding_ids, find_heads
from .passes.small_batch_linear import rewrite_small_batch_linears
from .passes.sparse_head import add_state_placeholders, insert_observe, remove_replaced, rewrite_head
from .vocab import ActiveVocab, vocab_for_weight

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MicrospecConfig:
    """Settings of the backend.

    Parameters
    ----------
    capacity : rows of the compact head buffer (the most active tokens at once)
    pinned_ids : token ids always active and never evicted (EOS, BOS, ...)
    min_vocab_size : a Linear with fewer output features is not treated as a head
    head : if set, only a head whose weight's graph name contains this string
    observe_inputs : observe the ids feeding the embedding on every call
    path : kernel path for the sparse head, ``"auto"``, ``"torch"``, ``"inductor"``
        or ``"triton"`` (see ``kernels.dispatch``)
    inductor : whether to compile the rewritten graph with Inductor (else run it eagerly)
    small_batch_linear : if >= 2, tall Linears (LM heads) run as
        ``microspec::small_batch_linear``: ``W @ x^T`` for 2..this many fp32 CPU
        rows, about 2x faster for a target verifying drafted tokens; rounds
        differently, so 0 (off) by default (``kernels/small_batch_linear.py``)
    """

    capacity: int = 4096
    pinned_ids: tuple = field(default_factory=tuple)
    min_vocab_size: int = 1000
    head: Optional[str] = None
    observe_inputs: bool = True
    path: str = "auto"
    inductor: bool = True
    small_batch_linear: int = 0

    def __post_init__(self):
        object.__setattr__(self, "pinned_ids", tuple(int(i) for i in self.pinned_ids))
        if self.capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {self.capacity}")
        if self.small_batch_linear < 0 or self.small_batch_linear == 1:
            raise ValueError("small_batch_linear must be 0 (off) or the most rows to transpose "
                             f"(>= 2), got {self.small_batch_linear}")
        if self.path not in ("auto", "torch", "inductor", "triton"):
            raise ValueError(f"path must be auto / torch / inductor / triton, got {self.path!r}")


def _real_values(gm: fx.GraphModule, example_inputs: Sequence) -> dict:
    """Map placeholder / get_attr nodes to the real tensors they stand for."""
    values = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, example_inputs):
        if isinstance(value, torch.Tensor):
            values[node] = value
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = getattr(gm, node.target, None)
            if isinstance(value, torch.Tensor):
                values[node] = value
    return values


def _clone(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` whose graph can take new placeholders (Dynamo keeps the old one)."""
    graph = fx.Graph()
    output = graph.graph_copy(gm.graph, {}, return_output_node=True)
    graph.output(output[0] if isinstance(output, tuple) else output)
    clone = fx.GraphModule(gm, graph)
    # AOTAutograd reads each Dynamo placeholder's source (for guards and static inputs).
    for old, new in zip(gm.graph.find_nodes(op="placeholder"), graph.find_nodes(op="placeholder")):
        if hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source
    for attr in ("_param_name_to_source", "meta"):
        if hasattr(gm, attr):
            setattr(clone, attr, getattr(gm, attr))
    return clone


def _fake(tensor: torch.Tensor):
    ctx = torch._guards.TracingContext.try_get()
    if ctx is None or ctx.fake_mode is None:
        return None
    return ctx.fake_mode.from_tensor(tensor, static_shapes=True)


def op_impl(config: MicrospecConfig) -> str:
    """The ``impl`` argument the rewritten ops get for ``config.path``."""
    return config.path if config.path in ("torch", "triton") else "auto"


def _inductor(gm: fx.GraphModule, example_inputs: list, config: MicrospecConfig) -> Callable:
    if config.small_batch_linear >= 2:
        gm = _clone(gm)  # (the no-head fallback passes Dynamo's own graph)
        rewrite_small_batch_linears(gm, _real_values(gm, example_inputs), config.small_batch_linear)
    if not config.inductor:
        return gm.forward
    from torch._inductor.compile_fx import compile_fx

    if config.path != "inductor":
        return compile_fx(gm, example_inputs)
    # The "inductor" path: the sparse-head ops decompose into mm over the compact
    # buffer plus a mask / normalisation / top-k epilogue that Inductor fuses.
    from torch._inductor.decomposition import select_decomp_table

    from .kernels.inductor_head import decompositions

    table = {**select_decomp_table(), **decompositions()}
    return compile_fx(gm, example_inputs, decompositions=table)


def rewrite_graph(gm: fx.GraphModule, example_inputs: Sequence, config: MicrospecConfig):
    """Rewrite every LM head of ``gm``; returns ``(new_gm, vocabularies)`` or None."""
    clone = _clone(gm)
    values = _real_values(clone, example_inputs)
    heads = find_heads(clone, values, config.min_vocab_size, config.head)
    if not heads:
        return None
    graph = clone.graph
    states, vocabs = {}, []
    for head in heads:
        weight = values[head.weight]
        vocab = vocab_for_weight(weight, config.capacity, config.pinned_ids)
        if id(vocab) not in states:
            fakes = tuple(_fake(t) for t in vocab.state())
            states[id(vocab)] = add_state_placeholders(graph, f"microspec{len(vocabs)}", fakes)
            vocabs.append(vocab)
            if config.observe_inputs:
                for ids, embedding in find_embedding_ids(clone, values, weight.shape[0]):
                    insert_observe(graph, ids, embedding, states[id(vocab)], head.weight,
                                   op_impl(config))
                    counters["microspec"]["observe_inserted"] += 1
        rewrite_head(graph, head, states[id(vocab)], weight.shape[0], op_impl(config))
        remove_replaced(graph, head)
        counters["microspec"]["heads_rewritten"] += 1
        counters["microspec"][f"heads_{head.kind}_{head.normalize}"] += 1
    graph.lint()
    clone.recompile()
    return clone, vocabs


def compile_microspec(gm: fx.GraphModule, example_inputs: Sequence, config: MicrospecConfig):
    """Compile one Dynamo graph (the body of the backend)."""
    rewritten = rewrite_graph(gm, example_inputs, config)
    if rewritten is None:
        _warn_no_head(config)
        counters["microspec"]["fallback_no_head"] += 1
        return _inductor(gm, list(example_inputs), config)
    clone, vocabs = rewritten
    extra = [t for vocab in vocabs for t in vocab.state()]
    compiled = _inductor(clone, list(example_inputs) + extra, config)

    def run(*args):
        counters["microspec"]["sparse_calls"] += 1
        return compiled(*args, *extra)

    run._microspec_vocabs = vocabs
    return run


@functools.lru_cache(maxsize=None)
def _warn_no_head(config: MicrospecConfig) -> None:
    warnings.warn(
        "microspec: no LM head found in the graph (a Linear with >= "
        f"{config.min_vocab_size} output features followed by softmax / log_softmax / "
        "topk / argmax or returned as logits); compiling it with plain Inductor",
        stacklevel=3,
    )


def microspec(gm: fx.GraphModule, example_inputs: Sequence, **config) -> Callable:
    """The ``backend="microspec"`` entry point, default configuration."""
    return compile_microspec(gm, example_inputs, MicrospecConfig(**config))


def backend(**config) -> Callable:
    """A configured backend: ``torch.compile(m, backend=microspec_compile.backend(capacity=2048))``."""
    cfg = MicrospecConfig(**config)
    return functools.partial(compile_microspec, config=cfg)


__all__ = ["ActiveVocab", "MicrospecConfig", "backend", "microspec", "compile_microspec"]
