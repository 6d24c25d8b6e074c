"""The manual's Python examples run as written (each `python` block of docs/*.md, in a
fresh interpreter, in a temporary directory)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
BLOCKS = [(page, i, code) for page in sorted(DOCS.glob("*.md")) for i, code in enumerate(BLOCK.findall(page.read_text()))]


@pytest.mark.parametrize("page, index, code", BLOCKS, ids=[f"{p.name}:{i}" for p, i, _ in BLOCKS])
def test_docs_python_blocks_run(tmp_path, page, index, code):
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{page.name} block {index} failed:\n{proc.stderr[-3000:]}"


def test_every_page_is_reachable_from_the_readme():
    readme = (DOCS.parent / "README.md").read_text()
    for page in DOCS.glob("*.md"):
        assert f"docs/{page.name}" in readme, f"README.md does not link docs/{page.name}"
