"""The target's exact 4-bit linears (``linears.int4``): recovery, kernel, model swap."""
import pytest
import torch
from test_eagle_tree import VOCAB, oracle_head, prompt, tiny_target
from torch import nn

from microspec_compile.linears import TargetConfig, needs_exact_attention, prepare_target
from microspec_compile.linears.int4 import (
    GROUP_SIZE,
    PREFILL_ROWS,
    Int4Linear,
    int4_groups,
    int4_kernel_available,
    int4_linear_reference,
    quantize_exact_int4,
)
from microspec_compile.spec import (
    TopkScorer,
    TreeConfig,
    autoregressive_generate,
    eagle_generate,
    lookup_generate,
)

needs_int4 = pytest.mark.skipif(not int4_kernel_available(),
                                reason="this torch build has no CPU int4 kernel")
pytestmark = needs_int4


def q4_1(weight: torch.Tensor) -> torch.Tensor:
    """What a GGUF Q4_1 round trip leaves in an fp32 weight: per group of 32, fp16 minimum
    and scale ``(max - min) / 15``, codes rounded to 0..15, dequantized in fp32."""
    n, k = weight.shape
    g = weight.reshape(n, k // GROUP_SIZE, GROUP_SIZE)
    low = g.amin(-1).half().float()
    scale = ((g.amax(-1) - low) / 15).half().float()
    step = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round((g - low[..., None]) / step[..., None]).clamp(0, 15)
    return (codes * scale[..., None] + low[..., None]).reshape(n, k)


def q4_1_model(model: nn.Module) -> nn.Module:
    """Every decoder linear of ``model`` through :func:`q4_1` (the LM head left as it is)."""
    for module in model.modules():
        if isinstance(module, nn.Linear) and module is not model.get_output_embeddings():
            module.weight.data = q4_1(module.weight.data)
    return model


# Why each case: a square weight, a tall one with a bias (the MLP's up projection shape),
# and a wide one whose input spans several groups (the down projection).
@pytest.mark.parametrize("out_features,in_features,bias", [(64, 64, False), (160, 64, True),
                                                           (48, 192, False)])
def test_groups_are_recovered_and_the_kernel_matches_its_reference(out_features, in_features,
                                                                   bias):
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=bias)
    linear.weight.data = q4_1(linear.weight.data)
    groups = int4_groups(linear.weight)
    assert groups is not None and torch.equal(groups.dequantize(), linear.weight)
    assert int(groups.codes.min()) >= 0 and int(groups.codes.max()) <= 15
    module = Int4Linear.from_linear(linear)
    x = torch.randn(2, 5, in_features)
    y = module(x)
    assert y.shape == (2, 5, out_features) and y.dtype == torch.float32
    ref = int4_linear_reference(x.reshape(-1, in_features), groups, linear.bias)
    torch.testing.assert_close(y.reshape(-1, out_features), ref, rtol=2e-2, atol=2e-2)
    # and the fp32 layer it stands for, within bf16 rounding
    torch.testing.assert_close(y, linear(x), rtol=3e-2, atol=3e-2)


def test_a_prefill_takes_the_bf16_copy_and_matches_the_kernels_reference():
    torch.manual_seed(2)
    linear = nn.Linear(64, 96, bias=True)
    linear.weight.data = q4_1(linear.weight.data)
    module, groups = Int4Linear.from_linear(linear), int4_groups(linear.weight)
    x = torch.randn(PREFILL_ROWS + 9, 64)
    torch.testing.assert_close(module(x), int4_linear_reference(x, groups, linear.bias),
                               rtol=2e-2, atol=2e-2)


def test_every_row_is_computed_alike_whatever_the_row_count():
    # what greedy speculative decoding needs: a tree verification (8 rows) and a one-token
    # step (1 row) give the same bits for the same input row
    torch.manual_seed(1)
    linear = nn.Linear(128, 96)
    linear.weight.data = q4_1(linear.weight.data)
    module = Int4Linear.from_linear(linear)
    x = torch.randn(PREFILL_ROWS, 128)
    alone = torch.cat([module(x[i:i + 1]) for i in range(PREFILL_ROWS)])
    assert torch.equal(module(x), alone)


# Why each case: a weight that is not 4-bit groups, a dtype the kernel is not fed from, and
# an input dimension that is not whole groups are all left as they are.
@pytest.mark.parametrize("weight", [torch.randn(32, 64), q4_1(torch.randn(32, 64)).bfloat16(),
                                    torch.zeros(32, 48)])
def test_other_weights_are_not_taken_for_groups(weight):
    assert int4_groups(weight) is None


