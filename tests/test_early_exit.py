"""``early_exit_agreement``: the full depth agrees with itself, shallower ones measure less."""
from __future__ import annotations

import pytest
import torch

from microspec_compile.models import early_exit_agreement


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
    # scored positions: prompt_len - 1 .. T - 2, i.e. T - prompt_len per sequence
    with torch.no_grad():
        ref = target(input_ids=sequences[0][1]).logits[0].argmax(-1)
    assert ref.shape[0] - sequences[0][0] == 8


def test_sequence_without_continuation_is_a_clear_error():
    with pytest.raises(ValueError, match="no continuation to score"):
        early_exit_agreement(_tiny_llama(1), [(7, torch.randint(0, 300, (1, 7)))], [1])
