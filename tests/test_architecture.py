"""
The house rules of docs/architecture.md, checked on the source: no module imports one that imports it back
(any import, inside a function too), the rooms' sizes, and the layers data flows down through.
"""
import ast
from pathlib import Path

from conftest import REPO

SOURCES = sorted(p for p in REPO.rglob('*.py') if not p.relative_to(REPO).parts[0] in ('tests', 'data', 'config')
                 and '.venv' not in p.parts)
MODULES = {'.'.join(p.relative_to(REPO).with_suffix('').parts).removesuffix('.__init__'): p for p in SOURCES}
SCRIPTS = ['train.py', 'dpo.py', 'sample.py', 'serve.py', 'bench.py', 'bench_serve.py', 'export.py', 'chat_eval.py', 'rl.py',
           'report.py',
           'sample_alibi_extrapolation.py']
# the layers, top to bottom: a module imports only from its own layer's files that are not scripts, or from below
LAYERS = [set(m.removesuffix('.py') for m in SCRIPTS),
          {'serving', 'serving.api', 'serving.worker', 'serving.runs', 'serving.metrics'},
          {'textgen', 'common', 'checkpoint', 'preference'},
          {'model', 'inference', 'lora'},
          {'engine', 'sampling', 'speculative', 'hf', 'muon'},
          {'tokenizer', 'configurator', 'calculator', 'grammar'}]


def imports(path):
    """The project modules a file imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] + [f'{node.module}.{a.name}' for a in node.names] if isinstance(node, ast.ImportFrom) and node.module else []
        found.update(n for n in names if n in MODULES)
    return found


def test_no_import_circle():
    graph = {m: imports(p) - {m} for m, p in MODULES.items()}

    def visit(m, path):
        assert m not in path, f"import circle: {' -> '.join(path[path.index(m):] + [m])}"
        for n in graph[m]:
            visit(n, path + [m])
    for m in graph:
        visit(m, [])


def test_data_flows_down_the_layers():
    layer = {m: i for i, names in enumerate(LAYERS) for m in names}
    for m, p in MODULES.items():
        if m not in layer or m.startswith('tasks'):
            continue
        for n in imports(p):
            if n in layer and not n.startswith('tasks'):
                assert layer[n] > layer[m] or (layer[n] == layer[m] and n not in LAYERS[0]), f"{m} imports {n}, above it"


def test_no_script_is_imported():
    for m, p in MODULES.items():
        for n in imports(p):
            assert n + '.py' not in SCRIPTS, \
                f"{m} imports the script {n}.py: move what it needs into a module"


def lengths(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            yield node, node.end_lineno - node.lineno + 1


def test_sizes():
    lines = lambda name: len((REPO / name).read_text().splitlines())  # noqa: E731
    assert lines('serve.py') <= 350 and lines('model.py') <= 500 and lines('README.md') <= 300
    for name in SCRIPTS:
        assert lines(name) <= 700, name
    for path in SOURCES:
        for node, n in lengths(path):
            limit = 250 if isinstance(node, ast.ClassDef) else 90
            assert n <= limit, f"{path.name}: {node.name} has {n} lines (at most {limit})"
