"""
Run the Python code blocks of the ecosystem guides in docs/.

All ```python blocks of a page run in order in one namespace, in a temporary working directory, with
network connections refused. A block preceded by the line `<!-- no-test -->` is skipped; those are for
code that needs a real model download or the Hub.
"""

import re
import socket
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = ["positions.md", "stacking-with-lora.md", "trainable-vectors.md", "hub.md", "export-llama-cpp.md", "loading.md"]
SKIP_MARK = "<!-- no-test -->"
# Skipped blocks must stay the exception; raise this only with a reason.
MAX_SKIPPED_PER_PAGE = 2
FENCE = re.compile(r"^```(\w*)\s*$")


def code_blocks(text: str) -> list[dict]:
    """Return the fenced code blocks of a Markdown page with their language, first line and skip mark."""
    blocks, current, previous_line = [], None, ""
    for number, line in enumerate(text.splitlines(), start=1):
        fence = FENCE.match(line)
        if current is None and fence:
            current = {"language": fence.group(1), "line": number + 1, "skip": previous_line == SKIP_MARK, "code": []}
        elif current is not None and line.startswith("```"):
            current["code"] = "\n".join(current["code"]) + "\n"
            blocks.append(current)
            current = None
        elif current is not None:
            current["code"].append(line)
        if line.strip():
            previous_line = line.strip()
    assert current is None, "unterminated code block"
    return blocks


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"a docs snippet tried to open a network connection: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    yield tmp_path


def test_code_block_parser():
    text = "intro\n```python\na = 1\n```\n\n<!-- no-test -->\n\n```python\nb = 2\n```\n```bash\nls\n```\n"

    blocks = code_blocks(text)

    assert [(b["language"], b["skip"], b["code"]) for b in blocks] == [
        ("python", False, "a = 1\n"),
        ("python", True, "b = 2\n"),
        ("bash", False, "ls\n"),
    ]
    assert blocks[0]["line"] == 3


@pytest.mark.parametrize("page", PAGES)
def test_page_has_runnable_python(page):
    blocks = [block for block in code_blocks((DOCS / page).read_text()) if block["language"] == "python"]

    assert [block for block in blocks if not block["skip"]], f"{page} has no runnable Python block"
    assert sum(block["skip"] for block in blocks) <= MAX_SKIPPED_PER_PAGE


@pytest.mark.parametrize("page", PAGES)
def test_page_snippets_run(page, sandbox):
    namespace = {"__name__": f"docs_{page.replace('-', '_').replace('.', '_')}"}
    for block in code_blocks((DOCS / page).read_text()):
        if block["language"] != "python" or block["skip"]:
            continue
        code = compile(block["code"], f"docs/{page}, block at line {block['line']}", "exec")
        exec(code, namespace)
