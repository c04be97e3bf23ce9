"""Official Photon checkpoints as published: S2 and S1 folders, a hub id from an (offline) HF cache,
pickle-only folders, and the prompt / generation settings of the reference's templates.

The folders are built from the tiny parity model (shared/parity, recorded from the official code) the
way official ones look: sharded safetensors with an index, ms-swift's args.json, a hub README and
.gitattributes, a results.zip, an image, a pickle beside the weights, a Qwen2-style tokenizer
(tests/fixtures/official_prompt). The S1 folder is the same without the ITS weights.
"""

import json
import logging
import pickle
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from photon_core.inference.predictor import Predictor
from photon_core.inference.prompt import GenerationSettings, Tokenizer
from photon_core.model.checkpoint import CheckpointError, load_model
from photon_core.model.hub import allow_patterns, ignore_patterns

PROMPT = Path(__file__).resolve().parent / "fixtures" / "official_prompt"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")
QUESTION = "Is there a lesion in the liver?"
REPO, COMMIT, BRANCH_COMMIT = "Photon-Org/Photon-S2", "a" * 40, "b" * 40


class _Touch:
    """Unpickling this creates ``path``: proof that a loader unpickled the file."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return Path.touch, (self.path,)


def _pickle_trap(folder: Path, name: str) -> Path:
    """Write a pickle into ``folder`` whose loading would create a sentinel file; return the sentinel."""
    sentinel = folder.parent / f"{folder.name}_{name}.unpickled"
    (folder / name).write_bytes(pickle.dumps({"state_dict": _Touch(sentinel)}))
    return sentinel


def _official_folder(src: Path, dest: Path, s1: bool = False, shards: int = 3) -> Path:
    """An official-looking checkpoint folder from the tiny parity model."""
    dest.mkdir(parents=True)
    state = load_file(str(src / "model.safetensors"))
    if s1:
        state = {k: v for k, v in state.items() if ".atp." not in k}
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k].contiguous() for k in keys[i::shards]}
        save_file(part, str(dest / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (dest / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map})
    )
    shutil.copy(src / "config.json", dest / "config.json")
    (dest / "generation_config.json").write_text(
        json.dumps(
            {
                "bos_token_id": 500,
                "pad_token_id": 500,
                "do_sample": True,
                "eos_token_id": [502, 500],
                "repetition_penalty": 1.05,
                "temperature": 0.1,
                "top_p": 0.001,
                "top_k": 1,
            }
        )
    )
    (dest / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "patch_size": 14,
                "temporal_patch_size": 14,
                "merge_size": 2,
                "image_processor_type": "Qwen2VLImageProcessor",
                "processor_class": "Qwen2_5_VLProcessor",
            }
        )
    )
    for f in TOKENIZER_FILES:
        shutil.copy(PROMPT / f, dest / f)
    (dest / "args.json").write_text(json.dumps({"model": "Qwen2.5-VL-3B", "stage": "S1" if s1 else "S2"}))
    (dest / "README.md").write_text("# Photon\n")
    (dest / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
    with zipfile.ZipFile(dest / "results.zip", "w") as z:
        z.writestr("3D-RAD/infer_result.jsonl", "{}\n")
    (dest / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    return dest


@pytest.fixture(scope="module")
def s2_dir(parity_dir, tmp_path_factory):
    return _official_folder(parity_dir / "model", tmp_path_factory.mktemp("official") / "Photon-S2")


@pytest.fixture(scope="module")
def s1_dir(parity_dir, tmp_path_factory):
    return _official_folder(parity_dir / "model", tmp_path_factory.mktemp("official") / "PhotonS1", s1=True)


@pytest.fixture(scope="module")
def frames():
    torch.manual_seed(0)
    return torch.rand(140, 280, 280)


@pytest.fixture
def no_unpickling(monkeypatch):
    """Fail the test if anything unpickles while it runs."""

    def refuse(*a, **k):
        raise AssertionError("something tried to unpickle a file")

    for mod, name in ((torch, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(mod, name, refuse)


def _hub_cache(root: Path, s2_dir: Path) -> Path:
    """An HF cache holding REPO: main = per-task sub-folders (+ results.zip at the root); branch 3D-RAD =
    that task's weights at the root. The layout huggingface_hub writes: snapshots/<commit>/…, refs/<name>."""
    repo = root / ("models--" + REPO.replace("/", "--"))
    main = repo / "snapshots" / COMMIT
    shutil.copytree(s2_dir, main / "3D-RAD")
    shutil.copytree(s2_dir, main / "DeepTumorVQA")
    shutil.copy(s2_dir / "results.zip", main / "results.zip")
    shutil.copytree(s2_dir, repo / "snapshots" / BRANCH_COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "refs" / "3D-RAD").write_text(BRANCH_COMMIT)
    return root


