"""The active vocabulary as an object you hold (``ActiveVocab``), several per head, and the
default vocabulary of a head for the one-line ``torch.compile(draft, backend="microspec")``.

The default's one rule: the first side that needs it (the draft's backend, the observer
given settings, ``vocab_of``) creates it with its settings; a later side that gives other
settings gets a ValueError naming both and the fix (an ``ActiveVocab`` passed to every side).
"""
from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn as nn
from torch._dynamo.utils import counters

import microspec_compile as mc
from microspec_compile.vocab import find_vocab

V, H, EOS = 1200, 32, 2


class Draft(nn.Module):
    """Embedding -> LM head -> logits: observes its own input ids, so sparse from the first call."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, H)
        self.lm_head = nn.Linear(H, V, bias=False)

    def get_output_embeddings(self):  # as HF models
        return self.lm_head

    def forward(self, ids):
        return self.lm_head(self.embed(ids))


class Target(Draft):
    """The same shape; compiled with the observer, its top-3 feed the draft's vocabulary."""


class PlainDraft(nn.Module):
    """Not a Hugging Face model: an untied embedding and a head of the same shape [V, H]."""

    def __init__(self, heads: int = 1):
        super().__init__()
        self.embed = nn.Embedding(V, H)
        self.heads = nn.ModuleList(nn.Linear(H, V, bias=False) for _ in range(heads))

    def forward(self, ids):
        return self.heads[0](self.embed(ids))


def _top3(logits: torch.Tensor) -> set:
    return set(logits.topk(3, dim=-1).indices.flatten().tolist())


@pytest.mark.parametrize("first", ["draft", "target"])
def test_the_backends_settings_make_the_default_in_either_run_order(first):
    torch.manual_seed(0)
    draft, target = Draft().eval(), Target().eval()
    draft.compile(backend=mc.backend(capacity=256, pinned_ids=[EOS]))
    target.compile(backend=mc.observer(draft))  # no settings: it never creates the default
    ids = torch.tensor([[11, 42, 42, 7]])
    counters.clear()
    with torch.no_grad():
        if first == "target":
            target(ids)  # no draft has run: nothing to feed yet, and nothing created
            assert counters["microspec"]["target_calls_before_draft"] == 1
            assert find_vocab(draft) is None
        draft(ids)
        target_logits = target(ids)
    vocab = mc.vocab_of(draft)
    assert vocab.capacity == 256 and vocab.pinned_ids == (EOS,)
    assert {EOS, 11, 42, 7} | _top3(target_logits) <= set(vocab.ids_list())
    vocab.reset()
    assert vocab.ids_list() == [EOS]


def test_the_observers_settings_make_the_default_when_the_target_runs_first():
    torch.manual_seed(0)
    draft, target = Draft().eval(), Target().eval()
    draft.compile(backend="microspec")
    target.compile(backend=mc.observer(draft, capacity=128, pinned_ids=EOS))
    ids = torch.tensor([[5, 6]])
    with torch.no_grad():
        top = _top3(target(ids))
        out = draft(ids)
    vocab = mc.vocab_of(draft)
    assert vocab.capacity == 128 and vocab.pinned_ids == (EOS,)
    active = set(vocab.ids_list())
    assert top | {EOS, 5, 6} == active
    assert torch.isfinite(out).sum(-1).eq(len(active)).all()  # the draft reads what it fed


@pytest.mark.parametrize("setting, backend_value, observer_value, shown", [
    ("capacity", 256, 512, "capacity=256.*capacity=512"),
    ("pinned_ids", [EOS], [3], r"pinned_ids=\[2\].*pinned_ids=\[3\]"),
])
def test_other_settings_for_an_existing_default_name_both_and_the_fix(
        setting, backend_value, observer_value, shown):
    torch.manual_seed(0)
    draft = Draft().eval()
    draft.compile(backend=mc.backend(**{setting: backend_value}))
    with torch.no_grad():
        draft(torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match=shown + ".*ActiveVocab"):
        mc.observer(draft, **{setting: observer_value})
    with pytest.raises(ValueError, match=shown):
        mc.vocab_of(draft, **{setting: observer_value})
    mc.observer(draft, **{setting: backend_value})  # the same settings: fine


