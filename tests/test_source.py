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
