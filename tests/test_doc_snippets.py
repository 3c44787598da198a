"""The Python snippets of the README and docs/ run as written (a newcomer copies them), each file's
in order in a fresh interpreter.

Snippets that need what a test machine lacks (a downloaded checkpoint, a ``torchrun`` launch) are
left out by what they contain; the README's training snippet runs with fewer steps.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NEEDS_OUTSIDE = ("path/to/", "init_distributed")
# (file, text, replacement): smaller work than the docs show, same code path.
SHORTER = [("README.md", "max_steps=50", "max_steps=2"), ("README.md", "max_tokens=8192", "max_tokens=512")]


def snippets(doc: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / doc).read_text(encoding="utf-8"), re.S)
    source = "\n".join(b for b in blocks if not any(marker in b for marker in NEEDS_OUTSIDE))
    for name, text, shorter in SHORTER:
        if name == doc:
            assert source.count(text) == 1, (doc, text)
            source = source.replace(text, shorter)
    return source


@pytest.mark.parametrize("doc", ["README.md", "docs/analysis.md", "docs/classic.md"])
def test_doc_snippets_run(doc: str, tmp_path: Path) -> None:
    source = snippets(doc)
    assert source.strip(), f"no Python snippets found in {doc}"
    script = tmp_path / "snippets.py"
    script.write_text(source, encoding="utf-8")
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    if done.returncode:
        pytest.fail(f"{doc} snippets failed:\n{done.stderr[-4000:]}")
    if doc == "README.md":
        assert (tmp_path / "runs" / "demo" / "analysis" / "report.html").is_file()
