"""Context lookup: draft the continuation of the last n-gram's previous occurrence.

Generated text repeats its context (MicroSpec's premise): code
reuses names, answers quote the question, and a small greedy target repeats its
own phrases.  When the last ``n`` tokens (``min_ngram <= n <= max_ngram``, longest
first) occurred earlier in the prompt or the output, the tokens that followed their
most recent occurrence are a free draft (prompt lookup decoding): no model runs.

``ContextLookup`` keeps a dict from every n-gram to the position after its latest
occurrence, updated as tokens are emitted (a few dict writes per token), so a
proposal costs a few lookups.  :func:`lookup_generate` decodes with it alone; the
EAGLE loop (``TreeConfig.lookup``) verifies such a chain instead of the head's tree
whenever one is found, and drafts with the head otherwise.
"""
from __future__ import annotations

import time

import torch

from .sampling import choose_token
from .stats import SpecStats, finish
from .tree import DraftTree
from .verify import check_request, keep_path_rows, prefill, target_session, verify_and_accept

__all__ = ["ContextLookup", "chain_tree", "lookup_generate"]


class ContextLookup:
    """An n-gram index of a growing token sequence (the prompt, then every emitted token).

    Parameters
    ----------
    ids : the context so far (token ids)
    min_ngram, max_ngram : suffix lengths tried, longest first (a 1-token match proposes
        poorly and takes rounds from the head: in the EAGLE loop with lookup 7, on the 14
        tuning prompts, 2..3 gave 1.92 tokens per verification and 1..3 gave 1.82)
    """

    def __init__(self, ids, min_ngram: int = 2, max_ngram: int = 3):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.min_ngram, self.max_ngram = min_ngram, max_ngram
        self.ids: list[int] = []
        self._after: dict[tuple, int] = {}  # n-gram -> position after its latest occurrence
        self.extend(ids)

    def extend(self, tokens) -> None:
        """Append emitted tokens to the context."""
        tokens = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
        for t in tokens:
            # n-grams ending at the old last token become earlier occurrences now
            end = len(self.ids)
            for n in range(self.min_ngram, self.max_ngram + 1):
                if end >= n:
                    self._after[tuple(self.ids[end - n:end])] = end
            self.ids.append(int(t))

    def propose(self, length: int) -> list[int]:
        """``length`` tokens that followed the latest earlier occurrence of the longest
        matching suffix; ``[]`` when no suffix of ``min_ngram`` or more tokens recurs.

        A match close to the end (a loop, ``a b a b``) runs past the context: the copy then
        goes on from the tokens it proposes, continuing the period.
        """
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if len(self.ids) < n:
                continue
            start = self._after.get(tuple(self.ids[-n:]))
            if start is not None:
                chain = self.ids[start:start + length]
                while len(chain) < length:  # start + i >= len(ids): continue the period
                    chain.append(chain[len(chain) - (len(self.ids) - start)])
                return chain
        return []


def chain_tree(root: int, chain: list[int]) -> DraftTree:
    """The root followed by ``chain`` as one path (on the host, as every ``DraftTree``)."""
    t = len(chain) + 1
    return DraftTree(torch.tensor([root, *chain], device="cpu"),
                     torch.arange(-1, t - 1, device="cpu"), torch.arange(t, device="cpu"))


@torch.inference_mode()
def lookup_generate(target, input_ids: torch.Tensor, max_new_tokens: int, lookup: int = 7, *,
                    sample: bool = False, temperature: float = 1.0,
                    eos_token_id: int | None = None, generator=None, verify_linears=None,
                    min_ngram: int = 2, max_ngram: int = 3):
    """Speculative decoding with context lookup alone (no draft model), batch 1.

    Each round verifies the root and the looked-up chain of up to ``lookup`` tokens in
    one target forward (a plain one-token step when nothing recurs) and accepts as
    :func:`~microspec_compile.spec.eagle_generate` does: greedy, or speculative
    sampling with the chain as deterministic candidates (exactly the target's
    distribution).  ``verify_linears``: ``PackedLinears`` of ``target`` for
    ``lookup + 1`` rows (or several row counts), or None.

    Returns
    -------
    (ids [P + new], SpecStats) as ``eagle_generate``; ``draft_times`` hold the lookups
    """

    check_request(input_ids, target.get_output_embeddings().weight.shape[0], sample, temperature)
    if lookup < 1:
        raise ValueError(f"lookup must be >= 1 tokens, got {lookup}")
    cache, target_attention = target_session(target)
    with target_attention:
        dev = target.get_output_embeddings().weight.device
        input_ids = input_ids.to(dev).clone()
        stats, t0 = SpecStats(), time.perf_counter()

        _, logits = prefill(target, input_ids, cache, all_logits=False)
        root = choose_token(logits[-1], sample, temperature, generator)
        stats.prefill_time = time.perf_counter() - t0
        index = ContextLookup(input_ids[0], min_ngram, max_ngram)
        index.extend([root])
        n, tokens = input_ids.shape[1], [root]
        while len(tokens) < max_new_tokens and tokens[-1] != eos_token_id:
            t = time.perf_counter()
            tree = chain_tree(root, index.propose(lookup))
            stats.draft_times.append(time.perf_counter() - t)
            stats.looked_up.append(len(tree) > 1)
            _, _, path, emitted = verify_and_accept(
                target, tree, cache, n, stats, verify_linears=verify_linears, sample=sample,
                temperature=temperature, generator=generator)
            stats.accepted.append(len(path) - 1)
            stats.tree_sizes.append(len(tree))
            keep_path_rows(cache, n, path)
            n += len(path)
            tokens.extend(emitted)
            index.extend(emitted)
            root = emitted[-1]
        return finish(input_ids.cpu(), tokens, max_new_tokens, eos_token_id, stats, t0)
