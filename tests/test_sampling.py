"""Token choice shared by every loop (``spec.sampling``): greedy, draws, where they happen."""
import pytest
import torch

from microspec_compile.spec.sampling import choose, choose_token, draw, probabilities, uniform


def test_greedy_is_the_argmax_and_has_no_probabilities():
    logits = torch.randn(5, 50)
    ids, probs = choose(logits, sample=False, temperature=1.0)
    assert torch.equal(ids, logits.argmax(-1)) and probs is None
    assert choose_token(logits[2], False, 1.0) == int(logits[2].argmax())


def test_probabilities_are_a_float64_tempered_softmax():
    logits = torch.randn(3, 40)
    probs = probabilities(logits, 0.5)
    assert probs.dtype == torch.float64
    assert torch.allclose(probs, torch.softmax(logits.double() * 2, -1))
    assert torch.allclose(probs.sum(-1), torch.ones(3, dtype=torch.float64))


# Why: a seed must mean one output (the loops' sampled runs are compared by seed), and the
# draws must follow the distribution (a fixed seed: a deterministic test, with a bound
# that a wrong distribution, e.g. an unscaled or float32-underflowed one, exceeds).
def test_draws_follow_the_distribution_and_the_seed():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    rows = probs.expand(20000, 4)
    first = draw(rows, torch.Generator().manual_seed(0))
    again = draw(rows, torch.Generator().manual_seed(0))
    assert first.shape == (20000,) and first.dtype == torch.int64
    assert torch.equal(first, again)
    freq = torch.bincount(first, minlength=4).double() / 20000
    assert torch.allclose(freq, probs, atol=0.015), freq
    assert draw(probs, torch.Generator().manual_seed(1)).dim() == 0  # one row: one id


def test_sampled_choice_and_token_agree_on_a_seed():
    logits = torch.randn(1, 30)
    ids, probs = choose(logits, True, 0.7, torch.Generator().manual_seed(3))
    assert torch.allclose(probs, probabilities(logits, 0.7))
    assert choose_token(logits[0], True, 0.7, torch.Generator().manual_seed(3)) == int(ids[0])


def test_uniform_is_float64_in_the_unit_interval_on_the_generators_device():
    u = torch.stack([uniform(torch.Generator().manual_seed(s)) for s in range(200)])
    assert u.dtype == torch.float64 and u.device.type == "cpu"
    assert bool((u >= 0).all() and (u < 1).all()) and float(u.std()) > 0.2
    assert uniform().dim() == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_host_generator_draws_on_the_host_for_device_probabilities():
    probs = torch.softmax(torch.randn(2, 10, device="cuda"), -1)
    ids = draw(probs, torch.Generator().manual_seed(0))
    assert ids.device.type == "cuda"
    assert torch.equal(ids.cpu(), draw(probs.cpu(), torch.Generator().manual_seed(0)))
