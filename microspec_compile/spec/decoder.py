"""The entry point for EAGLE-2 speculative decoding with a microspec (or another) LM head.

>>> decoder = prepare(target, head, DecoderConfig(pinned_ids=(eos,)))
>>> ids, stats = decoder.generate(input_ids, 64, eos_token_id=eos)

:func:`prepare` does once what every request shares: it builds the draft's LM-head call
for the chosen ``head`` (the microspec backend over the decoder's own active vocabulary,
the dense head through Inductor or prepacked, or FR-Spec's fixed subset), creates that
vocabulary (or takes yours), and packs the target's fp32 CPU linears for every verified tree
size and the head's own linears for the tree's expansions (``linears.PackedLinears``:
the fastest CPU kernel per weight shape, timed once).  Exact attention for a target with
exact 4-bit linears is chosen per request by the loop (``spec.verify.target_session``).
:meth:`Decoder.generate` runs :func:`spec.eagle_generate` with all of it;
:meth:`Decoder.rounds` steps the same request round by round.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ..config import DEFAULT_CAPACITY
from ..linears.packed import PackedLinears
from ..policy import TUNED, VocabPolicy
from ..vocab import ActiveVocab, normalize_pins
from .eagle import TreeConfig, eagle_rounds, pack_head_linears, run_to_end
from .scorers import PackedScorer, SubsetTopkScorer, TopkScorer, shared_topk_scorer

__all__ = ["HEADS", "DecoderConfig", "Decoder", "prepare", "pack_verification",
           "check_head_fits"]

HEADS = ("microspec", "dense", "dense-packed", "frspec")


@dataclass(frozen=True)
class DecoderConfig:
    """How a :class:`Decoder` drafts and verifies.

    Parameters
    ----------
    head : the draft's LM-head call, one of :data:`HEADS`: ``"microspec"`` (the backend's
        sparse head over the request's active vocabulary), ``"dense"`` (the full head
        through Inductor), ``"dense-packed"`` (the full head with its weight prepacked for
        1 and ``top_k`` rows: the fastest dense head on CPU), ``"frspec"`` (a fixed subset,
        ``frequent_ids``, through Inductor)
    tree : the EAGLE-2 tree's shape and the context lookup (``TreeConfig``)
    capacity, pinned_ids : the microspec vocabulary's that :func:`prepare` creates; None:
        the default capacity
    policy : which of the target's best tokens join the vocabulary (``policy.TUNED``, the
        default, or ``policy.PAPER``, MicroSpec's own)
    frequent_ids : [S] int64 token ids, the FR-Spec subset (``head="frspec"`` only)
    pack_target : pack the target's fp32 CPU linears for each verified size
    """

    head: str = "microspec"
    tree: TreeConfig = field(default_factory=TreeConfig)
    capacity: int | None = None
    pinned_ids: tuple = ()
    policy: VocabPolicy = TUNED
    frequent_ids: torch.Tensor | None = None
    pack_target: bool = True

    def __post_init__(self):
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {' / '.join(HEADS)}, got {self.head!r}")
        if (self.head == "frspec") != (self.frequent_ids is not None):
            raise ValueError("frequent_ids (the FR-Spec subset) goes with head='frspec' and "
                             f"only with it; got head={self.head!r}")
        object.__setattr__(self, "pinned_ids", normalize_pins(self.pinned_ids))
        if self.capacity is not None and (isinstance(self.capacity, bool) or
                                          not isinstance(self.capacity, int) or self.capacity < 1):
            raise ValueError(f"capacity must be an int >= 1, got {self.capacity!r}")
        if not isinstance(self.policy, VocabPolicy):
            raise TypeError(f"policy must be a VocabPolicy (policy.TUNED, policy.PAPER), got "
                            f"{type(self.policy).__name__}")


def pack_verification(target, tree: TreeConfig) -> list[PackedLinears]:
    """The target's fp32 CPU linears packed for each size the tree verifies (share them
    between decoders of the same target and tree: each packing copies the weights)."""
    return [PackedLinears(target, rows) for rows in tree.verified_sizes()]


class Decoder:
    """One target, its EAGLE head and a prepared LM-head call (built by :func:`prepare`).

    Attributes
    ----------
    config : the ``DecoderConfig``; scorer : the LM-head call; vocab : the microspec
    ``ActiveVocab`` (None for the other heads); verify_linears : the target's packings, one
    per verified size (possibly more sizes than this tree verifies); draft_linears : the
    head's
    """

    def __init__(self, target, head, config: DecoderConfig, scorer, vocab, verify_linears,
                 draft_linears):
        self.target, self.head, self.config = target, head, config
        self.scorer, self.vocab = scorer, vocab
        self.verify_linears, self.draft_linears = verify_linears, draft_linears

    def with_tree(self, tree: TreeConfig) -> "Decoder":
        """The same decoder (scorer, vocabulary, packings) over another tree of the same
        ``top_k`` (e.g. ``lookup=0``: plain EAGLE-2)."""
        if tree.top_k != self.config.tree.top_k:
            raise ValueError(f"with_tree keeps the scorer and packings of top_k "
                             f"{self.config.tree.top_k}; got top_k {tree.top_k}: prepare anew")
        if self.verify_linears:
            _check_covers(self.verify_linears, tree)
        return Decoder(self.target, self.head, replace(self.config, tree=tree), self.scorer,
                       self.vocab, self.verify_linears, self.draft_linears)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *,
                 eos_token_id: int | None = None, sample: bool = False, temperature: float = 1.0,
                 generator: torch.Generator | None = None):
        """``(ids [P + new], SpecStats)`` for the prompt ``input_ids`` [1, P]; greedy by
        default (the target's own output), or sampled at ``temperature`` (distributed as the
        target's)."""
        return run_to_end(self.rounds(input_ids, max_new_tokens, eos_token_id=eos_token_id,
                                      sample=sample, temperature=temperature,
                                      generator=generator))

    def rounds(self, input_ids: torch.Tensor, max_new_tokens: int, **options):
        """The request of :meth:`generate`, one round per ``next()`` (``spec.eagle_rounds``:
        it yields the tokens so far and returns ``(ids, SpecStats)``), so that requests of
        several decoders on one target can take turns; ``options`` as :meth:`generate`'s."""
        sizes = self.config.tree.verified_sizes()
        verify = [p for p in self.verify_linears if p.rows in sizes]
        return eagle_rounds(self.target, self.head, self.scorer, input_ids, max_new_tokens,
                            self.config.tree, vocab=self.vocab,
                            policy=self.config.policy, verify_linears=verify or None,
                            draft_linears=self.draft_linears, **options)


def check_head_fits(target, head) -> None:
    """A ValueError unless ``head`` was built for ``target``: the same hidden size and
    vocabulary, and ``target``'s own embedding shared (``EagleHead.for_target``,
    ``EagleHead.load(directory, target)``; the draft scores with ``prepare``'s ``lm_head``)."""
    config = target.config
    for name in ("hidden_size", "vocab_size"):
        if getattr(head.config, name) != getattr(config, name):
            raise ValueError(f"this EAGLE head has {name}={getattr(head.config, name)} but the "
                             f"target has {getattr(config, name)}: it was built for another "
                             "model (EagleHead.load(directory, target) checks this on loading)")
    if head.embed_tokens is not target.get_input_embeddings():
        raise ValueError("this EAGLE head embeds tokens with another model's embedding: build "
                         "it for this target (EagleHead.for_target(target) or "
                         "EagleHead.load(directory, target))")


def _check_covers(verify_linears: list[PackedLinears], tree: TreeConfig) -> None:
    missing = set(tree.verified_sizes()) - {p.rows for p in verify_linears}
    if missing:
        raise ValueError(f"verify_linears has no packing for {sorted(missing)} rows, which the "
                         f"tree verifies: pack_verification(target, tree)")


def _scorer(lm_head, config: DecoderConfig, vocab: ActiveVocab | None):
    """``(scorer, vocab)`` for ``config.head`` (module docstring)."""
    k = config.tree.top_k
    if config.head == "microspec":
        if vocab is None:
            capacity = DEFAULT_CAPACITY if config.capacity is None else config.capacity
            vocab = ActiveVocab(lm_head.weight, capacity, config.pinned_ids)
        elif config.capacity is not None or config.pinned_ids:
            raise ValueError("give capacity / pinned_ids to ActiveVocab(...) when you pass "
                             "vocab=..., not to DecoderConfig as well")
        else:
            vocab.check_serves(lm_head.weight, vocab.capacity)
        return shared_topk_scorer(lm_head, k, "microspec", vocab), vocab
    if vocab is not None:
        raise ValueError(f"vocab=... goes with head='microspec', not {config.head!r}")
    if config.head == "dense-packed":
        return PackedScorer(TopkScorer(lm_head, k), (1, k)), None
    if config.head == "dense":
        return shared_topk_scorer(lm_head, k, "inductor"), None
    module = SubsetTopkScorer(lm_head, config.frequent_ids, k)
    return torch.compile(module, backend="inductor", dynamic=True), None


def prepare(target, head, config: DecoderConfig | None = None, *,
            verify_linears: list[PackedLinears] | None = None,
            draft_linears: PackedLinears | None = None, lm_head=None,
            vocab: ActiveVocab | None = None) -> Decoder:
    """A :class:`Decoder` of ``target`` (a HF causal LM) with its EAGLE ``head``.

    Parameters
    ----------
    config : ``DecoderConfig`` (default: the microspec head, the default tree)
    verify_linears : :func:`pack_verification` of ``target`` for a tree verifying the same
        sizes, to share between decoders; None: packed here when ``config.pack_target``
    draft_linears : ``spec.pack_head_linears(head, tree)`` to share; None: packed here
    lm_head : the LM head the draft scores with (default: the target's)
    vocab : the microspec ``ActiveVocab`` of ``lm_head.weight`` this decoder drafts over
        (``head="microspec"``); None: a new one with ``config.capacity`` /
        ``config.pinned_ids``.  Every decoder has its own: decoders sharing one target and
        head decode independently, with one compiled head between them
    """
    config = config or DecoderConfig()
    check_head_fits(target, head)
    tree = config.tree
    if verify_linears is None:
        verify_linears = pack_verification(target, tree) if config.pack_target else []
    else:
        _check_covers(verify_linears, tree)
    if draft_linears is None:
        draft_linears = pack_head_linears(head, tree)
    lm_head = target.get_output_embeddings() if lm_head is None else lm_head
    scorer, vocab = _scorer(lm_head, config, vocab)
    return Decoder(target, head, config, scorer, vocab, verify_linears, draft_linears)
