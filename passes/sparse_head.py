"""Rewrite matched LM heads into the microspec custom ops.

Each rewrite is a plain function over a cloned Dynamo graph:

* ``rewrite_head`` replaces ``linear -> [getitem]* -> [softmax] -> [topk|argmax]``
  by one ``microspec::sparse_topk`` / ``microspec::sparse_full`` node over the
  compact state. Row-selecting getitems move before the head (they commute with a
  linear), so ``lm_head(h)[:, -1, :]`` only scores the last row.
* ``insert_observe`` adds a ``microspec::observe`` node (a mutating op, so it
  stays in the graph in order) on the ids that feed the draft's embedding, before
  the head runs: prompt, accepted and drafted tokens enter the vocabulary with no
  user code, and the whole step stays one graph (capturable by CUDA graphs).
  With ``asynchronous=True`` it is ``microspec::observe_start`` instead, and
  ``insert_wait`` puts the matching ``microspec::observe_wait`` immediately before
  the sparse head, after the decoder layers (``kernels/async_gather.py`` explains
  the dependencies that keep that order through Inductor).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..kernels import ops as _ops  # noqa: F401  (defines the torch.ops.microspec ops used here)
from ..kernels.state import VocabState
from .match_head import HeadMatch


def add_placeholders(graph: fx.Graph, names, fake_values) -> list[fx.Node]:
    """Append placeholders (runtime-supplied tensors) after the existing ones."""
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    nodes = []
    for name, fake in zip(names, fake_values):
        with graph.inserting_after(last):
            last = graph.placeholder(name)
        last.meta["example_value"] = fake
        last.meta["val"] = fake
        last._dynamo_source = None  # not a user input: no guards on it
        nodes.append(last)
    return nodes


def add_state_placeholders(graph: fx.Graph, prefix: str, fake_values) -> VocabState:
    """One placeholder per vocabulary state tensor; returns a ``VocabState`` of ``fx.Node``.

    The placeholders are marked as static inputs (what ``torch._dynamo.mark_static_address``
    records for a Dynamo input): the state is allocated once and updated in place, so
    CUDA graphs (``mode="reduce-overhead"``) read it at its own address instead of
    copying it into the graph's memory before every replay, and accept its mutation.

    Parameters
    ----------
    graph : the graph to extend
    prefix : placeholder names are ``f"{prefix}_{field}"``
    fake_values : a ``VocabState`` of fake tensors (the placeholders' metadata)
    """
    names = [f"{prefix}_{name}" for name in VocabState._fields]
    nodes = add_placeholders(graph, names, fake_values)
    for node in nodes:
        node.meta["tensor_dict"] = {"_dynamo_static_input_type": "unguarded"}
    return VocabState(*nodes)


def _call(graph: fx.Graph, target, *args) -> fx.Node:
    return graph.call_function(target, args)


def rewrite_head(graph: fx.Graph, match: HeadMatch, state: VocabState, vocab_size: int,
                 path: str = "auto") -> fx.Node:
    """Replace the head and its consumers by one sparse op; returns the op node.

    Parameters
    ----------
    graph : the (cloned) graph to edit in place
    match : the head, as found by ``match_head.find_heads``
    state : the vocabulary state placeholders
    vocab_size : V, the head's out_features
    path : the ops' implementation choice (``kernels.dispatch.PATHS``)
    """
    ops = torch.ops.microspec
    last = match.last
    with graph.inserting_before(last):
        hidden = match.hidden
        for index in match.index:
            hidden = _call(graph, operator.getitem, hidden, index)
        # The sparse head is an inference-time approximation: it carries no
        # gradient, so graphs traced with grad enabled need no backward for it.
        hidden = _call(graph, torch.ops.aten.detach.default, hidden)
        bias = None if match.bias is None else _call(graph, torch.ops.aten.detach.default, match.bias)
        common = (hidden, state.rows, state.ids, state.count, bias)
        if match.kind == "full":
            op = _call(graph, ops.sparse_full.default, *common, vocab_size, match.normalize, path)
            last.replace_all_uses_with(op)
            if match.capped is not None:
                _keep_inactive_at_minus_inf(graph, op, match.capped)
            return op
        op = _call(graph, ops.sparse_topk.default, *common, match.k, match.normalize, path)
        values = _call(graph, operator.getitem, op, 0)
        token_ids = _call(graph, operator.getitem, op, 1)
        if match.kind == "argmax":
            result = token_ids if match.keepdim else _call(
                graph, operator.getitem, token_ids, (Ellipsis, 0))
            last.replace_all_uses_with(result)
            return op
    for user in list(last.users):  # topk: users are getitem(topk, 0 | 1)
        user.replace_all_uses_with(values if user.args[1] == 0 else token_ids)
    return op


def _keep_inactive_at_minus_inf(graph: fx.Graph, sparse: fx.Node, capped: fx.Node) -> None:
    """After a soft-capping ``capped = tanh(sparse / c) * c``, put ``-inf`` back where
    ``sparse`` was ``-inf`` (outside the active set), for every user of ``capped``."""
    users = list(capped.users)
    with graph.inserting_after(capped):
        outside = _call(graph, torch.isneginf, sparse)
    with graph.inserting_after(outside):
        kept = _call(graph, torch.where, outside, sparse, capped)
    for user in users:
        user.replace_input_with(capped, kept)


def insert_observe(graph: fx.Graph, ids: fx.Node, before: fx.Node, state: VocabState,
                   weight: fx.Node, path: str = "auto", asynchronous: bool = False) -> fx.Node:
    """Observe ``ids`` into the vocabulary right before ``before`` (the embedding).

    ``asynchronous`` inserts ``microspec::observe_start`` (same arguments; on CUDA
    the gather runs on a side stream): pair it with :func:`insert_wait`.
    """
    ops = torch.ops.microspec
    target = ops.observe_start.default if asynchronous else ops.observe.default
    with graph.inserting_before(before):
        return graph.call_function(target, (*state, weight, ids, False, path))


def insert_wait(graph: fx.Graph, head: fx.Node, start: fx.Node, state: VocabState) -> fx.Node:
    """``microspec::observe_wait`` immediately before the sparse ``head`` node, for ``start``.

    Parameters
    ----------
    graph : the graph to edit in place
    head : the ``sparse_topk`` / ``sparse_full`` node (``rewrite_head``'s result); its
        first argument, the hidden states after the decoder layers, is the wait's
        ordering input
    start : the ``observe_start`` node whose gather the head must see (its ids
        argument is read by the wait, which keeps it alive until then)
    state : the vocabulary state placeholders
    """
    hidden, tokens = head.args[0], start.args[len(VocabState._fields) + 1]
    with graph.inserting_before(head):
        return graph.call_function(torch.ops.microspec.observe_wait.default,
                                   (hidden, tokens, state.rows, state.ids, state.count))


def remove_replaced(graph: fx.Graph, match: HeadMatch) -> None:
    """Erase the dense head and the consumers the sparse op replaced, once unused."""
    chain = [user for user in match.last.users if not user.users]  # topk's getitems
    node = match.last
    while node is not match.linear:
        chain.append(node)
        node = node.args[0]
    chain += [match.linear, match.linear.args[1]]  # the head and a `W.t()` spelling
    for node in chain:
        if isinstance(node, fx.Node) and node.op != "placeholder" and not node.users:
            graph.erase_node(node)
