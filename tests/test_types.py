"""The package type-checks: mypy, strict, with the configuration in pyproject.toml (the whole
package; the modules being rewritten are named there)."""

from __future__ import annotations

from pathlib import Path

from mypy import api

ROOT = Path(__file__).resolve().parent.parent


def test_mypy_strict_passes():
    config = ["--config-file", str(ROOT / "pyproject.toml")]
    out, err, status = api.run([*config, str(ROOT / "convmat")])
    assert status == 0, out + err
    assert out.startswith("Success: no issues found"), out


def test_mypy_strict_catches_a_wrong_annotation(tmp_path):
    # The same settings on a small module with one mistake of each kind strict adds.
    bad = tmp_path / "bad.py"
    bad.write_text("def untyped(x):\n    return x\n\ndef wrong(n: int) -> str:\n    return n\n")
    out, _, status = api.run(
        ["--config-file", str(ROOT / "pyproject.toml"), "--no-incremental", str(bad)]
    )
    assert status == 1
    assert "bad.py:1: error: Function is missing a type annotation" in out
    assert 'bad.py:5: error: Incompatible return value type (got "int", expected "str")' in out
