"""`make demo` runs `rome-lens demo`: the story must run end to end on the embedded model."""

from __future__ import annotations

import pytest

from rome_lens import cli

pytestmark = pytest.mark.integration


def test_demo_edits_and_restores(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["demo"]) == 0
    out = capsys.readouterr().out
    after = out.split("== After the edit ==")[1].split("== After revert ==")[0]
    assert after.split("\n")[2].strip().startswith("-> ' Rome'")  # the edit prompt's top-1
    assert "model unchanged by computing: True" in out
    assert "Weights bit-identical to the original (sha256 of all parameters): True" in out
    assert "Predictions identical to before: True" in out
