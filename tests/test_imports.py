"""The package's imports run one way and in no circle (read from the source with `ast`).

Layers, bottom to top: models, kernels, data; peft, parallel, interop; the run directory and
generation; objectives; the trainer and the config; commands, sweeps and the CLI. A module may
import its own layer or the ones below. A package's __init__ importing its own submodules is
not a cycle (Python runs it first either way); every other edge counts, including the edge to
a package that `from package import module` implies.
"""
import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'flaxllm')

# Module prefix -> layer (the longest matching prefix wins).
LAYERS = {
    'flaxllm': 0, 'flaxllm.models': 0, 'flaxllm.kernels': 0, 'flaxllm.data': 0,
    'flaxllm.peft': 1, 'flaxllm.lora': 1, 'flaxllm.parallel': 1, 'flaxllm.interop': 1,
    'flaxllm.rundir': 2, 'flaxllm.generate': 2, 'flaxllm.interop.convert': 2,
    'flaxllm.objectives': 3,
    'flaxllm.train': 4, 'flaxllm.config': 4,
    'flaxllm.train.main': 5, 'flaxllm.train.compile': 5, 'flaxllm.train.distill_data': 5,
    'flaxllm.train.reward_cmd': 5, 'flaxllm.train.reference_logps': 5,
    'flaxllm.sweeps': 5, 'flaxllm.cli': 5, 'flaxllm.evaluation': 5,
    'flaxllm.evaluation.in_training': 5, 'flaxllm.evaluation.command': 5,
    'flaxllm.serve': 5,
}


def _modules() -> dict[str, str]:
  out = {}
  root = os.path.dirname(PACKAGE)
  for base, _, files in os.walk(PACKAGE):
    for f in files:
      if f.endswith('.py'):
        path = os.path.join(base, f)
        name = os.path.relpath(path, root)[:-3].replace(os.sep, '.')
        out[name[:-len('.__init__')] if name.endswith('.__init__') else name] = path
  return out


def _imports(name: str, path: str, known) -> list[tuple[str, int, bool]]:
  """(imported module, line, inside a function) of every flaxllm import in a module."""
  tree = ast.parse(open(path, encoding='utf-8').read())
  here = name if path.endswith('__init__.py') else name.rpartition('.')[0]
  local = set()
  for fn in ast.walk(tree):
    if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
      local |= {id(n) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))}
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        parts = here.split('.')
        base = '.'.join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
      targets = [base] + [f'{base}.{a.name}' for a in node.names]
    else:
      continue
    for t in targets:
      while t and t not in known:
        t = t.rpartition('.')[0]
      if t and t != name:
        found.append((t, node.lineno, id(node) in local))
  return found


def _graph():
  known = _modules()
  graph = {}
  for name, path in known.items():
    edges = _imports(name, path, known)
    is_init = path.endswith('__init__.py')
    graph[name] = {t for t, _, _ in edges if not (is_init and t.rpartition('.')[0] == name)}
  return known, graph


def _cycles(graph) -> list[list[str]]:
  """Strongly connected components of more than one module (Tarjan)."""
  index, low, stack, on, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def _layer(module: str) -> int:
  prefix = max((p for p in LAYERS if module == p or module.startswith(p + '.')), key=len)
  return LAYERS[prefix]


def test_no_import_cycles():
  _, graph = _graph()
  assert _cycles(graph) == []


def test_a_cycle_is_found():
  """The cycle finder itself: a two-module circle and a three-module one are reported."""
  graph = {'a': {'b'}, 'b': {'a'}, 'c': {'d'}, 'd': {'e'}, 'e': {'c'}, 'f': {'a'}}
  assert _cycles(graph) == [['a', 'b'], ['c', 'd', 'e']]


def test_imports_run_downward_through_the_layers():
  known, graph = _graph()
  upward = sorted(f'{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})'
                  for m, targets in graph.items() for t in targets if _layer(t) > _layer(m))
  assert upward == []


def test_function_local_imports_say_why():
  """An import inside a function is for a heavy or optional dependency, and says so after
  ' -- ' on its line (`# pylint: disable=import-outside-toplevel -- heavy, ...`)."""
  silent = []
  for name, path in _modules().items():
    lines = open(path, encoding='utf-8').read().splitlines()
    tree = ast.parse('\n'.join(lines))
    for fn in ast.walk(tree):
      if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
        for node in ast.walk(fn):
          if isinstance(node, (ast.Import, ast.ImportFrom)) and ' -- ' not in (
              lines[node.lineno - 1]):
            silent.append(f'{name}:{node.lineno}: {lines[node.lineno - 1].strip()}')
  assert silent == []


@pytest.mark.parametrize('module,expected', [('flaxllm.objectives.distill.teacher', 3),
                                             ('flaxllm.train.main', 5), ('flaxllm.lora', 1)])
def test_layer_of_a_module(module, expected):
  assert _layer(module) == expected
