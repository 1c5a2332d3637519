"""Dynamo-graph helpers shared by the draft backend (``backend.py``) and the target
observer (``observer.py``): clone a graph, find the real tensors behind its inputs,
make fake tensors for new placeholders, compile the result, warn once when a graph
has no LM head.
"""
from __future__ import annotations

import functools
import warnings
from typing import Callable, Optional, Sequence

import torch
import torch.fx as fx

from .kernels import ops

__all__ = ["clone_graph", "real_values", "fake_tensor", "compile_graph", "warn_no_head"]


def real_values(gm: fx.GraphModule, example_inputs: Sequence) -> dict:
    """Map placeholder / get_attr nodes of ``gm`` to the real tensors they stand for.

    Returns
    -------
    dict
        ``{fx.Node: torch.Tensor}`` for every tensor input and tensor attribute.
    """
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


def clone_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` whose graph can take new placeholders (Dynamo keeps the old one).

    The placeholders' Dynamo sources, ``_param_name_to_source`` and ``meta`` are
    carried over: AOTAutograd reads them (for guards and static inputs).
    """
    graph = fx.Graph()
    output = graph.graph_copy(gm.graph, {}, return_output_node=True)
    graph.output(output[0] if isinstance(output, tuple) else output)
    clone = fx.GraphModule(gm, graph)
    for old, new in zip(gm.graph.find_nodes(op="placeholder"), graph.find_nodes(op="placeholder")):
        if hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source
    for attr in ("_param_name_to_source", "meta"):
        if hasattr(gm, attr):
            setattr(clone, attr, getattr(gm, attr))
    return clone


def fake_tensor(tensor: torch.Tensor):
    """``tensor`` as a static-shape fake tensor of the current Dynamo trace, or None outside one."""
    ctx = torch._guards.TracingContext.try_get()
    if ctx is None or ctx.fake_mode is None:
        return None
    return ctx.fake_mode.from_tensor(tensor, static_shapes=True)


def compile_graph(gm: fx.GraphModule, example_inputs: list, *, inductor: bool = True,
                  decompose: bool = False, mode: str = "default") -> Callable:
    """Compile a (rewritten) graph with Inductor, or run it eagerly.

    Parameters
    ----------
    gm : the graph module
    example_inputs : its inputs (state tensors included)
    inductor : compile with Inductor; False runs ``gm.forward`` (the FX graph) eagerly
    decompose : compile the head ops through ``kernels.inductor_head.decompositions``
        (the ``"inductor"`` kernel path)
    mode : torch.compile's mode; its Inductor options (``torch._inductor.list_mode_options``,
        e.g. ``triton.cudagraphs`` for ``"reduce-overhead"``) apply while compiling

    Returns
    -------
    callable
        Takes the graph's inputs, returns its outputs.
    """
    if not inductor:
        return gm.forward
    from torch._inductor import config as inductor_config
    from torch._inductor import list_mode_options

    # Inductor's caches key on this tag: the ops' schema digest keeps a graph cached under
    # another schema (an older package) from being loaded (kernels.ops.schema_digest)
    tag = f"{torch.compiler.config.cache_key_tag}microspec-ops-{ops.schema_digest()}"
    with inductor_config.patch(list_mode_options(mode)), \
            torch.compiler.config.patch(cache_key_tag=tag):
        if decompose:
            from .kernels.inductor_head import compile_with_decompositions

            return compile_with_decompositions(gm, example_inputs)
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)


@functools.cache
def warn_no_head(min_vocab_size: int, key: Optional[object] = None) -> None:
    """Warn (once per ``(min_vocab_size, key)``) that a graph has no LM head.

    ``key``: the caller's head-name filter (``MicrospecConfig.head``), so that each filter
    warns once; never an object that holds a model (the cache keeps its keys forever).
    """
    warnings.warn(
        "microspec: no LM head found in the graph (a Linear with >= "
        f"{min_vocab_size} output features followed by softmax / log_softmax / "
        "topk / argmax or returned as logits); compiling it with plain Inductor",
        stacklevel=3,
    )
