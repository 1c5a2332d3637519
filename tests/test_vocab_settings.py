"""One vocabulary, several sides: the draft's backend, the target's observer and vocab_of.

Settings that two sides give must agree (a ValueError naming the setting and both
values); a setting one side leaves out never conflicts, and the given value wins
whichever side compiles (first runs) first.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch._dynamo.utils import counters

import microspec_compile as mc
from microspec_compile.config import DEFAULT_CAPACITY
from microspec_compile.kernels.state import PINNED

V, H, EOS = 1200, 32, 2


class Draft(nn.Module):
    """Embedding -> LM head -> logits: observes its own input ids, so sparse from the first call."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, H)
        self.lm_head = nn.Linear(H, V, bias=False)

    def get_output_embeddings(self):  # as HF models: how observer / vocab_of find the head
        return self.lm_head

    def forward(self, ids):
        return self.lm_head(self.embed(ids))


class Target(Draft):
    """The same shape; compiled with the observer, its top-3 feed the draft's vocabulary."""


def _error(exc: BaseException) -> BaseException:
    """The ValueError itself, or the one Dynamo wrapped (BackendCompilerFailed)."""
    return getattr(exc, "inner_exception", exc)


def _setup(draft_config: dict, observer_config: dict):
    torch.manual_seed(0)
    draft, target = Draft().eval(), Target().eval()
    draft.compile(backend=mc.backend(**draft_config))
    target.compile(backend=mc.observer(draft, **observer_config))
    return draft, target


def _run(first: str, draft, target, ids):
    order = (draft, target) if first == "draft" else (target, draft)
    with torch.no_grad():
        return [model(ids) for model in order]


# -- settings given on one side only: the given value wins, in either order -----------

@pytest.mark.parametrize("first", ["draft", "target"])
@pytest.mark.parametrize("side", ["backend", "observer"])
def test_a_setting_given_on_one_side_wins_in_either_order(side, first):
    given = dict(capacity=256, pinned_ids=[EOS])
    draft, target = _setup(given if side == "backend" else {}, given if side == "observer" else {})
    ids = torch.tensor([[11, 42, 42, 7]])
    outs = _run(first, draft, target, ids)
    target_logits = outs[1] if first == "draft" else outs[0]
    draft_logits = outs[0] if first == "draft" else outs[1]
    vocab = mc.vocab_of(draft)
    assert vocab.capacity == 256 and vocab.state().capacity == 256
    assert vocab.pinned_ids == (EOS,) and vocab.capacity_given and vocab.pins_given
    active = set(vocab.ids_list())
    assert {EOS, 11, 42, 7} <= active
    assert set(target_logits.topk(3, dim=-1).indices.flatten().tolist()) <= active  # kept
    if first == "draft":  # the draft's first call saw its ids and the pin, not yet the target's
        assert torch.isfinite(draft_logits).sum(-1).eq(4).all()
    else:  # reallocated before the draft's graph took the state: the target's top-3 moved over
        assert torch.isfinite(draft_logits).sum(-1).eq(len(active)).all()
    vocab.reset()
    assert vocab.ids_list() == [EOS]  # pins adopted late survive a reset


def test_nothing_given_anywhere_is_the_default():
    draft, target = _setup({}, {})
    _run("target", draft, target, torch.tensor([[5, 6]]))
    vocab = mc.vocab_of(draft)
    assert vocab.capacity == min(DEFAULT_CAPACITY, V) and vocab.pinned_ids == ()
    assert not vocab.capacity_given and not vocab.pins_given


def test_vocab_of_before_compiling_leaves_settings_to_the_backend():
    torch.manual_seed(0)
    draft = Draft().eval()
    vocab = mc.vocab_of(draft)  # nothing given: the defaults, for now
    vocab.observe(torch.tensor([100, 200, 300]))
    draft.compile(backend=mc.backend(capacity=64, pinned_ids=[EOS]))
    with torch.no_grad():
        draft(torch.tensor([[9]]))
    assert mc.vocab_of(draft) is vocab and vocab.capacity == 64
    assert set(vocab.ids_list()) == {EOS, 9, 100, 200, 300}


# -- settings given on both sides must agree -----------------------------------------

@pytest.mark.parametrize("first", ["draft", "target"])
@pytest.mark.parametrize("setting, draft_value, target_value", [
    ("capacity", 256, 512),
    ("pinned_ids", [EOS], [3]),
])
def test_settings_given_on_both_sides_must_agree(setting, draft_value, target_value, first):
    draft, target = _setup({setting: draft_value}, {setting: target_value})
    with pytest.raises(Exception) as info:
        _run(first, draft, target, torch.tensor([[11, 42]]))
    error = _error(info.value)
    assert isinstance(error, ValueError)
    # the observer, configured first, asked for target_value; the backend asks for draft_value
    assert f"{setting}" in str(error)
    shown = (str(target_value) if setting == "pinned_ids" else f"capacity {target_value}",
             f"{setting}={draft_value}")
    assert all(part in str(error) for part in shown), str(error)


