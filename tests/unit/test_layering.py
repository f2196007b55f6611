"""The package's layering, checked from the source: imports point down (or sideways), never up, and never in a circle.

Every module under superblock/ is parsed with `ast`; every import counts (module level and inside functions,
`importlib.import_module("superblock...")` too), except those under `if TYPE_CHECKING:`. Layers, low to high,
are in LAYERS (docs/architecture.md, "Layers"). The package root superblock/__init__.py is a facade: it may
import anything, and nothing may import it (`import superblock`, `from superblock import <not a submodule>`).

Importing a submodule runs its packages' `__init__.py` first: `from superblock.export.loader import x` runs
superblock/export/__init__.py and everything it imports at module level. Those imports are charged to the importer
too (`charge_package_inits`), unless the importer sits inside that package (then its `__init__` is already running).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "superblock"
SRC = Path(__file__).resolve().parents[2]
PACKAGE_DIR = SRC / PACKAGE

# A module belongs to the layer of its longest prefix here. A module may import its own layer or lower ones.
LAYERS: dict[str, int] = {
    # 0: no superblock imports outside the layer
    "superblock.sparsity": 0,
    "superblock.logging": 0,
    "superblock.version": 0,
    "superblock.devices": 0,  # device / dtype names and what auto means
    "superblock.rundir": 0,  # run-directory layout (RunDir) and summary.json schema (RunSummary)
    "superblock.utils": 0,  # reserved for tiny dependency-free helpers
    "superblock.io": 0,
    "superblock.timing": 0,  # CUDA events, CUDA-graph replays, wall clock, interleaved comparisons, step timers
    "superblock.seeding": 0,  # process-independent seeds, seeding the global RNGs
    "superblock.progress": 0,  # console progress: tqdm's bar on a terminal, plain lines in a log
    # 1: building blocks
    "superblock.kernels": 1,
    "superblock.artifacts": 1,  # files on disk: training checkpoints, the export format, an export's folded model
    "superblock.config": 1,
    "superblock.models": 1,
    "superblock.hf_models": 1,  # transformers models by name (hf:<model_type> | hf:<dir>)
    "superblock.gguf": 1,  # GGUF files (llama.cpp) as checked transformers folders
    "superblock.data": 1,
    "superblock.data.bundle": 1,
    "superblock.data.synthetic": 1,
    "superblock.data.transforms": 1,
    "superblock.data.folders": 1,
    "superblock.data.datasets": 1,
    "superblock.data.loaders": 1,
    "superblock.data.corpus": 1,  # text sources: a local tree or the stdlib's own source files
    "superblock.data.tokenizer": 1,  # byte-level and local Hugging Face tokenizers
    "superblock.data.text": 1,  # causal-LM windows and text classification datasets
    "superblock.data.metrics": 1,  # perplexity, token-weighted loss
    # 2: training
    "superblock.engine": 2,
    # 3: sparse export and loading
    "superblock.export": 3,
    # 4: consumers of exports and runs
    "superblock.evaluate": 4,
    "superblock.report": 4,
    "superblock.report.runs": 4,
    "superblock.report.table": 4,
    "superblock.report.plot": 4,
    "superblock.report.writer": 4,
    "superblock.report.cli": 4,
    "superblock.report.__main__": 4,
    "superblock.sweep": 4,
    # 5: entry-point glue (Hydra -> functions, exit codes)
    "superblock.cli": 5,
}


@dataclass(frozen=True)
class Import:
    importer: str  # module name
    target: str  # module name (a submodule when `from pkg import submodule`)
    file: str  # path relative to the repository
    line: int
    names: tuple[str, ...] = ()  # for `from X import a, b`: the names taken from X itself
    toplevel: bool = True  # runs when the module is imported (not inside a function)
    via: str = ""  # a charged import: the package __init__ (file:line) that makes it, run by this import

    def where(self) -> str:
        return f"{self.file}:{self.line}"


def module_name(path: Path, root: Path = SRC) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def discover(package_dir: Path = PACKAGE_DIR) -> dict[str, Path]:
    return {module_name(p, package_dir.parent): p for p in sorted(package_dir.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve(target: str, modules: set[str]) -> str:
    """The longest known module that `target` names (an attribute path resolves to its module)."""
    parts = target.split(".")
    for n in range(len(parts), 0, -1):
        name = ".".join(parts[:n])
        if name in modules:
            return name
    return target


class _Collector(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool, file: str, modules: set[str]) -> None:
        self.module, self.is_package, self.file, self.modules = module, is_package, file, modules
        self.found: list[Import] = []
        self.depth = 0  # functions entered: imports inside them run only when called

    def _add(self, target: str, line: int, names: tuple[str, ...] = ()) -> None:
        if target == PACKAGE or target.startswith(PACKAGE + "."):
            resolved = _resolve(target, self.modules)
            self.found.append(Import(self.module, resolved, self.file, line, names, toplevel=self.depth == 0))

    def _in_function(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _in_function

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            for child in node.orelse:  # only the `if TYPE_CHECKING:` body is exempt
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.module.split(".")
            if not self.is_package:
                base = base[:-1]
            base = base[: len(base) - (node.level - 1)]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        from_source = []
        for alias in node.names:
            sub = f"{source}.{alias.name}"
            if alias.name != "*" and sub in self.modules:
                self._add(sub, node.lineno)
            else:
                from_source.append(alias.name)
        if from_source:
            self._add(source, node.lineno, tuple(from_source))

    def visit_Call(self, node: ast.Call) -> None:
        fn = node.func
        name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
        if name in ("import_module", "__import__") and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                self._add(arg.value, node.lineno)
        self.generic_visit(node)


def collect_imports(modules: dict[str, Path], root: Path = SRC) -> list[Import]:
    known = set(modules)
    found: list[Import] = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        collector = _Collector(name, path.name == "__init__.py", str(path.relative_to(root)), known)
        collector.visit(tree)
        found.extend(collector.found)
    return found


def charge_package_inits(imports: list[Import], modules: dict[str, Path], root: Path = SRC) -> list[Import]:
    """The imports a package's `__init__.py` makes at module level, charged to every module that imports a
    submodule of that package from outside it (importing a.b.c runs a/__init__.py and a/b/__init__.py first)."""
    inits: dict[str, list[Import]] = defaultdict(list)
    for imp in imports:
        if imp.toplevel and modules[imp.importer].name == "__init__.py":
            inits[imp.importer].append(imp)
    charged = []
    for imp in imports:
        parts = imp.target.split(".")
        for n in range(1, len(parts)):
            package = ".".join(parts[:n])
            if imp.importer == package or imp.importer.startswith(package + "."):
                continue  # the importer is inside the package: its __init__ has already run
            for dep in inits.get(package, ()):
                if dep.target != imp.target:
                    via = f"{modules[package].relative_to(root)}:{dep.line}"
                    charged.append(Import(imp.importer, dep.target, imp.file, imp.line, via=via))
    return charged


def layer_of(module: str) -> tuple[str, int] | None:
    """(the LAYERS key, its layer) for a module, or None when the module has no layer."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in LAYERS:
            return key, LAYERS[key]
    return None


