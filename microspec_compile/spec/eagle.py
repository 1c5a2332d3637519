"""EAGLE-2 dynamic-tree speculative decoding with an EAGLE head (batch 1).

One round, after ``n`` tokens are in the target's cache and the target has just
emitted the root token ``x_n``:

1. **Root.** The head encodes the pairs not yet in its own cache, ``(f_i, x_{i+1})``
   for the newly accepted positions (target features ``f``), one forward; the LM
   head scores the last row only: ``top_k`` children of the root, log-probs.
2. **Expand** ``depth`` times: the ``top_k`` frontier nodes go through the head in
   one forward over ``top_k`` rows (each sees the committed pairs and its own
   ancestors: a tree mask), with their parent's predicted feature as input; one
   LM-head call on ``top_k`` rows gives ``top_k`` children each, scored
   ``parent score + log q``; the best ``top_k`` children become the frontier.
3. **Rerank.** The best ``total_tokens - 1`` candidates over all depths and the root
   form the tree (``spec.tree.select_tree``).
4. **Verify** in one target forward (``spec.verify``); accept the longest agreeing
   path (greedy) or walk it by multi-candidate speculative sampling; keep only the
   accepted rows of the target's cache; the head's tree rows are dropped.

With ``TreeConfig.lookup`` a round whose last 2-3 tokens recur in the context skips
steps 1-3: it verifies the tokens that followed their latest occurrence
(``spec.lookup``), and the head encodes that round's pairs in its next round.

The LM head is called through ``scorer(hidden [N, H]) -> (log-probs [N, k], ids [N, k])``:
the dense head compiled by Inductor, the same compiled by ``backend="microspec"``
(sparse over the active vocabulary), or a fixed subset.  With a ``vocab`` the loop
follows a vocabulary policy (``microspec_compile.policy``): after prefill the prompt ids
(and the target's top-k at every prompt position, ``PAPER``); after every verification
the tree tokens, the emitted ones and the target's top-k at every tree position.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from ..heads import EagleHead
from ..linears.packed import PackedLinears
from ..policy import TUNED, VocabPolicy, observe_prompt, observe_verified
from ..vocab import using
from .attention import gqa_attention
from .lookup import ContextLookup, chain_tree
from .sampling import choose_token
from .stats import SpecStats, finish
from .tree import DraftTree, causal_mask, select_tree
from .verify import (
    check_request,
    crop_cache,
    keep_path_rows,
    packings,
    prefill,
    target_session,
    verify_and_accept,
)

__all__ = ["TreeConfig", "EagleDrafter", "eagle_generate", "eagle_rounds", "run_to_end",
           "bind_scorer", "pack_head_linears"]


@dataclass(frozen=True)
class TreeConfig:
    """Shape of the dynamic tree (defaults: ``bench/bench_eagle_tree.py`` with the shipped head
    on this project's 2-core CPUs, see the README: with this head's acceptance, one expansion
    and 4 verified tokens beat deeper trees, whose extra tokens are rarely accepted; 4
    children per node accept as much as 8 and draft for less; a looked-up chain of up to 7
    tokens beat 4 and none on the tuning prompts).

    Parameters
    ----------
    depth : expansion steps after the root (the tree is up to ``depth + 1`` deep)
    top_k : children per expanded node, and nodes expanded per step
    total_tokens : nodes the target verifies, root included
    lookup : context lookup (``spec.lookup``): when the last 2-3 tokens occurred before,
        verify the root and the up to ``lookup`` tokens that followed them instead of the
        head's tree (the head does not run that round); 0: the head drafts every round
    """

    depth: int = 1
    top_k: int = 4
    total_tokens: int = 4
    lookup: int = 7

    def __post_init__(self):
        for name in ("depth", "top_k", "total_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lookup < 0:
            raise ValueError(f"lookup must be >= 0 (0: off), got {self.lookup}")
        if self.total_tokens > self.max_tokens():
            raise ValueError(
                f"total_tokens={self.total_tokens} is more than a tree of depth {self.depth} and "
                f"top_k {self.top_k} can hold ({self.max_tokens()}: the root, {self.top_k} "
                f"children, then {self.top_k}x{self.top_k} per expansion): lower total_tokens "
                "or raise depth / top_k")

    def max_tokens(self) -> int:
        """The most nodes a tree of this depth and top_k can verify, root included."""
        return 1 + self.top_k + self.depth * self.top_k ** 2

    def verified_sizes(self) -> tuple[int, ...]:
        """Tree sizes a round verifies: the head's tree, and a full looked-up chain."""
        return tuple(sorted({self.total_tokens, self.lookup + 1} if self.lookup
                            else {self.total_tokens}))


