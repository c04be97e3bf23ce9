"""The GPU data stream and the GPU runner: the same bodies, findings, questions and answers as the CPU
generator; prepared bodies that travel without nibabel; the runner's smoke path (the same code, tiny, CPU)."""
import json
import math
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from conftest import ROOT

from photon_core.train.synthetic.anatomy import downsample_shape, load_background, shrink
from photon_core.train.synthetic.generator import DemoGenerator
from photon_core.train.synthetic.gpu import GpuStream
from photon_core.train.synthetic.questions import FINDING_FAMILIES, NORMAL_QUESTION, nothing_seen
from photon_core.train.targets import token_targets

pytestmark = pytest.mark.slow
CASES = ("abdomen_ct", "chest_aorta_ct")


@pytest.fixture(scope="module")
def backgrounds():
    """The training cases' bodies; on a machine without nibabel (the GPU machine), the prepared bodies
    carried along in runs/bodies."""
    try:
        import nibabel  # noqa: F401
    except ImportError:
        from photon_core.train.synthetic.bodies import load_bodies
        path = ROOT / "runs" / "bodies" / "bodies.safetensors.xz"
        if not path.is_file():
            pytest.skip("no nibabel here, and no prepared bodies in runs/bodies")
        return load_bodies(path)
    return {c: load_background(c) for c in CASES}


@pytest.fixture(scope="module")
def coarse_bodies(backgrounds, tmp_path_factory):
    """The prepared-bodies file on the curriculum grid (what the smoke runs read)."""
    from photon_core.train.synthetic import bodies
    path = tmp_path_factory.mktemp("bodies") / "bodies.safetensors.xz"
    real = bodies.load_background
    bodies.load_background = lambda c: backgrounds[c]           # (prepared once for the module)
    try:
        bodies.save_bodies(path, CASES, downsample=2.5)
    finally:
        bodies.load_background = real
    return path


def _reference(gen: DemoGenerator, n: int) -> list:
    """``n`` samples of the reference generator (every other one followed by its clean twin), each with
    its finding map and organs. Run to the end before the stream under test starts: both draw their
    noise from torch's global generator, which each one seeds when it is made."""
    out = []
    for i in range(n):
        frames, qa, meta, organs = gen.sample(with_findings=1.0)
        out.append((frames, qa, meta, organs, gen.last_truth))
        if i % 2:
            frames, qa = gen.counterfactual()
            out.append((frames, qa, None, organs, None))
    return out


def _agree(ref: tuple, got, grid):
    """One reference sample against one scan of the stream: the same findings (meta), questions and
    answers, organs, frames and token targets."""
    frames, qa, meta, organs, truth = ref
    assert got.qa == qa and (meta is None or got.meta == meta)
    assert set(got.organs) == set(organs) and all(torch.equal(got.organs[o], organs[o]) for o in organs)
    assert torch.equal(got.frames.cpu(), frames)
    want = token_targets(organs, truth, grid)
    for k in want:
        assert torch.allclose(got.targets[k].cpu().float(), want[k].float(), atol=1e-6), k


@pytest.mark.parametrize("downsample", [2.5, 1.0])
def test_stream_gives_the_reference_generators_scans(backgrounds, downsample):
    """GpuStream is DemoGenerator split across devices; on one CPU device it gives the reference stream
    bit for bit — findings (meta), questions and answers, frames, finding maps, clean twins, token
    targets — with organ enlargement on."""
    n = 6 if downsample != 1 else 2
    kw = dict(seed=7, pool=1, downsample=downsample, enlargement=0.5)
    ref = _reference(DemoGenerator("train", backgrounds=backgrounds, **kw), n)
    stream = GpuStream("train", device="cpu", bodies=backgrounds, **kw)
    got = []
    for i in range(n):
        got.append(stream.scan(with_findings=1.0))
        if i % 2:
            got.append(stream.twin(got[-1]))
    assert [g.kind for g in got] == ["scan" if r[2] is not None else "twin" for r in ref]
    for r, g in zip(ref, got):
        _agree(r, g, stream.grid)