def test_a_vocabulary_you_hold_serves_the_backend_and_the_observer():
    torch.manual_seed(0)
    draft, target = Draft().eval(), Target().eval()
    vocab = mc.ActiveVocab(draft.lm_head.weight, capacity=128, pinned_ids=[EOS])
    draft.compile(backend=mc.backend(vocab=vocab))
    target.compile(backend=mc.observer(vocab))
    ids = torch.tensor([[11, 42]])
    with torch.no_grad():
        top = _top3(target(ids))  # the target may run first: the vocabulary exists already
        out = draft(ids)
    assert set(vocab.ids_list()) == top | {EOS, 11, 42}
    assert torch.isfinite(out).sum(-1).eq(vocab.size).all()
    assert find_vocab(draft) is None  # no default vocabulary was made
    with pytest.raises(ValueError, match="give capacity / pinned_ids to ActiveVocab"):
        mc.backend(vocab=vocab, capacity=64)
    with pytest.raises(ValueError, match="give capacity / pinned_ids to ActiveVocab"):
        mc.observer(vocab, pinned_ids=[1])
    with pytest.raises(TypeError, match="ActiveVocab"):
        mc.backend(vocab=draft.lm_head.weight)


def test_a_vocabulary_of_another_weight_is_refused():
    torch.manual_seed(0)
    draft, other = Draft().eval(), Draft().eval()
    compiled = torch.compile(draft, backend=mc.backend(vocab=mc.ActiveVocab(other.lm_head.weight)))
    for _ in range(2):  # a ValueError, not Dynamo's BackendCompilerFailed, on every call
        with pytest.raises(ValueError, match="belongs to another LM-head weight"), \
                torch.no_grad():
            compiled(torch.tensor([[1]]))


def test_the_observer_feeds_the_head_of_a_plain_draft_not_its_embedding():
    """The silent split of issue 33: the vocabulary went to the untied embedding's weight."""
    torch.manual_seed(0)
    draft, target = PlainDraft().eval(), PlainDraft().eval()
    draft.compile(backend=mc.backend(capacity=512))
    target.compile(backend=mc.observer(draft, capacity=512))
    ids = torch.tensor([[11, 42]])
    with torch.no_grad():
        top = _top3(target(ids))  # the target first: the observer creates the default
        out = draft(ids)
    vocab = mc.vocab_of(draft)
    assert vocab.belongs_to(draft.heads[0].weight)
    assert not vocab.belongs_to(draft.embed.weight)
    assert top <= set(vocab.ids_list())
    assert torch.isfinite(out[..., sorted(top)]).all()  # the sparse head scores them
    other = PlainDraft().eval()
    other.compile(backend=mc.backend(capacity=1024))
    mc.observer(other, capacity=512)  # nothing exists yet: no conflict to see
    with torch.no_grad():
        other(ids)  # the backend makes the default with 1024
    with pytest.raises(ValueError, match="capacity=1024.*capacity=512"):
        mc.observer(other, capacity=512)


def test_a_draft_whose_head_cannot_be_told_is_a_clear_error():
    with pytest.raises(LookupError, match=r"2 Linear layers .*ActiveVocab\(head.weight"):
        mc.observer(PlainDraft(heads=2))
    with pytest.raises(LookupError, match="no Linear layer"):
        mc.vocab_of(nn.Sequential(nn.Embedding(V, H)))


def test_one_compiled_head_serves_several_vocabularies():
    torch.manual_seed(0)
    head = nn.Linear(H, V, bias=False)
    compiled = torch.compile(head, backend="microspec")
    first, second = mc.ActiveVocab(head.weight, 64), mc.ActiveVocab(head.weight, 64)
    first.observe(torch.tensor([1, 2]))
    second.observe(torch.tensor([3]))
    x = torch.randn(2, H)
    counters.clear()
    with torch.no_grad():
        for _ in range(2):
            with mc.using(first):
                a = compiled(x)
            with mc.using(second):
                b = compiled(x)
    assert torch.isfinite(a).nonzero()[:, 1].unique().tolist() == [1, 2]
    assert torch.isfinite(b).nonzero()[:, 1].unique().tolist() == [3]
    assert counters["microspec"]["heads_rewritten"] == 1  # one graph for both
    assert counters["microspec"]["sparse_calls"] == 4
    assert find_vocab(head) is None  # the binding served the compile too
    default = mc.vocab_of(head, capacity=64)  # outside using: the head's default, not `second`
    default.observe(torch.tensor([9]))
    with torch.no_grad():
        assert torch.isfinite(compiled(x)).nonzero()[:, 1].unique().tolist() == [9]
    first.reset()
    assert second.ids_list() == [3]  # one request's reset leaves the other alone
    with pytest.raises(ValueError, match="capacity 64, and a vocabulary of capacity 32"), \
            torch.no_grad(), mc.using(mc.ActiveVocab(head.weight, 32)):
        compiled(x)
    with pytest.raises(TypeError, match="ActiveVocab"):
        with mc.using(head.weight):
            pass


