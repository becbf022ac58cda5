"""The architecture of dstrain/, checked on its source: parsed with `ast`, nothing imported (no torch, no
DeepSpeed), so this runs in about a second and a failure names file:line.

- No import cycle between dstrain's modules. Function-local imports count (they still run, just later);
  imports under `if TYPE_CHECKING:` do not (they never run). `from pkg import mod` is an import of pkg.mod
  when mod is a module, of pkg (its __init__) otherwise; importing a package means its __init__.
- No file over 400 lines; no function or method over 60 lines, counted from its first decorator (or `def`)
  to its last line, docstring and nested functions included.
- The DeepSpeed engine boundary: only dstrain/engine.py (and dstrain/checkpoint/optim.py, which must gather
  and scatter the ZeRO-partitioned optimizer state) use the engine's API; only engine.py calls
  `deepspeed.initialize`; elsewhere the engine class is imported for type hints only.
- Every subpackage has an __init__.py whose docstring says what the subpackage holds.
"""

from __future__ import annotations

import ast
import functools
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "dstrain"
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60
ENGINE_API_OWNERS = frozenset({"dstrain/engine.py", "dstrain/checkpoint/optim.py"})
INITIALIZE_OWNER = "dstrain/engine.py"
ENGINE_MODULE = "dstrain.engine"  # `from dstrain import engine`: calls on it are the boundary, not a breach
# DeepSpeedEngine's methods and attributes (nn.Module's included: the engine is the wrapped module's owner).
ENGINE_MEMBERS = frozenset(
    {
        "backward", "step", "was_step_applied", "get_lr", "get_global_grad_norm", "train", "eval",
        "save_checkpoint", "load_checkpoint", "module", "optimizer", "lr_scheduler", "forward", "zero_grad",
        "device", "global_steps", "global_samples", "is_gradient_accumulation_boundary",
        "set_gradient_accumulation_boundary", "gradient_accumulation_steps", "train_batch_size",
        "train_micro_batch_size_per_gpu", "zero_optimization_stage", "no_sync", "destroy", "parameters",
        "named_parameters", "state_dict", "load_state_dict", "get_mom", "bfloat16_enabled", "fp16_enabled",
    }
)  # fmt: skip


@dataclass(frozen=True)
class Module:
    name: str  # dotted: dstrain.checkpoint.save; a package is its __init__: dstrain.checkpoint
    where: str  # the path shown in messages, relative to the repository root
    tree: ast.Module
    is_package: bool
    lines: int


def parse(name: str, where: str, source: str) -> Module:
    is_package = where.endswith("__init__.py")
    return Module(name, where, ast.parse(source, filename=where), is_package, len(source.splitlines()))


@functools.cache
def package_modules() -> dict[str, Module]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = parse(name, path.relative_to(ROOT).as_posix(), path.read_text(encoding="utf-8"))
    return modules


