"""The README's Python examples run as written (torch backend, CPU), and its test command is .ci/run's."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
EXAMPLES = re.findall(r"```python\n(.*?)```", README, flags=re.S)


@pytest.mark.parametrize("code", EXAMPLES, ids=[f"example{i}" for i in range(len(EXAMPLES))])
def test_readme_example_runs(code, capsys):
    exec(compile(code, "README.md", "exec"), {})
    assert "nan" not in capsys.readouterr().out.lower()


def test_readme_has_examples_and_test_command():
    assert len(EXAMPLES) >= 4
    m = re.search(r"<!-- test-command:start -->\s*```bash\n(.*?)\n```", README, flags=re.S)
    assert m and "pytest tests" in m.group(1)
    assert "test-command:start" in (ROOT / ".ci" / "run").read_text()