def find_cycles(imports: list[Import]) -> list[list[Import]]:
    """One shortest cycle (as its import statements) per strongly connected group of modules."""
    edges: dict[str, dict[str, Import]] = defaultdict(dict)
    for imp in imports:
        edges[imp.importer].setdefault(imp.target, imp)
    nodes = sorted(set(edges) | {t for out in edges.values() for t in out})

    # Tarjan's strongly connected components (iterative).
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    groups: list[list[str]] = []
    counter = 0
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, it = work[-1]
            advanced = False
            for nxt in it:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(edges[nxt]))))
                    advanced = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1 or node in edges[node]:
                    groups.append(sorted(group))

    cycles = []
    for group in groups:
        members = set(group)
        start = group[0]
        # breadth-first from start back to start, inside the group: the shortest cycle through it
        prev: dict[str, str] = {}
        frontier = [start]
        seen = set()
        end = None
        while frontier and end is None:
            nxt_frontier = []
            for node in frontier:
                for target in sorted(edges[node]):
                    if target not in members:
                        continue
                    if target == start:
                        end = node
                        break
                    if target not in seen:
                        seen.add(target)
                        prev[target] = node
                        nxt_frontier.append(target)
                if end is not None:
                    break
            frontier = nxt_frontier
        path = [end]
        while path[-1] != start:
            path.append(prev[path[-1]])
        path.reverse()  # start ... end, and end imports start
        cycles.append([edges[a][b] for a, b in zip(path, path[1:] + [start], strict=True)])
    return cycles


@pytest.fixture(scope="module")
def modules() -> dict[str, Path]:
    found = discover()
    assert PACKAGE in found and len(found) > 10, f"no package found under {PACKAGE_DIR}"
    return found


@pytest.fixture(scope="module")
def imports(modules: dict[str, Path]) -> list[Import]:
    direct = collect_imports(modules)
    return direct + charge_package_inits(direct, modules)


def _fmt(imp: Import) -> str:
    what = f"{imp.target} ({', '.join(imp.names)})" if imp.names else imp.target
    via = f" via {imp.via}" if imp.via else ""
    return f"  {imp.where()}: {imp.importer} imports {what}{via}"


def test_every_module_has_a_layer(modules):
    missing = sorted(m for m in modules if m != PACKAGE and layer_of(m) is None)
    if missing:
        pytest.fail(
            "modules without a layer (add them to LAYERS in tests/unit/test_layering.py and to the table in "
            "docs/architecture.md):\n  " + "\n  ".join(missing),
            pytrace=False,
        )