# ---------------------------------------------------------------------------------- folders
def test_official_s2_folder_loads_sharded_and_ignores_the_rest(s2_dir, parity_dir, caplog, no_unpickling):
    sentinel = _pickle_trap(s2_dir, "training_args.bin")  # ms-swift leaves one beside the weights
    with caplog.at_level(logging.INFO, logger="photon_core.model.checkpoint"):
        m = load_model(s2_dir)
    ignored = caplog.text
    for name in ("args.json", "README.md", ".gitattributes", "results.zip", "logo.png", "training_args.bin"):
        assert name in ignored, name
    assert not sentinel.exists()
    ref = load_model(parity_dir / "model")
    assert m.config.has_its and ref.config.has_its
    own, want = m.state_dict(), ref.state_dict()
    assert set(own) == set(want)
    assert all(torch.equal(own[k], want[k]) for k in want)  # every shard read through the index


def test_s2_folder_answers_and_names_the_checkpoint(s2_dir, frames, monkeypatch):
    import huggingface_hub

    def no_download(*a, **k):
        raise AssertionError("a folder must not reach the hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_download)
    p = Predictor(s2_dir, device="cpu")
    assert (p.checkpoint.source, p.checkpoint.stage, p.checkpoint.has_its) == ("folder", "S2", True)
    assert p.generation.repetition_penalty == 1.05 and set(p.generation.eos_token_ids) == {502, 500}
    p.set_volume(frames)
    a = p.ask(QUESTION, max_new_tokens=4)
    assert a.budget == "auto" and 0 < a.kept < a.total == 1000
    assert a.to_dict()["checkpoint"] == p.checkpoint.to_dict()
    assert a.checkpoint["path"] == s2_dir.name and str(s2_dir.parent) not in json.dumps(a.to_dict())
    assert "S2" in p.name and s2_dir.name in p.name


def test_s1_folder_runs_full_and_saliency_budgets_not_auto(s1_dir, s2_dir, frames):
    s1, s2 = Predictor(s1_dir, device="cpu"), Predictor(s2_dir, device="cpu")
    assert (s1.checkpoint.stage, s1.checkpoint.has_its) == ("S1", False)
    assert s1.model.its_module is None
    for p in (s1, s2):
        p.set_volume(frames)
    a = s1.ask(QUESTION, max_new_tokens=4)  # default: every visual token
    assert a.budget == "full" and a.kept == a.total == 1000
    assert a.to_dict()["theta"] is None and a.checkpoint["stage"] == "S1"
    # S1 is S2 without the threshold MLP: the same answer on every token, the same saliency ranking
    assert a.text == s2.ask(QUESTION, "full", max_new_tokens=4).text
    k1, k2 = s1.ask(QUESTION, "25%", max_new_tokens=1), s2.ask(QUESTION, "25%", max_new_tokens=1)
    assert k1.kept == 250 and (k1.keep_grid == k2.keep_grid).all()
    assert k1.rho.max() == pytest.approx(1.0) and k1.rho.min() == pytest.approx(0.0)
    assert s1.ask(QUESTION, "fastv:100", max_new_tokens=1).kept == 100
    for budget in ("auto", "threshold:0.4"):
        msg = s1.supports(budget)
        assert msg and "S2" in msg
        with pytest.raises(ValueError, match="S2 checkpoint"):
            s1.ask(QUESTION, budget, max_new_tokens=1)
    assert s2.supports("auto") is None and s1.supports("25%") is None
    ids = torch.tensor([s1.tokenizer.prompt(QUESTION, s1.features.shape[0])[0]])
    with torch.inference_mode(), pytest.raises(ValueError, match="S2 checkpoint"):   # the model refuses too
        s1.model(ids, features=s1.features, grid_thw=s1.grid_thw, budget="auto")


def test_pickle_only_folder_is_refused_without_unpickling(parity_dir, tmp_path, no_unpickling):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(parity_dir / "model" / "config.json", folder)
    for f in TOKENIZER_FILES:
        shutil.copy(PROMPT / f, folder / f)
    sentinel = _pickle_trap(folder, "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="(?si)pickle.*convert them to safetensors"):
        Predictor(folder, device="cpu")
    assert not sentinel.exists()


def test_pickle_trap_is_real(tmp_path, monkeypatch):
    """The trap above is a real one: loading it does write the sentinel."""
    folder = tmp_path / "trap"
    folder.mkdir()
    sentinel = _pickle_trap(folder, "x.bin")
    pickle.loads((folder / "x.bin").read_bytes())
    assert sentinel.exists()


# ---------------------------------------------------------------------------------- hub ids
def test_hub_id_resolves_from_an_offline_cache(s2_dir, frames, tmp_path, monkeypatch, capsys, no_unpickling):
    cache = _hub_cache(tmp_path / "hub", s2_dir)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    p = Predictor(REPO, subfolder="3D-RAD", device="cpu")
    c = p.checkpoint
    assert (c.source, c.repo_id, c.subfolder, c.stage) == ("hub", REPO, "3D-RAD", "S2")
    assert c.path == cache / ("models--" + REPO.replace("/", "--")) / "snapshots" / COMMIT / "3D-RAD"
    p.set_volume(frames)
    assert p.ask(QUESTION, max_new_tokens=2).checkpoint["repo_id"] == REPO
    b = Predictor(REPO, revision="3D-RAD", device="cpu").checkpoint  # a task's branch
    assert b.path.name == BRANCH_COMMIT and b.revision == "3D-RAD" and "@ 3D-RAD" in b.label()
    from photon_core.inference.ask import main  # the CLI resolves it the same way

    scan = Path(__file__).resolve().parent.parent / "sample_cases" / "abdomen_ct" / "ct.nii.gz"
    assert main(["--scan", str(scan), "--question", QUESTION, "--model", REPO, "--subfolder", "3D-RAD",
                 "--device", "cpu", "--max-new-tokens", "1", "--json"]) == 0
    c = json.loads(capsys.readouterr().out)["checkpoint"]
    assert (c["source"], c["repo_id"], c["subfolder"], c["path"]) == ("hub", REPO, "3D-RAD", "3D-RAD")
    with pytest.raises(CheckpointError, match="(?s)not in the HF cache.*HF_HUB_OFFLINE"):
        Predictor("Photon-Org/Photon-S1", device="cpu")
    with pytest.raises(CheckpointError, match="no sub-folder 'CT-RATE'"):
        Predictor(REPO, subfolder="CT-RATE", device="cpu")
    with pytest.raises(CheckpointError, match=r"(?s)lacks config.json.*a sub-folder \(--subfolder\) or a "
                                              r"branch \(--revision\)"):
        Predictor(REPO, device="cpu")                                   # main holds per-task sub-folders


def test_hub_cache_missing_a_shard_names_it(s2_dir, tmp_path, monkeypatch):
    cache = _hub_cache(tmp_path / "hub", s2_dir)
    (
        cache
        / ("models--" + REPO.replace("/", "--"))
        / "snapshots"
        / COMMIT
        / "3D-RAD"
        / "model-00002-of-00003.safetensors"
    ).unlink()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors"):
        Predictor(REPO, subfolder="3D-RAD", device="cpu")


def test_download_patterns_take_only_what_the_loader_reads():
    from huggingface_hub.utils import filter_repo_objects

    repo = [
        "results.zip",
        "README.md",
        ".gitattributes",
        "3D-RAD/model-00001-of-00002.safetensors",
        "3D-RAD/model-00002-of-00002.safetensors",
        "3D-RAD/model.safetensors.index.json",
        "3D-RAD/config.json",
        "3D-RAD/generation_config.json",
        "3D-RAD/preprocessor_config.json",
        "3D-RAD/tokenizer.json",
        "3D-RAD/tokenizer_config.json",
        "3D-RAD/vocab.json",
        "3D-RAD/merges.txt",
        "3D-RAD/args.json",
        "3D-RAD/pytorch_model.bin",
        "3D-RAD/training_args.bin",
        "3D-RAD/optimizer.pt",
        "3D-RAD/figs/a.png",
        "3D-RAD/checkpoint-100/model.safetensors",
        "DeepTumorVQA/model.safetensors",
        "DeepTumorVQA/config.json",
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "adapter_model.safetensors",
    ]
    pick = lambda sub: set(
        filter_repo_objects(
            repo,
            allow_patterns=allow_patterns(sub),  # noqa: E731
            ignore_patterns=ignore_patterns(sub),
        )
    )
    assert pick("3D-RAD") == {
        f
        for f in repo
        if f.startswith("3D-RAD/")
        and "/" not in f[7:]
        and f.split("/")[1] not in ("args.json", "pytorch_model.bin", "training_args.bin", "optimizer.pt")
    }
    assert pick(None) == {"model.safetensors", "config.json", "tokenizer.json"}


# ---------------------------------------------------------------------------------- prompt
@pytest.fixture(scope="module")
def reference():
    return json.loads((PROMPT / "expected.json").read_text())


def test_prompt_ids_equal_the_reference_template(reference, parity_dir):
    tok = Tokenizer(PROMPT)
    model = load_model(parity_dir / "model")
    meta = reference["template_meta"]["photon_s2"]
    assert reference["photon_s1_equals_photon_s2"]
    assert (
        tok.render("{{QUERY}}", 0)
        == meta["system_prefix"][0].replace("{{SYSTEM}}", meta["default_system"]) + meta["prompt"][0]
    )
    checked = 0
    for row in reference["prompts"]:
        n = 1000
        ids, start = tok.prompt(row["question"], n, prior_visual=n if row["volumes"] == 2 else 0)
        if row["form"] == "tag_space":  # "<video> question": the README's data sample; we send no space
            assert len(row["input_ids"]) == len(ids) + 1
            continue
        assert ids == row["input_ids"], (row["question"], row["form"])
        assert start == len(ids)
        t = torch.tensor([ids])
        vision, question = model.masks(t, torch.ones_like(t))
        assert int(vision.sum()) == row["vision_mask_count"]
        ours, ref = question[0].nonzero().flatten().tolist(), row["question_mask"]
        if row["volumes"] == 2:
            # the reference never saw two volumes: its mask runs from the FIRST <|vision_end|>, over the
            # current scan's span; ours is the text after the last one (documented in model.masks)
            ends = [i for i, t in enumerate(ids) if t == tok.ids["<|vision_end|>"]]
            ref = [i for i in ref if not ends[0] < i <= ends[-1]]
        assert ours == ref
        checked += 1
    assert checked >= 6


def test_generation_settings_read_as_swift_infer_reads_them(reference, tmp_path):
    tok = Tokenizer(PROMPT)
    for row in reference["generation"]:
        (tmp_path / "generation_config.json").write_text(json.dumps(row["generation_config"]))
        g, want = GenerationSettings.from_folder(tmp_path, 502, tok), row["swift_infer"]
        assert g.do_sample == want["do_sample"] and g.repetition_penalty == pytest.approx(
            want["repetition_penalty"]
        )
        if want["do_sample"]:
            assert (g.temperature, g.top_k, g.top_p) == pytest.approx(
                (want["temperature"], want["top_k"], want["top_p"])
            )
        eos = want["eos_token_id"]
        assert set(eos if isinstance(eos, list) else [eos]) <= set(g.eos_token_ids)
        assert set(reference["template_meta"]["photon_s2"]["stop_words"]) == {"<|endoftext|>", "<|im_end|>"}
        assert {tok.ids["<|endoftext|>"], tok.ids["<|im_end|>"]} <= set(g.eos_token_ids)


def test_repetition_penalty_is_transformers_rule():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    from photon_core.inference.generate import repetition_penalised as _penalise

    torch.manual_seed(0)
    scores, seen = torch.randn(2, 50), torch.randint(0, 50, (2, 12))
    want = RepetitionPenaltyLogitsProcessor(1.3)(seen, scores.clone())
    assert torch.allclose(_penalise(scores, seen, 1.3), want)
    padded = torch.cat([torch.full((2, 3), -1), seen], 1)  # padding slots are not ids
    assert torch.allclose(_penalise(scores, padded, 1.3), want)


# ---------------------------------------------------------------------------------- app / CLI
def test_budget_modes_for_s1_and_s2():
    from app.service import budget_modes

    s2, note2 = budget_modes(True)
    s1, note1 = budget_modes(False)
    assert [m for _, m in s2] == ["Auto", "Tokens", "Percent", "Threshold", "Full"] and not note2
    assert [m for _, m in s1] == ["Full", "Tokens", "Percent"]
    assert "S2" in note1 and "saliency" in note1


def test_ask_cli_on_an_s1_folder(s1_dir, capsys):
    from photon_core.inference.ask import main

    scan = Path(__file__).resolve().parent.parent / "sample_cases" / "abdomen_ct" / "ct.nii.gz"
    args = ["--scan", str(scan), "--question", QUESTION, "--model", str(s1_dir), "--device", "cpu"]
    assert main(args + ["--max-new-tokens", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["budget"] == "full" and out["theta"] is None and out["checkpoint"]["stage"] == "S1"
    assert main(args + ["--budget", "auto"]) == 2
    assert "S2 checkpoint" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- damaged folders
def _copy(folder: Path, dest: Path) -> Path:
    shutil.copytree(folder, dest)
    return dest


def test_a_shard_without_what_its_index_lists_is_refused_not_loaded_as_s1(s2_dir, tmp_path):
    """The shard holding the ITS tensors replaced by one without them: the weights alone would say S1 and
    the model would answer without its token scheduling; the index says they belong there."""
    folder = _copy(s2_dir, tmp_path / "Photon-S2")
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    its = sorted(k for k in weight_map if ".atp." in k)
    assert its
    for shard in {weight_map[k] for k in its}:
        part = load_file(str(folder / shard))
        save_file({k: v for k, v in part.items() if ".atp." not in k}, str(folder / shard))
    shards = "|".join(sorted({weight_map[k] for k in its}))
    with pytest.raises(CheckpointError, match=rf"'({shards})' lacks \d+ tensors? that "
                                              r"'model.safetensors.index.json' puts there \([^)]*\.atp\."):
        load_model(folder)


def test_a_config_that_states_the_stage_must_agree_with_the_weights(s1_dir, s2_dir, tmp_path):
    """Folders this project writes state ``photon.has_its``; weights of the other stage are refused, and
    a folder whose config agrees (or, as published, says nothing) loads."""
    for src, declared, loads in ((s1_dir, True, False), (s2_dir, False, False), (s1_dir, False, True),
                                 (s2_dir, True, True)):
        folder = _copy(src, tmp_path / f"{src.name}_{declared}")
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, "photon": {"has_its": declared}}))
        if loads:
            assert load_model(folder).config.has_its is declared
        else:
            with pytest.raises(CheckpointError, match=rf"photon.has_its = {str(declared).lower()}.*"
                                                      rf"token-scheduling \(ITS\) tensors"):
                load_model(folder)


def test_damaged_weight_files_and_configs_are_named_with_the_reason(s2_dir, tmp_path):
    folder = _copy(s2_dir, tmp_path / "lfs")
    shard = folder / "model-00002-of-00003.safetensors"
    shard.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 123\n")
    with pytest.raises(CheckpointError, match="'model-00002-of-00003.safetensors' is a Git LFS pointer.*"
                                              "git lfs pull"):
        load_model(folder)
    shard.write_bytes(load_file.__module__.encode() * 3)          # not a safetensors header
    with pytest.raises(CheckpointError, match=r"not a readable safetensors file \(\w+: .+\)"):
        load_model(folder)

    folder = _copy(s2_dir, tmp_path / "configs")
    config = folder / "config.json"
    good = json.loads(config.read_text())
    config.write_text(json.dumps(good)[:-20])
    with pytest.raises(ValueError, match=r"^'configs/config.json' is not valid JSON \("):
        load_model(folder)
    config.write_text("[]")
    with pytest.raises(ValueError, match="'configs/config.json' holds a JSON list"):
        load_model(folder)
    config.write_text(json.dumps({**good, "num_hidden_layers": str(good["num_hidden_layers"])}))
    with pytest.raises(ValueError, match="'configs/config.json': num_hidden_layers is '"):
        load_model(folder)
    vision = {**good["vision_config"], "depth": 2.5}
    config.write_text(json.dumps({**good, "vision_config": vision}))
    with pytest.raises(ValueError, match="vision_config.depth is 2.5"):
        load_model(folder)


def test_the_app_refuses_a_checkpoint_in_words(tmp_path):
    """``app.py --model`` with a folder that is not there: one line and exit status 2, no traceback."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "app.py", "--model", str(tmp_path / "no_such_folder")], cwd=root,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert "error: --model" in done.stderr and "neither an existing folder nor a hub id" in done.stderr


def test_an_integer_weight_is_refused_and_a_head_a_tied_config_drops_is_told(s2_dir, tmp_path, caplog):
    folder = _copy(s2_dir, tmp_path / "odd")
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    key = next(k for k in sorted(weight_map) if k.endswith("norm.weight"))
    part = load_file(str(folder / weight_map[key]))
    save_file({**part, key: part[key].to(torch.int64)}, str(folder / weight_map[key]))
    with pytest.raises(CheckpointError, match=r"Weight '[\w.]*' is stored as int64; model weights are float"):
        load_model(folder)

    folder = _copy(s2_dir, tmp_path / "head")
    embed = next(k for k in weight_map if k.endswith("embed_tokens.weight"))
    part = load_file(str(folder / weight_map[embed]))
    save_file({**part, "lm_head.weight": part[embed] + 1}, str(folder / weight_map[embed]))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["lm_head.weight"] = weight_map[embed]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with caplog.at_level(logging.WARNING, logger="photon_core.model.checkpoint"):
        m = load_model(folder)
    assert "stored lm_head.weight, which differs from them, is not used" in caplog.text
    assert m.lm_head.weight is m.model.embed_tokens.weight
