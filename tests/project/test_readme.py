"""README.md: its research-code example runs as written, and each figure it shows is one a
script of the repository makes. (What moved to the documentation site is checked in
tests/project/test_docs.py.)"""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_python_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README.md should hold a python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert namespace["v"].shape == (8, 10, 16)
    assert namespace["grad_u"].shape == (8, 1152, 8)


def test_every_readme_figure_is_made_by_a_script():
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README.read_text())
    assert figures, "README.md shows at least one figure"
    script = (README.parent / "scripts" / "paper_experiments.sh").read_text()
    for figure in figures:
        assert (README.parent / figure).is_file(), figure
        assert Path(figure).name in script, f"{figure}: no script in the repository writes it"
