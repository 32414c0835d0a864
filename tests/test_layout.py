"""The README's layout table is the import rule: every folder and module has a row, each imports only what its
row allows (`(CLI)`: only its `__main__.py`), and the allowed imports form no cycle (nothing imports upwards)."""
import ast
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTSIDE = ('configs', 'launch', 'bench', 'tests')  # folders beside the package


def layout_table() -> dict[str, str]:
  """README `## Layout` rows: path (no trailing '/') -> the imports cell."""
  with open(os.path.join(REPO, 'README.md')) as f:
    section = f.read().split('\n## Layout\n', 1)[1].split('\n## ', 1)[0]
  rows = re.findall(r'^\| `([^`]+)` \| .+ \| (.+) \|$', section, re.MULTILINE)
  return {path.rstrip('/'): cell for path, cell in rows}


def short(path: str) -> str:
  """'llava_jax/models' / 'llava_jax/chat.py' / 'configs' -> 'models' / 'chat' / 'configs'."""
  return os.path.basename(path).removesuffix('.py')


def rule(cell: str):
  """'`models`, `data` (CLI)' -> ({'models'}, {'data'}); 'anything' -> None; 'nothing' or '(shell)' -> (set(), set())."""
  if cell == 'anything':
    return None
  names = re.findall(r'`(\w+)`( \(CLI\))?', cell)
  assert names or cell in ('nothing', '(shell)'), f'README layout: cannot read the imports cell {cell!r}'
  return {n for n, cli in names if not cli}, {n for n, cli in names if cli}


def unit_of(rel: str) -> str:
  parts = rel.split('/')
  return '/'.join(parts[:2]) if parts[0] == 'llava_jax' else parts[0]


def python_files():
  for top in ('llava_jax',) + OUTSIDE:
    for d, _, files in os.walk(os.path.join(REPO, top)):
      for f in sorted(files):
        if f.endswith('.py'):
          yield os.path.relpath(os.path.join(d, f), REPO)


def imported_units(rel: str) -> set[str]:
  """Short names of the llava_jax folders/modules a file imports (anywhere in it, function bodies included)."""
  with open(os.path.join(REPO, rel)) as f:
    tree = ast.parse(f.read(), rel)
  modules = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      modules += [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      assert node.level == 0, f'{rel}:{node.lineno}: relative import'
      modules += [f'{node.module}.{a.name}' for a in node.names]
  return {m.split('.')[1] for m in modules if m.startswith('llava_jax.')}


def test_every_folder_and_module_has_a_row():
  package = os.path.join(REPO, 'llava_jax')
  expected = {f'llava_jax/{e}' for e in os.listdir(package)
              if (e.endswith('.py') and e != '__init__.py') or os.path.isfile(os.path.join(package, e, '__init__.py'))}
  expected |= set(OUTSIDE)
  assert sorted(set(layout_table()) - expected) == [] and sorted(expected - set(layout_table())) == []


def test_imports_follow_the_table():
  table = layout_table()
  rules = {short(path): rule(cell) for path, cell in table.items()}
  bad = []
  for rel in python_files():
    if rel == 'llava_jax/__init__.py':  # the package itself: imports nothing of ours
      bad += [f'{rel} imports {u}' for u in sorted(imported_units(rel))]
      continue
    unit = short(unit_of(rel))
    if rules[unit] is None:
      continue
    anywhere, cli = rules[unit]
    allowed = anywhere | (cli if rel.endswith('__main__.py') else set())
    bad += [f'{rel} imports {u}' for u in sorted(imported_units(rel) - allowed - {unit})]
  assert bad == []
  # No cycle among the allowed imports (CLI entries aside): the table is a layering.
  graph = {u: r[0] for u, r in rules.items() if r is not None}
  done, path = set(), []

  def visit(u):
    assert u not in path, f'import cycle in the README layout table: {" -> ".join(path + [u])}'
    if u in done:
      return
    path.append(u)
    for v in graph.get(u, ()):
      visit(v)
    path.pop()
    done.add(u)

  for u in graph:
    visit(u)
