"""A small gpt-fast-style speculative decoding loop with exact per-step stats.

Hugging Face assisted ``generate`` (``target.generate(..., assistant_model=draft)``)
is the user path and works with drafts compiled in place by the microspec
backend.  It hides what we want to measure, though: it adapts the number of
drafted tokens, times nothing, and does not say which tokens were accepted.
This loop runs the same algorithm with a fixed ``gamma`` and records, per target
step, the accepted count, the time of every draft forward, and whether the
tokens the target emitted were in the draft's active vocabulary.

The maths (Leviathan et al. 2023; Chen et al. 2023).  Let ``p_i`` be the
target's and ``q_i`` the draft's next-token distribution at draft position
``i = 1..gamma``.  The draft proposes ``x_i ~ q_i`` (greedy: ``argmax q_i``);
the target scores ``[cur, x_1..x_gamma]`` in one forward, which gives
``p_1..p_{gamma+1}``.

* greedy: accept the longest prefix with ``x_i == argmax p_i``; then emit
  ``argmax p_{n+1}`` (correction or bonus).  The output equals the target's own
  greedy decoding whatever the draft proposes.
* sampling: accept ``x_i`` with probability ``min(1, p_i(x_i) / q_i(x_i))``; at
  the first rejection emit ``y ~ norm(max(p_i - q_i, 0))``; if all ``gamma``
  are accepted emit ``y ~ p_{gamma+1}``.  Every emitted token is distributed
  exactly as ``p``.  A sparse draft has ``q = 0`` outside its active vocabulary;
  it only ever proposes tokens with ``q > 0``, so the ratio is finite (the
  backend never emits an all-masked row).

Caches are Hugging Face ``DynamicCache`` objects rolled back with ``crop``.
After a step with ``n`` accepted tokens the target cache holds the prompt plus
the emitted tokens except the last one (``cur``, fed next step).  When all
``gamma`` drafts are accepted the draft has not yet seen ``x_gamma``; it is fed
one extra token (timed as a draft step), as gpt-fast does.
"""

from __future__ import annotations

import contextlib
import time

import torch

from ..hf import cache_kwargs, check_cache_grew
from ..vocab import find_vocab, using
from .sampling import choose, draw, probabilities, uniform
from .stats import SpecStats, finish
from .verify import crop_cache, target_session

__all__ = ["autoregressive_generate", "speculative_generate"]


def _forward(model, ids: torch.Tensor, cache, last_only: bool = False) -> torch.Tensor:
    cached = cache.get_seq_length()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1 if last_only else 0,
                **cache_kwargs(model, cache))
    check_cache_grew(cache, cached, ids.shape[1], f"{type(model).__name__}'s forward")
    return out.logits[0]


@torch.inference_mode()
def autoregressive_generate(model, input_ids: torch.Tensor, max_new_tokens: int, *,
                            sample: bool = False, temperature: float = 1.0,
                            eos_token_id: int | None = None, generator=None,
                            prompt_logits: bool = True):
    """Plain one-token-per-step decoding (the baseline), in the cache and attention the
    tree loops give the target (``spec.verify.target_session``).

    ``prompt_logits``: the prefill scores every prompt position, as ``speculative_generate``
    does (the same prefill in both); False: the last one only, all the target alone needs.

    Returns ``(ids [P + new], SpecStats)`` with ``target_times`` filled.
    """

    input_ids = input_ids.clone()  # an inference tensor, like every later input (no recompile)
    stats, t0 = SpecStats(), time.perf_counter()
    # attends as eagle_generate's target does (an int4 target: exactly, spec.attention)
    cache, attention = target_session(model)
    with attention:
        # Full prefill logits by default, as in speculative_generate: the same prefill
        # graph and cost (an observer-compiled target scores every prompt position).
        logits = _forward(model, input_ids, cache, last_only=not prompt_logits)
        tok, _ = choose(logits[-1:], sample, temperature, generator)
        crop_cache(cache, input_ids.shape[1])
        stats.prefill_time = time.perf_counter() - t0
        tokens = [int(tok)]
        while len(tokens) < max_new_tokens and tokens[-1] != eos_token_id:
            t = time.perf_counter()
            logits = _forward(model, tok.view(1, 1), cache)
            tok, _ = choose(logits[-1:], sample, temperature, generator)
            tokens.append(int(tok))
            stats.target_times.append(time.perf_counter() - t)
    return finish(input_ids, tokens, max_new_tokens, eos_token_id, stats, t0)


