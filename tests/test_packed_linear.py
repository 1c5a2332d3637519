"""PackedLinears: MKL- or oneDNN-prepacked fp32 linears for the tree verification's row count."""
import pytest
import torch
from torch import nn

from microspec_compile.linears import packed as packed_linear
from microspec_compile.linears.packed import KERNELS, PackedLinears, choose_kernel, mkl_packing_available

needs_mkl = pytest.mark.skipif(not mkl_packing_available(), reason="this torch build has no MKL")
# both packings, where this build has them: the faster is chosen per CPU, so both must be right
KERNEL_NAMES = [pytest.param(name, marks=pytest.mark.skipif(
    not available(), reason=f"this torch build has no {name}"))
    for name, (available, _) in KERNELS.items()]
PACKED_OP = {"mkl": "mkl::_mkl_linear", "onednn": "mkldnn::_linear_pointwise",
             "transposed": "aten::mm"}  # W @ x^T (F.linear would show as aten::linear)


def small_model(dtype=torch.float32):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 40), nn.SiLU(), nn.Linear(40, 16, bias=False)).to(dtype)
    return model.requires_grad_(False)  # inference, as in verification


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
@pytest.mark.parametrize("shape", [
    (8, 24),      # the packed row count: the packed product
    (1, 8, 24),   # the same rows behind a batch dim, as HF passes [1, T, H]
])
def test_packed_rows_match_linear(shape, kernel):
    model = small_model()
    x = torch.randn(shape)
    ref = model(x)
    packed = PackedLinears(model, 8, kernel=kernel)
    assert packed.count == 2 and packed.kernel == kernel
    with packed, torch.profiler.profile() as prof:
        out = model(x)
    ran = {e.key for e in prof.key_averages()}
    assert PACKED_OP[kernel] in ran and "aten::linear" not in ran  # the packed product ran
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
@pytest.mark.parametrize("rows", [1, 5, 200])  # a step, a smaller tree, a prefill
def test_other_row_counts_are_plain_linear(rows, kernel):
    model = small_model()
    x = torch.randn(rows, 24)
    ref = model(x)
    with PackedLinears(model, 8, kernel=kernel):
        out = model(x)
    assert torch.equal(out, ref)  # the ordinary product, bit for bit


def test_kernels_are_chosen_per_weight_shape():
    # each shape gets its own measured choice; modules of one shape share it
    model = nn.Sequential(nn.Linear(24, 40), nn.Linear(40, 40), nn.Linear(40, 40)).requires_grad_(
        False)
    packed = PackedLinears(model, 4)
    assert set(packed.kernels) == {(40, 24), (40, 40)} and packed.count == 3
    assert packed.kernel == packed.kernels[(40, 40)]  # the shape with the most elements
    x = torch.randn(4, 24)
    ref = model(x)
    with packed:
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


def test_the_choice_is_timed_once_per_shape_and_reused(monkeypatch):
    # a drafter packs its head per request: only the first packing may pay for the timing
    monkeypatch.setattr(packed_linear, "_CHOSEN", {})
    timed = []
    real = packed_linear._fastest
    monkeypatch.setattr(packed_linear, "_fastest",
                        lambda w, b, rows, names, repeats: timed.append(len(names))
                        or real(w, b, rows, names, repeats))
    first = PackedLinears(small_model(), 8)
    second = PackedLinears(small_model(), 8)
    assert second.kernels == first.kernels
    assert timed[len(first.kernels):] == [1] * len(second.kernels)  # reused, not timed again


def test_the_faster_kernel_is_chosen_and_a_bad_name_is_a_clear_error():
    available = [name for name, (ok, _) in KERNELS.items() if ok()]
    for chosen in (choose_kernel(torch.randn(40, 24), 8, repeats=3),
                   PackedLinears(small_model(), 8).kernel):  # by measurement: either may win
        assert chosen in available if available else chosen is None
    with pytest.raises(ValueError, match="unknown kernel 'blas'"):
        PackedLinears(small_model(), 8, kernel="blas")


@needs_mkl
def test_exit_restores_modules_and_bf16_is_left_alone():
    model = small_model()
    packed = PackedLinears(model, 4)
    with packed:
        assert all("forward" in m.__dict__ for m in model if isinstance(m, nn.Linear))
    assert all("forward" not in m.__dict__ for m in model)
    assert PackedLinears(small_model(torch.bfloat16), 4).count == 0  # only fp32 is packed


@needs_mkl
def test_autograd_calls_take_the_plain_product():
    # MKL's packed op has no gradient: a call autograd records must still work
    model = small_model().requires_grad_(True)
    x = torch.randn(8, 24, requires_grad=True)
    with PackedLinears(model, 8):
        model(x).sum().backward()
    assert x.grad is not None and model[0].weight.grad is not None


def test_without_any_kernel_nothing_is_packed(monkeypatch):
    # where no kernel is available every module stays as it is
    for name in packed_linear.KERNELS:
        monkeypatch.setitem(packed_linear.KERNELS, name, (lambda: False, None))
    model = small_model()
    x = torch.randn(8, 24)
    packed = PackedLinears(model, 8)
    assert packed.count == 0 and packed.kernel is None
    with packed:
        assert torch.equal(model(x), small_model()(x))


@pytest.mark.parametrize("rows", [0, -1, 2.5])
def test_bad_row_count_is_a_clear_error(rows):
    with pytest.raises(ValueError, match="rows must be a positive int"):
        PackedLinears(small_model(), rows)
