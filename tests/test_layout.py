"""The package layout: every module imports only from its own stage or a lower one, and stays short.

Stages, lowest first (a module's stage is its subpackage; errors, atomic and models are core):

    core < data < library < inference < discover < train < eval < serve < demo < cli

Every import counts: module level, inside functions (lazy imports) and importlib.import_module
calls with a literal name. Parsed with `ast`, nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "chainlora"
STAGES = ("core", "data", "library", "inference", "discover", "train", "eval", "serve", "demo", "cli")
RANK = {stage: i for i, stage in enumerate(STAGES)}
CORE = ("errors", "atomic", "base_model", "models", "console", "quantization")  # top-level modules every stage may use
MAX_LINES = 450


def module_of(path: Path) -> str:
    """chainlora/train/run.py -> chainlora.train.run; a package's __init__.py is the package."""
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def stage_of(module: str) -> str | None:
    """The stage of a chainlora module; None for anything outside chainlora, "?" for no stage."""
    parts = module.split(".")
    if parts[0] != "chainlora":
        return None
    if len(parts) == 1 or parts[1] in CORE:
        return "core"  # the top-level package itself holds only __version__ and ChainloraError
    if parts[1] == "__main__":
        return "cli"  # `python -m chainlora` is the CLI
    return parts[1] if parts[1] in RANK and parts[1] != "core" else "?"


def _is_module(module: str) -> bool:
    path = SRC.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imported(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, module) of every chainlora module the tree imports."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's own package
                anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # `from chainlora import library` imports chainlora.library
                sub = f"{base}.{alias.name}"
                found.append((node.lineno, sub if _is_module(sub) else base))
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
              in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            found.append((node.lineno, node.args[0].value))
    return sorted(found)


def violations(source: str, module: str, where: str, is_package: bool = False) -> list[str]:
    """Imports of a higher-ranked stage (or of a module in no stage) in `source`."""
    own = stage_of(module)
    if own == "?":
        return [f"{where}: {module} belongs to no stage (put it in a subpackage: {', '.join(STAGES[1:])})"]
    bad = []
    for line, target in imported(ast.parse(source, where), module, is_package):
        stage = stage_of(target)
        if stage is None:
            continue
        if stage == "?":
            bad.append(f"{where}:{line}: imports {target}, which belongs to no stage")
        elif RANK[stage] > RANK[own]:
            bad.append(f"{where}:{line}: {own} imports {target} ({stage} ranks above {own})")
    return bad


def sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_no_module_imports_a_higher_stage():
    bad = []
    for path in sources():
        bad += violations(path.read_text(encoding="utf-8"), module_of(path), str(path.relative_to(SRC.parent)),
                          is_package=path.name == "__init__.py")
    assert not bad, "imports against the stage order:\n" + "\n".join(bad)


def test_no_module_is_too_long():
    long = [f"{p.relative_to(SRC.parent)}: {n} lines" for p in sources()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES]
    assert not long, f"modules over {MAX_LINES} lines (split them):\n" + "\n".join(long)


def test_every_stage_is_a_package():
    for stage in STAGES[1:]:
        assert (PACKAGE / stage / "__init__.py").is_file(), stage
    for name in CORE:
        assert (PACKAGE / f"{name}.py").is_file(), name


def test_the_check_catches_a_violation():
    """The checker itself: a lazy upward import, a `from chainlora import` of a stage, a dynamic one."""
    src = ("import json\n"
           "from chainlora import atomic\n"
           "from chainlora.data import records\n"
           "def f():\n"
           "    from chainlora.train import cola\n"
           "    from chainlora import serve\n"
           "    import importlib; importlib.import_module('chainlora.cli')\n")
    found = violations(src, "chainlora.library.store", "store.py")
    assert [v.split(": ")[0] for v in found] == ["store.py:5", "store.py:6", "store.py:7"], found
    assert violations("from chainlora.inference.engine import Engine\n", "chainlora.serve.app", "app.py") == []
    assert violations("from chainlora.base_model import load_base\n", "chainlora.data.records", "r.py") == []
    assert violations("", "chainlora.helpers", "helpers.py")  # a new flat module has no stage
    assert violations("from chainlora.helpers import x\n", "chainlora.cli", "cli.py")


MAX_FUNCTION_LINES = 80
REGISTRY = PACKAGE / "library" / "kinds.py"


def long_functions(source: str, where: str) -> list[str]:
    """Functions (methods and nested ones included) over MAX_FUNCTION_LINES lines."""
    return [f"{where}:{n.lineno}: {n.name} is {n.end_lineno - n.lineno + 1} lines"
            for n in ast.walk(ast.parse(source, where)) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]


def selector_kind_names() -> set[str]:
    """Every selector and the entry each runs on, as the registry defines them."""
    from chainlora.library import kinds

    return set(kinds.SELECTORS) | {s.entry for s in kinds.SELECTORS.values()}


def kind_lists(source: str, where: str, names: set[str]) -> list[str]:
    """Tuples, lists, sets and dict keys that spell out two or more selector kinds by hand: such a
    list goes stale when a selector is added; read chainlora.library.kinds instead."""
    found = []
    for node in ast.walk(ast.parse(source, where)):
        items = (node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set))
                 else node.keys if isinstance(node, ast.Dict) else [])
        spelled = {i.value for i in items if isinstance(i, ast.Constant) and i.value in names}
        if len(spelled) >= 2:
            found.append(f"{where}:{node.lineno}: {sorted(spelled)}")
    return found


def test_no_function_is_too_long():
    long = []
    for path in sources():
        long += long_functions(path.read_text(encoding="utf-8"), str(path.relative_to(SRC.parent)))
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (split them into named steps):\n" + "\n".join(long)


def test_selector_kinds_are_listed_only_in_the_registry():
    names, bad = selector_kind_names(), []
    for path in sources():
        if path != REGISTRY:
            bad += kind_lists(path.read_text(encoding="utf-8"), str(path.relative_to(SRC.parent)), names)
    assert not bad, "selector kinds written out by hand (use chainlora.library.kinds):\n" + "\n".join(bad)


def test_the_function_and_kind_checks_catch_what_they_should():
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    assert long_functions(f"def f():\n{body}", "f.py") == [f"f.py:1: f is {MAX_FUNCTION_LINES + 1} lines"]
    assert long_functions(f"def f():\n{body[:-11]}", "f.py") == []
    names = selector_kind_names()
    src = ('A = ("classifier", "encoder", "sft")\n'
           'B = {"score": 1, "generate": 2}\n'
           'C: Literal["auto", "score", "router"]\n'
           'D = ("score", "mixed")\n')
    assert [v.split(": ")[0] for v in kind_lists(src, "m.py", names)] == ["m.py:1", "m.py:2", "m.py:3"]


MOVED = {"chainlora.models": "chainlora.base_model", "chainlora.library.llamacpp": "chainlora.library.gguf",
         "chainlora.train.selectors": "chainlora.train.selector_models", "chainlora.train.run": "chainlora.train.recipe",
         "chainlora.inference.router": "chainlora.inference.label_ranking",
         "chainlora.discover.run": "chainlora.discover.pipeline"}


def test_moved_modules_still_import_as_the_new_ones():
    import importlib

    for old, new in MOVED.items():
        assert importlib.import_module(old) is importlib.import_module(new), old
    from chainlora.inference.classifier import Encoder, FrozenEncoder
    from chainlora.train.run import run_job, train_library  # noqa: F401  (the old entry points)

    assert Encoder is FrozenEncoder
