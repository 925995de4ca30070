"""MkDocs hook: the site's formulas become MathML when the site is built.

``pymdownx.arithmatex`` (generic mode) wraps every formula of the Markdown and of the
docstrings in ``<span class="arithmatex">\\( … \\)</span>`` or
``<div class="arithmatex">\\[ … \\]</div>``. This hook converts each one to MathML with
``latex2mathml``, so the pages need no script, no web font and no network to show their
math: every current browser renders MathML natively. A formula the converter cannot
read fails the build, naming the page and the formula.
"""

from __future__ import annotations

import html
import re

from latex2mathml.converter import convert
from mkdocs.exceptions import PluginError

_FORMULA = re.compile(r'<(span|div) class="arithmatex">(.*?)</\1>', re.S)
_DELIMITERS = {"span": (r"\(", r"\)", "inline"), "div": (r"\[", r"\]", "block")}


def to_mathml(tex: str, display: str) -> str:
  """Returns the MathML of one TeX formula (``display`` is ``"inline"`` or ``"block"``)."""
  # The converter lays out ``align*`` as a table; its ``aligned`` would print the ``&``.
  tex = tex.strip().replace(r"\begin{aligned}", r"\begin{align*}").replace(
      r"\end{aligned}", r"\end{align*}")
  mathml = convert(tex, display=display)
  # Inside \text{…}/\texttt{…} TeX escapes underscores; the converter keeps the backslash.
  mathml = re.sub(r"(<mtext[^>]*>)([^<]*)(</mtext>)",
                  lambda m: m.group(1) + m.group(2).replace("\\_", "_") + m.group(3), mathml)
  # The converter prints a command it does not know as text: refuse it instead.
  unknown = re.findall(r"\\[A-Za-z]+", re.sub(r"<[^>]+>", " ", mathml))
  if unknown:
    raise ValueError(f"unsupported TeX command(s) {sorted(set(unknown))}")
  return mathml


def on_page_content(content, page, **kwargs):  # pylint: disable=unused-argument
  """Replaces every arithmatex formula of a page by MathML."""

  def replace(match):
    tag, body = match.groups()
    opening, closing, display = _DELIMITERS[tag]
    tex = html.unescape(body).strip()
    if not (tex.startswith(opening) and tex.endswith(closing)):
      raise PluginError(f"{page.file.src_path}: unexpected math markup {body[:80]!r}")
    tex = tex[len(opening):-len(closing)]
    try:
      mathml = to_mathml(tex, display)
    except Exception as error:  # the converter raises several exception types
      raise PluginError(f"{page.file.src_path}: cannot convert {tex[:80]!r}: {error}") from error
    return f'<{tag} class="arithmatex">{mathml}</{tag}>'

  return _FORMULA.sub(replace, content)
