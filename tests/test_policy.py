"""MicroSpec's vocabulary policy (``microspec_compile.policy``): what joins the active set."""
import pytest
import torch

from microspec_compile import policy
from microspec_compile.vocab import ActiveVocab

VOCAB, HIDDEN = 1024, 64


def _vocab(seed=0, capacity=512):
    torch.manual_seed(seed)
    return ActiveVocab(torch.randn(VOCAB, HIDDEN), capacity=capacity)


# Why each case: the fp32 path must be F.linear's own top-k; the bf16 path (CPUs with
# native bf16 products, CUDA) must rank well-separated scores alike, refresh its copy
# after the weight changes in place, and take rows in chunks without changing a row.
@pytest.mark.parametrize("bf16", [False, True])
def test_prompt_top_ids_ranks_as_the_head(bf16, monkeypatch):
    monkeypatch.setattr(policy, "fast_bf16_products", lambda device: bf16)
    torch.manual_seed(0)
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
    hidden = torch.randn(37, HIDDEN)
    ids = policy.prompt_top_ids(head, hidden, 3, rows=8)
    assert ids.shape == (37, 3) and ids.dtype == torch.int64
    expected = head(hidden).topk(3, dim=-1).indices
    if not bf16:
        assert torch.equal(ids, expected)
    # one clear winner per row: bf16 rounding cannot reorder it
    winners = torch.randperm(VOCAB)[:37]
    with torch.no_grad():
        head.weight.mul_(0.01)
        head.weight[winners] = hidden * 10  # in place: the bf16 copy must follow
    assert torch.equal(policy.prompt_top_ids(head, hidden, 1, rows=5)[:, 0], winners)
    with pytest.raises(ValueError, match="k must be >= 1"):
        policy.prompt_top_ids(head, hidden, 0)
    with pytest.raises(ValueError, match=r"hidden must be \[N, 64\]"):
        policy.prompt_top_ids(head, hidden[:, :10], 3)
    with pytest.raises(TypeError, match="float features"):
        policy.prompt_top_ids(head, torch.ones(2, HIDDEN, dtype=torch.int64), 3)


# Why: a request starts from an empty set (nothing of the last request stays), then holds
# exactly the prompt's ids and the target's top-k at every prompt position; k=0 leaves
# the top-k out (the demo's --target-topk 0, measuring what the signal adds).
@pytest.mark.parametrize("k", [0, 3])
def test_observe_prompt_resets_then_adds_the_prompt_and_its_top_k(k, monkeypatch):
    monkeypatch.setattr(policy, "fast_bf16_products", lambda device: False)
    vocab = _vocab()
    vocab.observe(torch.tensor([1000, 1001]))  # the previous request's
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
    prompt = torch.tensor([[5, 17, 17, 900]])
    features = torch.randn(4, HIDDEN)
    policy.observe_prompt(vocab, prompt, head, features, k)
    expected = set(prompt.flatten().tolist())
    if k:
        expected |= set(head(features).topk(k, dim=-1).indices.flatten().tolist())
    assert set(vocab.ids_list()) == expected


# Why: after a verification the set gains the tree's tokens, the emitted ones and the
# target's top-k at every verified position; k=0 still adds each position's argmax
# (the emitted tokens hold it only along the accepted path).
@pytest.mark.parametrize("k", [0, 3])
def test_observe_verified_adds_tree_emitted_and_target_top_k(k):
    vocab = _vocab()
    vocab.reset()
    tree_tokens = torch.tensor([3, 4, 8, 9])
    logits = torch.randn(4, VOCAB)
    emitted = [4, 77]
    policy.observe_verified(vocab, tree_tokens, logits, emitted, k)
    top = logits.topk(max(k, 1), dim=-1).indices.flatten().tolist()
    assert set(vocab.ids_list()) == {3, 4, 8, 9, 77} | set(top)


def test_target_top_ids_is_topk_indices_and_traceable():
    """The observer puts this call in the target's graph: it must trace under
    ``torch.compile`` (fullgraph) and give ``topk``'s indices."""
    logits = torch.randn(2, 5, VOCAB)
    compiled = torch.compile(policy.target_top_ids, backend="eager", fullgraph=True)
    assert torch.equal(compiled(logits, 3), logits.topk(3, dim=-1).indices)
