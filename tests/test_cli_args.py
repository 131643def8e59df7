"""Overrides anywhere on the command line (mmfm.cli_args), against the real `mmfm` parser."""

import pytest

from mmfm.cli import build_parser
from mmfm.cli_args import is_override, parse_args_anywhere, split_overrides

CFG = "configs/text_moe_tiny.yaml"


def test_plain_argparse_refuses_overrides_after_a_flag(capsys):
    with pytest.raises(SystemExit):  # what `mmfm train CFG --resume train.steps=60` did
        build_parser().parse_args(["train", CFG, "--resume", "train.steps=60"])
    assert "unrecognized arguments: train.steps=60" in capsys.readouterr().err


@pytest.mark.parametrize("argv, overrides, resume_from", [
    (["train", CFG, "--resume", "train.steps=60"], ["train.steps=60"], None),
    (["train", CFG, "train.steps=60", "--resume"], ["train.steps=60"], None),
    (["train", CFG, "a.b=1", "--resume-from", "runs/x/step_1", "c.d=2", "a.b=3"],
     ["a.b=1", "c.d=2", "a.b=3"], "runs/x/step_1"),
    (["train", "--resume", CFG, "train.steps=60"], ["train.steps=60"], None),
])
def test_overrides_before_and_after_flags_keep_their_order(argv, overrides, resume_from):
    args = parse_args_anywhere(build_parser(), argv)
    assert args.config == CFG and args.overrides == overrides
    assert args.resume_from == resume_from


def test_other_leftovers_are_still_errors(capsys):
    with pytest.raises(SystemExit):
        parse_args_anywhere(build_parser(), ["train", CFG, "--resume", "--no-such-flag"])
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_override_on_a_command_without_overrides_is_an_error(capsys):
    with pytest.raises(SystemExit):
        parse_args_anywhere(build_parser(), ["report", "routing", "runs/x", "train.steps=5"])
    assert "unrecognized arguments: train.steps=5" in capsys.readouterr().err


def test_what_counts_as_an_override():
    assert is_override("model.moe.top_k=1") and is_override("train.init_from=")
    assert is_override("multimodal.sources.images.weight=2")
    assert not is_override("--resume-from=x") and not is_override("configs/a=b.yaml")
    assert not is_override("=3") and not is_override("train.steps")
    assert split_overrides(["x", "a=1", "--f", "b.c=2"]) == (["a=1", "b.c=2"], ["x", "--f"])
