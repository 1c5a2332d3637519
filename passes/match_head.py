"""Find the LM head in a Dynamo (torch IR) graph and normalise its spellings.

At the Dynamo level ``linear``, ``softmax``, ``topk`` and ``argmax`` are still whole
ops, so one matcher covers function / method / module spellings, args or kwargs,
bias or not, 2-D or 3-D inputs and slicing ``getitem``s between the head and its
consumer (``logits[:, -1, :]``). The result is a ``HeadMatch`` that the rewrite
in ``sparse_head.py`` turns into one custom op.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

LINEAR_TARGETS = {torch._C._nn.linear, F.linear}
MATMUL_TARGETS = {operator.matmul, torch.matmul, torch.mm}
SOFTMAX_TARGETS = {torch.softmax: "softmax", F.softmax: "softmax", torch.special.softmax: "softmax",
                   torch.log_softmax: "log_softmax", F.log_softmax: "log_softmax",
                   torch.special.log_softmax: "log_softmax"}
SOFTMAX_METHODS = {"softmax": "softmax", "log_softmax": "log_softmax"}
EMBEDDING_TARGETS = {F.embedding, torch.embedding}


@dataclass
class HeadMatch:
    """One LM head and what consumes it.

    ``linear`` is the node computing ``x @ W.T (+ b)``; ``index`` the row-selecting
    getitem indices applied after it (moved before the head by the rewrite);
    ``last`` the node whose value the sparse op replaces; ``kind`` is ``"full"``
    (logits / probabilities returned), ``"topk"`` or ``"argmax"``; ``capped`` the last
    node of a final-logit soft-capping ``tanh(logits / c) * c`` (Gemma 2 / 3) applied to
    full logits, whose value outside the active set the rewrite puts back to ``-inf``
    (the capping maps ``-inf`` to ``-c``).
    """

    linear: fx.Node
    hidden: fx.Node
    weight: fx.Node
    bias: Optional[fx.Node]
    index: list = field(default_factory=list)
    normalize: str = "none"
    kind: str = "full"
    k: int = 1
    keepdim: bool = False
    last: Optional[fx.Node] = None
    capped: Optional[fx.Node] = None


def arg(node: fx.Node, pos: int, name: str, default: Any = None) -> Any:
    """Argument ``name`` of a call, given positionally at ``pos`` or as a kwarg."""
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


def value_of(node: Any) -> Any:
    """The example (fake) tensor Dynamo recorded for a node, if any."""
    if isinstance(node, fx.Node):
        return node.meta.get("example_value", node.meta.get("val"))
    return None


def _transposed_weight(node: Any) -> Optional[fx.Node]:
    """``W`` if ``node`` spells ``W.t()`` / ``W.T`` / ``W.transpose(0, 1)`` / ``W.permute(1, 0)``."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_method" and node.target == "t":
        return node.args[0]
    if node.op == "call_function" and node.target in (torch.t, torch.Tensor.t):
        return node.args[0]
    if node.op == "call_function" and node.target is getattr and node.args[1] in ("T", "mT"):
        return node.args[0]
    if (node.op == "call_method" and node.target == "transpose") or (
        node.op == "call_function" and node.target is torch.transpose
    ):
        dims = sorted(d % 2 for d in node.args[1:3])
        return node.args[0] if dims == [0, 1] else None
    if node.op == "call_method" and node.target == "permute":
        dims = node.args[1] if len(node.args) == 2 else node.args[1:]
        return node.args[0] if tuple(dims) == (1, 0) else None
    return None


def as_linear(node: fx.Node) -> Optional[tuple]:
    """``(x, W, b)`` if ``node`` is a linear layer in any spelling, else None."""
    if node.op == "call_function" and node.target in LINEAR_TARGETS:
        return arg(node, 0, "input"), arg(node, 1, "weight"), arg(node, 2, "bias")
    if node.op == "call_function" and node.target in MATMUL_TARGETS:
        weight = _transposed_weight(node.args[1])
        return (node.args[0], weight, None) if weight is not None else None
    return None


def _single_user(node: fx.Node) -> Optional[fx.Node]:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _last_dim(dim: Any, rank: Optional[int]) -> bool:
    return dim == -1 or (rank is not None and dim == rank - 1)


def _row_index(node: fx.Node, rank: Optional[int]) -> Optional[tuple]:
    """The index of a getitem that keeps the last (vocabulary) dim whole, else None."""
    if node.op != "call_function" or node.target is not operator.getitem or rank is None:
        return None
    idx = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    if any(i is None or isinstance(i, (fx.Node, list, torch.Tensor)) for i in idx):
        return None  # new axes and advanced indexing: leave them alone
    if Ellipsis in idx:
        if idx.count(Ellipsis) > 1 or idx[-1] is not Ellipsis:
            return None
        return idx  # the ellipsis covers the last dim
    if len(idx) < rank:
        return idx
    last = idx[rank - 1] if len(idx) == rank else None
    if len(idx) == rank and isinstance(last, slice) and last == slice(None):
        return idx
    return None


def _normalize_of(node: fx.Node, rank: Optional[int]) -> Optional[str]:
    """``"softmax"`` / ``"log_softmax"`` if ``node`` normalises over the last dim."""
    if node.op == "call_function" and node.target in SOFTMAX_TARGETS:
        mode = SOFTMAX_TARGETS[node.target]
    elif node.op == "call_method" and node.target in SOFTMAX_METHODS:
        mode = SOFTMAX_METHODS[node.target]
    else:
        return None
    dtype_pos = 3 if node.target in (F.softmax, F.log_softmax) else 2
    if arg(node, dtype_pos, "dtype") is not None:
        return None  # a requested upcast: keep the original op over full logits
    return mode if _last_dim(arg(node, 1, "dim"), rank) else None


