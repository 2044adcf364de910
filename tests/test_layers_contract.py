"""The layering is enforced: import-linter's contracts in pyproject.toml (lower packages never
import higher ones; a package's modules are imported only through its ``__init__``), no private
name imported across packages, and the command's torch-free subcommands stay torch-free.

Each check is also run on a copy of the package with one rule broken, to show it can fail.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from importlinter.api import read_configuration

import convmat

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = Path(convmat.__file__).resolve().parent
PYPROJECT = ROOT / "pyproject.toml"


LINT_IMPORTS = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"


def _report(config: Path, path: Path = ROOT) -> dict[str, bool]:
    """Each contract's name and whether ``lint-imports`` keeps it (no cache: the repository
    stays clean), with the package found first under ``path``."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(path), os.environ.get("PYTHONPATH", "")]),
    }
    r = subprocess.run(
        [LINT_IMPORTS, "--config", str(config), "--no-cache"],
        capture_output=True, text=True, cwd=path, env=env, timeout=120,
    )  # fmt: skip
    kept = {
        m.group(1): m.group(2) == "KEPT"
        for m in re.finditer(r"^(.+) (KEPT|BROKEN)(?: \(.*\))?$", r.stdout, re.MULTILINE)
    }
    assert kept and r.returncode == (0 if all(kept.values()) else 1), r.stdout + r.stderr
    return kept


def test_every_contract_is_kept():
    kept = _report(PYPROJECT)
    assert len(kept) == len(read_configuration(str(PYPROJECT))["contracts_options"]) == 5, kept
    assert all(kept.values()), [name for name, ok in kept.items() if not ok]


def _probe_copy(tmp_path: Path, edit: tuple[str, str]) -> Path:
    """A copy of the package named ``convmat_probe`` with ``edit = (module, line)`` appended,
    and the contracts rewritten for it; returns the copy's config file."""
    shutil.copytree(PACKAGE, tmp_path / "convmat_probe", ignore=shutil.ignore_patterns("*.pyc"))
    module, line = edit
    target = tmp_path / "convmat_probe" / module
    target.write_text(target.read_text() + f"\n{line}\n")
    config = tmp_path / "pyproject.toml"
    text = PYPROJECT.read_text().split("[tool.importlinter]", 1)[1].split("\n[tool.", 1)[0]
    config.write_text("[tool.importlinter]" + text.replace("convmat", "convmat_probe"))
    return config


@pytest.mark.parametrize(
    ("edit", "broken"),
    [
        (("engine/shapes.py", "from ..presentation import main"), "lower never imports higher"),
        (("matrix.py", "from .layers import to_mlp"), "lower never imports higher"),
        (("_errors.py", "from .engine import Geometry"), "lower never imports higher"),
        (("analysis/normalize.py", "from ..engine.cache import lookup"), "the engine is used"),
        (("presentation/cli.py", "from ..layers.linear import to_mlp"), "the layers are used"),
        (
            ("presentation/cli.py", "from ..analysis.spectral import NormResult"),
            "the analysis is used",
        ),
    ],
)
def test_a_broken_rule_breaks_its_contract(tmp_path, edit, broken):
    kept = _report(_probe_copy(tmp_path, edit), tmp_path)
    assert [name for name, ok in kept.items() if not ok] == [
        name for name in kept if broken in name
    ], kept


def test_contracts_name_every_package():
    contracts = read_configuration(str(PYPROJECT))["contracts_options"]
    layers = next(c for c in contracts if c["type"] == "layers")["layers"]
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert {f"convmat.{p}" for p in packages} <= set(layers)
    protected = {m for c in contracts if c["type"] == "protected" for m in c["protected_modules"]}
    assert protected == {f"convmat.{p}.*" for p in packages}


# -- private names stay inside their package -----------------------------------------------------
def _unit(module: str) -> str:
    """The package (or top-level module) a dotted ``convmat.`` name belongs to: ``engine`` for
    ``convmat.engine.cache``, ``matrix`` for ``convmat.matrix``, ``""`` for ``convmat``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def private_imports(source: str, module: str, is_package: bool) -> list[str]:
    """``importer -> name`` for every private name (``_x``, not a dunder) that the module
    ``module`` (dotted, in ``convmat``) imports from another package or top-level module, and
    every module of another package reached by a private path (``convmat.engine._x``)."""
    here = module.split(".") if is_package else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            base = here[: len(here) - node.level + 1] if node.level else []
            target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            pairs = [(target, a.name) for a in node.names]
        elif isinstance(node, ast.Import):
            pairs = [(a.name, "") for a in node.names]
        else:
            continue
        for target, name in pairs:
            if target.split(".")[0] != "convmat" or _unit(target) == _unit(module):
                continue
            below = target.split(".")[2:]
            private = [p for p in [*below, name] if p.startswith("_") and not p.startswith("__")]
            if private:
                found.append(f"{module} -> {target}.{name}".rstrip("."))
    return found


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        is_package = rel.name == "__init__"
        parts = rel.parts[:-1] if is_package else rel.parts
        yield path, ".".join(parts), is_package


def test_no_private_name_crosses_a_package():
    found = [f for p, m, pkg in _modules() for f in private_imports(p.read_text(), m, pkg)]
    assert found == []


@pytest.mark.parametrize(
    ("source", "module", "is_package", "expected"),
    [
        ("from ..engine.cache import _Cache", "convmat.layers.nn", False,
         ["convmat.layers.nn -> convmat.engine.cache._Cache"]),
        ("from ..engine import _WHERE", "convmat.analysis", True,
         ["convmat.analysis -> convmat.engine._WHERE"]),
        ("from .engine import _WHERE", "convmat.matrix", False,
         ["convmat.matrix -> convmat.engine._WHERE"]),
        ("import convmat.engine._x", "convmat.presentation.cli", False,
         ["convmat.presentation.cli -> convmat.engine._x"]),
        ("from ..matrix import _weight_view", "convmat.layers.linear", False,
         ["convmat.layers.linear -> convmat.matrix._weight_view"]),
        # allowed: inside one package, public names, the ground modules, dunders, other roots
        ("from .spectral import _check_tol", "convmat.analysis.lipschitz", False, []),
        ("from ..engine import weight_view as _weight_view", "convmat.layers.nn", False, []),
        ("from .._errors import ConvMatError", "convmat.engine.cache", False, []),
        ("from .. import __version__", "convmat.presentation.cli", False, []),
        ("from torch.nn.modules.utils import _ntuple", "convmat.analysis.lipschitz", False, []),
    ],
)  # fmt: skip
def test_private_import_check_flags_what_it_should(source, module, is_package, expected):
    assert private_imports(source, module, is_package) == expected


# -- the command's shape rules need no torch -----------------------------------------------------
def test_convmat_shape_never_imports_torch():
    code = (
        "import runpy, sys\n"
        "sys.argv = ['convmat', 'shape', '--input', '8,9', '--kernel', '3', '--in-channels', '2']\n"
        "try:\n"
        "    runpy.run_module('convmat', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert e.code in (0, None), e.code\n"
        "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "print('torch modules:', loaded)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "W" in r.stdout and r.stdout.strip().endswith("torch modules: []"), r.stdout
