"""The layout of the package: no import cycle, no private imports, one table of recipes."""

from __future__ import annotations

import ast
import pathlib
from typing import Any

import kl_optax
from kl_optax import parts as P
from kl_optax.options import Fallback, Layout, resolve
from kl_optax.recipes import RecipeSpec, with_adam_fallback
from kl_optax.transform import kron_transform
from recipe_contract import check_recipe

PACKAGE = pathlib.Path(kl_optax.__file__).parent


def _modules() -> dict[str, pathlib.Path]:
  return {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
          for p in PACKAGE.rglob("*.py")}


def _imports(path: pathlib.Path):
  """``(module, name)`` for every ``from kl_optax… import name`` and ``import kl_optax…``."""
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kl_optax"):
      for alias in node.names:
        yield node.module, alias.name
    elif isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.startswith("kl_optax"):
          yield alias.name, None


def _graph() -> dict[str, set[str]]:
  modules = _modules()
  graph = {}
  for name, path in modules.items():
    deps = set()
    for module, imported in _imports(path):
      target = f"{module}.{imported}" if f"{module}.{imported}" in modules else module
      if target != name and target != "kl_optax":
        deps.add(target)
    graph[name] = deps
  return graph


def test_the_import_graph_has_no_cycle():
  graph = _graph()
  assert graph["kl_optax.state"] == set()   # the state types import nothing of the package
  done, active = set(), []

  def visit(node):
    if node in active:
      raise AssertionError(f"import cycle: {' -> '.join(active[active.index(node):] + [node])}")
    if node in done:
      return
    active.append(node)
    for dep in graph.get(node, ()):
      visit(dep)
    active.pop()
    done.add(node)

  for node in graph:
    visit(node)


def test_no_module_imports_a_private_name_of_another():
  offenders = []
  for name, path in _modules().items():
    for module, imported in _imports(path):
      private_module = any(part.startswith("_") and part != "__init__"
                           for part in module.split("."))
      if (imported or "").startswith("_") or private_module:
        offenders.append(f"{name}: from {module} import {imported}")
    tree = ast.parse(path.read_text())
    aliases = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
               and (n.module or "").startswith("kl_optax") for a in n.names}
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
          and not node.attr.startswith("__") and isinstance(node.value, ast.Name)
          and node.value.id in aliases):
        offenders.append(f"{name}: {node.value.id}.{node.attr}")
  assert not offenders, offenders


def test_the_table_drives_the_exports_and_the_benchmarks():
  from kl_optax.benchmarks import optimizers, suite
  for name, spec in kl_optax.RECIPES.items():
    assert getattr(kl_optax, name) is spec.constructor
    assert name in kl_optax.__all__ and spec.preconditioner.__name__ in kl_optax.__all__
    assert name in optimizers.OPTIMIZERS and name in suite.ALL_OPTIMIZERS
    for workload, lr in spec.learning_rates.items():
      assert suite.QUICK_LEARNING_RATES[workload][name] == lr
  assert set(suite.KL_RECIPES) == {n for n, s in kl_optax.RECIPES.items() if s.kl}


def test_the_contract_checks_pass_on_kl_shampoo():
  # The other rows are covered check by check in test_conformance, test_reliability and
  # test_sharding, which read the table; this shows that check_recipe passes on a real row.
  check_recipe(kl_optax.RECIPES["kl_shampoo"])


# A recipe written by following docs/design.md, "Adding a recipe", step 1 (in the test
# instead of kl_optax/recipes.py): KL-Shampoo with Nesterov momentum.


def scale_by_kl_shampoo_nesterov(
    b1: Any = 0.9, b2: Any = 0.98, eps: Any = 1e-8, precondition_frequency: Any = 10,
    init_factor: Any = 0.1, *, layout: Layout | None = None, **legacy: Any):
  layout, _ = resolve("scale_by_kl_shampoo_nesterov", layout, None, legacy, takes_fallback=False)
  return kron_transform(
      P.momentum(b1, nesterov=True),
      P.whiten(eps),
      P.kl_factor_update(b2),
      P.ema_eigenvalues(b2, init_factor=init_factor),
      P.qr_basis_refresh(precondition_frequency),
      **layout.transform_options())


def kl_shampoo_nesterov(
    learning_rate, b1: Any = 0.9, b2: Any = 0.98, eps: Any = 1e-8, weight_decay: Any = 0.01,
    precondition_frequency: Any = 10, init_factor: Any = 0.1, *,
    layout: Layout | None = None, fallback: Fallback | None = None, **legacy: Any):
  layout, fallback = resolve("kl_shampoo_nesterov", layout, fallback, legacy)
  return with_adam_fallback(
      scale_by_kl_shampoo_nesterov(b1, b2, eps, precondition_frequency, init_factor,
                                   layout=layout.without_masks()),
      learning_rate, weight_decay, layout=layout, fallback=fallback)


def test_a_recipe_built_from_the_contract_passes_the_table_checks():
  spec = RecipeSpec("kl_shampoo_nesterov", kl_shampoo_nesterov, scale_by_kl_shampoo_nesterov,
                    test_kwargs={"init_factor": 1e-3}, kl=True)
  check_recipe(spec)


def _closure_depth(path: pathlib.Path) -> int:
  deepest = 0

  def walk(node, depth):
    nonlocal deepest
    for child in ast.iter_child_nodes(node):
      d = depth + isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
      deepest = max(deepest, d)
      walk(child, d)

  walk(ast.parse(path.read_text()), 0)
  return deepest


def test_the_update_pipelines_nest_at_most_two_functions_deep():
  assert _closure_depth(PACKAGE / "transform.py") <= 2
  assert _closure_depth(PACKAGE / "pro.py") <= 2
  assert max(_closure_depth(p) for p in PACKAGE.glob("*.py")) <= 3
