"""The EAGLE training pipeline's parts on a tiny Llama target (CPU, seconds)."""
import math

import pytest
import torch
from test_eagle_tree import VOCAB, oracle_head, tiny_target

from microspec_compile.heads import EagleHead
from microspec_compile.train.corpus import Sequence, held_out_texts, training_prompts
from microspec_compile.train.evaluate import head_agreement
from microspec_compile.train.features import FeatureSet, compute_features, target_features
from microspec_compile.train.pipeline import frequent_ids
from microspec_compile.train.trainer import TrainConfig, batch_tensors, make_batches, train


def sequences(n=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 8 + 5 * i
        out.append(Sequence(torch.randint(0, VOCAB, (length,), generator=gen), 3 + i % 3))
    return out


def test_features_batched_equal_one_by_one():
    target = tiny_target()
    seqs = sequences()
    fs = compute_features(target, seqs, autocast=False, token_budget=64)  # several batches
    assert len(fs) == len(seqs) and fs.features.dtype == torch.float16
    for s, seq in enumerate(seqs):
        ids, feats, prompt_len = fs.sequence(s)
        assert torch.equal(ids, seq.ids) and prompt_len == seq.prompt_len
        alone = target_features(target, seq.ids.view(1, -1))[0]
        torch.testing.assert_close(feats.float(), alone, atol=2e-3, rtol=2e-3)


def test_feature_set_save_load_concat(tmp_path):
    target = tiny_target()
    a = compute_features(target, sequences(3, 0), autocast=False)
    b = compute_features(target, sequences(2, 1), autocast=False)
    both = FeatureSet.concat([a, b])
    both.save(tmp_path / "f.pt")
    loaded = FeatureSet.load(tmp_path / "f.pt")
    assert len(loaded) == 5 and torch.equal(loaded.sequence(3)[0], b.sequence(0)[0])
    assert loaded.answer_tokens() == a.answer_tokens() + b.answer_tokens()
    picked = loaded.select([4, 0])
    assert len(picked) == 2 and picked.answer_tokens() == sum(
        int(loaded.lengths()[s] - loaded.prompt_lens[s]) for s in (4, 0))
    for new, old in ((0, 4), (1, 0)):
        for x, y in zip(picked.sequence(new), loaded.sequence(old)):
            assert torch.equal(torch.as_tensor(x), torch.as_tensor(y))


def test_batches_cover_every_sequence_within_budget():
    lengths = torch.tensor([5, 40, 12, 33, 7, 64, 9])
    batches = make_batches(lengths, token_budget=70, epoch=0, seed=1)
    assert sorted(s for b in batches for s in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or max(int(lengths[s]) for s in b) * len(b) <= 70
    assert batches == make_batches(lengths, 70, 0, 1)  # deterministic
    assert batches != make_batches(lengths, 70, 1, 1) or len(batches) == 1  # reshuffled


def test_batch_pairs_and_loss_mask():
    target = tiny_target()
    seqs = [Sequence(torch.arange(10), 4), Sequence(torch.arange(20, 26), 5)]
    fs = compute_features(target, seqs, autocast=False)
    tokens, inputs, targets, positions, mask = batch_tensors(fs, [0, 1])
    # pair i = (f_i, x_{i+1}) predicts f_{i+1}
    assert tokens[0].tolist() == list(range(1, 10))
    torch.testing.assert_close(inputs[0, 3], fs.sequence(0)[1][3].float())
    torch.testing.assert_close(targets[0, 3], fs.sequence(0)[1][4].float())
    # the loss covers pairs predicting answer tokens (x_{i+2}, i + 2 >= prompt_len), no padding
    assert mask[0].tolist() == [False, False] + [True] * 7
    assert mask[1].tolist() == [False, False, False, True, True] + [False] * 4
    assert positions[1].tolist() == list(range(9))


def test_training_lowers_loss_and_resumes_exactly(tmp_path):
    target = tiny_target()
    fs = compute_features(target, sequences(8), autocast=False)
    cfg = TrainConfig(lr=3e-3, warmup_steps=2, token_budget=128, autocast=False, save_every_s=0.0)

    torch.manual_seed(0)
    straight = EagleHead.for_target(target)
    first = train(straight, fs, tmp_path / "a", seconds=math.inf, config=cfg, steps=12)
    losses = [h[0] for h in torch.load(tmp_path / "a" / "checkpoint.pt",
                                       weights_only=False)["state"]["history"]]
    assert first["steps"] == 12 and sum(losses[-3:]) < sum(losses[:3])

    def interrupt(step, total, loss, agree):
        if step == 5:
            raise KeyboardInterrupt  # killed mid-run: the last checkpoint is after step 4

    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        train(EagleHead.for_target(target), fs, tmp_path / "b", seconds=math.inf, config=cfg,
              steps=12, progress=interrupt)
    torch.manual_seed(123)  # a fresh process: other initial weights, overwritten on resume
    again = EagleHead.for_target(target)
    assert train(again, fs, tmp_path / "b", seconds=math.inf, config=cfg, steps=12)["steps"] == 12
    for key, value in straight.trainable_state().items():
        torch.testing.assert_close(again.trainable_state()[key], value, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="another training configuration"):
        train(again, fs, tmp_path / "b", seconds=math.inf, config=TrainConfig(lr=1.0), steps=12)


def test_agreement_of_an_oracle_head_is_one():
    target = tiny_target(bigram=True)
    seqs = sequences(3)
    assert head_agreement(target, oracle_head(target), seqs)["agreement"] == 1.0
    random_head = EagleHead.for_target(target)
    assert head_agreement(target, random_head, seqs)["agreement"] < 0.2


def test_frequent_ids_most_frequent_first():
    tokens = torch.tensor([5, 5, 5, 2, 2, 9, 1])
    assert frequent_ids(tokens, 10, 0.3).tolist() == [5, 2, 1]  # tie 1 vs 9: lower id first


def test_evaluation_prompts_are_held_out_of_training():
    held = held_out_texts()
    assert len(held) > 200  # MT-bench turns and HumanEval prompts
    pairs = training_prompts(30)
    assert len(pairs) == 30
    assert not any(" ".join(user.split()).lower() in held for user, _ in pairs)


LIBRARY_MODULE = '''import os
import re


def documented(path, limit=3):
    """Return the first lines of path."""
    with open(path) as f:
        return f.readlines()[:limit]


class Box:
    def size(self):
        """The box's size."""
        width = self.width
        return width * self.height

    def undocumented(self):
        return 1


def only_docstring():
    """Nothing after the docstring: no body to learn from."""
'''


def test_stdlib_functions_cut_after_the_docstring(tmp_path):
    from microspec_compile.train.code_corpus import stdlib_functions

    (tmp_path / "mod.py").write_text(LIBRARY_MODULE)
    (tmp_path / "broken.py").write_text("def f(:\n")  # unparsable files are skipped
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "test_mod.py").write_text(LIBRARY_MODULE)  # test suites left out
    functions = dict(stdlib_functions(10, root=tmp_path))
    assert len(functions) == 2  # documented() and Box.size; the others lack a doc or a body
    header = next(h for h in functions if "def size" in h)
    assert header.startswith("import os\nimport re\n\n\ndef size(self):")  # method dedented
    assert header.endswith('"""The box\'s size."""\n')
    assert functions[header] == "    width = self.width\n    return width * self.height\n"
    first, rest = stdlib_functions(1, root=tmp_path), stdlib_functions(5, skip=1, root=tmp_path)
    assert len(rest) == 1 and first[0] != rest[0]  # disjoint slices


class CharTokenizer:
    """One token per character: enough to check where sequences are cut."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) for c in text]}


def test_code_sequences_loss_starts_after_the_header():
    from microspec_compile.train.code_corpus import code_sequences

    header, body = "def add(a, b):\n    \"\"\"Sum.\"\"\"\n", "    return a + b\n"
    long_header = "#" * 300 + "\n" + header
    seqs = code_sequences(CharTokenizer(), [(header, body), (long_header, body)], max_len=40)
    assert len(seqs) == 1  # a header over max_prompt (256) tokens is skipped
    (seq,) = seqs
    assert seq.prompt_len == len(header) and len(seq.ids) == 40  # cut to max_len
    assert "".join(map(chr, seq.ids.tolist())) == (header + body)[:40]


def test_agreement_by_group_weights_by_positions():
    from microspec_compile.train.evaluate import agreement_by_group

    quality = {"per_sequence": [1.0, 0.0, 0.5], "per_sequence_positions": [3, 1, 4]}
    groups = agreement_by_group(["mtbench/1", "mtbench/2", "HumanEval/0"], quality)
    assert groups == {"mtbench": 0.75, "HumanEval": 0.5}
