"""``microspec demo`` rejects bad settings before it loads anything."""
from __future__ import annotations

import pytest

from microspec_compile.apps.cli import build_parser, main


@pytest.mark.parametrize("argv, message", [
    (["--runs", "0"], "--runs must be >= 1"),
    (["--capacity", "0"], "--capacity must be >= 1"),
    (["--top-k", "0"], "--top-k must be >= 1"),
    (["--total-tokens", "0"], "--total-tokens must be >= 1"),
])
def test_bad_settings_exit_with_a_clear_message(argv, message, capsys):
    with pytest.raises(SystemExit) as done:
        main(["demo", *argv])
    assert done.value.code == 2
    assert capsys.readouterr().err == f"microspec demo: {message}\n"  # one line, no traceback


def test_a_wrong_model_or_head_is_said_before_anything_loads(tmp_path, capsys, monkeypatch):
    import microspec_compile.apps.models as models

    monkeypatch.setattr(models, "load_causal_lm", lambda *a, **k: pytest.fail("loaded a model"))
    for argv, said in (
            (["demo", "--model", "no-such-model"], "unknown model 'no-such-model': give a named"),
            (["demo", "--head", str(tmp_path)], f"no EAGLE head at {tmp_path} (eagle_config.json "
                                                "or config.json and frequent_ids.json"),
            (["demo", "--model", str(tmp_path)], "no EAGLE head ships for"),
            (["train-eagle", "--out", str(tmp_path), "--model", "nope"], "unknown model 'nope'"),
            (["train-eagle", "--out", str(tmp_path), "--init-head", str(tmp_path / "x")],
             "no EAGLE head at")):
        with pytest.raises(SystemExit) as done:
            main(argv)
        err = capsys.readouterr().err
        assert done.value.code == 2 and said in err and err.count("\n") == 1, (argv, err)


def test_policy_is_a_named_preset(capsys):
    assert build_parser().parse_args(["demo"]).policy == "tuned"
    assert build_parser().parse_args(["demo", "--policy", "paper"]).policy == "paper"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--policy", "greedy"])
    assert "invalid choice: 'greedy'" in capsys.readouterr().err


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--help"])
    text = capsys.readouterr().out
    for option in ("--prompt", "--max-new-tokens", "--policy", "--model",
                   "--threads", "--head", "--depth", "--lookup",
                   "--top-k", "--total-tokens"):
        assert option in text
    assert "--gamma" not in text and "--draft-layers" not in text  # the chain demo is gone


def test_train_eagle_help_and_required_out(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train-eagle", "--help"])
    text = capsys.readouterr().out
    for option in ("--out", "--work-dir", "--generate-minutes", "--train-minutes", "--seed",
                   "--regen-skip", "--ce-weight", "--ce-vocab"):
        assert option in text
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train-eagle"])  # --out is required
    assert "--out" in capsys.readouterr().err


def test_every_option_has_help_one_default_and_both_commands_one_model():
    from microspec_compile.apps import cli, demo

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # argparse has no public accessor
    for name, command in commands.items():
        for action in command._actions:
            if action.dest != "help":
                assert action.help, (name, action.dest)
                assert "(default" not in action.help, (name, action.dest)  # the formatter adds it
    demo_args = parser.parse_args(["demo"])
    assert demo_args.model == parser.parse_args(["train-eagle", "--out", "x"]).model
    assert cli.DEFAULT_CORE == demo.DEFAULT_CORE == demo_args.core


def test_demo_fails_loudly_without_head_weights(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from microspec_compile.apps.demo import run_eagle_demo
    from microspec_compile.heads import EagleHead

    target = LlamaForCausalLM(LlamaConfig(vocab_size=1024, hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=1, num_attention_heads=2,
                                          num_key_value_heads=1))
    with pytest.raises(FileNotFoundError, match="no EAGLE head at .*: neither eagle_config.json"):
        run_eagle_demo(["hi"], model=(target, None), head_dir=tmp_path, out=None)
    EagleHead.for_target(target).save(tmp_path)
    with pytest.raises(FileNotFoundError, match="frequency subset"):
        run_eagle_demo(["hi"], model=(target, None), head_dir=tmp_path, out=None)


@pytest.mark.parametrize("requested, busy, expected", [
    (3, 2.0, 3),        # an explicit --threads is kept, whatever else runs
    (0, 0.1, None),     # idle machine: every core (torch's default)
    (0, None, None),    # no /proc/stat (not Linux): torch's default
    (0, 1.5, 1),        # another process holds a core: 1 thread, said once
])
def test_demo_threads_default_to_every_idle_core(monkeypatch, requested, busy, expected):
    import torch

    from microspec_compile.apps import measure

    monkeypatch.setattr(measure, "busy_cores", lambda: busy)
    said = []
    threads = measure.demo_threads(requested, log=said.append)
    assert threads == (expected or torch.get_num_threads())
    assert bool(said) == (expected == 1)


def test_busy_cores_reads_a_share_of_the_cores():
    import os

    from microspec_compile.apps.measure import busy_cores

    busy = busy_cores(0.05)
    assert busy is None or 0.0 <= busy <= (os.cpu_count() or 1)
