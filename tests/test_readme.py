"""The README is a short user's guide whose every Python block runs as written.

All ```python blocks run in order, in one fresh interpreter (later blocks use the names
earlier ones define), from a scratch directory; bash blocks are not run.  The files and
charts the README links must exist.
"""
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

RUNNER = """
import sys
blocks = {blocks!r}
namespace = {{"__name__": "__main__"}}
for number, code in enumerate(blocks, 1):
    print(f"=== README python block {{number}} ===", flush=True)
    exec(compile(code, f"README.md python block {{number}}", "exec"), namespace)
print("=== all README python blocks ran ===", flush=True)
"""


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)


@pytest.mark.hf_inductor_cpu
def test_readme_python_blocks_run_as_written(tmp_path):
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 4, "the usage, Hugging Face, EAGLE-2 and custom-loop examples"
    script = tmp_path / "readme_blocks.py"
    script.write_text(RUNNER.format(blocks=blocks))
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=900)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert "=== all README python blocks ran ===" in done.stdout
    usage = done.stdout.split("=== README python block 2 ===")[0]
    assert "ActiveVocab(size=3," in usage  # the first example prints what its comment says


def test_readme_is_a_guide_and_links_what_it_quotes():
    text = README.read_text()
    assert len(text.splitlines()) <= 300
    assert "docs/RESULTS.md" in text  # the measurement history lives there
    assert "## Results" in text and text.count("\n| way |") == 1  # one current results table
    links = {target for target in re.findall(r"\]\(([^)#\s]+)\)", text) if "://" not in target}
    assert {"docs/RESULTS.md", "bench/results/demo_eagle_gemma3.json"} <= links
    missing = [path for path in sorted(links) if not (ROOT / path).exists()]
    assert not missing, f"the README links files that do not exist: {missing}"


def test_results_history_links_exist():
    results = ROOT / "docs" / "RESULTS.md"
    links = [t for t in re.findall(r"\]\(([^)#\s]+)\)", results.read_text()) if "://" not in t]
    missing = [path for path in links if not (results.parent / path).exists()]
    assert not missing, f"docs/RESULTS.md links files that do not exist: {missing}"
