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
# each distinct program once: the README's lines of one program differ only in their options (not run)
PROGRAMS: dict[tuple, list[str]] = {}
for _doc, _line in COMMANDS:
    PROGRAMS.setdefault(tuple(_argv(_line)), []).append(f"{_doc}: {_line}")


def test_the_readmes_name_commands():
    names = {line.split()[0] for _, line in COMMANDS}
    assert {".venv/bin/python", ".venv/bin/photon-ask", ".venv/bin/photon-eval",
            ".venv/bin/photon-train"} <= names


@pytest.mark.parametrize("argv", list(PROGRAMS), ids=[" ".join(Path(w).name for w in a[:3])
                                                      for a in PROGRAMS])
def test_every_readme_command_starts(argv):
    lines = "\n".join(PROGRAMS[argv])
    if not Path(argv[0]).exists():
        pytest.fail(f"{argv[0]} is not installed (make installs the project's commands), named by:\n{lines}")
    r = subprocess.run(list(argv), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "usage" in r.stdout.lower(), f"{' '.join(argv)}\n{r.stderr[-2000:]}\n{lines}"


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


def test_layout_names_the_scripts_and_benchmarks_there_are():
    """scripts/ and bench/ list their files by name: each named file exists, each file there is named."""
    text = (ROOT / "README.md").read_text()
    layout = re.search(r"## Layout\n\n```\n(.*?)```", text, re.S).group(1)
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    for folder in ("scripts", "bench"):
        entry = re.search(rf"^{folder}/(.*?)(?=^\S)", layout, re.S | re.M).group(1)
        named = set(re.findall(r"[\w-]+\.(?:py|sh)\b", entry))
        there = {p.split("/")[1] for p in tracked if p.startswith(f"{folder}/") and p.count("/") == 1}
        assert named <= there, f"the Layout's {folder}/ names {sorted(named - there)}, which are not there"
        assert there <= named, f"the Layout's {folder}/ does not name {sorted(there - named)}"


TOP = ("photon_core/", "app/", "viz/", "tests/", "bench/", "scripts/", "research/", "reports/",
       "sample_cases/", "docs/")


def _paths_in(doc: Path) -> list[str]:
    """The repository paths a document names in backticks (`photon_core/io/volume.py: Limits` → the file;
    `train_log_stage{A,B}.jsonl` → each file), and its images."""
    out, text = [], doc.read_text()
    for span in re.findall(r"`([^`\n]+)`", text) + re.findall(r"!\[[^]]*\]\(([^)]+)\)", text):
        span = span.split(":")[0].split()[0] if span.split() else span
        if not span.startswith(TOP):
            continue
        brace = re.search(r"\{([^}]*)\}", span)
        out += ([span[:brace.start()] + x + span[brace.end():] for x in brace.group(1).split(",")] if brace
                else [span])
    return out


@pytest.mark.parametrize("doc", ["README.md", "photon_core/demo_model/MODEL_CARD.md", "BENCHMARKS.md"])
def test_the_paths_the_docs_name_exist(doc):
    paths = _paths_in(ROOT / doc)
    assert paths, f"{doc} names no repository path"
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert not missing, f"{doc} names {missing}, which do not exist"


@pytest.mark.parametrize("doc", ["README.md", "photon_core/demo_model/MODEL_CARD.md", "BENCHMARKS.md"])
def test_the_modules_the_docs_run_exist(doc):
    import importlib.util

    text = (ROOT / doc).read_text()
    modules = set(re.findall(r"python -m ([\w.]+)", text))
    missing = [m for m in sorted(modules) if importlib.util.find_spec(m) is None]
    assert not missing, f"{doc} runs python -m {missing}, which is no module"


def test_the_model_cards_training_commands_are_accepted_by_the_trainer(tmp_path):
    """Each stage's command, as the card writes it, parses and passes the trainer's checks (its --init-from
    folders are the earlier stages' output, not here)."""
    import argparse
    import dataclasses
    import shlex

    from photon_core.train.config import TrainConfig, add_arguments, from_arguments
    from photon_core.train.loop import check

    text = (ROOT / "photon_core" / "demo_model" / "MODEL_CARD.md").read_text().replace("\\\n", " ")
    commands = [line.split("#")[0].split() for line in text.splitlines()
                if line.strip().startswith("python -m photon_core.train ")]
    assert len(commands) >= 8
    for words in commands:
        words = [w for w in shlex.split(" ".join(words))][3:]
        ap = argparse.ArgumentParser(exit_on_error=False)
        add_arguments(ap, TrainConfig)
        cfg = from_arguments(TrainConfig, ap.parse_args(words))
        cfg = dataclasses.replace(cfg, init_from="", out=str(tmp_path / "run"))
        assert check(cfg) is None, f"{' '.join(words)}: {check(cfg)}"


def _limits_table() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    table = re.search(r"## Limits.*?\n\n(\|.*?)\n\n", text, re.S).group(1)
    return {row.split("|")[1].strip(): row.split("|")[2].strip() for row in table.splitlines()[2:]}


def test_the_limits_table_states_the_codes_limits():
    from app.layout import CACHE_MAX_AGE_S
    from photon_core.inference.predictor import MAX_NEW_TOKENS_LIMIT
    from photon_core.inference.prompt import MAX_QUESTION_CHARS
    from photon_core.io import decode
    from photon_core.io.volume import AIR_HU, HU_RANGE, MIN_AIR_FRACTION, NONFINITE_HU, Limits
    from photon_core.model.budget import MIN_KEEP_RATIO, MIN_KEEP_TOKENS

    lim, rows = Limits(), _limits_table()
    n = lambda x: f"{x:g}".replace("-", "−")  # noqa: E731
    expected = {
        "upload size": [f"{lim.max_file_bytes // 1_000_000} MB"],
        "voxels per axis / decoded volume": [f"{lim.max_axis} / {lim.max_bytes / 1e9:g} GB"],
        "minimum slices": [str(lim.min_slices)],
        "smallest manual budget": [f"{MIN_KEEP_TOKENS} visual tokens or {100 * MIN_KEEP_RATIO:g}%"],
        "values": [f"{n(HU_RANGE[0])}…{n(HU_RANGE[1])} HU", f"{n(NONFINITE_HU)} HU",
                   f"{100 * MIN_AIR_FRACTION:g}% of voxels in {n(AIR_HU[0])}…{n(AIR_HU[1])} HU"],
        ".zip: unpacked bytes / files / compression ratio":
            [f"{lim.max_zip_bytes / 1e9:g} GB / {lim.max_zip_files} / {lim.max_zip_ratio:g}×"],
        "compressed DICOM": [f"deadline {decode.START_S:g} s + {decode.PER_FILE_S:g} s a file"],
        "question length": [f"{MAX_QUESTION_CHARS} characters"],
        "generated tokens": [f"hard cap {MAX_NEW_TOKENS_LIMIT}"],
        "files served (3-D scenes, slices, exports)": [f"deleted after {CACHE_MAX_AGE_S / 3600:g} h"],
    }
    for row, says in expected.items():
        assert row in rows, f"the Limits table has no row {row!r}"
        for s in says:
            assert s in rows[row], f"Limits, {row}: the code says {s!r}; the README says {rows[row]!r}"


def test_the_limits_tables_app_options_are_app_py_helps_defaults():
    """The table sends readers to `app.py --help` for the options it names: the help states each default, and
    it is the table's."""
    r = subprocess.run([sys.executable, "app.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    helptext = " ".join(r.stdout.split("options:", 1)[1].split())
    rows = [text for text in _limits_table().values() if "`--" in text]
    assert len(rows) == 3
    for text in rows:
        flag = re.search(r"`(--[\w-]+)`", text).group(1)
        default = re.search(r"\d+", text.replace(flag, "")).group(0)
        said = re.search(rf"{flag} \S+ (.*?)(?= --|$)", helptext)
        what = said.group(1) if said else "nothing"
        assert f"default: {default}" in what, f"app.py --help says of {flag}: {what}"
