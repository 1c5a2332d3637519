"""``early_exit_agreement``: the full depth agrees with itself, shallower ones measure less."""
from __future__ import annotations

import pytest
import torch

from microspec_compile.analysis.acceptance import early_exit_agreement
from microspec_compile.models import early_exit_draft


def _tiny_llama(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()


def test_agreement_by_depth():
    target = _tiny_llama(3)
    sequences = [(4, torch.randint(0, 300, (1, 12))), (2, torch.randint(0, 300, (1, 7)))]
    result = early_exit_agreement(target, sequences, [1, 3])
    assert result[3] == 1.0  # the full-depth "draft" is the target itself
    assert 0.0 <= result[1] < 1.0  # one random layer of three does not copy the target
    # Depth 1 by hand: the positions predicting the continuation (prompt_len - 1 ..
    # T - 2), 8 + 5 of them, pooled over both sequences.
    draft, hits, scored = early_exit_draft(target, 1), 0, 0
    with torch.no_grad():
        for prompt_len, ids in sequences:
            ref = target(input_ids=ids).logits[0].argmax(-1)[prompt_len - 1:-1]
            pred = draft(input_ids=ids).logits[0].argmax(-1)[prompt_len - 1:-1]
            hits, scored = hits + int((pred == ref).sum()), scored + ref.numel()
    assert scored == 13
    assert result[1] == pytest.approx(hits / scored)


def test_one_scored_position_gives_zero_or_one():
    """A sequence with a single continuation token scores exactly one position."""
    result = early_exit_agreement(_tiny_llama(2), [(5, torch.randint(0, 300, (1, 6)))], [1, 2])
    assert result[2] == 1.0 and result[1] in (0.0, 1.0)


def test_sequence_without_continuation_is_a_clear_error():
    with pytest.raises(ValueError, match="no continuation to score"):
        early_exit_agreement(_tiny_llama(1), [(7, torch.randint(0, 300, (1, 7)))], [1])