def pack_head_linears(head: EagleHead, tree: TreeConfig) -> PackedLinears:
    """The head's own linears (``fc`` and its layer; not the shared LM head) packed for the
    tree's expansions of ``top_k`` rows.  Build it once per head and pass it to
    :func:`eagle_generate` as ``draft_linears``; build it again after training the head."""
    return PackedLinears(nn.ModuleList([head.fc, head.layer]), tree.top_k)


class EagleDrafter:
    """The head's side of the loop: its KV cache of committed pairs and tree drafting.

    ``linears``: :func:`pack_head_linears` of ``head`` for ``tree`` (every expansion feeds
    ``top_k`` rows through them), or None: packed here.
    """

    def __init__(self, head: EagleHead, scorer, tree: TreeConfig,
                 linears: PackedLinears | None = None):
        self.head, self.scorer, self.tree = head, scorer, tree
        self.packed = linears if linears is not None else pack_head_linears(head, tree)
        self.reset()

    def reset(self) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.head.config.llama_config())
        self.committed = 0

    def encode(self, tokens: torch.Tensor, features: torch.Tensor):
        """Add pairs ``(features[i], tokens[i])`` ([m], [m, H]) to the cache; score the last.

        Returns ``(hidden [H], log-probs [k], ids [k])`` of the root's children.
        """
        m, n, dev = tokens.numel(), self.committed, features.device
        positions = torch.arange(n, n + m, device=dev).view(1, -1)
        hidden = self.head.hidden(tokens.view(1, -1).to(dev), features.view(1, m, -1), positions,
                                  causal_mask(n, m, features.dtype, device=dev), self.cache)[0]
        self.committed += m
        logp, ids = self.scorer(hidden[-1:])
        return hidden[-1], logp[0], ids[0]

    def draft(self, root_token: int, root_hidden: torch.Tensor, logp: torch.Tensor,
              ids: torch.Tensor) -> DraftTree:
        """Grow the dynamic tree from the root's children (module docstring, steps 2-3)."""
        k, n, dtype, dev = ids.numel(), self.committed, root_hidden.dtype, root_hidden.device
        tokens, parents, scores, depths = [ids], [torch.full((k,), -1, device=dev)], [
            logp.float()], [torch.ones(k, dtype=torch.int64, device=dev)]
        eye = torch.eye(k, dtype=torch.bool, device=dev)
        frontier = torch.arange(k, device=dev)  # candidate index of each frontier node
        frontier_tokens, frontier_scores = ids, logp.float()
        parent_hidden = root_hidden.expand(k, -1)
        ancestors = torch.zeros(k, 0, dtype=torch.bool, device=dev)  # frontier x tree columns
        total = k
        for d in range(1, self.tree.depth + 1):
            allowed = torch.cat([torch.ones(k, n, dtype=torch.bool, device=dev), ancestors, eye], 1)
            mask = torch.zeros(allowed.shape, dtype=dtype, device=dev).masked_fill_(
                ~allowed, torch.finfo(dtype).min)[None, None]
            positions = torch.full((1, k), n + d - 1, device=dev)
            with self.packed:
                hidden = self.head.hidden(frontier_tokens.view(1, -1), parent_hidden[None],
                                          positions, mask, self.cache)[0]
            child_logp, child_ids = self.scorer(hidden)                 # [k, k]
            child_scores = frontier_scores[:, None] + child_logp.float()
            tokens.append(child_ids.reshape(-1))
            parents.append(frontier.repeat_interleave(k))
            scores.append(child_scores.reshape(-1))
            depths.append(torch.full((k * k,), d + 1, device=dev))
            if d == self.tree.depth:
                break
            best = child_scores.reshape(-1).topk(k).indices
            rows = best // k
            frontier = total + best
            frontier_tokens, frontier_scores = child_ids.reshape(-1)[best], child_scores.reshape(-1)[best]
            parent_hidden = hidden[rows]
            ancestors = torch.cat([ancestors[rows], eye[rows]], 1)
            total += k * k
        crop_cache(self.cache, n)
        # one transfer per round: the tree is chosen on the host
        tokens, parents = torch.cat(tokens).cpu(), torch.cat(parents).cpu()
        scores, depths = torch.cat(scores).cpu(), torch.cat(depths).cpu()
        vocab_size = self.head.config.vocab_size
        # An active vocabulary smaller than k pads with -inf scores: never propose those.
        scores = torch.where((tokens < vocab_size) & torch.isfinite(scores), scores,
                             torch.full_like(scores, -float("inf")))
        usable = int(torch.isfinite(scores).sum())
        return select_tree(root_token, tokens, parents, scores, depths,
                           min(self.tree.total_tokens, usable + 1))


