"""The research probes (research/): each runs end to end on a tiny model, and its measuring parts are
right."""
import importlib.util

import pytest
from conftest import ROOT


class _OneQuestion:
    """A generator stand-in: one scan, one question."""

    enlargement = 0.0

    def __init__(self, frames, q):
        self.frames, self.q = frames, q

    def sample(self):
        return self.frames, [self.q], {}, {}


def _script(name: str):
    """A probe of research/ (scripts, not a package), imported from its file."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "research" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_closed_auroc_margins_are_per_question(tiny_model_dir):
    """research/closed_auroc.py reads the first answer token of each left-padded row: a question's
    margin in the batch equals its margin asked alone, every yes/no question gets one, the label is
    "finding present" (flipped for the normal question), and the paired comparison runs."""
    from photon_core.inference.predictor import Predictor
    from photon_core.train.synthetic.generator import DemoGenerator
    mod = _script("closed_auroc")
    p = Predictor(tiny_model_dir, device="cpu")
    batched = mod.margins(p, DemoGenerator("test", seed=0, downsample=2.5), 2, "full")
    gen = DemoGenerator("test", seed=0, downsample=2.5)
    seen, lung = {f: 0 for f in mod.FAMILIES}, []
    for _ in range(2):
        frames, qa, _, _ = gen.sample()
        for q in [q for q in qa if q["family"] in mod.FAMILIES]:
            (m,), (y,) = mod.margins(p, _OneQuestion(frames, q), 1, "full")[q["family"]]
            k = seen[q["family"]]
            assert y == mod.present(q) == batched[q["family"]][1][k]
            assert y == ((q["answer"] == "yes") if q["question"] != mod.NORMAL else (q["answer"] == "no"))
            assert m == pytest.approx(batched[q["family"]][0][k], abs=1e-4)
            seen[q["family"]] += 1
            if mod.lungs(q):                        # lung questions are also scored as a group of their own
                lung.append(m)
    lungs = batched.pop(mod.LUNGS, ([], []))[0]
    assert lung and lungs == pytest.approx(lung, abs=1e-4)
    assert seen == {f: len(m) for f, (m, _) in batched.items()} and sum(seen.values()) > 0
    wins = mod.paired(p, DemoGenerator("test", seed=0, downsample=2.5), 2, "full")
    assert wins["existence"] and set(wins["existence"] + wins["anomaly_detection"]) <= {0.0, 0.5, 1.0}


def test_closed_auroc_scores_enlargement_questions_apart(tiny_model_dir):
    """With enlarged organs in the stream, "is the organ enlarged?" questions are scored in their own
    group (label: enlarged), and only they; the lesion questions keep their families."""
    from photon_core.inference.predictor import Predictor
    from photon_core.train.synthetic.generator import DemoGenerator
    from photon_core.train.synthetic.questions import ENLARGED
    mod = _script("closed_auroc")
    gen = DemoGenerator("test", seed=0, downsample=2.5, enlargement=1.0)
    out = mod.margins(Predictor(tiny_model_dir, device="cpu"), gen, 3, "full")
    replay = DemoGenerator("test", seed=0, downsample=2.5, enlargement=1.0)
    enlarged = [q for _ in range(3) for q in replay.sample()[1]
                if q["family"] == "existence"
                and any(q["question"] == t.format(o=q["organ"]) for t in ENLARGED)]
    assert enlarged and any(q["answer"] == "yes" for q in enlarged)
    assert out["enlargement"][1] == [q["answer"] == "yes" for q in enlarged]
    assert mod.group(dict(question="Is there a lesion in the liver?", organ="liver",
                          family="existence")) == "existence"


def test_ball_probe_runs(capsys, tmp_path):
    """research/ball_probe.py (the four trainings) runs end to end and prints one accuracy each."""
    mod = _script("ball_probe")
    pv, grid, ys = mod.Balls(0).batch(4)
    assert pv.shape == (4 * 256, 14 ** 3) and grid.tolist() == [[4, 8, 8]] * 4 and len(ys) == 4
    mod.main(["--steps", "2"])
    lines = capsys.readouterr().out.splitlines()
    assert [x.split()[0] for x in lines] == ["joint", "mean-head", "max-head", "llm-after"]
    assert all(0.0 <= float(x.split()[-1]) <= 1.0 for x in lines)
    mod.main(["--steps", "2", "--vision-width", "48", "--standardise", "--runs", "max-head"])   # one training
    assert [x.split()[0] for x in capsys.readouterr().out.splitlines()] == ["max-head"]
    mod.main(["--steps", "2", "--spread", "1", "--fold", "--runs", "max-head", "llm-after"])
    assert [x.split()[0] for x in capsys.readouterr().out.splitlines()] == ["max-head", "llm-after"]
    m = mod.new_model("tiny", mod.build_tokenizer(tmp_path, vocab_size=400), width=48)
    assert m.visual.cfg.hidden_size == 48 and m.visual.cfg.intermediate_size == 96


def test_detect_probe(tiny_model_dir, capsys):
    """research/detect_probe.py: the probe finds a planted token signal; the script runs on a model."""
    import torch
    mod = _script("detect_probe")
    g = torch.Generator().manual_seed(0)
    y = torch.rand(6, 64, generator=g) < 0.05
    x = torch.randn(6, 64, 8, generator=g)
    x[..., 3] += 3 * y
    s = mod.fit_probe(x, y)(x)
    from photon_core.eval.metrics import auroc
    assert auroc(s.flatten().tolist(), y.flatten().tolist()) > 0.95
    assert auroc(mod.fit_probe(x[..., :3], y)(x[..., :3]).flatten().tolist(), y.flatten().tolist()) < 0.8
    from photon_core.model.checkpoint import load_model
    t = mod.tokens(load_model(tiny_model_dir, "cpu", torch.float32), "test", 3, 2.5, blob=True)
    assert t["x"].shape[:2] == t["y"].shape == t["tissue"].shape == t["blob"].shape == (3, 64)
    assert bool((t["tissue"] | ~t["y"]).all())          # every finding block counts as tissue
    z = mod.tokens(load_model(tiny_model_dir, "cpu", torch.float32), "test", 3, 2.5, standardise=True)["x"]
    assert torch.allclose(z, (t["x"] - t["x"].mean(1, keepdim=True)) / (t["x"].std(1, keepdim=True) + 1e-6),
                          atol=1e-4)                     # the same scans, each read as its deviations
    out = mod.main(["--model", str(tiny_model_dir), "--scans", "8", "--downsample", "2.5"])
    assert set(out) == {"probe", "blob"}
    assert all(0 <= v <= 1 for f in out.values() for v in f.values())
    assert "scan-level (max token) AUROC" in capsys.readouterr().out


def test_organ_probe(tiny_model_dir, capsys):
    """research/organ_probe.py: the least-squares probe recovers planted shares; the within-organ AUROC
    compares each organ with its own normal scans; the script runs on a model."""
    import torch
    mod = _script("organ_probe")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=g)
    y = torch.stack([0.3 * x[:, 0] + 0.1, -0.2 * x[:, 4]], -1)
    assert mod.r2(mod.fit_probe(x, y)(x), y) > 0.999
    assert mod.r2(mod.fit_probe(x[:, 1:4], y)(x[:, 1:4]), y) < 0.05
    rows = [dict(organ="liver", enlarged=e, volume=v)
            for e, v in ((False, 100), (False, 110), (True, 150))] + \
           [dict(organ="spleen", enlarged=e, volume=v) for e, v in ((False, 20), (False, 22), (True, 30))]
    assert mod.within_organ_auroc(rows, "volume") == 1.0      # raw volumes would rank the spleen
                                                              # below the liver
    out = mod.main(["--model", str(tiny_model_dir), "--scans", "4", "--enlargement", "1.0", "--pool", "1"])
    assert set(out["r2"]) == set(out["correlation"]) == set(mod.ENLARGE_ORGANS)
    assert all(0 <= v <= 1 for v in out["auroc"].values()) and out["auroc"]["volume"] > 0.9
    assert set(out["coverage"]) == {"scan", "noise"} and all(0 <= v <= 1 for v in out["coverage"].values())
    assert "token R²" in capsys.readouterr().out


def test_feature_rank(tiny_model_dir, capsys):
    """research/feature_rank.py: the spectrum tells one direction from many, the question dependence
    tells one ranking for every question from rankings that differ; the script runs on a model."""
    import numpy as np
    import torch
    mod = _script("feature_rank")
    g = torch.Generator().manual_seed(0)
    line = 5.0 + torch.randn(300, 1, generator=g) * torch.randn(1, 16, generator=g)     # tokens on one line
    spread = torch.randn(300, 16, generator=g)
    assert mod.spectrum(line)["top1"] > 0.999 and mod.spectrum(spread)["top1"] < 0.2
    assert mod.spectrum(line)["mean_share"] > mod.spectrum(spread)["mean_share"]
    base = np.random.default_rng(0).random(1000)
    corr, share = mod.question_dependence(np.stack([base, 2 * base + 1, 0.5 * base]))   # affine: same ranking
    assert corr > 0.999
    corr, share = mod.question_dependence(np.random.default_rng(1).random((3, 1000)))
    assert abs(corr) < 0.1 and share > 0.5
    assert mod.pairwise_cosine(torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])) == pytest.approx(1 / 3)
    keep = np.zeros(10, bool)
    keep[:4] = True
    assert mod.pairwise_jaccard([keep, keep, ~keep]) == [1.0, 0.0, 0.0]
    out = mod.main(["--model", str(tiny_model_dir), "--scans", "2", "--pool", "1"])
    assert out and all(-1 <= v["corr"] <= 1 and 0 <= v["tokens_top1"] <= 1 for v in out.values())
    for v in out.values():
        assert 0 <= v["jaccard"] <= 1 and 0 <= v["cover"] <= 1 and 0 < v["kept"] <= 1000
        assert v["state_norm"] > 0 and v["embed_norm"] > 0 and -1 <= v["embed_cos"] <= 1
    printed = capsys.readouterr().out
    assert "question-dependent variance share" in printed and "Jaccard of two organ prompts" in printed


def test_key_bound(tiny_model_dir, capsys):
    """research/key_bound.py: a ridge fit finds a set that a feature marks, top-k keeps k, the bound of
    two organs told apart by a feature is low and of two organs on one feature high; runs on a model."""
    import numpy as np
    mod = _script("key_bound")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 4))
    a, b = mod.top(x[:, 0], 30), mod.top(x[:, 1], 30)          # two organs of 30 blocks, two features
    assert mod.top(mod.ridge(x, a.astype(float))(x), int(a.sum()))[a].mean() > 0.8
    assert mod.top(np.arange(10.0), 3).tolist() == [False] * 7 + [True] * 3
    scan = dict(keys=x, tokens=x, rho={"p": x[:, 2], "q": x[:, 2]}, target={"p": a, "q": b},
                blocks={"p": a, "q": b})
    far = mod.bound([scan], "keys", "best, this scan")
    same = mod.bound([scan], "keys", "model")                  # one ρ for both organs: the same set
    assert same["jaccard"] == 1.0 and far["jaccard"] < 0.3 and far["cover"] > 0.8
    assert far["target_jaccard"] == same["target_jaccard"] < 0.3 and far["pairs"] == 1
    out = mod.main(["--model", str(tiny_model_dir), "--scans", "3", "--pool", "1"])   # 2 of one body
    for body in out.values():
        for modes in body.values():
            assert all(0 <= r["jaccard"] <= 1 and 0 <= r["cover"] <= 1 for r in modes.values())
    assert any("best, one per organ" in body["keys"] for body in out.values())
    assert "one per organ" in capsys.readouterr().out


def test_blob_scores_mark_a_ball():
    """detect_probe's classical reference: a bright ball in a flat volume scores highest in its block."""
    import torch
    mod = _script("detect_probe")
    v = torch.full((28, 56, 56), 0.5)
    z, y, x = torch.meshgrid(*[torch.arange(n).float() for n in v.shape], indexing="ij")
    v[((z - 20) * 2.6) ** 2 + ((y - 40) * 1.3) ** 2 + ((x - 12) * 1.3) ** 2 <= 8.0 ** 2] = 0.6
    s = mod.blob_scores(v, (2, 2, 2), (2.6, 1.3, 1.3))
    assert int(s.argmax()) == 1 * 4 + 1 * 2 + 0      # block (d 1, h 1, w 0)
    assert float(s[6]) > 5 * float(s[1])            # a block on the far side


