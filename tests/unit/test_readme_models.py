"""README's "Supported models" table is the model-family matrix the tests run, generated, never edited."""

from __future__ import annotations

from tests.families import table
from tests.helpers import REPO


def test_readme_table_is_the_tested_matrix():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    begin, end = "<!-- models:begin -->\n", "\n<!-- models:end -->"
    written = readme[readme.index(begin) + len(begin) : readme.index(end)]
    assert written == table(), "regenerate it: python -m tests.families --table"