def test_bad_inputs_are_clear_errors():
    linear = nn.Linear(64, 32)
    linear.weight.data = q4_1(linear.weight.data)
    module = Int4Linear.from_linear(linear)
    with pytest.raises(TypeError, match="takes float inputs, got dtype torch.int64"):
        module(torch.ones(2, 64, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"expects inputs \[..., 64\], got \[2, 48\]"):
        module(torch.randn(2, 48))
    with pytest.raises(ValueError, match="runs on CPU"):
        module(torch.randn(2, 64, device="meta"))


def test_constant_groups_have_a_zero_scale():
    weight = torch.full((4, 64), 0.25)
    groups = int4_groups(weight)
    assert groups is not None and torch.equal(groups.dequantize(), weight)
    assert float(groups.scale.abs().max()) == 0.0


def test_the_model_swap_leaves_the_lm_head_and_counts_what_it_replaced():
    target = q4_1_model(tiny_target())
    layers = target.config.num_hidden_layers
    assert quantize_exact_int4(target) == 7 * layers
    assert isinstance(target.get_output_embeddings(), nn.Linear)
    assert isinstance(target.model.layers[0].mlp.up_proj, Int4Linear)
    assert quantize_exact_int4(tiny_target()) == 0  # random weights: nothing qualifies


# Why each case: the lookup loop (chains up to 5 verified) and the EAGLE loop with the
# oracle head (whole trees accepted): both must emit the int4 target's own greedy tokens.
@pytest.mark.parametrize("loop", ["lookup", "eagle"])
def test_speculative_loops_keep_the_int4_targets_greedy_output(loop):
    target = q4_1_model(tiny_target(bigram=True))
    head = oracle_head(target)
    assert quantize_exact_int4(target) > 0
    ids = prompt()
    ref, _ = autoregressive_generate(target, ids, 24)
    if loop == "lookup":
        out, _ = lookup_generate(target, ids, 24, lookup=4)
    else:
        shape = TreeConfig(depth=2, top_k=2, total_tokens=4, lookup=0)
        out, stats = eagle_generate(target, head, TopkScorer(target.lm_head, 2), ids, 24, shape)
        assert stats.tokens_per_verification() > 2.0
    assert torch.equal(out, ref) and int(out.max()) < VOCAB


def prepared(target, weights: str) -> str:
    return prepare_target(target, TargetConfig(weights=weights))


def test_prepare_target_chooses_the_weights():
    assert prepared(tiny_target(), "fp32") == "fp32"
    assert prepared(q4_1_model(tiny_target()), "fp32") == "fp32"
    assert prepared(tiny_target(), "auto") == "fp32"  # nothing qualifies
    with pytest.raises(ValueError, match="no linear of the target holds exact 4-bit groups"):
        prepared(tiny_target(), "int4")
    with pytest.raises(ValueError, match="weights must be one of"):
        prepared(tiny_target(), "int8")
    target = q4_1_model(tiny_target())
    assert not needs_exact_attention(target)
    assert prepared(target, "int4").startswith("int4 (14 ")
    assert needs_exact_attention(target)  # the loops then keep attention exact


def test_auto_keeps_fp32_where_int4_is_measured_slower(monkeypatch):
    import microspec_compile.linears.int4 as int4_linear

    linear = nn.Linear(64, 64)
    linear.weight.data = q4_1(linear.weight.data)
    assert isinstance(int4_linear.int4_is_faster([linear], [Int4Linear.from_linear(linear)]),
                      bool)
    assert int4_linear.int4_is_faster([], []) is False
    monkeypatch.setattr(int4_linear, "int4_is_faster", lambda linears, int4_linears: False)
    target = q4_1_model(tiny_target())
    assert quantize_exact_int4(target, check_speed=True) == 0
    assert not any(isinstance(m, Int4Linear) for m in target.modules())
    assert prepared(target, "auto") == "fp32"
    assert prepared(target, "int4").startswith("int4 (14 ")  # asked for: no check
    monkeypatch.setattr(int4_linear, "int4_is_faster", lambda linears, int4_linears: True)
    assert quantize_exact_int4(q4_1_model(tiny_target()), check_speed=True) == 14
    assert prepared(q4_1_model(tiny_target()), "auto").startswith("int4 (14 ")


def test_a_torch_without_the_kernel_is_a_clear_error(monkeypatch):
    monkeypatch.delattr(torch, "_weight_int4pack_mm_for_cpu")
    with pytest.raises(RuntimeError, match="no CPU int4 weight-only kernel"):
        quantize_exact_int4(q4_1_model(tiny_target()))
    assert prepared(q4_1_model(tiny_target()), "auto") == "fp32"
