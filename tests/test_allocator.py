"""The malloc settings the command line applies: on where glibc has them, off on request."""

import subprocess
import sys

import pytest

CHECK = "from zamba2.allocator import tune_allocator; print(tune_allocator(), tune_allocator())"


def run(env_value: str | None) -> str:
    import os

    env = {k: v for k, v in os.environ.items() if k != "ZAMBA2_MALLOC_TUNING"}
    if env_value is not None:
        env["ZAMBA2_MALLOC_TUNING"] = env_value
    return subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, check=True).stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_tuning_applies_once_and_can_be_turned_off():
    assert run(None).split() == ["True", "True"]  # idempotent
    assert run("0").split() == ["False", "False"]
