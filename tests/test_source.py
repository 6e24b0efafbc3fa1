"""The package's own source: checks that no other test makes."""

import ast
import pathlib
import re
import warnings

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCES = sorted(p for d in ("jaxcl", "experiments", "benchmarks", "tests")
                 for p in (ROOT / d).rglob("*.py"))
# What a LaTeX command in a non-raw docstring turns into: \b (\beta,
# \begin) a backspace, \t (\theta, \top) a tab, \f (\frac) a form feed,
# \a (\alpha) a bell, \v (\vert) a vertical tab, \r (\rho) a return.
CONTROL = re.compile(r"[\x07\x08\x09\x0b\x0c\x0d]")


@pytest.mark.parametrize("path", SOURCES,
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_docstrings_keep_their_backslashes(path):
  """Two docstrings' math had lost a ``\\begin`` and a ``\\theta`` to escapes
  (session 34), and five files had escapes Python 3.12 warns about."""
  source = path.read_text(encoding="utf-8")
  with warnings.catch_warnings():
    warnings.simplefilter("error", SyntaxWarning)
    warnings.simplefilter("error", DeprecationWarning)
    tree = compile(source, str(path), "exec", ast.PyCF_ONLY_AST)
  for node in ast.walk(tree):
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                         ast.AsyncFunctionDef)):
      doc = ast.get_docstring(node, clean=False) or ""
      hit = CONTROL.search(doc)
      assert hit is None, (
          f"{getattr(node, 'name', 'module')}: a control character "
          f"{hit.group()!r} in its docstring near "
          f"{doc[max(0, hit.start() - 30):hit.start() + 10]!r}; double the "
          "backslash or make the docstring raw")


# Calls of ``ctx.model.apply`` that only read shapes (latent replay finds
# its layers in a ``jax.eval_shape``), and so need no mixed precision.
SHAPE_ONLY_APPLY = {"latent_replay.py": 1}


def test_strategies_run_the_model_through_the_context():
  """A strategy that runs the model itself calls ``ctx.model_apply`` (or
  ``ctx.apply`` / ``ctx.logits``), which applies ``model.compute_dtype``;
  ``ctx.model.apply`` skipped it, in seven strategies until session 48."""
  found = {}
  for path in sorted((ROOT / "jaxcl" / "strategies").glob("*.py")):
    n = path.read_text(encoding="utf-8").count("ctx.model.apply(")
    if n:
      found[path.name] = n
  assert found == SHAPE_ONLY_APPLY, (
      f"ctx.model.apply in {found}; call ctx.model_apply so that "
      "model.compute_dtype reaches the pass")