def test_patch_detect(capsys):
    """research/patch_detect.py: patches come out on the model's grid, the figures rank as they should,
    the 3-D CNN learns a planted blob, and the script runs end to end."""
    import torch
    mod = _script("patch_detect")
    x = torch.zeros(28, 28, 42)
    x[14:, :14, 28:] = 1                                   # depth 1, row 0, column 2 → patch 1·6 + 0·3 + 2
    p = mod.patch_view(x)
    assert p.shape == (12, 14, 14, 14) and p.sum((1, 2, 3)).nonzero().flatten().tolist() == [8]
    kind = torch.tensor([mod.FINDING, mod.TWIN, mod.TISSUE, mod.TISSUE])
    assert mod.patch_figures(torch.tensor([3.0, 2, 1, 0]), kind) == {"all": 1.0, "twin": 1.0, "tissue": 1.0}
    assert mod.patch_figures(torch.tensor([0.0, 1, 2, 3]), kind)["twin"] == 0.0

    def blobs(n, seed):
        g = torch.Generator().manual_seed(seed)
        v = torch.randn(n, 14, 14, 14, generator=g)
        y = (torch.rand(n, generator=g) < 0.5).float()
        for i in y.nonzero().flatten().tolist():
            a, b, c = torch.randint(0, 10, (3,), generator=g).tolist()
            v[i, a:a + 4, b:b + 4, c:c + 4] += 1.5
        return v, y
    torch.manual_seed(0)
    model = mod.train(mod.Cnn(), mod.draws(*blobs(512, 0)), steps=60)
    v, y = blobs(256, 1)
    from photon_core.eval.metrics import auroc
    assert auroc(mod.score(model, v).tolist(), y.bool().tolist()) > 0.9

    stream = mod.PatchStream("train", seed=0, downsample=2.5)         # pairs: painted,
                                                                      # then the same crop clean
    x, y = stream.batch(8)
    assert x.shape == (8, 14, 14, 14) and y.tolist() == [1.0, 0.0] * 4
    changed = (x[0::2] != x[1::2]).flatten(1).float().mean(1)
    assert bool((changed >= mod.MIN_SHARE * 0.5).all())               # a lesion in each painted crop
    assert torch.equal(x[1::2].clamp(0, 1), x[1::2])                  # (a few of its voxels may keep
                                                                      # their value by chance)
    for argv in (["--scans", "6"], ["--stream"]):
        out = mod.main(argv + ["--test-scans", "4", "--eval-scans", "3", "--steps", "3",
                               "--downsample", "2.5"])
        assert set(out) == {"flat", "cnn"}
        assert all(set(f) == {"all", "twin", "tissue", "organ_auroc", "scan_auroc"} and
                   all(0 <= v <= 1 for v in f.values()) for f in out.values())
        assert "organ-level AUROC" in capsys.readouterr().out
