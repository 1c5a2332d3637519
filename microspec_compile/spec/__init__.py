"""Decoding loops: the target alone, a chain draft, and EAGLE-2 dynamic trees.

* :mod:`.chain`  gpt-fast-style chain speculative decoding with a causal-LM draft;
* :mod:`.eagle`  EAGLE-2 tree drafting with an EAGLE head, verified in one target forward;
* :mod:`.tree`   the tree layout, masks and greedy / sampling acceptance;
* :mod:`.verify` the target's tree forward and KV-cache upkeep;
* :mod:`.sampling` token choice (greedy, or a draw at a temperature) for every loop;
* :mod:`.scorers` the LM-head calls (full, microspec-compiled, fixed subset);
* :mod:`.decoder` the entry point: ``prepare(target, head, DecoderConfig(...)).generate(...)``.
"""
from .chain import autoregressive_generate, speculative_generate
from .decoder import HEADS, Decoder, DecoderConfig, pack_verification, prepare
from .eagle import EagleDrafter, TreeConfig, eagle_generate, eagle_rounds, pack_head_linears
from .lookup import ContextLookup, lookup_generate
from .scorers import PackedScorer, SubsetTopkScorer, TopkScorer
from .stats import SpecStats
from .tree import DraftTree, accept_greedy, accept_sampling, select_tree

__all__ = ["HEADS", "Decoder", "DecoderConfig", "pack_verification", "prepare", "SpecStats",
           "autoregressive_generate", "speculative_generate", "EagleDrafter",
           "TopkScorer", "SubsetTopkScorer", "PackedScorer", "TreeConfig", "eagle_generate", "eagle_rounds",
           "pack_head_linears", "DraftTree", "ContextLookup", "lookup_generate",
           "accept_greedy", "accept_sampling", "select_tree"]
