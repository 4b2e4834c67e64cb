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


# Size limits that keep one concept per file (STYLE.md): what a reader can hold at once.
MAX_FILE_LINES, MAX_FUNCTION_LINES, MAX_CLASS_LINES = 500, 80, 200
LONG_FILES_ALLOWED = ("sputnik_kernels/",)  # Triton kernels with their launchers


def _sizes(path: Path):
    """(kind, qualified name, lines) of every function and class in a Python file."""
    import ast

    tree = ast.parse(path.read_text())

    def walk(node, prefix=""):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                kind = "class" if isinstance(child, ast.ClassDef) else "function"
                yield kind, prefix + child.name, child.end_lineno - child.lineno + 1
                yield from walk(child, prefix + child.name + ".")

    yield from walk(tree)


def _python_files():
    for pkg in ("orchestrator", "model", "rl", "data", "sputnik_kernels", "benchmarks", "tests"):
        yield from sorted((ROOT / pkg).rglob("*.py"))


def test_files_functions_and_classes_stay_readable():
    too_long = []
    for path in _python_files():
        rel = path.relative_to(ROOT).as_posix()
        n = len(path.read_text().splitlines())
        if n > MAX_FILE_LINES and not rel.startswith(LONG_FILES_ALLOWED):
            too_long.append(f"{rel}: {n} lines")
        if rel.startswith("orchestrator/"):
            for kind, name, lines in _sizes(path):
                limit = MAX_CLASS_LINES if kind == "class" else MAX_FUNCTION_LINES
                if lines > limit:
                    too_long.append(f"{rel}: {kind} {name} {lines} lines")
    assert not too_long, "over the size limits: " + "; ".join(too_long)


def test_the_size_check_measures_functions_and_classes(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("class A:\n    def f(self):\n        x = 1\n        return x\n\n\ndef g():\n    pass\n")
    assert list(_sizes(src)) == [("class", "A", 4), ("function", "A.f", 3), ("function", "g", 2)]
