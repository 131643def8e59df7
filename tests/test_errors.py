"""The CLI's error contract: a user error (`MmfmError`) is one line and exit status 2; any other
exception, including torch's or Python's own `ValueError`, is a bug and keeps its traceback."""

from __future__ import annotations

import argparse

import pytest

from mmfm import cli
from mmfm.config import ConfigError
from mmfm.errors import MmfmError, UserValueError
from mmfm.train.checkpoint import CheckpointError


def _run_raising(monkeypatch, exc: Exception) -> int:
    def fake_parser():
        parser = argparse.ArgumentParser()
        parser.set_defaults(func=lambda args: (_ for _ in ()).throw(exc))
        return parser

    monkeypatch.setattr(cli, "build_parser", fake_parser)
    monkeypatch.delenv("MMFM_DEBUG", raising=False)
    return cli.main([])


@pytest.mark.parametrize("exc", [ConfigError("train.lr=-1 must be > 0"),
                                 CheckpointError("checkpoint x: meta.json is corrupt"),
                                 UserValueError("data.tokenizer=x.json: not a tokenizer")])
def test_user_errors_print_one_line(monkeypatch, capsys, exc):
    assert _run_raising(monkeypatch, exc) == 2
    err = capsys.readouterr().err
    assert err == f"error: {exc}\n"


def test_a_plain_value_error_keeps_its_traceback(monkeypatch):
    with pytest.raises(ValueError, match="not enough values to unpack"):
        _run_raising(monkeypatch, ValueError("not enough values to unpack"))


def test_error_classes_share_the_base():
    for cls in (ConfigError, CheckpointError, UserValueError):
        assert issubclass(cls, MmfmError) and issubclass(cls, ValueError)
