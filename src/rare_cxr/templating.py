"""Every document rare-cxr writes (report.html, the inference report, the model card) is a
Jinja2 template filled with plain data; text that comes from a file or a bundle is escaped,
never interpreted.

Why templates: a bundle's metadata (model name, data source, subgroup names...) and file names
are input, not markup. Built from string pieces, a source such as
`x\\n# Approved for clinical use ![](http://evil/pixel.png)` became a heading and an external
image in the card. Here escaping is the default, not a call someone can forget:

* HTML templates (`*.html.j2`): Jinja2's autoescape. `|safe` is used only on fragments this
  package rendered itself (the card's HTML, from escaped Markdown); tables go through the
  `table` filter (pandas' `to_html(escape=True)`, marked safe there).
* Markdown templates (`*.md.j2`): every `{{ value }}` goes through `finalize`, which escapes
  it as Markdown text (`md_escape`: whitespace collapsed to one space, so a value cannot start
  a block; every character that can open a link, image, emphasis, code, HTML tag, table cell,
  entity or strikethrough backslash-escaped; a leading `#`, `+`, `-`, `=` or `1.`/`1)`
  escaped too). Only values already turned into Markdown by this module's filters (`MdSafe`:
  numbers, code spans) pass unchanged.

Templates live in `rare_cxr/templates/` (package data, see pyproject.toml): `report.html.j2`,
`inference_report.html.j2`, `model_card.md.j2`, and `style.css` (the pages' shared inline
style: a report stays one self-contained file).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from functools import cache
from typing import Any

import jinja2
from markupsafe import Markup

TEMPLATE_PACKAGE = ("rare_cxr", "templates")


class MdSafe(Markup):
    """Markdown this module produced (an escaped value, a number, a code span, a macro's
    table): `finalize` leaves it as it is.

    A `markupsafe.Markup` only so that Jinja2's own "already safe" machinery does the work in
    Markdown templates: their environment runs with autoescape on and a `finalize` that turns
    every other value into escaped Markdown (`md_escape`); Jinja2 then leaves these values, and
    the output of macros built from them, as they are. No HTML escaping is applied to Markdown.
    """


# CommonMark backslash-escapes any ASCII punctuation; these are the ones that can open inline
# markup (links/images [ ] !, emphasis * _, code `, HTML/autolinks < >, entities &, GFM table
# cells |, strikethrough ~) or be a backslash escape themselves. An underscore between two
# letters or digits cannot open or close emphasis (CommonMark 6.2), so `val_macro_auroc`
# stays readable in the Markdown source.
_INLINE = re.compile(r"([\\`*\[\]<>|~&!]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9]))")
_BLOCK_START = re.compile(r"^([#+=-])|^(\d+)([.)])")


def md_escape(value: Any) -> MdSafe:
    """`value` as Markdown text that renders as exactly that text (see the module doc)."""
    text = " ".join(str(value).split())
    text = _INLINE.sub(r"\\\1", text)
    text = _BLOCK_START.sub(lambda m: f"\\{m[1]}" if m[1] else f"{m[2]}\\{m[3]}", text, count=1)
    return MdSafe(text)


def md_code(value: Any) -> MdSafe:
    """`value` as a Markdown code span (nothing inside one is interpreted): the fence is one
    backtick longer than the longest run of backticks in the text. Not for table cells (a `|`
    would still end the cell there); use plain `{{ value }}` in tables."""
    text = " ".join(str(value).split())
    runs = [len(r) for r in re.findall(r"`+", text)]
    fence = "`" * (max(runs, default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or not text.strip() else ""
    return MdSafe(f"{fence}{pad}{text}{pad}{fence}")


def _md_finalize(value: Any) -> Markup:
    """What every `{{ value }}` of a Markdown template prints (see `MdSafe`)."""
    if isinstance(value, Markup):  # MdSafe, or a macro's output (built from MdSafe values)
        return value
    if value is None:
        return MdSafe("n/a")
    if isinstance(value, bool):
        return MdSafe(str(value).lower())
    if isinstance(value, int | float):
        return MdSafe(value)
    return md_escape(value)


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def fmt_number(value: Any, digits: int = 3) -> str:
    """A metric as text: `n/a` when missing or NaN, integers as integers; a value that is not
    a number (a damaged bundle) is shown as the text it is."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    number = _number(value)
    if number is None:
        return "n/a" if value is None or _is_nan(value) else str(value)
    return f"{number:.{digits}f}"


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def fmt_ci(value: Any, ci: Sequence[Any] | None = None, digits: int = 3) -> str:
    """`value [low, high]`, or the value alone when the interval is incomplete."""
    text = fmt_number(value, digits)
    if _number(value) is None or not isinstance(ci, Sequence) or len(ci) != 2:
        return text
    low, high = _number(ci[0]), _number(ci[1])
    if low is None or high is None:
        return text
    return f"{text} [{low:.{digits}f}, {high:.{digits}f}]"


def _md_number(value: Any, digits: int = 3) -> MdSafe:
    text = fmt_number(value, digits)
    return MdSafe(text) if _number(value) is not None or text == "n/a" else md_escape(text)


def _md_ci(value: Any, ci: Sequence[Any] | None = None, digits: int = 3) -> MdSafe:
    if _number(value) is None:
        return _md_number(value, digits)
    return MdSafe(fmt_ci(value, ci, digits))


def html_table(frame: Any) -> Markup:
    """A DataFrame as an HTML table, every cell escaped (pandas' `escape=True`); `n/a` for a
    missing value. The one place a table becomes markup."""
    return Markup(frame.to_html(index=False, na_rep="n/a", border=0, escape=True))


@cache
def _environment(markdown: bool) -> jinja2.Environment:
    """One environment per document kind, built on first use."""
    loader = jinja2.PackageLoader(*TEMPLATE_PACKAGE)
    common = {
        "loader": loader,
        "undefined": jinja2.StrictUndefined,
        "keep_trailing_newline": True,
        "autoescape": True,  # Markdown: see MdSafe; the escaping is `finalize`'s
        "trim_blocks": True,  # block tags on lines of their own leave no blank line behind
        "lstrip_blocks": True,
    }
    if markdown:
        env = jinja2.Environment(finalize=_md_finalize, **common)
        env.filters.update(code=md_code, num=_md_number, ci=_md_ci)
    else:
        env = jinja2.Environment(**common)
        env.filters.update(num=fmt_number, ci=fmt_ci, table=html_table)
    return env


def render(name: str, **context: Any) -> str:
    """Render the package template `name` (`*.md.j2` as Markdown, anything else as HTML)."""
    return _environment(name.endswith(".md.j2")).get_template(name).render(**context)
