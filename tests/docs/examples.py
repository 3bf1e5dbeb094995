"""Finding the code the docs promise runs: fenced blocks marked runnable in ``docs/`` pages,
and the Example sections of public docstrings (parsed by griffe, as the site renders them)."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCS = os.path.join(ROOT, "docs")

# A runnable block opens with ```{.python .runnable} (attributes may follow, e.g. title="...").
# The marker is documented in docs/guides/contributing_docs.md.
_FENCE = re.compile(r"^(?P<indent> *)(?P<ticks>`{3,})\s*\{(?P<attrs>[^}]*)\}\s*$")
_CODE_FENCE = re.compile(r"^(?P<indent> *)(?P<ticks>`{3,})\s*python\s*$")


def pages():
    """Every Markdown page under ``docs/``, relative to it, sorted."""
    found = []
    for folder, _, files in os.walk(DOCS):
        found += [
            os.path.relpath(os.path.join(folder, f), DOCS) for f in files if f.endswith(".md")
        ]
    return sorted(found)


def _blocks(lines, opening):
    """``(first line number, code)`` of each fenced block whose opening line ``opening``
    accepts (a match object or None)."""
    blocks, i = [], 0
    while i < len(lines):
        m = opening(lines[i])
        if not m:
            i += 1
            continue
        indent, ticks, start = len(m["indent"]), m["ticks"], i + 1
        j = start
        while j < len(lines) and lines[j].strip() != ticks:
            j += 1
        if j == len(lines):
            raise ValueError(f"Unclosed code fence opened at line {start}")
        blocks.append((start, "\n".join(line[indent:] for line in lines[start:j]) + "\n"))
        i = j + 1
    return blocks


def is_runnable_fence(line):
    m = _FENCE.match(line)
    if m and ".python" in m["attrs"].split() and ".runnable" in m["attrs"].split():
        return m
    return None


def runnable_blocks(page):
    """``[(line, code)]`` of the runnable blocks of ``docs/<page>``, in page order."""
    with open(os.path.join(DOCS, page), encoding="utf-8") as f:
        return _blocks(f.read().splitlines(), is_runnable_fence)


def python_fences(text):
    """The code of every plain ```python fence of ``text`` (a docstring's Example section)."""
    return [code for _, code in _blocks(text.splitlines(), _CODE_FENCE.match)]


def docstring_examples(obj):
    """The Example sections of a griffe object's docstring, as text (one per section). Griffe
    reads ``Examples:`` as an examples section and ``Example:`` (KerasHub's usual title) as an
    admonition of kind "example"; both count."""
    from griffe import DocstringSectionKind

    if obj.docstring is None:
        return []
    texts = []
    for section in obj.docstring.parse("google"):
        if section.kind is DocstringSectionKind.examples:
            texts.append(
                "\n".join(
                    value if kind is DocstringSectionKind.text else _doctest_to_code(value)
                    for kind, value in section.value
                )
            )
        elif section.kind is DocstringSectionKind.admonition and (
            section.value.annotation == "example"
        ):
            texts.append(section.value.description)
    return texts


def _doctest_to_code(value):
    lines = []
    for line in value.splitlines():
        if line.startswith((">>> ", "... ")):
            lines.append(line[4:])
    return "```python\n" + "\n".join(lines) + "\n```"