def is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node that can run: all of the tree but the bodies of `if TYPE_CHECKING:` blocks."""
    for child in ast.iter_child_nodes(tree):
        yield child
        if is_type_checking(child):
            for other in child.orelse:
                yield other
                yield from runtime_nodes(other)
        else:
            yield from runtime_nodes(child)


def from_base(module: Module, node: ast.ImportFrom) -> str:
    """The absolute module a `from X import ...` reads from, relative imports resolved."""
    if not node.level:
        return node.module or ""
    package = module.name.split(".") if module.is_package else module.name.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imports(module: Module, known: dict[str, Module]) -> Iterator[tuple[str, int]]:
    """(imported dstrain module, line) for every import that runs, function-local ones included."""
    for node in runtime_nodes(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")  # `import a.b.c` runs a, a.b and a.b.c: the deepest known
                names = (".".join(parts[:n]) for n in range(len(parts), 0, -1))
                if (found := next((name for name in names if name in known), None)) is not None:
                    yield found, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = from_base(module, node)
            for alias in node.names:
                target = f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                if target in known:
                    yield target, node.lineno


def import_graph(modules: dict[str, Module]) -> dict[str, dict[str, int]]:
    """module -> {imported module: line of its first import}, self-imports left out."""
    graph: dict[str, dict[str, int]] = {name: {} for name in modules}
    for name, module in modules.items():
        for target, line in imports(module, modules):
            if target != name:
                graph[name].setdefault(target, line)
    return graph


def shortest_cycle_through(graph: dict[str, dict[str, int]], start: str) -> list[str] | None:
    """[start, ..., start] by breadth-first search along the imports, or None when no path leads back."""
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node]):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [*reversed(path), start]
                if nxt not in came_from:
                    came_from[nxt] = node
                    following.append(nxt)
        frontier = following
    return None


def import_cycles(modules: dict[str, Module]) -> list[str]:
    """One line per cycle (each set of modules once), every step with the line of its import."""
    graph = import_graph(modules)
    problems, seen = [], set()
    for start in sorted(graph):
        cycle = shortest_cycle_through(graph, start)
        if cycle and frozenset(cycle) not in seen:
            seen.add(frozenset(cycle))
            steps = [f"{modules[a].where}:{graph[a][b]} imports {b}" for a, b in itertools.pairwise(cycle)]
            problems.append("import cycle: " + " -> ".join(steps))
    return problems


def long_functions(modules: dict[str, Module]) -> list[str]:
    problems = []
    for module in modules.values():
        for node in ast.walk(module.tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                length = node.end_lineno - first + 1
                if length > MAX_FUNCTION_LINES:
                    problems.append(f"{module.where}:{node.lineno}: {node.name} is {length} lines")
    return problems


def names_bound_to(tree: ast.AST, target: str) -> set[str]:
    """Local names that an import binds to module `target` (`from dstrain import engine as eng` -> eng)."""
    bound = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            bound |= {a.asname or a.name for a in node.names if f"{node.module}.{a.name}" == target}
        elif isinstance(node, ast.Import):
            bound |= {a.asname for a in node.names if a.name == target and a.asname}
    return bound


def holds_engine(node: ast.AST, modules_named_engine: set[str]) -> bool:
    """`engine`, `ds_engine`, `x_engine` or `<anything>.engine`: a name the loop gives the engine handle."""
    if isinstance(node, ast.Name):
        name = node.id
        return (name == "engine" or name.endswith("_engine")) and name not in modules_named_engine
    if isinstance(node, ast.Attribute):  # not `engine.create_engine`, a function of dstrain.engine
        on_module = isinstance(node.value, ast.Name) and node.value.id in modules_named_engine
        return (node.attr == "engine" or node.attr.endswith("_engine")) and not on_module
    return False


def engine_api_uses(module: Module) -> list[str]:
    """`engine.<member>` and `engine(...)` outside the modules that own the engine API."""
    if module.where in ENGINE_API_OWNERS:
        return []
    modules_named_engine = names_bound_to(module.tree, ENGINE_MODULE)
    problems = []
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Attribute) and node.attr in ENGINE_MEMBERS:
            if holds_engine(node.value, modules_named_engine):
                problems.append(f"{module.where}:{node.lineno}: .{node.attr} on the DeepSpeed engine")
        elif isinstance(node, ast.Call) and holds_engine(node.func, modules_named_engine):
            problems.append(f"{module.where}:{node.lineno}: calls the DeepSpeed engine (its forward)")
    return problems


def engine_class_imports(tree: ast.AST) -> Iterator[tuple[ast.AST, set[str]]]:
    """(import node, names it binds) for every import of deepspeed.runtime.engine or a *Engine class."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("deepspeed.runtime.engine"):
                    yield node, {alias.asname or alias.name.split(".")[0]}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("deepspeed"):
            mod = node.module or ""
            names = {
                a.asname or a.name
                for a in node.names
                if mod.startswith("deepspeed.runtime.engine")
                or a.name.endswith("Engine")
                or (mod == "deepspeed.runtime" and a.name == "engine")
            }
            if names:
                yield node, names


def annotation_names(tree: ast.AST) -> set[ast.AST]:
    """Every node inside an annotation (arguments, returns, annotated assignments)."""
    notes = [getattr(node, "annotation", None) or getattr(node, "returns", None) for node in ast.walk(tree)]
    return {inner for note in notes if isinstance(note, ast.expr) for inner in ast.walk(note)}


def postponed_annotations(tree: ast.Module) -> bool:
    future = (n for n in tree.body if isinstance(n, ast.ImportFrom) and n.module == "__future__")
    return any(a.name == "annotations" for n in future for a in n.names)


def engine_class_runtime_uses(module: Module) -> list[str]:
    """The rule: outside the owners the engine class may be imported under `if TYPE_CHECKING:`, or, with
    `from __future__ import annotations` (annotations never evaluated), used in annotations and nowhere else."""
    if module.where in ENGINE_API_OWNERS:
        return []
    runs, notes = set(runtime_nodes(module.tree)), annotation_names(module.tree)
    postponed = postponed_annotations(module.tree)
    problems = []
    for node, names in engine_class_imports(module.tree):
        if node not in runs:  # under `if TYPE_CHECKING:`
            continue
        if not postponed:
            problems.append(
                f"{module.where}:{node.lineno}: imports the DeepSpeed engine at run time without "
                "`from __future__ import annotations` (use it, or import under `if TYPE_CHECKING:`)"
            )
            continue
        for use in ast.walk(module.tree):
            if isinstance(use, ast.Name) and use.id in names and use not in notes:
                problems.append(f"{module.where}:{use.lineno}: {use.id} used outside a type hint")
    return problems


def initialize_calls(module: Module) -> list[str]:
    if module.where == INITIALIZE_OWNER:
        return []
    problems = []
    for node in ast.walk(module.tree):
        by_attribute = isinstance(node, ast.Attribute) and node.attr == "initialize"
        by_attribute = by_attribute and isinstance(node.value, ast.Name) and "deepspeed" in node.value.id
        by_import = isinstance(node, ast.ImportFrom) and (node.module or "").startswith("deepspeed")
        by_import = by_import and any(a.name == "initialize" for a in node.names)
        if by_attribute or by_import:
            problems.append(f"{module.where}:{node.lineno}: deepspeed.initialize outside {INITIALIZE_OWNER}")
    return problems


