"""The decoding entry point: ``spec.prepare(target, head, DecoderConfig(...)).generate(...)``.

Every head (microspec, dense through Inductor, dense prepacked, FR-Spec's subset) decodes the
target's own greedy output through one prepared decoder; the settings are checked up front.
"""
from __future__ import annotations

import pytest
import torch
from test_eagle_tree import oracle_head, prompt, tiny_target

from microspec_compile.linears.packed import mkl_packing_available
from microspec_compile.spec import (
    HEADS,
    DecoderConfig,
    TreeConfig,
    autoregressive_generate,
    pack_verification,
    prepare,
)

TREE = TreeConfig(depth=2, top_k=4, total_tokens=6, lookup=4)
packing = pytest.mark.skipif(not mkl_packing_available(), reason="this torch build has no MKL")


def _config(head: str, target, **kwargs) -> DecoderConfig:
    everything = torch.arange(target.config.vocab_size)  # an FR-Spec subset that misses nothing
    return DecoderConfig(head=head, tree=TREE, capacity=256, pinned_ids=(0,),
                         frequent_ids=everything if head == "frspec" else None, **kwargs)


@packing
def test_every_head_decodes_the_targets_greedy_output():
    target = tiny_target(bigram=True)
    head = oracle_head(target)
    ids = prompt()
    expected = autoregressive_generate(target, ids, 20)[0]
    shared = pack_verification(target, TREE)  # one packing of the target for all decoders
    for name in HEADS:
        decoder = prepare(target, head, _config(name, target), verify_linears=shared)
        out, stats = decoder.generate(ids, 20)
        assert torch.equal(out, expected), name
        assert stats.tokens_per_verification() > 1.0, name
        assert (decoder.vocab is not None) == (name == "microspec")
    plain = decoder.with_tree(TreeConfig(depth=2, top_k=4, total_tokens=6, lookup=0))
    assert plain.scorer is decoder.scorer and plain.vocab is decoder.vocab
    assert torch.equal(plain.generate(ids, 20)[0], expected)


def test_microspec_decoder_fills_its_vocabulary_without_packing():
    target = tiny_target(bigram=True)
    decoder = prepare(target, oracle_head(target), _config("microspec", target, pack_target=False))
    ids = prompt()
    out, _ = decoder.generate(ids, 12)
    assert torch.equal(out, autoregressive_generate(target, ids, 12)[0])
    assert decoder.verify_linears == []
    assert decoder.vocab.contains(out[0]).all()  # prompt and emitted tokens are active
    assert decoder.vocab.pinned_ids == (0,)


def test_bad_settings_are_clear_errors():
    target = tiny_target()
    with pytest.raises(ValueError, match="head must be one of"):
        DecoderConfig(head="sparse")
    with pytest.raises(ValueError, match="frequent_ids"):
        DecoderConfig(head="frspec")
    with pytest.raises(ValueError, match="frequent_ids"):
        DecoderConfig(frequent_ids=torch.arange(10))
    decoder = prepare(target, oracle_head(target), _config("dense", target, pack_target=False))
    with pytest.raises(ValueError, match="top_k"):
        decoder.with_tree(TreeConfig(depth=2, top_k=2, total_tokens=6))


@packing
def test_a_shared_packing_must_cover_the_trees_sizes():
    target = tiny_target()
    other = pack_verification(target, TreeConfig(depth=2, top_k=4, total_tokens=8, lookup=0))
    with pytest.raises(ValueError, match=r"no packing for \[5, 6\] rows"):
        prepare(target, oracle_head(target), _config("dense", target), verify_linears=other)