def _is_call(node: fx.Node, name: str) -> bool:
    return (node.op == "call_method" and node.target == name) or (
        node.op == "call_function" and node.target is getattr(torch, name)
    )


def _match_selector(node: fx.Node, match: HeadMatch, rank: Optional[int]) -> bool:
    """Fill ``match`` if ``node`` is a top-k or argmax over the last dim."""
    if _is_call(node, "topk"):
        k = arg(node, 1, "k")
        ok = (isinstance(k, int) and _last_dim(arg(node, 2, "dim", -1), rank)
              and arg(node, 3, "largest", True) is True)
        users_ok = all(u.op == "call_function" and u.target is operator.getitem for u in node.users)
        if ok and users_ok:
            match.kind, match.k, match.last = "topk", k, node
            return True
    if _is_call(node, "argmax"):
        if _last_dim(arg(node, 1, "dim"), rank):
            match.kind, match.k, match.last = "argmax", 1, node
            match.keepdim = bool(arg(node, 2, "keepdim", False))
            return True
    return False


def _scaled_by(node: fx.Node, source: fx.Node, ops: tuple) -> Optional[float]:
    """``c`` if ``node`` is ``source <op> c`` for a positive Python number ``c``."""
    if node.op != "call_function" or node.target not in ops or len(node.args) != 2:
        return None
    other = node.args[1]
    if node.args[0] is source and isinstance(other, (int, float)) and other > 0:
        return float(other)
    return None


def _softcap_end(node: fx.Node) -> Optional[fx.Node]:
    """The ``* c`` node if ``node``'s single user starts ``tanh(node / c) * c``, else None."""
    div = _single_user(node)
    if div is None or (c := _scaled_by(div, node, (operator.truediv, torch.div))) is None:
        return None
    tanh = _single_user(div)
    if tanh is None or not _is_call(tanh, "tanh") or tanh.args[0] is not div:
        return None
    mul = _single_user(tanh)
    if mul is None or _scaled_by(mul, tanh, (operator.mul, torch.mul)) != c:
        return None
    return mul


def match_consumers(match: HeadMatch) -> HeadMatch:
    """Walk from the head through getitems to softmax / top-k / argmax."""
    node = match.linear
    val = value_of(node)
    rank = val.dim() if isinstance(val, torch.Tensor) else None
    match.last = node
    while (user := _single_user(node)) is not None:
        idx = _row_index(user, rank)
        if idx is None:
            break
        match.index.append(idx)
        val = value_of(user)
        rank = val.dim() if isinstance(val, torch.Tensor) else None
        node = match.last = user
    user = _single_user(node)
    if user is None:
        return match
    if (capped := _softcap_end(node)) is not None:
        match.capped = capped  # full logits, capped by the model's own code after the head
        return match
    mode = _normalize_of(user, rank)
    if mode is not None:
        match.normalize, match.last = mode, user
        nxt = _single_user(user)
        if nxt is not None and _match_selector(nxt, match, rank):
            return match
        return match
    _match_selector(user, match, rank)
    if match.kind == "full":
        match.last = node
    return match


def find_heads(gm: fx.GraphModule, weights: dict, min_vocab_size: int,
               name_filter: Optional[str] = None) -> list[HeadMatch]:
    """The LM heads: linears with a known ``[V, H]`` weight, V >= ``min_vocab_size``.

    Only the linears with the largest V in the graph qualify (an LLM's vocabulary
    is wider than any MLP projection), and when the graph embeds token ids, V must
    equal the embedding's vocabulary. ``weights`` maps placeholder / get_attr nodes
    to their real tensors.
    """
    heads = []
    for node in gm.graph.nodes:
        parts = as_linear(node)
        if parts is None:
            continue
        hidden, weight, bias = parts
        tensor = weights.get(weight)
        if tensor is None or tensor.dim() != 2 or tensor.shape[0] < min_vocab_size:
            continue
        if name_filter is not None and name_filter not in str(weight.target):
            continue
        if bias is not None and not isinstance(bias, fx.Node):
            continue
        heads.append(HeadMatch(node, hidden, weight, bias))
    if not heads:
        return []
    vocab_sizes = {weights[h.weight].shape[0] for h in heads}
    embedded = {weights[t].shape[0] for _, e in _embeddings(gm) if (t := _table(e)) in weights}
    wanted = max(vocab_sizes & embedded) if vocab_sizes & embedded else max(vocab_sizes)
    return [match_consumers(h) for h in heads if weights[h.weight].shape[0] == wanted]


def _embeddings(gm: fx.GraphModule):
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in EMBEDDING_TARGETS:
            ids = node.args[0] if node.target is F.embedding else node.args[1]
            yield ids, node


def _table(node: fx.Node):
    return node.args[1] if node.target is F.embedding else node.args[0]


def find_embedding_ids(gm: fx.GraphModule, weights: dict, vocab_size: int) -> list[tuple]:
    """``(ids, embedding)`` node pairs of embeddings over the same vocabulary."""
    return [(ids, node) for ids, node in _embeddings(gm)
            if isinstance(ids, fx.Node) and (t := weights.get(_table(node))) is not None
            and t.shape[0] == vocab_size]
