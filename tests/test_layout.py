"""Module names in the repository must not shadow installed packages or the standard library.

Python puts a script's own directory first on sys.path, so a file benchmarks/kernels.py made
`import kernels` inside transformers (which depends on Hugging Face's `kernels`) load our script
when any benchmark imported transformers; a top-level package `kernels` did the same for the whole
project. The reference is the environment itself: the top-level import names of every installed
distribution (importlib.metadata) and sys.stdlib_module_names.
"""

import importlib.metadata
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _ours() -> dict[str, Path]:
    names = {p.stem: p for p in (ROOT / "benchmarks").glob("*.py")}
    names.update({p.parent.name: p.parent for p in ROOT.glob("*/__init__.py")})
    return names


def _clashes(names: dict[str, Path]) -> dict[str, str]:
    installed = {name for name, dists in importlib.metadata.packages_distributions().items()
                 if any(d.lower() != "sputnik" for d in dists)}
    return {name: str(path) for name, path in names.items() if name in installed or name in sys.stdlib_module_names}


def test_no_module_shadows_an_installed_package_or_the_stdlib():
    clashes = _clashes(_ours())
    assert not clashes, f"these would shadow an installed package or a stdlib module: {clashes}"


def test_the_check_sees_clashes():
    planted = {"torch": Path("benchmarks/torch.py"), "json": Path("benchmarks/json.py"), "model": ROOT / "model"}
    assert set(_clashes(planted)) == {"torch", "json"}  # `model` is ours (the sputnik distribution)
