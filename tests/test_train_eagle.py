"""The EAGLE training pipeline's parts on a tiny Llama target (CPU, seconds)."""
import math

import pytest
import torch
from test_eagle_tree import VOCAB, oracle_head, tiny_target

from microspec_compile.apps.train.corpus import Sequence, held_out_texts, training_prompts
from microspec_compile.apps.train.evaluate import head_agreement
from microspec_compile.apps.train.features import FeatureSet, compute_features, target_features
from microspec_compile.apps.train.pipeline import frequent_ids
from microspec_compile.apps.train.trainer import TrainConfig, batch_tensors, make_batches, train
from microspec_compile.heads import EagleHead


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


# ce_vocab: the cross-entropy over some rows of the vocabulary (the batch's + frequent ones)
@pytest.mark.parametrize("ce_vocab", [0, 300])
def test_training_lowers_loss_and_resumes_exactly(tmp_path, ce_vocab):
    target = tiny_target()
    fs = compute_features(target, sequences(8), autocast=False)
    cfg = TrainConfig(lr=3e-3, warmup_steps=2, token_budget=128, autocast=False, save_every_s=0.0,
                      ce_vocab=ce_vocab)

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
    with pytest.raises(ValueError, match=r"another training configuration \(lr: 0.003 there"):
        train(again, fs, tmp_path / "b", seconds=math.inf, config=TrainConfig(lr=1.0,
              autocast=False, token_budget=128, warmup_steps=2, save_every_s=0.0,
              ce_vocab=ce_vocab), steps=12)


def test_training_walks_epochs_of_different_batch_counts(tmp_path):
    # each epoch packs its shuffled length buckets anew, so an epoch can hold fewer batches
    # than the first (a 32-minute run once stopped with an IndexError at such an epoch)
    target = tiny_target()
    fs = compute_features(target, sequences(8), autocast=False)
    cfg = TrainConfig(lr=1e-3, warmup_steps=2, token_budget=96, autocast=False,
                      save_every_s=math.inf)
    counts = [len(make_batches(fs.lengths(), cfg.token_budget, e, cfg.seed)) for e in range(4)]
    assert min(counts[1:]) < counts[0]  # the case this test is about
    steps = sum(counts)
    out = train(EagleHead.for_target(target), fs, tmp_path, seconds=math.inf, config=cfg,
                steps=steps)
    assert out["steps"] == steps and out["epochs"] == pytest.approx(4.0)


@pytest.mark.parametrize("faster", [True, False])  # an AMX / AVX512-BF16 CPU, an AVX2 one
def test_bf16_only_where_this_cpu_runs_it_faster(tmp_path, monkeypatch, faster):
    # an emulated bf16 (AVX2: measured 8x slower than fp32) must not slow training down
    from microspec_compile.apps.train import corpus, features, precision, trainer

    for module in (precision, corpus, features, trainer):
        monkeypatch.setattr(module, "bf16_is_faster", lambda: faster)
    target = tiny_target()
    seqs = sequences(3)
    autocast_runs = []
    real = features.target_features
    monkeypatch.setattr(features, "target_features",
                        lambda t, ids, autocast: autocast_runs.append(autocast) or real(t, ids))
    features.compute_features(target, seqs)
    assert set(autocast_runs) == {faster}
    fs = compute_features(target, seqs, autocast=False)
    cfg = TrainConfig(lr=1e-3, warmup_steps=1, token_budget=128, save_every_s=0.0)
    assert train(EagleHead.for_target(target), fs, tmp_path, seconds=math.inf, config=cfg,
                 steps=2)["autocast"] is faster
    dtypes = []
    monkeypatch.setattr(type(target), "generate", lambda self, **kw: dtypes.append(self.dtype)
                        or torch.cat([kw["input_ids"], kw["input_ids"][:, :2]], 1))
    corpus.regenerate(target, _Tokenizer(), [[1, 2, 3]], max_new_tokens=2)
    assert dtypes == [torch.bfloat16 if faster else torch.float32]


class _Tokenizer:
    eos_token_id, pad_token_id = 0, 0


def test_bf16_measurement_answers_a_bool():
    from microspec_compile.apps.train.precision import bf16_is_faster

    assert isinstance(bf16_is_faster(), bool) and bf16_is_faster() is bf16_is_faster()  # cached


def test_agreement_of_an_oracle_head_is_one():
    target = tiny_target(bigram=True)
    seqs = sequences(3)
    oracle = head_agreement(target, oracle_head(target), seqs)
    # the oracle reads only the token, so its own features cost it nothing at depth 2
    assert oracle["agreement"] == 1.0 and oracle["depth2_agreement"] == 1.0
    random_head = head_agreement(target, EagleHead.for_target(target), seqs)
    assert random_head["agreement"] < 0.2 and random_head["depth2_agreement"] < 0.2


