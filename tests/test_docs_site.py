"""The documentation site, built strictly as CI builds it, then read back page by page.

Needs the ``docs`` extra (``pip install -e ".[docs]"``); without it the module is
skipped. CI installs the extra and runs this file after the main test command.
"""

from __future__ import annotations

import html
import html.parser
import importlib
import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

for _name in ("mkdocs", "material", "latex2mathml"):
  if os.environ.get("KL_OPTAX_REQUIRE_DOCS"):  # CI: a missing extra fails instead of skipping
    importlib.import_module(_name)
  else:
    pytest.importorskip(_name, reason="the docs extra is not installed")

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Elements whose text is not prose: TeX or backslashes there are expected.
_NOT_PROSE = {"code", "pre", "math", "script", "style", "kbd", "samp"}
_EXTERNAL = re.compile(r"^(https?:)?//", re.I)
_ROLE = re.compile(r":(func|class|mod|meth|attr|data|obj|exc):`")


class _Page(html.parser.HTMLParser):
  """Collects a page's prose text, its ``<math>`` count and the assets it loads."""

  def __init__(self):
    super().__init__(convert_charrefs=True)
    self.prose: list[str] = []
    self.assets: list[str] = []
    self.math = 0
    self._skip = 0

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    if tag == "math":
      self.math += 1
    if tag in _NOT_PROSE:
      self._skip += 1
    if tag == "script" and attrs.get("src"):
      self.assets.append(attrs["src"])
    if tag == "link" and attrs.get("rel") in ("stylesheet", "preload", "modulepreload"):
      self.assets.append(attrs.get("href", ""))
    if tag == "img" and attrs.get("src"):
      self.assets.append(attrs["src"])

  def handle_endtag(self, tag):
    if tag in _NOT_PROSE and self._skip:
      self._skip -= 1

  def handle_data(self, data):
    if not self._skip:
      self.prose.append(data)


def _read(path: pathlib.Path) -> _Page:
  page = _Page()
  page.feed(path.read_text(encoding="utf-8"))
  return page


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> pathlib.Path:
  out = tmp_path_factory.mktemp("site")
  env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
  result = subprocess.run(
      [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr[-4000:]}"
  return out


def _pages(site: pathlib.Path) -> list[pathlib.Path]:
  pages = sorted(site.rglob("*.html"))
  assert len(pages) >= 12, pages
  return pages


def _formulas(markdown: str) -> int:
  """The number of ``$$…$$`` blocks and ``$…$`` spans in a Markdown source (code excluded)."""
  text = re.sub(r"```.*?```", "", markdown, flags=re.S)
  text = re.sub(r"`[^`\n]*`", "", text)
  blocks = len(re.findall(r"\$\$.+?\$\$", text, flags=re.S))
  text = re.sub(r"\$\$.+?\$\$", "", text, flags=re.S)
  return blocks + len(re.findall(r"(?<!\\)\$[^$]+?(?<!\\)\$", text))


def test_math_page_renders_every_formula_without_a_script(site):
  page = _read(site / "math" / "index.html")
  prose = "".join(page.prose)
  for raw in ("$$", r"\(", r"\)", r"\[", r"\]"):
    assert raw not in prose, f"raw {raw!r} left in the math page's text"
  leftovers = re.findall(r"\\[A-Za-z]+", prose)
  assert not leftovers, f"raw TeX commands in the math page's text: {sorted(set(leftovers))}"
  expected = _formulas((ROOT / "docs" / "math.md").read_text(encoding="utf-8"))
  assert expected > 100
  assert page.math == expected, (page.math, expected)


def test_no_page_loads_anything_from_outside_the_site(site):
  for path in _pages(site):
    page = _read(path)
    external = [a for a in page.assets if _EXTERNAL.match(a)]
    assert not external, f"{path.relative_to(site)} loads {external}"


def test_no_page_shows_raw_math_or_docstring_roles(site):
  for path in _pages(site):
    page = _read(path)
    prose = "".join(page.prose)
    for raw in ("$$", r"\(", r"\["):
      assert raw not in prose, f"raw {raw!r} in {path.relative_to(site)}"
    roles = _ROLE.findall(prose)
    assert not roles, f"raw Sphinx roles {roles[:5]} in {path.relative_to(site)}"


def test_api_signatures_are_formatted_with_their_types(site):
  text = (site / "api" / "recipes" / "index.html").read_text(encoding="utf-8")
  anchor = text.index('id="kl_optax.recipes.kl_shampoo"')
  signature = text[anchor:text.index("</code></pre>", anchor)]
  plain = html.unescape(re.sub(r"<[^>]+>", "", signature))
  # One parameter per line (formatted by ruff), annotations shown.
  assert plain.count("\n") > 10, plain[:400]
  assert "b1: float = 0.9" in plain, plain[:400]
  assert "init_factor: float | str" in plain, plain[:400]


def _hook():
  spec = importlib.util.spec_from_file_location("mathml_hook", ROOT / "docs" / "hooks" / "mathml.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_math_hook_converts_and_refuses_what_it_cannot_render():
  hook = _hook()
  block = hook.to_mathml(r"\begin{aligned} m &\leftarrow b \\ U &= c \end{aligned}", "block")
  assert "<mtable" in block and "&amp;" not in block and ">&<" not in block
  assert "init_factor" in hook.to_mathml(r"\texttt{init\_factor}", "inline")
  with pytest.raises(ValueError, match=r"\\foo"):
    hook.to_mathml(r"\foo{x}", "inline")

  class _File:
    src_path = "page.md"

  class _P:
    file = _File()

  out = hook.on_page_content('<p><span class="arithmatex">\\(x^2\\)</span></p>', page=_P())
  assert "<math" in out and "<msup>" in out
  from mkdocs.exceptions import PluginError  # pylint: disable=import-outside-toplevel
  with pytest.raises(PluginError, match="page.md"):
    hook.on_page_content('<span class="arithmatex">\\(x^\\)</span>', page=_P())
