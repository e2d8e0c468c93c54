"""Messages the docs quote are messages the code prints.

The review found docs quoting error messages the code never printed (data.md, augmentation.md).
Every code span of the README and docs/ that reads as a sentence (at least four spaces, no path,
no command, no code) is checked:

* a parameter error (`<key path>: expected ..., got V` or `<key path>: unknown key ...`) is
  produced here by the project's own checker, with the value the quote names, and the quote must
  be part of what it prints;
* any other quote must be an instance of (a part of) one message of the package's source or
  templates, word by word: a placeholder of the source (`{...}` of an f-string, `%s` of a log
  call) stands for any words, `...` or `<...>` in the quote for any omitted text; at least 60%
  of the quote's words must be the message's own (not values its placeholders took).
"""

from __future__ import annotations

import ast
import copy
import re
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
WORD = re.compile(r"[A-Za-z][A-Za-z_'-]*")
COMMANDS = {
    "kedro",
    "make",
    "python",
    ".venv",
    "torchrun",
    "pip",
    "sbatch",
    "bash",
    "docker",
    "mlflow",
    "git",
    "export",
    "for",
    "cp",
    "mv",
    "mkdir",
    "rm",
    "ln",
    "cd",
    "sudo",
}
PARAMETER_MESSAGE = re.compile(r"^(?P<key>[a-z_][a-z0-9_.]*): (?P<what>expected|unknown key)")


def _code_spans(text: str) -> list[str]:
    """The inline code spans of a Markdown text, as CommonMark reads them (markdown-it)."""
    from markdown_it import MarkdownIt

    spans = []
    for token in MarkdownIt().parse(text):
        spans += [c.content for c in token.children or [] if c.type == "code_inline"]
    return spans


def _sentence_spans() -> list[tuple[str, str]]:
    spans = []
    for doc in DOCS:
        for span in _code_spans(doc.read_text()):
            if span.count(" ") < 4 or "/" in span or span[0] in "{[":
                continue
            if "=" in span.replace(">=", "").replace("<=", ""):
                continue
            if span.split()[0] in COMMANDS or re.search(r"\w\(", span):
                continue
            if re.fullmatch(r"[\w.]+(, [\w.]+)+", span):
                continue  # a list of names (columns, keys), not a message
            if re.match(r"^\w+: [\d\[-]", span) and not PARAMETER_MESSAGE.match(span):
                continue  # a YAML mapping (`scale: [0.92, 1.08], ...`), not a message
            spans.append((doc.name, span))
    return spans


PH, GAP = "\x00placeholder", "\x00gap"
TOKEN = re.compile(r"[a-z0-9_']+")


def _tokens(text: str, holes: str, hole: str) -> list[str]:
    out: list[str] = []
    for i, piece in enumerate(re.split(holes, text.lower())):
        if i:
            out.append(hole)
        out += TOKEN.findall(piece)
    return out


def _source_messages() -> list[list[str]]:
    """Every string literal of src/ (f-strings with their placeholders) and every template."""
    placeholders = r"%[-+ #0.\d]*[sdfrgi]|\{[^}]*\}"
    messages: list[list[str]] = []
    for path in (ROOT / "src").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                messages.append(_tokens(node.value, placeholders, PH))
            elif isinstance(node, ast.JoinedStr):
                tokens: list[str] = []
                for value in node.values:
                    if isinstance(value, ast.Constant):
                        tokens += _tokens(value.value, placeholders, PH)
                    else:
                        tokens.append(PH)
                messages.append(tokens)
    messages += [
        _tokens(p.read_text(), r"\{\{.*?\}\}|\{%.*?%\}", PH) for p in (ROOT / "src").rglob("*.j2")
    ]
    return [m for m in messages if len([t for t in m if t != PH]) >= 3]


def _best_alignment(quote: list[str], message: list[str]) -> int:
    """How many words of `quote` (words and GAPs) match words of `message` (words and PHs) in
    the best alignment that makes the quote a part of an instance of the message; -1 if none.
    A placeholder absorbs any words (a value filled in), but those do not count as matched."""
    n, m = len(quote), len(message)
    impossible = -(10**9)

    @cache
    def match(i: int, j: int) -> int:
        if i == n:
            return 0
        if quote[i] == GAP:
            return max(match(i + 1, k) for k in range(j, m + 1))
        if j == m:
            return impossible
        if message[j] == PH:
            return max(match(i, j + 1), match(i + 1, j))
        return 1 + match(i + 1, j + 1) if quote[i] == message[j] else impossible

    return max([match(0, j) for j in range(m)] + [-1])


SPANS = _sentence_spans()


def test_the_scan_finds_the_quotes_it_is_for():
    quoted = {span for _, span in SPANS}
    assert "reporting.gradcam.devcie: unknown key (did you mean 'device'?)" in quoted
    assert any(span.startswith("training already finished for this") for span in quoted)


def _parameter_error(key_path: str, what: str, quote: str) -> str:
    from rare_cxr.configuration import validate_parameters
    from rare_cxr.parameters import ParameterError
    from rare_cxr.pipeline_registry import project_parameters

    params = copy.deepcopy(project_parameters(ROOT, None))
    *parents, leaf = key_path.split(".")
    node = params
    for part in parents:
        node = node.setdefault(part, {})
    if what == "expected":
        node[leaf] = yaml.safe_load(quote.rsplit("got ", 1)[1])
    else:  # an unknown key: any value
        node[leaf] = 1
    with pytest.raises(ParameterError) as error:
        validate_parameters(params, allowed=set())
    return str(error.value)


@pytest.mark.parametrize(("doc", "quote"), SPANS, ids=[f"{d}:{q[:40]}" for d, q in SPANS])
def test_a_quoted_message_is_printed_by_the_code(doc, quote):
    parameter = PARAMETER_MESSAGE.match(quote)
    if parameter:
        printed = _parameter_error(parameter["key"], parameter["what"], quote)
        assert quote in printed, f"{doc} quotes {quote!r}; the checker prints:\n{printed}"
        return
    words = _tokens(quote, r"<[^>]*>|\.\.\.|…", GAP)
    literal = [w for w in words if w != GAP]
    best = max((_best_alignment(words, m) for m in SOURCE if set(literal) & set(m)), default=-1)
    # most of the quote must be the message's own words, not values its placeholders took
    assert best >= max(3, 0.6 * len(literal)), (
        f"{doc} quotes {quote!r}, which no message of src/ prints "
        f"(best: {max(best, 0)} of its {len(literal)} words)"
    )


SOURCE = _source_messages()