def test_frequent_ids_most_frequent_first():
    tokens = torch.tensor([5, 5, 5, 2, 2, 9, 1])
    assert frequent_ids(tokens, 10, 3).tolist() == [5, 2, 1]  # tie 1 vs 9: lower id first


def test_evaluation_prompts_are_held_out_of_training():
    held = held_out_texts()
    assert len(held) > 200  # MT-bench turns and HumanEval prompts
    pairs = training_prompts(30)
    assert len(pairs) == 30
    assert training_prompts(0) == []  # --original-prompts 0: none (it once gave one)
    assert not any(" ".join(user.split()).lower() in held for user, _ in pairs)


def test_regen_skip_answers_prompts_past_the_earlier_ones():
    # a fine-tuning run with --regen-skip N must regenerate prompts the earlier head never saw
    first = training_prompts(10)
    later = training_prompts(10, skip=200)  # conversations, not pairs: far past the first 10
    assert len(later) == 10 and not set(later) & set(first)
    from microspec_compile.apps.train.pipeline import PipelineConfig

    with pytest.raises(ValueError, match="regen_skip must be >= 0"):
        PipelineConfig(regen_skip=-1)


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
    from microspec_compile.apps.train.code_corpus import stdlib_functions

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
    from microspec_compile.apps.train.code_corpus import code_sequences

    header, body = "def add(a, b):\n    \"\"\"Sum.\"\"\"\n", "    return a + b\n"
    long_header = "#" * 300 + "\n" + header
    seqs = code_sequences(CharTokenizer(), [(header, body), (long_header, body)], max_len=40)
    assert len(seqs) == 1  # a header over max_prompt (256) tokens is skipped
    (seq,) = seqs
    assert seq.prompt_len == len(header) and len(seq.ids) == 40  # cut to max_len
    assert "".join(map(chr, seq.ids.tolist())) == (header + body)[:40]


def test_agreement_by_group_weights_by_positions():
    from microspec_compile.apps.train.evaluate import agreement_by_group

    quality = {"per_sequence": [1.0, 0.0, 0.5], "per_sequence_positions": [3, 1, 4]}
    groups = agreement_by_group(["mtbench/1", "mtbench/2", "HumanEval/0"], quality)
    assert groups == {"mtbench": 0.75, "HumanEval": 0.5}


def test_rollout_is_what_a_depth_one_tree_node_computes():
    # the training-time test must train exactly the computation the drafter runs at depth 1:
    # committed pairs 0..i-1 in the cache, then node (own prediction h_{i-1}, x_{i+1}) at i
    from transformers import DynamicCache

    from microspec_compile.spec.tree import causal_mask

    target = tiny_target()
    torch.manual_seed(3)
    head = EagleHead.for_target(target).eval()
    length, hidden_size = 9, head.config.hidden_size
    tokens = torch.randint(0, VOCAB, (1, length))
    feats = torch.randn(1, length, hidden_size)
    positions = torch.arange(length).view(1, -1)
    with torch.inference_mode():
        cache = DynamicCache(config=head.attention_config)
        hidden = head.hidden(tokens, feats, positions, cache=cache)
        deeper = head.rollout_hidden(tokens, hidden, positions, cache)
        assert deeper.shape == (1, length - 1, hidden_size)
        for i in (1, 4, length - 1):
            drafter_cache = DynamicCache(config=head.attention_config)
            prefix = head.hidden(tokens[:, :i], feats[:, :i], positions[:, :i],
                                 causal_mask(0, i), drafter_cache)
            node = head.hidden(tokens[:, i:i + 1], prefix[:, -1:], positions[:, i:i + 1],
                               causal_mask(i, 1), drafter_cache)
            torch.testing.assert_close(deeper[:, i - 1], node[:, 0], atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="rollout_hidden needs"):
            head.rollout_hidden(tokens[:, :4], hidden[:, :4], positions[:, :4], cache)


