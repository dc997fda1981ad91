"""The house rules, read from the source with ast: who may import whom, files and functions a reader can take in
whole (the budgets below), and lines a reader can see whole."""
import ast
import glob
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GROUND = {"model": set(), "tokenizer": set(), "tasks": set()}  # each ground-floor file -> what it may import
SHARED = {"common", "device", "checkpoints", "data", "inference", "replies", "training", "isolate", "configurator",
          "lora", "distill"}
SHARED_LINES = 300  # a shared file is one job, read in one sitting
FILE_LINES = {"model": 320, "train": 420, "README.md": 350}
FUNCTION_LINES = 100  # anywhere; a class's methods count one by one
MAIN_LINES = {"train": 100, "rl": 100, "dpo": 100}


def top_level_files():
    return sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "*.py")))


def project_imports(name):
    """The project files that name.py imports, anywhere in it (inside functions too)."""
    with open(os.path.join(ROOT, f"{name}.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found & set(top_level_files()) - {name}


def test_every_top_level_file_is_on_a_floor():
    scripts = set(top_level_files()) - GROUND.keys() - SHARED
    for name in scripts:
        with open(os.path.join(ROOT, f"{name}.py"), encoding="utf-8") as f:
            assert 'if __name__ == "__main__":' in f.read(), f"{name}.py is neither a floor file nor a script"


@pytest.mark.parametrize("name", top_level_files())
def test_imports_go_down_the_floors(name):
    imports = project_imports(name)
    if name in GROUND:
        assert imports <= GROUND[name], f"ground-floor {name}.py imports {imports - GROUND[name]}"
    elif name in SHARED:
        assert imports <= GROUND.keys() | SHARED, f"{name}.py imports the script(s) {imports - GROUND.keys() - SHARED}"
    else:
        scripts = imports - GROUND.keys() - SHARED
        assert not scripts, f"the script {name}.py imports the script(s) {scripts}: share through a shared file"


def test_ground_floor_text_files_need_no_torch():
    for name in ("tokenizer", "tasks"):
        with open(os.path.join(ROOT, f"{name}.py"), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        modules = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        modules |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not any(m.split(".")[0] == "torch" for m in modules), f"{name}.py imports torch"


def test_no_test_file_imports_another():
    tests = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "tests", "test_*.py"))}
    for name in tests:
        with open(os.path.join(ROOT, "tests", f"{name}.py"), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not imported & tests, f"tests/{name}.py imports {imported & tests}: share through conftest.py"


def test_lines_are_at_most_120_characters():
    paths = glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "tests", "*.py")) \
        + glob.glob(os.path.join(ROOT, "config", "*.py"))
    long_lines = [f"{os.path.relpath(p, ROOT)}:{i}" for p in paths
                  for i, line in enumerate(open(p, encoding="utf-8"), 1) if len(line.rstrip("\n")) > 120]
    assert not long_lines, f"lines over 120 characters: {', '.join(long_lines)}"


def line_count(name):
    path = os.path.join(ROOT, name if "." in name else f"{name}.py")
    with open(path, encoding="utf-8") as f:
        return sum(1 for _ in f)


@pytest.mark.parametrize("name", sorted(SHARED))
def test_a_shared_file_has_one_job_and_fits_the_budget(name):
    with open(os.path.join(ROOT, f"{name}.py"), encoding="utf-8") as f:
        docstring = ast.get_docstring(ast.parse(f.read()))
    assert docstring and docstring.strip(), f"{name}.py has no docstring saying its job"
    assert line_count(name) <= SHARED_LINES, f"{name}.py has {line_count(name)} lines (budget {SHARED_LINES})"


@pytest.mark.parametrize("name, budget", FILE_LINES.items())
def test_files_fit_their_budget(name, budget):
    assert line_count(name) <= budget, f"{name} has {line_count(name)} lines (budget {budget})"


def functions(name):
    """(qualified name, lines) of every function and method in name.py."""
    with open(os.path.join(ROOT, f"{name}.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    found = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found.append((prefix + child.name, child.end_lineno - child.lineno + 1))
                visit(child, prefix + child.name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")
    visit(tree, "")
    return found


@pytest.mark.parametrize("name", top_level_files())
def test_no_function_is_longer_than_the_budget(name):
    long = [f"{qualname} ({lines})" for qualname, lines in functions(name) if lines > FUNCTION_LINES]
    assert not long, f"{name}.py: functions over {FUNCTION_LINES} lines: {', '.join(long)}"


@pytest.mark.parametrize("name, budget", MAIN_LINES.items())
def test_a_training_scripts_main_reads_in_one_screenful_or_two(name, budget):
    lines = dict(functions(name))["main"]
    assert lines <= budget, f"{name}.main has {lines} lines (budget {budget})"


def test_shared_files_import_no_cycle():
    graph = {name: project_imports(name) & SHARED for name in SHARED}
    done, stack = set(), []

    def visit(name):
        assert name not in stack, f"import cycle among shared files: {' -> '.join(stack + [name])}"
        if name in done:
            return
        stack.append(name)
        for imported in graph[name]:
            visit(imported)
        stack.pop()
        done.add(name)
    for name in sorted(graph):
        visit(name)
