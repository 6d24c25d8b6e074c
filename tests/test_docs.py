"""The manual's Python examples run as written, and its links lead somewhere.

Every ```python block of README.md and docs/**/*.md runs, unless the line right before it
is `<!-- not-run: REASON -->`: that block's test is skipped with the reason. The blocks of
one page run in order in one namespace (a later block may use names an earlier one defined),
in a temporary directory of the page's own. All pages run in one fresh interpreter, so that
importing torch is paid once; each block still gets its own test and its own failure.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
NOT_RUN = re.compile(r"^<!-- not-run: (\S.*?) -->$")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def python_blocks(page: Path) -> list[tuple[str, str | None]]:
    """`(code, reason)` for each python block of a page; `reason` is None for blocks that run."""
    text = page.read_text()
    blocks = []
    for match in BLOCK.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = NOT_RUN.match(before)
        blocks.append((match.group(1), marker.group(1) if marker else None))
    return blocks


def name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


BLOCKS = [(name(page), i, code, reason) for page in PAGES for i, (code, reason) in enumerate(python_blocks(page))]

# Runs in the child interpreter: argv[1] is a JSON file of {page: [code or None, ...]},
# argv[2] the directory to work in, argv[3] where the results go.
RUNNER = r"""
import contextlib, io, json, os, sys, time, traceback
pages = json.load(open(sys.argv[1]))
results = {}
for page, blocks in pages.items():
    cwd = os.path.join(sys.argv[2], page.replace("/", "_"))
    os.makedirs(cwd)
    os.chdir(cwd)
    namespace = {"__name__": "__main__"}
    failed = None
    for index, code in enumerate(blocks):
        if code is None:
            continue
        key = f"{page}:{index}"
        if failed is not None:
            results[key] = f"not run: block {failed} of this page failed first"
            continue
        out = io.StringIO()
        started = time.perf_counter()
        try:
            with contextlib.redirect_stdout(out):
                exec(compile(code, key, "exec"), namespace)
            results[key] = None
        except BaseException:
            failed = index
            results[key] = out.getvalue()[-2000:] + traceback.format_exc()[-4000:]
        print(f"{key}: {time.perf_counter() - started:.1f}s", file=sys.stderr)
json.dump(results, open(sys.argv[3], "w"))
"""


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    base = tmp_path_factory.mktemp("docs")
    pages: dict[str, list[str | None]] = {}
    for page, _, code, reason in BLOCKS:
        pages.setdefault(page, []).append(None if reason else code)
    (base / "blocks.json").write_text(json.dumps(pages))
    (base / "work").mkdir()
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-c", RUNNER, str(base / "blocks.json"), str(base / "work"), str(base / "results.json")]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"the docs runner crashed:\n{proc.stderr[-3000:]}"
    return json.loads((base / "results.json").read_text())


@pytest.mark.parametrize("page, index, code, reason", BLOCKS, ids=[f"{p}:{i}" for p, i, _, _ in BLOCKS])
def test_docs_python_blocks_run(results, page, index, code, reason):
    if reason:
        pytest.skip(f"{page} python block {index}, not-run: {reason}")
    error = results[f"{page}:{index}"]
    assert error is None, f"{page} python block {index} failed:\n{error}"


def test_not_run_markers_are_well_formed():
    """A misspelt marker would make its block run (and fail) instead of being skipped."""
    for page in PAGES:
        for line in page.read_text().splitlines():
            if "not-run" in line and line.startswith("<!--"):
                assert NOT_RUN.match(line), f"{name(page)}: malformed marker {line!r}; write <!-- not-run: REASON -->"


def test_every_page_is_reachable_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    for page in DOCS.rglob("*.md"):
        assert f"({name(page)}" in readme, f"README.md does not link {name(page)}"


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as dashes."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.MULTILINE | re.DOTALL)
    headings = re.findall(r"^#+ (.+)$", text, re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=name)
def test_relative_links_lead_to_existing_files_and_headings(page):
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked here
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{name(page)} links {target}: no such file"
        if anchor and file.suffix == ".md":
            assert anchor in anchors(file), f"{name(page)} links {target}: {file.name} has no such heading"
