"""The README's Python example runs as written."""

import re
import runpy
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    blocks = [b for b in blocks if "import unifusion_core" in b]  # the self-contained examples
    assert blocks, "README has no runnable python example"
    monkeypatch.chdir(tmp_path)
    for i, code in enumerate(blocks):
        script = tmp_path / f"readme_example_{i}.py"
        script.write_text(code.replace("/tmp/", f"{tmp_path}/"))
        runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert "torch.Size([2, 16, 24, 32])" in out and "SmolLM2-135M-Instruct" in out