def per_module(check, modules: dict[str, Module]) -> list[str]:
    return [problem for module in modules.values() for problem in check(module)]


def report(problems: list[str], what: str) -> str:
    return f"{len(problems)} {what}:\n  " + "\n  ".join(problems)


def test_no_import_cycles():
    problems = import_cycles(package_modules())
    assert not problems, report(problems, "import cycles (the first import line of each step)")


def test_no_file_over_400_lines():
    problems = [
        f"{m.where}:{m.lines}: {m.lines} lines"
        for m in package_modules().values()
        if m.lines > MAX_FILE_LINES
    ]
    assert not problems, report(problems, f"files over {MAX_FILE_LINES} lines")


def test_no_function_over_60_lines():
    problems = long_functions(package_modules())
    assert not problems, report(problems, f"functions over {MAX_FUNCTION_LINES} lines (decorators to end)")


def test_only_the_engine_module_uses_the_deepspeed_engine_api():
    problems = per_module(engine_api_uses, package_modules())
    assert not problems, report(problems, "uses of the engine API outside dstrain.engine (call it instead)")


def test_the_engine_class_is_imported_for_type_hints_only():
    problems = per_module(engine_class_runtime_uses, package_modules())
    assert not problems, report(problems, "run-time uses of DeepSpeed's engine module outside dstrain.engine")


def test_deepspeed_initialize_only_in_the_engine_module():
    problems = per_module(initialize_calls, package_modules())
    assert not problems, report(problems, "deepspeed.initialize outside dstrain/engine.py")


def test_every_subpackage_has_an_init_with_a_docstring():
    problems = []
    for directory in sorted({path.parent for path in PACKAGE.rglob("*.py")}):
        init = directory / "__init__.py"
        where = init.relative_to(ROOT).as_posix()
        if not init.is_file():
            problems.append(f"{where}:1: missing")
        elif not ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))):
            problems.append(f"{where}:1: no docstring saying what the subpackage holds")
    assert not problems, report(problems, "subpackages without a documented __init__.py")


# The checks themselves, on made-up modules: each must catch what it looks for (and only that).


def fake(sources: dict[str, str]) -> dict[str, Module]:
    """name -> source, as modules; a name listed as `pkg/` is a package's __init__."""
    where = {
        name: name.rstrip("/").replace(".", "/") + ("/__init__.py" if name[-1] == "/" else ".py")
        for name in sources
    }
    return {name.rstrip("/"): parse(name.rstrip("/"), where[name], src) for name, src in sources.items()}


def test_the_cycle_check_sees_local_relative_and_from_imports_and_ignores_type_checking():
    modules = fake(
        {
            "p/": "",
            "p.a": "def f():\n    from p import b\n",  # function-local, `from pkg import module`
            "p.b": "from .c import thing\n",  # relative
            "p.c": "import p.a\nthing = 1\n",
            "p.d": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from p import e\n",
            "p.e": "from p import d\n",
        }
    )
    [cycle] = import_cycles(modules)
    assert cycle == ("import cycle: p/a.py:2 imports p.b -> p/b.py:1 imports p.c -> p/c.py:1 imports p.a")


def test_the_engine_checks_catch_calls_runtime_imports_and_initialize():
    modules = fake(
        {
            "p.loop": (
                "from __future__ import annotations\n"
                "from deepspeed.runtime.engine import DeepSpeedEngine\n"
                "from dstrain import engine as eng\n"
                "def run(session, engine: DeepSpeedEngine) -> DeepSpeedEngine:\n"
                "    eng.step(engine)\n"  # through the boundary: fine
                "    eng.create_engine(session)\n"
                "    session.engine.backward(1)\n"
                "    engine.optimizer.zero_grad()\n"
                "    return isinstance(engine, DeepSpeedEngine)\n"
            ),
            "p.setup": "import deepspeed\nds_engine = deepspeed.initialize()[0]\nds_engine(x=1)\n",
        }
    )
    uses = per_module(engine_api_uses, modules)
    assert uses == [
        "p/loop.py:7: .backward on the DeepSpeed engine",
        "p/loop.py:8: .optimizer on the DeepSpeed engine",
        "p/setup.py:3: calls the DeepSpeed engine (its forward)",
    ]
    assert per_module(engine_class_runtime_uses, modules) == [
        "p/loop.py:9: DeepSpeedEngine used outside a type hint"
    ]
    assert per_module(initialize_calls, modules) == [
        "p/setup.py:2: deepspeed.initialize outside dstrain/engine.py"
    ]


def test_the_length_check_counts_decorators_and_docstrings():
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES - 3))
    source = f'@decorator\ndef f():\n    """Doc."""\n{body}\n'  # exactly the limit
    assert long_functions(fake({"p.ok": source})) == []
    assert long_functions(fake({"p.long": source + "    y = 0\n"})) == [
        f"p/long.py:2: f is {MAX_FUNCTION_LINES + 1} lines"
    ]
