"""Route the graph's tall Linear layers (LM heads) through ``microspec::small_batch_linear``.

Applied (opt-in, ``MicrospecConfig.small_batch_linear = max_rows``) to a model
that scores a few rows per call, such as a target verifying ``gamma + 1``
drafted tokens on CPU; ``kernels/small_batch_linear.py`` has the measured reason
and why only tall weights (``out_features >= TALL * in_features``) qualify.
Works at the Dynamo level, where a Linear is still one ``linear`` call.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch._dynamo.utils import counters

from ..kernels import small_batch_linear as _op  # noqa: F401  (registers the op)
from .match_head import LINEAR_TARGETS, arg

TALL = 8  # LM heads: 49152 / 576 = 85 (SmolLM2), 128256 / 4096 = 31 (Llama 3); MLPs: <= 4


def rewrite_small_batch_linears(gm: fx.GraphModule, values: dict, max_rows: int) -> int:
    """Replace every tall ``linear(x, W, b)`` of ``gm`` in place; returns how many.

    Parameters
    ----------
    gm : the graph module (rewritten in place and recompiled)
    values : placeholder / get_attr nodes -> their real tensors (to read ``W``'s shape)
    max_rows : the op takes the ``W @ x^T`` path for ``2 <= rows <= max_rows``
    """
    if max_rows < 2:
        return 0
    graph, done = gm.graph, 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in LINEAR_TARGETS:
            continue
        x, weight, bias = arg(node, 0, "input"), arg(node, 1, "weight"), arg(node, 2, "bias")
        w = values.get(weight)
        if w is None or w.dim() != 2 or w.shape[0] < TALL * w.shape[1]:
            continue
        with graph.inserting_after(node):
            new = graph.call_function(torch.ops.microspec.small_batch_linear.default,
                                      (x, weight, bias, max_rows))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        done += 1
    if done:
        graph.lint()
        gm.recompile()
    counters["microspec"]["small_batch_linears"] += done
    return done
