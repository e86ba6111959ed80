"""Every ```python block of README.md runs, in order, in one namespace (the README's promise)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.DOTALL)


def test_readme_starts_with_install_and_test_commands():
    text = (ROOT / "README.md").read_text()
    first_bash = re.search(r"```bash\n(.*?)```", text, flags=re.DOTALL)
    assert first_bash is not None
    assert first_bash.group(1).split("\n")[:2] == ['python -m pip install -e ".[dev]"', "python -m pytest"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'python -m pip install -e ".[dev]"' in ci and "python -m pytest" in ci


@pytest.mark.slow
def test_readme_python_blocks_run(tmp_path, monkeypatch):
    blocks = python_blocks()
    assert len(blocks) >= 8
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    for index, block in enumerate(blocks):
        try:
            exec(compile(block, f"README.md block {index}", "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"README python block {index} failed:\n{block}") from error
    assert os.getcwd() == str(tmp_path)
    # the tour leaves its artifacts where a user would find them
    assert (tmp_path / "multitask.onnx").is_file()
    assert (tmp_path / "benchmark.json").is_file()
