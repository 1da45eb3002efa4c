"""zamba2.allocator: the glibc malloc settings the command line, server and benchmark apply at start."""

from __future__ import annotations

import platform

import pytest

from zamba2 import allocator, cli

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@pytest.fixture
def fresh(monkeypatch):
    """A process where tune() has not run yet (it applies its settings once per process)."""
    monkeypatch.setattr(allocator, "_state", None)
    monkeypatch.delenv(allocator.ENV, raising=False)


def test_tune_applies_once_and_reports(fresh):
    assert allocator.state() == "untouched"
    expected = "tuned" if GLIBC else "unsupported"
    assert allocator.tune() == expected
    assert allocator.tune() == expected and allocator.state() == expected


def test_public_name(fresh):
    import zamba2

    assert zamba2.tune_allocator is allocator.tune
    assert "tune_allocator" in zamba2.__all__


def test_environment_opt_out(fresh, monkeypatch):
    monkeypatch.setenv(allocator.ENV, "default")
    assert allocator.tune() == "default"


def test_bad_environment_value_names_the_variable(fresh, monkeypatch):
    monkeypatch.setenv(allocator.ENV, "fast")
    with pytest.raises(ValueError, match=r"ZAMBA2_MALLOC='fast': expected 'tuned' or 'default'"):
        allocator.tune()
    assert allocator.state() == "untouched"


def test_cli_reports_a_bad_setting_in_one_line(fresh, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv(allocator.ENV, "fast")
    code = cli.main(["generate", "--model", str(tmp_path / "model"), "hi"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_USAGE
    assert err.strip() == "zamba2: error: environment variable ZAMBA2_MALLOC='fast': expected 'tuned' or 'default'"
