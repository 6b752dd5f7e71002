"""docs/interactions.md's python code blocks, run as written (in a temporary folder)."""

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "interactions.md"


@pytest.mark.slow
def test_interactions_doc_code_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)\n```", DOC.read_text(encoding="utf-8"), re.S)
    assert blocks, "docs/interactions.md has no python code block"
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        exec(compile(code, str(DOC), "exec"), {"__name__": "__doc__"})
