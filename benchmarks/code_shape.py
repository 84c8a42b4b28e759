"""The shape of the code a maintainer lives in, measured (issue #30's before/after):
import cycles between our modules counting function-local imports, the longest functions,
and where each setting's range and meaning are declared.

    .venv/bin/python benchmarks/code_shape.py            # all three
    .venv/bin/python benchmarks/code_shape.py --cycles   # only the cycles (exit 1 if any)
"""

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("arcface_core", "cleaning", "dataset", "pipelines")


def our_modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of our packages."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Our modules that `name` imports, at the top or inside a function (`from a import b`
    counts `a.b` when that is a module, else `a`)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # a.b.func -> a.b
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_cycles() -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), i.e. the import cycles.
    A package's __init__ importing its own submodules is not counted as a cycle with them."""
    modules = our_modules()
    graph = {name: {t for t in imports_of(name, path, modules) if not name.startswith(t + ".")}
             for name, path in modules.items()}
    index, low, stack, on_stack, groups, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            visit(v)
    return sorted(groups)


def longest_functions(top: int) -> list[tuple[int, str]]:
    sizes = []
    for name, path in our_modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                sizes.append((node.end_lineno - node.lineno + 1, f"{name}.{node.name}"))
    return sorted(sizes, reverse=True)[:top]


def setting_declarations() -> tuple[int, int, int]:
    """(settings whose range is declared beside their field, ranges declared in a separate
    table, raise statements left in validate/__post_init__ methods)."""
    import dataclasses

    sys.path.insert(0, str(ROOT))
    from pipelines import config

    def beside(section) -> int:
        return sum(beside(getattr(section, f.name)) if dataclasses.is_dataclass(getattr(section, f.name))
                   else int("range" in f.metadata) for f in dataclasses.fields(section))

    declared = beside(config.Config())
    table = len(set(getattr(config, "RANGES", {})) - set(dict(_ranges_beside(config.Config()))))
    hand = 0
    for path in our_modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name in ("validate", "__post_init__"):
                hand += sum(isinstance(n, ast.Raise) for n in ast.walk(node))
    return declared, table, hand


def _ranges_beside(section, prefix: str = ""):
    import dataclasses

    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            yield from _ranges_beside(value, f"{prefix}{f.name}.")
        elif "range" in f.metadata:
            yield f"{prefix}{f.name}", f.metadata["range"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", action="store_true", help="only report import cycles")
    args = parser.parse_args()
    cycles = import_cycles()
    print(f"import cycles (function-local imports included): {len(cycles)}")
    for group in cycles:
        print("  " + " <-> ".join(group))
    if not args.cycles:
        print("longest functions (lines):")
        for lines, name in longest_functions(10):
            print(f"  {lines:4d}  {name}")
        declared, table, hand = setting_declarations()
        print(f"settings whose range is declared beside the field: {declared}; in a separate table: {table}; "
              f"raise statements in validate/__post_init__ methods: {hand}")
    return 1 if cycles else 0


if __name__ == "__main__":
    sys.exit(main())