def test_rollout_training_lowers_both_losses_and_old_checkpoints_resume(tmp_path):
    from microspec_compile.apps.train.trainer import eagle_loss

    target = tiny_target()
    fs = compute_features(target, sequences(8), autocast=False)
    cfg = TrainConfig(lr=3e-3, warmup_steps=2, token_budget=128, autocast=False, save_every_s=0.0,
                      rollout_weight=1.0)
    torch.manual_seed(0)
    head = EagleHead.for_target(target)
    batch = batch_tensors(fs, list(range(8)))

    def losses():
        with torch.no_grad():
            plain = eagle_loss(head, *batch, noise=0.0, ce_weight=0.1)[0]
            both = eagle_loss(head, *batch, noise=0.0, ce_weight=0.1, rollout_weight=1.0)[0]
        return float(plain), float(both) - float(plain)  # depth-1 loss, depth-2 loss

    with pytest.raises(ValueError, match="rollout_weight must be >= 0"):
        TrainConfig(rollout_weight=-0.5)
    before = losses()
    assert before[1] > 0
    train(head, fs, tmp_path, seconds=math.inf, config=cfg, steps=15)
    after = losses()
    assert after[0] < before[0] and after[1] < before[1]
    # a checkpoint written before rollout_weight existed resumes under the default (0)
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    del saved["config"]["rollout_weight"]
    torch.save(saved, tmp_path / "checkpoint.pt")
    old = dict(cfg.__dict__, rollout_weight=0.0)
    assert train(head, fs, tmp_path, seconds=math.inf, config=TrainConfig(**old),
                 steps=15)["steps"] == 15


def test_model_card_states_data_training_and_both_agreements(tmp_path):
    from dataclasses import asdict

    from microspec_compile.apps.train.pipeline import PipelineConfig, write_model_card

    training = {**asdict(TrainConfig(rollout_weight=0.5)), "steps": 10, "epochs": 1.5,
                "tokens": 1000, "seconds": 60.0, "last_agreement": 0.4, "last_loss": 0.7}
    report = {"data": {"regenerated_answers": 3, "regenerated_answer_tokens": 30,
                       "original_answers": 2, "original_answer_tokens": 20,
                       "sequence_tokens": 80},
              "pipeline": asdict(PipelineConfig()), "training": training,
              "held_out": {"prompts": ["mtbench/1", "humaneval/2"], "positions": 50,
                           "agreement": 0.41, "by_group": {"mtbench": 0.5},
                           "depth2_agreement": 0.27},
              "hardware": {"cpu_model": "some CPU", "cpus": 2, "torch": "2.x"},
              "initialised_from": None}
    write_model_card(tmp_path / "card.md", report)
    card = (tmp_path / "card.md").read_text()
    assert "**0.410**" in card and "**0.270**" in card and "mtbench: 0.500" in card
    assert "0.5 x the same loss one step deeper" in card and "--rollout-weight 0.5" in card
    # the reproduce line names every pipeline setting that differs from the defaults
    assert "--generate-minutes" not in card
    report["pipeline"] = {**asdict(PipelineConfig()), "regen_skip": 1230, "generate_minutes": 14.0}
    write_model_card(tmp_path / "card.md", report)
    card = (tmp_path / "card.md").read_text()
    assert "--regen-skip 1230 " in card and "--generate-minutes 14.0 " in card
    assert "(after the first 1230)" in card and "--ce-weight" not in card
    training["ce_weight"] = 1.0
    write_model_card(tmp_path / "card.md", report)
    assert "--ce-weight 1.0" in (tmp_path / "card.md").read_text()
    # code the target continued is listed even without code trained on with its own bodies
    report["data"].update({"code-regenerated_answers": 4, "code-regenerated_answer_tokens": 40,
                           "code-original_answers": 0, "code-original_answer_tokens": 0})
    write_model_card(tmp_path / "card.md", report)
    assert "continued by the target from their docstring" in (tmp_path / "card.md").read_text()
    # fine-tuned twice: both earlier stages are listed, newest first
    stage = {"held_out": {"agreement": 0.3}, "training": training, "data": {"sequence_tokens": 9}}
    report["initialised_from"] = {**stage, "initialised_from": {
        **stage, "held_out": {"agreement": 0.2}, "initialised_from": None}}
    write_model_card(tmp_path / "card.md", report)
    card = (tmp_path / "card.md").read_text()
    assert card.index("earlier head (0.300") < card.index("earlier head (0.200")
    training["rollout_weight"] = 0.0
    report["initialised_from"] = None
    del report["held_out"]["depth2_agreement"]
    write_model_card(tmp_path / "card.md", report)
    card = (tmp_path / "card.md").read_text()
    assert "one step deeper" not in card and "--rollout-weight" not in card


def test_ce_rows_take_the_batch_then_the_most_frequent():
    from microspec_compile.apps.train.trainer import ce_rows

    by_frequency = torch.tensor([5, 2, 9, 1, 0, 3, 4, 6, 7, 8])
    tokens = torch.tensor([[9, 7, 7], [4, 9, 0]])
    rows = ce_rows(tokens, by_frequency, 6)
    assert rows.tolist() == [0, 4, 7, 9, 5, 2]  # the batch's ids, then the most frequent others
    assert ce_rows(tokens, by_frequency, 3).tolist() == [0, 4, 7]
    with pytest.raises(ValueError, match="exceeds the vocabulary"):
        ce_rows(tokens, by_frequency, 11)
