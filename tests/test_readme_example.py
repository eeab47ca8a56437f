"""The README's Python example runs as printed, on the real Fashion-MNIST files `make test` installs."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_python_example_runs_and_finds_the_planted_issues():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no ```python example"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(blocks[0], "README.md", "exec"), {"__name__": "readme"})
    lines = out.getvalue().split("\n")
    wrong, right = (float(v) for v in lines[0].split())
    assert wrong > 0.5 and right < 0.3, f"flagged {wrong:.0%} of wrong labels and {right:.0%} of right ones"
    drifted, p_value = lines[1].split()
    assert drifted == "True" and float(p_value) < 0.01
