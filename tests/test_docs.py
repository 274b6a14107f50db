"""Every ```python block in docs/ runs. The blocks of one page share a namespace and run in
order, in a temporary working directory. A page containing `<!-- docs-test: slow -->` is marked slow; `<!-- docs-test: requires MODULE -->` skips
the page where MODULE (an optional extra) is not installed."""
from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from qdrop.io import torch_threads

DOCS = Path(__file__).resolve().parents[1] / "docs"
BLOCK = re.compile(r"^```python[^\n]*\n(.*?)^```", re.S | re.M)
PAGES = sorted(p for p in DOCS.rglob("*.md") if BLOCK.search(p.read_text()))


def python_blocks(page: Path) -> list[tuple[int, str]]:
    text = page.read_text()
    return [(text[: m.start()].count("\n") + 1, m.group(1)) for m in BLOCK.finditer(text)]


REQUIRES = re.compile(r"<!-- docs-test: requires ([\w.]+) -->")


def _param(page: Path):
    text = page.read_text()
    marks = [pytest.mark.slow] if "<!-- docs-test: slow -->" in text else []
    # a page whose examples need an optional extra (e.g. transformers for docs/nlp.md) runs where it is installed
    for module in REQUIRES.findall(text):
        try:
            __import__(module)
        except ImportError:
            marks.append(pytest.mark.skip(reason=f"{module} is not installed (optional extra)"))
    return pytest.param(page, id=str(page.relative_to(DOCS)), marks=marks)


def test_docs_have_examples():
    names = {str(p.relative_to(DOCS)) for p in PAGES}
    for page in ("algorithms/naive.md", "algorithms/adaround.md", "algorithms/brecq.md", "algorithms/qdrop.md",
                 "quantize_your_model.md", "benchmark_protocol.md"):
        assert page in names, page


@pytest.mark.parametrize("page", [_param(p) for p in PAGES])
def test_doc_examples_run(page, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QDROP_OFFLINE", "1")
    monkeypatch.setenv("QDROP_CACHE", str(tmp_path / "cache"))
    namespace = {"__name__": f"docs_{page.stem}"}
    t0 = time.perf_counter()
    with torch_threads(1):
        for line, code in python_blocks(page):
            try:
                exec(compile(code, f"{page.relative_to(DOCS)}:{line}", "exec"), namespace)
            except Exception as err:
                raise AssertionError(f"{page.name}, block at line {line} failed: {type(err).__name__}: {err}") from err
    elapsed = time.perf_counter() - t0
    assert elapsed < 60 or "<!-- docs-test: slow -->" in page.read_text(), f"{page.name} took {elapsed:.0f} s: mark it slow"
