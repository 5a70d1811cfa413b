"""The README's quick start runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs(capsys):
    text = README.read_text()
    section = text[text.index("## Quick start"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README.md quick start", "exec"), {})
    printed = capsys.readouterr().out
    assert "MH accuracy" in printed and "SMC log Z" in printed


def test_prove_your_own_kernel_runs_and_prints_the_shown_message(capsys):
    text = README.read_text()
    section = text[text.index("## Prove your own kernel"):]
    code, printed = re.findall(r"```(?:python)?\n(.*?)```", section, re.S)[:2]
    exec(compile(code, "README.md prove your own kernel", "exec"), {})
    assert capsys.readouterr().out.strip() == printed.strip()


def test_model_internals_example_runs(tmp_path):
    text = README.read_text()
    section = text[text.index("## Model internals"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1).replace("/tmp/adapter", str(tmp_path / "adapter"))
    namespace = {}
    exec(compile(code, "README.md model internals", "exec"), namespace)
    assert namespace["out"].features.shape == (4, 8, namespace["lm"].hidden_size)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
