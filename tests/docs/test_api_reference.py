"""Every public name is in the API reference, with a docstring that has an Example section
holding a fenced Python example (the examples themselves run in test_docstring_examples)."""

import glob
import os
import re

import pytest

from tests.docs.examples import DOCS, ROOT, docstring_examples, python_fences
from tests.docs.public_api import public_names

_DIRECTIVE = re.compile(r"^:::\s+(\S+)\s*$", re.M)


def reference_directives():
    """The objects the API pages render (``::: dotted.path`` lines)."""
    found = set()
    for page in glob.glob(os.path.join(DOCS, "api", "*.md")):
        with open(page, encoding="utf-8") as f:
            found.update(_DIRECTIVE.findall(f.read()))
    return found


@pytest.fixture(scope="module")
def package():
    import griffe

    return griffe.load("keras_llama", search_paths=[ROOT], docstring_parser="google")


def griffe_object(package, dotted):
    return package[dotted.split(".", 1)[1]]


def missing_examples(obj):
    """Why ``obj``'s docstring falls short, or None when it has a fenced Example."""
    examples = docstring_examples(obj)
    if not examples:
        return "no Example section"
    if not any(python_fences(text) for text in examples):
        return "an Example section without a ```python block"
    return None


@pytest.mark.parametrize("name", public_names())
def test_public_name_is_in_the_reference_with_an_example(name, package):
    assert name in reference_directives(), f"{name} is not rendered by any docs/api/*.md page"
    problem = missing_examples(griffe_object(package, name))
    assert problem is None, f"{name}: {problem}"


def test_the_check_catches_a_docstring_without_example(package):
    """The check fails where it should: a docstring with Args but no Example, and one whose
    Example holds prose only."""
    import griffe

    for text in ("Summary.\n\nArgs:\n    x: a value.\n",
                 "Summary.\n\nExample:\n    Call it with a value.\n"):  # fmt: skip
        function = griffe.Function("f", docstring=griffe.Docstring(text, parser="google"))
        assert missing_examples(function) is not None
