"""pytest-benchmark micro-benchmarks: ``.venv/bin/python -m pytest bench/ --benchmark-only``.

The files are named ``bench_<family>.py`` (one family, one basename), which pytest does not collect by
default; this hook collects them when bench/ is given explicitly. The test suite (testpaths =
["tests"]) never sees them.
"""
import pytest


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
