"""Entry points: user errors are one line (exit 2); anything else is a bug with its traceback (exit 3) (issue 24 #5)."""

import pytest

from latentdiff import errors
from latentdiff.config_utils import ConfigError
from latentdiff.convert.key_tables import ConversionError
from latentdiff.data.errors import DataError
from latentdiff.evaluation.references import EvalError
from latentdiff.train.loop import NonFiniteError


def run(capsys, exception: BaseException) -> tuple[int, str]:
    def main():
        raise exception

    with pytest.raises(SystemExit) as stop:
        errors.run_cli(main)
    return stop.value.code, capsys.readouterr().err


@pytest.mark.parametrize("kind", [errors.UserError, ConfigError, ConversionError, DataError, EvalError, NonFiniteError])
def test_user_errors_are_one_line(capsys, monkeypatch, kind):
    monkeypatch.delenv("LATENTDIFF_DEBUG", raising=False)
    code, err = run(capsys, kind("batch_size=0 must be positive\nsecond line"))
    assert code == 2 and err == "error: batch_size=0 must be positive\n"


def test_file_errors_are_one_line(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("LATENTDIFF_DEBUG", raising=False)
    try:
        open(tmp_path / "missing.json")
    except FileNotFoundError as e:
        code, err = run(capsys, e)
    assert code == 2 and err.startswith("error: [Errno 2] No such file") and err.count("\n") == 1


@pytest.mark.parametrize("bug", [KeyError("params"), RuntimeError("shape mismatch"), ValueError("internal"), TypeError])
def test_anything_else_is_a_bug_with_its_traceback(capsys, monkeypatch, bug):
    """A plain KeyError / RuntimeError / ValueError is not hidden behind one line any more."""
    monkeypatch.delenv("LATENTDIFF_DEBUG", raising=False)
    code, err = run(capsys, bug)
    assert code == 3
    assert "Traceback (most recent call last)" in err and "in main" in err
    assert err.rstrip().splitlines()[-1].startswith("internal error (") and "report it" in err


def test_device_out_of_memory_is_one_line_with_the_fix(capsys, monkeypatch):
    monkeypatch.delenv("LATENTDIFF_DEBUG", raising=False)
    code, err = run(capsys, RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 12 GiB"))
    assert code == 2 and err.count("\n") == 1 and "lower the batch size" in err