def test_batches_pairs_and_null_volumes(backgrounds):
    """A batch holds (scan, clean twin) pairs and null volumes where asked; twins keep the scan's body
    and acquisition and lose only the findings' voxels; null volumes carry no organ and no finding and
    are asked their scan's questions with every finding question answered as nothing seen."""
    stream = GpuStream("val", seed=3, pool=0, device="cpu", bodies=backgrounds, downsample=2.5)
    scans = stream.batch(24, counterfactual=0.4, null=0.3)
    kinds = [s.kind for s in scans]
    assert len(scans) == 24 and {"scan", "twin"} <= set(kinds) and set(kinds) & {"noise", "air", "smooth"}
    for a, b in zip(scans, scans[1:]):
        if b.kind == "twin":
            assert a.kind == "scan" and b.meta["background"] == a.meta["background"]
            lesion = token_targets(a.organs, None, stream.grid)["lesion"]
            assert float(b.targets["lesion"].sum()) == 0 and float(lesion.sum()) == 0
            changed = a.frames != b.frames
            assert not changed.any() or float(a.targets["lesion"].sum()) > 0
    for s in scans:
        if s.kind in ("noise", "air", "smooth"):
            assert s.organs is None and not bool(s.targets["organ_known"].any())
            assert float(s.targets["lesion"].sum()) == 0 and s.frames.shape == stream.shape
            assert 0 <= float(s.frames.min()) and float(s.frames.max()) <= 1
            assert all(q["answer"] == ("yes" if q["question"] == NORMAL_QUESTION else "no")
                       for q in s.qa if q["family"] in FINDING_FAMILIES)
    assert stream.scans == 24 and stream.scans_per_s > 0


def test_nothing_seen_keeps_the_other_answers():
    qa = [dict(family="existence", question="Is there a lesion in the liver?", answer="yes"),
          dict(family="anomaly_detection", question=NORMAL_QUESTION, answer="no"),
          dict(family="anomaly_detection", question="Is there any abnormality in this scan?", answer="yes"),
          dict(family="measurement", question="How large is the liver lesion in mm?", answer="21 mm")]
    assert [q["answer"] for q in nothing_seen(qa)] == ["no", "yes", "no", "21 mm"]
    assert qa[0]["answer"] == "yes"                                   # a copy, not an edit