def test_settings_given_on_both_sides_that_agree_are_fine():
    draft, target = _setup(dict(capacity=128, pinned_ids=[EOS, 0]),
                           dict(capacity=128, pinned_ids=[0, EOS]))
    _run("target", draft, target, torch.tensor([[11, 42]]))
    vocab = mc.vocab_of(draft)
    assert vocab.capacity == 128 and set(vocab.pinned_ids) == {0, EOS}


def test_observer_after_the_draft_ran_may_not_change_its_capacity():
    """Given after a compiled graph took the state: too late, and said so."""
    torch.manual_seed(0)
    draft = Draft().eval()
    draft.compile(backend=mc.backend())  # capacity left out: the default
    with torch.no_grad():
        draft(torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match=r"default capacity 1200; capacity=512 .*too late"):
        mc.observer(draft, capacity=512)
    mc.observer(draft, pinned_ids=[EOS])  # pins can still be added: in place
    assert EOS in mc.vocab_of(draft).ids_list()


def test_direct_merge_keeps_pins_and_the_most_recent_ids():
    weight = torch.randn(V, H)
    vocab = mc.vocab.vocab_for_weight(weight)  # all defaults
    vocab.observe(torch.tensor([7]), pin=True)  # pinned by hand: kept as a pin too
    for token in range(100, 140):
        vocab.observe(torch.tensor([token]))
    vocab.merge(capacity=11, pinned_ids=[EOS])
    assert vocab.capacity == 11 and vocab.pinned_ids == (EOS,)
    ids = vocab.ids_list()
    assert sorted(ids) == sorted([7, EOS, *range(131, 140)])  # 9 most recent + 2 pins
    seen = vocab.last_seen[: vocab.size]
    assert int((seen == PINNED).sum()) == 2
    torch.testing.assert_close(vocab.rows[: vocab.size], weight[vocab.ids[: vocab.size]])
    assert mc.vocab.vocab_for_weight(weight) is vocab
    with pytest.raises(ValueError, match="capacity 11; capacity=12"):
        vocab.merge(capacity=12)
    with pytest.raises(ValueError, match=r"pinned_ids=\[2\]; pinned_ids=\[5\]"):
        vocab.merge(pinned_ids=[5])
    vocab.merge(capacity=11, pinned_ids=[EOS])  # the same again: fine
    vocab.merge(pinned_ids=[])  # empty: nothing asked for
    with pytest.raises(ValueError, match="do not fit"):
        mc.vocab.vocab_for_weight(torch.randn(V, H)).merge(capacity=1, pinned_ids=[1, 2])


# -- the documented Hugging Face pattern, in either compile order ----------------------

def _tiny_llama(layers: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=64,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=128, eos_token_id=EOS)
    return LlamaForCausalLM(config).eval()


@pytest.mark.hf_inductor_cpu
@pytest.mark.parametrize("first", ["draft", "target"])
def test_hf_assisted_generation_with_pins_in_either_compile_order(first):
    """README's pattern: pins (and a capacity) on the draft only, the observer with none."""
    target, draft = _tiny_llama(2, seed=0), _tiny_llama(1, seed=1)
    order = []
    draft.register_forward_pre_hook(lambda *_: order.append("draft"))
    target.register_forward_pre_hook(lambda *_: order.append("target"))
    draft.compile(backend=mc.backend(pinned_ids=[EOS], capacity=256))
    target.compile(backend=mc.observer(draft))
    prompt = torch.randint(3, V, (1, 8))
    rewritten = counters["microspec"]["heads_rewritten"]
    args = dict(max_new_tokens=12, do_sample=False)
    with torch.no_grad():
        if first == "draft":  # generate() calls the draft before the target
            got = target.generate(prompt, assistant_model=draft, **args)
            expected = target.generate(prompt, **args)
        else:
            expected = target.generate(prompt, **args)
            got = target.generate(prompt, assistant_model=draft, **args)
    assert order[0] == first
    assert torch.equal(got, expected)
    assert counters["microspec"]["heads_rewritten"] - rewritten > 0
    vocab = mc.vocab_of(draft)
    assert vocab.capacity == 256 and vocab.pinned_ids == (EOS,) and EOS in vocab.ids_list()
