"""Every fenced block marked runnable (```{.python .runnable}) in docs/ runs. The blocks of a
page run in order in one namespace, in an empty temporary folder, as a reader would run them.
Most pages load the built-in SmolLM2-135M-Instruct (cached offline)."""

import pytest

from tests.docs.examples import pages, runnable_blocks

PAGES = [page for page in pages() if runnable_blocks(page)]


def test_runnable_blocks_are_found():
    """The marker is recognised (a page set that lost its runnable blocks fails here)."""
    assert {"guides/quickstart.md", "guides/generation.md", "loading/index.md"} <= set(PAGES)


@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.parametrize("page", PAGES)
def test_page_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    for line, code in runnable_blocks(page):
        exec(compile(code, f"docs/{page}, block at line {line}", "exec"), namespace)
