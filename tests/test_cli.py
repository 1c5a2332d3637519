"""``microspec demo`` rejects bad settings before it loads anything."""
from __future__ import annotations

import pytest

from microspec_compile.cli import build_parser, main


@pytest.mark.parametrize("argv, message", [
    (["--gamma", "0"], "--gamma must be >= 1"),
    (["--target-topk", "-1"], "--target-topk must be >= 0"),
    (["--small-batch-linear", "1"], "--small-batch-linear must be 0 (off) or >= 2"),
])
def test_bad_settings_exit_with_a_clear_message(argv, message):
    with pytest.raises(SystemExit, match=message.replace("(", r"\(").replace(")", r"\)")):
        main(["demo", *argv])


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--help"])
    text = capsys.readouterr().out
    for option in ("--prompt", "--max-new-tokens", "--draft-layers", "--target-topk",
                   "--small-batch-linear", "--threads"):
        assert option in text