def eagle_generate(target, head: EagleHead, scorer, input_ids: torch.Tensor,
                   max_new_tokens: int, tree: TreeConfig = TreeConfig(), **options):
    """EAGLE-2 speculative decoding of one sequence: :func:`eagle_rounds` run to the end.

    Returns
    -------
    (ids [P + new], SpecStats): ``accepted`` holds the drafted tokens accepted per
    verification (tokens per verification = accepted + 1), ``draft_times`` the time
    of each round's drafting, ``target_times`` each verification
    """
    return run_to_end(eagle_rounds(target, head, scorer, input_ids, max_new_tokens, tree,
                                   **options))


def run_to_end(rounds):
    """Step a request of :func:`eagle_rounds` to its end; its ``(ids, SpecStats)``."""
    while True:
        try:
            next(rounds)
        except StopIteration as done:
            return done.value


def bind_scorer(scorer, vocab):
    """``scorer`` with ``vocab`` bound around each call (``microspec_compile.using``): a
    microspec scorer then reads ``vocab``, whichever vocabulary it was compiled with."""
    if vocab is None:
        return scorer

    def bound(hidden):
        with using(vocab):
            return scorer(hidden)

    return bound


@torch.inference_mode()
def eagle_rounds(target, head: EagleHead, scorer, input_ids: torch.Tensor,
                 max_new_tokens: int, tree: TreeConfig = TreeConfig(), *, vocab=None,
                 policy: VocabPolicy = TUNED, sample: bool = False,
                 temperature: float = 1.0,
                 eos_token_id: int | None = None, generator=None,
                 verify_linears=None, draft_linears=None):
    """EAGLE-2 speculative decoding of one sequence, one round per step: a generator
    that yields the number of new tokens after prefill and after every round and
    returns ``(ids, SpecStats)`` (as :func:`eagle_generate`).  Requests stepped in turn
    share nothing but the models: each has its own caches and vocabulary, and enters
    the attention settings only for its own steps.

    Parameters
    ----------
    target : HF causal LM (Llama architecture); head : its EAGLE head
    scorer : the LM-head call (see the module docstring)
    input_ids : [1, P] int64 prompt
    tree : the tree's shape
    vocab : the microspec vocabulary the scorer reads (bound around its calls, reset
        here), or None (dense)
    policy : the target's top-k at prompt and verified positions that join ``vocab``
        (``microspec_compile.policy``)
    sample, temperature, generator : sampling mode (default greedy)
    verify_linears : a ``linears.PackedLinears`` of ``target`` for ``tree.total_tokens``
        rows, or a sequence of them for ``tree.verified_sizes()`` (with ``lookup``), entered
        around each verification of that size (CPU: a plain fp32 product repacks every
        weight per call; other rounding), or None
    draft_linears : :func:`pack_head_linears` of ``head`` for ``tree``, or None: packed
        for this request (packing and choosing the kernel take milliseconds)
    """
    check_request(input_ids, head.config.vocab_size, sample, temperature)
    for packed in packings(verify_linears):
        if packed.rows not in tree.verified_sizes():
            raise ValueError(f"verify_linears is packed for {packed.rows} rows but the tree "
                             f"verifies {' or '.join(map(str, tree.verified_sizes()))} tokens: "
                             f"build PackedLinears(target, rows) for those")
    if draft_linears is not None and draft_linears.rows != tree.top_k:
        raise ValueError(f"draft_linears is packed for {draft_linears.rows} rows but the tree "
                         f"expands {tree.top_k} nodes per step: build pack_head_linears(head, "
                         f"tree)")
    # tree queries attend to the caches without repeat_kv copies (spec.attention)
    cache, target_attention = target_session(target)
    head_attention = gqa_attention(head.attention_config)
    dev = head.fc.weight.device
    input_ids = input_ids.to(dev).clone()
    stats, t0, t_stats = SpecStats(), time.perf_counter(), 0.0
    dtype = head.fc.weight.dtype
    drafter = EagleDrafter(head, bind_scorer(scorer, vocab), tree, draft_linears)

    with target_attention, head_attention:
        features, logits = prefill(target, input_ids, cache, dtype, all_logits=False)
        root = choose_token(logits[-1], sample, temperature, generator)
        if vocab is not None:
            observe_prompt(vocab, input_ids, target.get_output_embeddings(), features,
                           policy.prompt_topk)
    stats.prefill_time = time.perf_counter() - t0
    n, tokens = input_ids.shape[1], [root]
    index = ContextLookup(input_ids[0]) if tree.lookup else None
    if index is not None:
        index.extend([root])
    # pairs (f_i, x_{i+1}) the head has not encoded yet
    pair_tokens = torch.cat([input_ids[0, 1:], torch.tensor([root], device=dev)])
    pair_features = features
    yield len(tokens)

    while len(tokens) < max_new_tokens and tokens[-1] != eos_token_id:
        with target_attention, head_attention:
            t = time.perf_counter()
            chain = index.propose(tree.lookup) if index is not None else []
            if chain:  # the context recurs: verify its continuation, the head's pairs wait
                draft_tree = chain_tree(root, chain)
            else:
                root_hidden, logp, ids = drafter.encode(pair_tokens, pair_features)
                draft_tree = drafter.draft(root, root_hidden, logp, ids)
                pair_tokens, pair_features = pair_tokens[:0], pair_features[:0]
            stats.draft_times.append(time.perf_counter() - t)
            stats.looked_up.append(bool(chain))

            features, logits, path, emitted = verify_and_accept(
                target, draft_tree, cache, n, stats, dtype=dtype,
                verify_linears=verify_linears, sample=sample, temperature=temperature,
                generator=generator)
        if vocab is not None:
            t = time.perf_counter()
            stats.vocab_sizes.append(vocab.size)
            stats.covered += int(vocab.contains(torch.tensor(emitted, device=dev)).sum())
            stats.checked += len(emitted)
            t_stats += time.perf_counter() - t
            observe_verified(vocab, draft_tree.tokens, logits, emitted, policy.verified_topk)
        stats.accepted.append(len(path) - 1)
        stats.tree_sizes.append(len(draft_tree))
        keep_path_rows(cache, n, path)
        n += len(path)
        tokens.extend(emitted)
        if index is not None:
            index.extend(emitted)
        root = emitted[-1]
        pair_tokens = torch.cat([pair_tokens, torch.tensor(emitted, device=dev)])
        pair_features = torch.cat([pair_features, features[torch.tensor(path, device=dev)]])
        yield len(tokens)
    return finish(input_ids.cpu(), tokens, max_new_tokens, eos_token_id, stats, t0, t_stats)
