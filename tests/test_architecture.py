"""The code's shape, checked rather than promised: function length, import direction, no test hooks in src/."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "gpt_tinystories"
MAX_FUNCTION_LINES = 60


def modules() -> dict[str, ast.Module]:
    return {path.stem: ast.parse(path.read_text(), str(path)) for path in sorted(SRC.glob("*.py"))}


def imported(tree: ast.Module) -> set[str]:
    """The package's own modules that `tree` imports, at any depth (lazy imports inside functions too)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names |= {node.module} if node.module else {alias.name for alias in node.names}
    return names


def test_no_function_in_src_is_longer_than_60_lines():
    too_long = [
        f"{name}.py:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for name, tree in modules().items()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno + 1 > 60
    ]
    assert not too_long, f"functions longer than {MAX_FUNCTION_LINES} lines: {too_long}"


def test_the_length_check_sees_a_long_function():
    body = "\n".join(f"    x{i} = {i}" for i in range(61))
    tree = ast.parse(f"def long():\n{body}\n")
    (node,) = tree.body
    assert node.end_lineno - node.lineno + 1 == 62 > MAX_FUNCTION_LINES


def test_imports_flow_one_way():
    trees = modules()
    # checkpoint and hf learn about the hub from hub.py, not from the data pipeline
    assert "data" not in imported(trees["checkpoint"]) and "data" not in imported(trees["hf"])
    assert "hub" in imported(trees["checkpoint"]) and "hub" in imported(trees["hf"])
    # nothing below the CLI imports it; the model and the write helper import nothing that knows about runs
    assert not [name for name, tree in trees.items() if "cli" in imported(tree) and name != "__main__"]
    assert imported(trees["model"]) <= {"config", "errors", "attention"}  # the attention kernels are a model part
    assert imported(trees["attention"]) <= {"config", "errors"}
    assert imported(trees["atomic"]) == set()
    # evaluation does not train; checkpoints do not evaluate or train
    assert "trainer" not in imported(trees["evaluate"])
    assert not {"trainer", "evaluate", "cli"} & imported(trees["checkpoint"])


def test_no_test_hook_in_production_code():
    for path in SRC.glob("*.py"):
        text = path.read_text()
        assert "KILL_IN_SAVE" not in text and "SIGKILL" not in text, path.name


def test_every_file_write_goes_through_the_atomic_helper():
    """No module but atomic.py renames files into place itself."""
    for path in SRC.glob("*.py"):
        if path.name != "atomic.py":
            assert "os.replace(" not in path.read_text(), path.name
