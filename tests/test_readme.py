"""The README's Python example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    blocks = [b for b in blocks if "import unifusion_core" in b]  # the self-contained examples
    assert blocks, "README has no runnable python example"
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        exec(compile(code.replace("/tmp/", f"{tmp_path}/"), "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "torch.Size([2, 16, 24, 32])" in out and "SmolLM2-135M-Instruct" in out
