"""The layout of docs/architecture.md holds: no import circle, no import up the floors, training
imported only by its entry points, no module over 450 lines, matplotlib's backend chosen only by
entry points, and every module has its line in the architecture docs. Read from the source with
``ast``; nothing is imported."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("monai_iqt", "preprocessing")
ARCHITECTURE = REPO / "docs" / "architecture.md"
MAX_LINES = 450
#: Modules that may import ``monai_iqt.training``: training itself, the study that runs it in
#: cells, and nothing else.
TRAINING_USERS = ("monai_iqt.training", "monai_iqt.study")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _runtime_nodes(node: ast.AST):
    """Every node but those under ``if TYPE_CHECKING:`` (imports for annotations only)."""
    yield node
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and getattr(child.test, "id", None) == "TYPE_CHECKING":
            continue
        yield from _runtime_nodes(child)


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Project modules ``name`` imports when it runs, function-level imports included."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            candidates = [module] + [f"{module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in known:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                found.add(candidate)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def _is_package_of(package: str, module: str) -> bool:
    return module.startswith(package + ".")


def test_no_import_circle():
    edges = graph()
    # A package's __init__ importing its own submodules is how a package exports them; a
    # submodule importing its package's __init__ back would be the circle.
    state: dict[str, int] = {}
    circles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges[node]):
            if state.get(target) == 1:
                circles.append(stack[stack.index(target) :] + [target])
            elif target not in state:
                visit(target, stack + [target])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert circles == []


def test_preprocessing_imports_nothing_of_monai_iqt():
    edges = graph()
    upward = sorted(
        f"{name} -> {target}"
        for name, targets in edges.items()
        if name.startswith("preprocessing")
        for target in targets
        if target.startswith("monai_iqt")
    )
    assert upward == []


def test_only_training_entry_points_import_training():
    edges = graph()
    users = sorted(
        f"{name} -> {target}"
        for name, targets in edges.items()
        for target in targets
        if (target == "monai_iqt.training" or _is_package_of("monai_iqt.training", target))
        and not any(name == user or _is_package_of(user, name) for user in TRAINING_USERS)
    )
    assert users == []


def test_no_module_over_the_line_limit():
    long = {
        name: n
        for name, path in modules().items()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def _matplotlib_use_calls(path: Path) -> list[str]:
    """Names of the functions (or ``<module>``) that call ``matplotlib.use``."""
    callers = []
    tree = ast.parse(path.read_text())

    def visit(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, ast.FunctionDef) else function
            if (
                isinstance(child, ast.Call)
                and isinstance(child.func, ast.Attribute)
                and child.func.attr == "use"
                and isinstance(child.func.value, ast.Name)
                and child.func.value.id == "matplotlib"
            ):
                callers.append(function)
            visit(child, inner)

    visit(tree, "<module>")
    return callers


def test_matplotlib_backend_is_chosen_by_entry_points_only():
    """Entry points: ``__main__`` modules and the bundle functions (``bundle_*``) configs call."""
    wrong = [
        f"{name}:{caller}"
        for name, path in modules().items()
        for caller in _matplotlib_use_calls(path)
        if not (path.name == "__main__.py" or caller.startswith("bundle_"))
    ]
    assert wrong == []


def test_architecture_docs_name_every_module():
    text = ARCHITECTURE.read_text()
    named = set(re.findall(r"`([a-z_0-9]+(?:\.[a-z_0-9]+)*)`", text))
    missing = sorted(name for name in modules() if name not in named)
    assert missing == []


def test_architecture_table_lists_each_modules_imports():
    """Each module's row (``| `module` | job | `imports`, ... |``) names what it imports now."""
    rows = {}
    for line in ARCHITECTURE.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) == 3:
            rows[cells[0].strip("`")] = set(re.findall(r"`([\w.]+)`", cells[2]))
    assert rows == graph()
