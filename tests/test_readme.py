"""The README's Python snippets run as written (strict: every call runs a pyfastdl kernel)."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_snippets():
    assert SNIPPETS, "README.md has no ```python blocks"


@pytest.mark.parametrize("i", range(len(SNIPPETS)))
def test_readme_snippet_runs(i):
    namespace = {"__name__": "readme_snippet"}
    exec(compile(SNIPPETS[i], f"README.md (python block {i})", "exec"), namespace)