# Known upward imports through a package __init__ (importer, the __init__ that runs): each to be removed by
# restructuring, not by growing this list. A stale entry fails test_known_init_charges_are_still_real.
KNOWN_INIT_CHARGES: set[tuple[str, str]] = set()


def _upward(imports: list[Import]) -> list[tuple[Import, str]]:
    bad = []
    for imp in imports:
        if imp.importer == PACKAGE or imp.target == PACKAGE:
            continue  # the facade may import anything; imports of the root are their own test
        src, dst = layer_of(imp.importer), layer_of(imp.target)
        if src and dst and dst[1] > src[1]:
            bad.append((imp, f"{_fmt(imp)}: layer {src[1]} ({src[0]}) -> layer {dst[1]} ({dst[0]})"))
    return bad


def _known(imp: Import) -> bool:
    return bool(imp.via) and (imp.importer, imp.via.rsplit(":", 1)[0]) in KNOWN_INIT_CHARGES


def test_no_module_imports_a_higher_layer(imports):
    bad = [text for imp, text in _upward(imports) if not _known(imp)]
    if bad:
        pytest.fail("imports from a lower layer into a higher one:\n" + "\n".join(bad), pytrace=False)


def test_known_init_charges_are_still_real(imports):
    seen = {(imp.importer, imp.via.rsplit(":", 1)[0]) for imp, _ in _upward(imports) if imp.via}
    stale = sorted(KNOWN_INIT_CHARGES - seen)
    assert not stale, f"fixed: remove these from KNOWN_INIT_CHARGES: {stale}"


def test_no_module_imports_the_package_root(imports):
    bad = [_fmt(imp) for imp in imports if imp.target == PACKAGE and imp.importer != PACKAGE]
    if bad:
        pytest.fail(
            "the package root superblock/__init__.py is a facade for users; modules import the submodule that "
            "defines the name instead:\n" + "\n".join(bad),
            pytrace=False,
        )


def test_no_import_cycles(imports):
    cycles = find_cycles(imports)
    text = []
    for cycle in cycles:
        text.append(" -> ".join([imp.importer for imp in cycle] + [cycle[0].importer]))
        text.extend(_fmt(imp) for imp in cycle)
    if cycles:
        pytest.fail(
            "import cycles (module level and inside functions; TYPE_CHECKING excluded):\n" + "\n".join(text),
            pytrace=False,
        )


def test_the_checker_sees_function_level_imports_and_skips_type_checking(tmp_path):
    pkg = tmp_path / "superblock"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from superblock.sub import b\n")
    (pkg / "sub" / "a.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "import superblock\n"
        "if TYPE_CHECKING:\n"
        "    from superblock.sub import b\n"
        "def f():\n"
        "    from . import b\n"
        "    from .b import thing\n"
        "    importlib.import_module('superblock.sub.b')\n"
    )
    (pkg / "sub" / "b.py").write_text("def g():\n    from superblock.sub.a import f\n")
    found = collect_imports(discover(pkg), tmp_path)
    got = sorted((i.importer, i.target, i.line) for i in found)
    assert got == [
        ("superblock.sub", "superblock.sub.b", 1),
        ("superblock.sub.a", "superblock", 2),
        ("superblock.sub.a", "superblock.sub.b", 6),
        ("superblock.sub.a", "superblock.sub.b", 7),
        ("superblock.sub.a", "superblock.sub.b", 8),
        ("superblock.sub.b", "superblock.sub.a", 2),
    ]
    (cycle,) = find_cycles(found)
    assert {(i.importer, i.target) for i in cycle} == {
        ("superblock.sub.a", "superblock.sub.b"),
        ("superblock.sub.b", "superblock.sub.a"),
    }


def test_importing_a_submodule_is_charged_its_packages_init(tmp_path):
    """`from superblock.high.low import x` runs superblock/high/__init__.py: its module-level imports are charged
    to the importer (not its function-level ones, and not to modules inside the package)."""
    pkg = tmp_path / "superblock"
    (pkg / "high").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "high" / "__init__.py").write_text(
        "from superblock.high.heavy import h\ndef lazy():\n    from superblock.high.lazy import z\n"
    )
    for name in ("low", "heavy", "lazy"):
        (pkg / "high" / f"{name}.py").write_text("")
    (pkg / "high" / "inner.py").write_text("from superblock.high.low import y\n")
    (pkg / "user.py").write_text("def f():\n    from superblock.high.low import x\n")
    modules = discover(pkg)
    direct = collect_imports(modules, tmp_path)
    charged = charge_package_inits(direct, modules, tmp_path)
    assert [(i.importer, i.target, i.line, i.via) for i in charged] == [
        ("superblock.user", "superblock.high.heavy", 2, f"{Path('superblock/high/__init__.py')}:1")
    ]
