"""The README is what a newcomer runs: every command in it starts (``--help``), its Python example runs,
and its Layout names what the tree holds (and nothing that is not there)."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

DOCS = [ROOT / "README.md", ROOT / "research" / "README.md"]
BIN = Path(sys.executable).parent


def _blocks(path: Path, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", path.read_text(), re.S)


def _commands() -> list[tuple[str, str]]:
    out = []
    for doc in DOCS:
        for block in _blocks(doc, "bash"):
            for line in block.splitlines():
                line = line.split("#")[0].strip()
                if line.startswith(".venv/bin/") and not line.startswith(".venv/bin/pip"):
                    out.append((doc.name, line))
    return out


def _argv(line: str) -> list[str]:
    """The command up to its first option, then --help; .venv/bin/X resolved in this interpreter's venv."""
    words = line.split()
    exe = words[0].removeprefix(".venv/bin/")
    head = [sys.executable] if exe == "python" else [str(BIN / exe)]
    for w in words[1:]:
        if w.startswith(("-", "[")) or w == "|":
            if w == "-m":
                head.append(w)
                continue
            break
        head.append(w)
    return head + ["--help"]


COMMANDS = _commands()


def test_the_readmes_name_commands():
    names = {line.split()[0] for _, line in COMMANDS}
    assert {".venv/bin/python", ".venv/bin/photon-ask", ".venv/bin/photon-eval", ".venv/bin/photon-train"} <= names


@pytest.mark.parametrize("doc,line", COMMANDS, ids=[f"{d}:{line.split()[1][:40]}" for d, line in COMMANDS])
def test_every_readme_command_starts(doc, line):
    argv = _argv(line)
    if not Path(argv[0]).exists():
        pytest.fail(f"{doc}: {argv[0]} is not installed (make installs the project's commands)")
    r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "usage" in r.stdout.lower(), f"{doc}: {' '.join(argv)}\n{r.stderr[-2000:]}"


def test_the_python_example_runs():
    code = _blocks(ROOT / "README.md", "python")
    assert code, "README.md has no Python example"
    r = subprocess.run([sys.executable, "-c", code[0]], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip(), "the example prints the answer"


def test_layout_names_the_tree():
    text = (ROOT / "README.md").read_text()
    layout = re.search(r"## Layout\n\n```\n(.*?)```", text, re.S).group(1)
    named, stack = set(), []
    for line in layout.splitlines():
        if not line.strip() or line.startswith(" " * 8):       # continuation lines of a description
            continue
        indent = (len(line) - len(line.lstrip())) // 2
        name = line.split()[0]
        if not re.fullmatch(r"[\w.-]+/?", name):
            continue
        stack = stack[:indent] + [name.rstrip("/")]
        path = "/".join(stack)
        assert (ROOT / path).exists(), f"the Layout names {path}, which does not exist"
        named.add(path)
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    top = {p.split("/")[0] for p in tracked if "/" in p} - {".ci"}
    missing = sorted(top - named)
    assert not missing, f"the Layout does not name {missing}"
    subpackages = {p.split("/")[1] for p in tracked if p.startswith("photon_core/") and p.count("/") >= 2}
    missing = sorted(d for d in subpackages if f"photon_core/{d}" not in named)
    assert not missing, f"the Layout does not name photon_core's {missing}"