def test_prepared_bodies_come_back_as_prepared(backgrounds, coarse_bodies, tmp_path):
    """The bodies file gives the cases' frames within 1 HU of rounding and their organ masks exactly,
    reads without nibabel, and refuses a file made from other sample-case files."""
    from photon_core.train.synthetic import bodies
    got = bodies.load_bodies(coarse_bodies)
    shape = downsample_shape(2.5)
    assert set(got) == set(CASES)
    for c in CASES:
        want = shrink(backgrounds[c], shape)
        assert got[c].frames.shape == shape and got[c].voxel_mm == pytest.approx(want.voxel_mm)
        assert float((got[c].frames - want.frames).abs().max()) <= 0.5 / bodies.UNIT_HU + 1e-6
        assert set(got[c].organs) == set(want.organs)
        assert all(torch.equal(got[c].organs[o], want.organs[o]) for o in want.organs)
    data = bodies.lzma.decompress(coarse_bodies.read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header["__metadata__"]["sources"] = json.dumps({"abdomen_ct/ct.nii.gz": "0" * 64})
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    stale = tmp_path / "stale.safetensors.xz"
    stale.write_bytes(bodies.lzma.compress(len(new).to_bytes(8, "little") + new + data[8 + n:]))
    with pytest.raises(ValueError, match="other sample-case files"):
        bodies.load_bodies(stale)
    (tmp_path / "other.xz").write_bytes(bodies.lzma.compress(b"\x02\x00\x00\x00\x00\x00\x00\x00{}"))
    with pytest.raises(ValueError, match="not a prepared-bodies file"):
        bodies.load_bodies(tmp_path / "other.xz")


def _files(out):
    return sorted(p for p in out.rglob("*") if p.is_file())


def test_gpu_runner_smoke_trains_every_stage_and_resumes_without_nibabel(coarse_bodies, tmp_path):
    """The runner's smoke path — the GPU command's code at a tiny size on the CPU — in a process where
    nibabel and pydicom cannot be imported (as on the GPU machine): it measures the stream, runs the
    three stages, leaves a model folder the Predictor loads and a metrics file, within what comes back
    from the GPU machine (≤ 8 files, ≤ 16 MiB each, ≤ 2 folders deep). A later call on a fresh machine
    continues it from that folder carried along (--resume-from), into an empty output folder."""
    out = tmp_path / "run"
    code = ("import sys; sys.modules['nibabel'] = None; sys.modules['pydicom'] = None; "
            "from photon_core.train.gpu import main; main(sys.argv[1:])")
    args = ["--smoke", "--out", str(out), "--bodies", str(coarse_bodies), "--minutes", "0.4"]
    r = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["generator"]["scans_per_s_first"] > 0 and m["generator"]["scans_per_s"] > 0
    assert set(m["stages"]) == {"vision", "llm", "joint"}
    assert all(s["steps"] > 0 for s in m["stages"].values())
    assert {"token_auroc", "scan_auroc", "pair_win_rate"} <= set(m["vision_probe"])
    parity = m["parity"]                  # the stream against the CPU generator, on this device (the CPU)
    assert parity["findings_questions_answers_equal"] and parity["finding_maps_equal"]
    assert parity["frames_max_abs_diff"] == 0
    assert set(m["val"]["scan"]["balanced"]) <= set(FINDING_FAMILIES) and m["val"]["questions"] > 0
    assert 0 <= m["null_answers"]["malformed"] <= m["null_answers"]["asked"] > 0
    files = _files(out)
    assert len(files) <= 8 and all(f.stat().st_size <= 16 * 2**20 for f in files)
    assert all(len(f.relative_to(out).parts) <= 3 for f in files)
    state = json.loads((out / "model" / "train_state.json").read_text())
    assert state["done"] == ["vision", "llm", "joint"] and state["folded"] and state["calls"] == 1
    from photon_core.inference.predictor import Predictor
    p = Predictor(out / "model", device="cpu")
    p.set_volume(torch.rand(140, 280, 280))
    assert isinstance(p.ask("Is there a lesion in the liver?", max_new_tokens=4).text, str)
    carried = tmp_path / "carried"
    shutil.copytree(out / "model", carried)
    out2 = tmp_path / "run2"
    args2 = ["--smoke", "--out", str(out2), "--bodies", str(coarse_bodies), "--minutes", "0.2",
             "--resume-from", str(carried)]
    r = subprocess.run([sys.executable, "-c", code, *args2], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    again = json.loads((out2 / "model" / "train_state.json").read_text())
    assert again["calls"] == 2 and again["folded"]
    assert set(json.loads((out2 / "metrics.json").read_text())["stages"]) == {"llm", "joint"}   # `--more`
    assert again["steps"]["llm"] > state["steps"]["llm"]
    assert again["steps"]["vision"] == state["steps"]["vision"]


def test_gpu_runner_stages_train_what_they_name(coarse_bodies, tmp_path):
    """vision: the tower alone moves (the LLM and ITS stay as built); llm: the tower stays, but for the
    fold into the merger's last Linear; the LLM and ITS move."""
    from safetensors.torch import load_file

    from photon_core.train.gpu import SMOKE, GpuConfig, build_model, main
    out = tmp_path / "run"
    common = ["--smoke", "--out", str(out), "--bodies", str(coarse_bodies), "--minutes", "0.15",
              "--reserve-s", "3", "--val-scans", "1", "--probe-pairs", "1", "--autocast", "bf16"]
    main([*common, "--stages", "vision:1"])
    w0 = load_file(str(out / "model" / "model.safetensors"))
    built, _ = build_model(replace(GpuConfig(), **SMOKE))
    fresh = built.state_dict()
    llm = [k for k in w0 if not k.startswith("visual.")]
    assert llm and all(torch.equal(w0[k], fresh[k]) for k in llm)                  # the LLM as built
    assert any(not torch.equal(w0[k], fresh[k]) for k in w0 if k.startswith("visual."))
    main([*common, "--stages", "llm:1", "--resume"])
    w1 = load_file(str(out / "model" / "model.safetensors"))
    moved = {k for k in w0 if k.startswith("visual.") and not torch.equal(w0[k], w1[k])}
    assert moved == {"visual.merger.mlp.2.weight", "visual.merger.mlp.2.bias"}     # the fold, nothing else
    assert any(not torch.equal(w0[k], w1[k]) for k in llm)
    assert math.isfinite(sum(float(v.float().abs().sum()) for v in w1.values()))


def test_cpu_trainer_takes_null_volumes(capsys, tmp_path):
    """The CPU trainer shares the null volumes: their rows train on nothing-seen answers, out of the
    retention band, with ITS keeping nothing (`null_keep`)."""
    from photon_core.train.loop import main
    main(["--out", str(tmp_path / "run"), "--preset", "tiny", "--steps", "2", "--scans-per-step", "2",
          "--questions-per-scan", "2", "--pool", "0", "--warmup", "1", "--log-every", "1", "--device", "cpu",
          "--downsample", "2.5", "--phase2-start", "0", "--phase3-start", "0", "--null-volumes", "1",
          "--keep-guide", "1", "--robust-prob", "0"])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert len(lines) == 2
    assert all("null_keep" in x and "band" not in x and x["loss"] == x["loss"] for x in lines)


@pytest.mark.gpu
def test_stream_on_the_gpu_agrees_with_the_cpu_generator(backgrounds):
    """On CUDA (frames there, decisions on the CPU masks; the pool deformed on the CPU so that the bodies
    are the same): the same findings, questions, answers, organs and finding maps as the CPU generator;
    the frames agree up to the Gaussian noise each device's generator draws — acquisition noise σ ≤ 0.01
    and lesion texture σ = 0.004 —, so |Δ| ≤ 10 × 0.01 everywhere, and exactly where a clean acquisition
    (no jitter, no noise) holds no finding."""
    ref = _reference(DemoGenerator("test", seed=5, pool=1, backgrounds=backgrounds), 6)
    stream = GpuStream("test", seed=5, pool=1, device="cuda", bodies=backgrounds, pool_device="cpu")
    got = []
    for i in range(6):
        got.append((stream.scan(with_findings=1.0), stream.gen.last_truth))
        if i % 2:
            got.append((stream.twin(got[-1][0]), None))
    for (frames, qa, meta, organs, truth), (s, s_truth) in zip(ref, got):
        assert s.qa == qa and (meta is None or s.meta == meta)
        assert all(torch.equal(s.organs[o], organs[o]) for o in organs)
        assert (truth is None) == (s_truth is None) and (truth is None or torch.equal(s_truth.cpu(), truth))
        diff = (s.frames.cpu() - frames).abs()
        assert float(diff.max()) <= 0.1
        lesion = truth > 0 if truth is not None else torch.zeros_like(frames, dtype=torch.bool)
        if float(diff[~lesion].max()) < 1e-6 and bool(lesion.any()):   # a clean acquisition: only texture
            assert float(diff[lesion].max()) <= 10 * 0.004
    gpu = GpuStream("train", seed=1, pool=2, device="cuda", bodies=backgrounds, enlargement=0.3)
    assert len(gpu.batch(8, counterfactual=0.5, null=0.1)) == 8 and gpu.scans_per_s > 0