def test_a_default_vocabulary_does_not_keep_its_model_alive():
    draft = Draft().eval()
    vocab = mc.vocab_of(draft, capacity=64)
    vocab.observe(torch.tensor([5]))
    weight = weakref.ref(draft.lm_head.weight)
    del draft
    gc.collect()
    assert weight() is None
    with pytest.raises(ValueError, match="was freed"):
        vocab.observe(torch.tensor([6]))


def test_settings_are_checked_where_they_are_given():
    weight = torch.randn(V, H)
    with pytest.raises(ValueError, match="capacity must be an int >= 1"):
        mc.ActiveVocab(weight, capacity=-5)
    with pytest.raises(ValueError, match="out of range"):
        mc.ActiveVocab(weight, pinned_ids=[V])
    with pytest.raises(ValueError, match="do not fit"):
        mc.ActiveVocab(weight, capacity=1, pinned_ids=[1, 2])
    with pytest.raises(ValueError, match="2-D"):
        mc.ActiveVocab(weight[0])
    assert mc.ActiveVocab(weight, pinned_ids=EOS).pinned_ids == (EOS,)  # one int is one id
    head = nn.Linear(H, V, bias=False)
    assert mc.vocab_of(head, pinned_ids=0).pinned_ids == (0,)  # id 0 is an id (EOS in some)
    assert mc.vocab_of(head, pinned_ids=[0]).ids_list() == [0]
    assert mc.ActiveVocab(weight, capacity=10 * V).capacity == V


# -- the documented Hugging Face pattern, in either order -------------------------------

def _tiny_llama(layers: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=64,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=128, eos_token_id=EOS)
    return LlamaForCausalLM(config).eval()


@pytest.mark.hf_inductor_cpu
@pytest.mark.parametrize("first", ["draft", "target"])
def test_hf_assisted_generation_with_pins_in_either_order(first):
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


@pytest.mark.hf_inductor_cpu
def test_assisted_sets_up_the_pair_in_one_call_and_a_wrapped_draft_is_said():
    """Issue 36, point 2: one call compiles both models in place with the settings that
    keep them compiled; a draft compiled by torch.compile's wrapper (generate() then runs
    the uncompiled module) gets a warning instead of silence."""
    target, draft = _tiny_llama(2, seed=0), _tiny_llama(1, seed=1)
    with torch._dynamo.config.patch(recompile_limit=8):  # restored afterwards
        _assisted_pair(target, draft)


def _assisted_pair(target, draft):
    vocab = mc.assisted(target, draft)
    assert torch._dynamo.config.recompile_limit >= 16 and vocab.pinned_ids == (EOS,)
    prompt = torch.randint(3, V, (1, 8))
    rewritten, sparse = counters["microspec"]["heads_rewritten"], counters["microspec"]["sparse_calls"]
    with torch.no_grad():
        expected = target.generate(prompt, max_new_tokens=10, do_sample=False)
        got = target.generate(prompt, assistant_model=draft, max_new_tokens=10, do_sample=False)
    assert torch.equal(got, expected)
    assert counters["microspec"]["heads_rewritten"] > rewritten
    assert counters["microspec"]["sparse_calls"] > sparse and vocab.size > 1
    with pytest.raises(TypeError, match="OptimizedModule"):
        mc.assisted(target, torch.compile(draft))

    with pytest.raises(ValueError, match="give capacity / pinned_ids to ActiveVocab"):
        mc.assisted(target, draft, vocab=vocab, capacity=64)
    wrapped = torch.compile(draft, backend=mc.backend(pinned_ids=[EOS]))  # not in place
    with pytest.warns(UserWarning, match=r"OptimizedModule.*runs the \*uncompiled\* module"):
        mc.observer(wrapped)