@torch.inference_mode()
def speculative_generate(target, draft, input_ids: torch.Tensor, max_new_tokens: int,
                         gamma: int = 4, *, sample: bool = False, temperature: float = 1.0,
                         eos_token_id: int | None = None, generator=None,
                         vocab="auto"):
    """Speculative decoding of one sequence (batch 1) with exact per-step stats.

    Parameters
    ----------
    target, draft : transformers causal LMs sharing a tokenizer (compiled or not).
    input_ids : ``[1, P]`` int64 prompt.
    max_new_tokens : int
    gamma : int
        Tokens drafted per target step.
    sample, temperature, generator :
        Sampling mode (default greedy); ``generator`` seeds ``torch.multinomial``
        and the acceptance test.
    eos_token_id : int, optional
        Stop after this token.
    vocab : ActiveVocab, None or "auto"
        The draft's microspec vocabulary: reset at the start (one request, one
        vocabulary), bound around the draft's calls (``microspec_compile.using``: the
        request's own, when it is not the head's default) and used to record coverage
        and sizes (the time this costs is excluded from ``total_time``).  ``"auto"``
        takes the default vocabulary of the draft's head (``vocab.find_vocab``); pass
        ``None`` for a dense draft that shares its head weight with a
        microspec-compiled model (the lookup goes by weight and would find that
        model's vocabulary).

    Returns
    -------
    (torch.Tensor, SpecStats)
        ``[P + new]`` ids (prompt included) and the measurements.
    """
    from transformers import DynamicCache

    input_ids = input_ids.clone()  # an inference tensor, like every later input (no recompile)
    auto = isinstance(vocab, str)
    if auto:
        vocab = find_vocab(draft)  # None: a dense draft, or not compiled yet
    if vocab is not None:
        vocab.reset()  # one request = one vocabulary
    # a vocabulary given for this request is the one the compiled draft reads
    with using(vocab) if vocab is not None else contextlib.nullcontext():
        stats, t0, t_stats = SpecStats(), time.perf_counter(), 0.0
        t_cache, d_cache = DynamicCache(config=target.config), DynamicCache(config=draft.config)
        # Prefill: the target's last logits give the first token; the draft only
        # needs its KV cache (and observes the prompt ids).
        logits = _forward(target, input_ids, t_cache)
        cur, _ = choose(logits[-1:], sample, temperature, generator)
        _forward(draft, input_ids, d_cache, last_only=True)
        for cache in (t_cache, d_cache):
            crop_cache(cache, input_ids.shape[1])  # contiguous layout from the first step on
        stats.prefill_time = time.perf_counter() - t0
        if auto and vocab is None:  # the backend creates the vocabulary on the first call
            vocab = find_vocab(draft)  # None: a dense draft, or not compiled yet
        tokens = [int(cur)]

        while len(tokens) < max_new_tokens and tokens[-1] != eos_token_id:
            # 1. Draft gamma tokens autoregressively: x_i ~ q_i.
            drafted, q_probs, x = [], [], cur.view(1, 1)
            for _ in range(gamma):
                t = time.perf_counter()
                x, q = choose(_forward(draft, x, d_cache), sample, temperature, generator)
                stats.draft_times.append(time.perf_counter() - t)
                drafted.append(x)
                q_probs.append(q)
                x = x.view(1, 1)
            drafted = torch.cat(drafted)
            if vocab is not None:  # S as the draft saw it, before the target adds its top-3
                t = time.perf_counter()
                in_vocab = vocab.contains(torch.arange(vocab.vocab_size, device=vocab.rows.device))
                stats.vocab_sizes.append(vocab.size)
                t_stats += time.perf_counter() - t

            # 2. Verify [cur, x_1..x_gamma] in one target forward: p_1..p_{gamma+1}.
            t = time.perf_counter()
            logits = _forward(target, torch.cat([cur, drafted]).view(1, -1), t_cache)
            stats.target_times.append(time.perf_counter() - t)

            # 3. Accept / reject.
            if not sample:
                target_ids = logits.argmax(-1)
                agree = (target_ids[:gamma] == drafted).int()
                n = int(agree.cumprod(0).sum())  # longest agreeing prefix
                bonus = target_ids[n]
            else:
                p = probabilities(logits, temperature)
                n = 0
                while n < gamma:
                    x_n = drafted[n]
                    ratio = p[n, x_n] / q_probs[n][0, x_n]
                    if uniform(generator) >= torch.clamp(ratio, max=1.0):
                        break
                    n += 1
                if n < gamma:  # resample from the residual norm(max(p - q, 0))
                    residual = torch.clamp(p[n] - q_probs[n][0], min=0.0)
                    total = residual.sum()
                    dist = residual / total if total > 0 else p[n]
                else:
                    dist = p[gamma]
                bonus = draw(dist, generator)
            emitted = drafted[:n].tolist() + [int(bonus)]
            tokens.extend(emitted)
            stats.accepted.append(n)
            if vocab is not None:
                stats.covered += int(in_vocab[torch.tensor(emitted, device=in_vocab.device)].sum())
                stats.checked += len(emitted)

            # 4. Roll back both caches to prompt + emitted tokens minus the last one.
            length = input_ids.shape[1] + len(tokens) - 1
            crop_cache(t_cache, length)
            if n == gamma:  # the draft has not seen x_gamma yet
                t = time.perf_counter()
                _forward(draft, drafted[-1:].view(1, 1), d_cache)
                stats.draft_times.append(time.perf_counter() - t)
            crop_cache(d_cache, length)
            cur = bonus.view(1)
        return finish(input_ids, tokens, max_new_tokens, eos_token_id, stats, t0, t_stats)
