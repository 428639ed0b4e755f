"""The command line's error contract: lmcore's own bad-input errors (lmcore.errors.UserError)
are one line on stderr with exit status 2; any other exception is a bug and keeps its traceback."""

from __future__ import annotations

import pytest

from lmcore import cli, info
from lmcore.errors import InputError, InputNotFound, UserError


def test_user_errors_are_one_line_exit_2(capsys):
    rc = cli.main(["info", "--preset", "record", "--set", "train.nope=1"])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip().splitlines() == [f"lmcore info: error: {err.split('error: ', 1)[1].strip()}"]
    assert "train.nope" in err and "Traceback" not in err


@pytest.mark.parametrize("exc", [ValueError("internal invariant broken"), FileNotFoundError("lmcore/missing.py"),
                                 KeyError("oops"), TypeError("bad call")])
def test_bugs_keep_their_traceback(monkeypatch, exc):
    """A plain ValueError / FileNotFoundError raised inside lmcore is a bug, not bad input."""

    def broken(cfg, device="cpu"):
        raise exc

    monkeypatch.setattr(info, "describe", broken)
    with pytest.raises(type(exc)):
        cli.main(["info", "--preset", "smoke"])


@pytest.mark.parametrize("exc", [InputError("x.json: field y"), InputNotFound("runs/a: not found")])
def test_lmcore_input_errors_are_user_errors(monkeypatch, capsys, exc):
    assert isinstance(exc, UserError)

    def bad_input(cfg, device="cpu"):
        raise exc

    monkeypatch.setattr(info, "describe", bad_input)
    assert cli.main(["info", "--preset", "smoke"]) == 2
    assert capsys.readouterr().err == f"lmcore info: error: {exc}\n"


def test_ctrl_c_is_one_line(monkeypatch, capsys):
    def interrupted(cfg, device="cpu"):
        raise KeyboardInterrupt

    monkeypatch.setattr(info, "describe", interrupted)
    assert cli.main(["info", "--preset", "smoke"]) == 130
    assert capsys.readouterr().err == "lmcore info: interrupted\n"
