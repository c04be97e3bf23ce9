"""Model behaviour on a tiny random Photon: hard drop, budgets, SGP formula, training, loading."""
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from photon_core.inference.predictor import Predictor
from photon_core.inference.prompt import Tokenizer, batch_prompts
from photon_core.model.baselines import merge_dropped
from photon_core.model.budget import MIN_KEEP_TOKENS, Budget
from photon_core.model.checkpoint import CheckpointError, load_model, save_model
from photon_core.model.config import PhotonConfig
from photon_core.model.its import Schedule
from photon_core.model.sgp import pack_indices, surrogate_gather
from photon_core.train.config import TrainConfig
from photon_core.train.loop import step_losses
from photon_core.train.losses import contrast_loss, guide_loss, keep_guide_loss, photon_loss


def _frames(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(140, 1, 280, 280, generator=g) * 0.2
    x[40:80, :, 100:180, 60:140] += 0.6
    return x.clamp(0, 1)


@pytest.fixture(scope="module")
def pred(tiny_model_dir):
    p = Predictor(tiny_model_dir, device="cpu")
    p.set_volume(_frames())
    return p


def test_dropped_tokens_are_absent_from_the_cache(pred):
    m, tok = pred.model, pred.tokenizer
    ids, _ = tok.prompt("Is there a lesion in the liver?", 1000)
    ids = torch.tensor([ids])
    with torch.no_grad():
        out = m(ids, features=pred.features, grid_thw=pred.grid_thw, use_cache=True, budget="ratio:0.3")
    kept = int(out.its.kept_count)
    assert kept == 300
    L, dropped = ids.shape[1], 1000 - kept
    for layer_kv in out.cache:                            # every layer, including those before ITS
        assert layer_kv[0].shape[2] == L - dropped
    # attention length per layer: full up to and including the ITS layer, then prompt − dropped
    s = m.its_layer
    assert out.seq_len_per_layer[: s + 1] == [L] * (s + 1)
    assert out.seq_len_per_layer[s + 1:] == [L - dropped] * (len(m.model.layers) - s - 1)
    # attention FLOPs of the later layers fall by (L−dropped)²/L²
    assert (L - dropped) ** 2 / L ** 2 < 0.2


@pytest.mark.parametrize("budget,expected", [("top_k:123", 123), ("ratio:0.25", 250), ("full", 1000),
                                             ("fastv:77", 77), ("visionzip:150", 150), ("random:200", 200),
                                             (str(MIN_KEEP_TOKENS), MIN_KEEP_TOKENS)])   # the floor
def test_budget_modes_keep_what_they_promise(pred, budget, expected):
    a = pred.ask("Is the spleen enlarged?", budget=budget, max_new_tokens=2)
    assert a.kept == expected and a.keep_grid.sum() == expected and a.total == 1000


def test_topk_keeps_the_most_salient(pred):
    a = pred.ask("Is the spleen enlarged?", budget="top_k:100", max_new_tokens=1)
    rho = a.rho.ravel()
    assert rho[a.keep_grid.ravel()].min() >= rho[~a.keep_grid.ravel()].max()


def test_threshold_and_auto(pred):
    a = pred.ask("Is the spleen enlarged?", budget="threshold:0.5", max_new_tokens=1)
    assert a.kept == int((a.rho > 0.5).sum())
    auto = pred.ask("Is the spleen enlarged?", budget="auto", max_new_tokens=1)
    assert auto.kept == int((auto.rho > auto.theta).sum())


def test_full_equals_model_without_its(pred):
    m, tok = pred.model, pred.tokenizer
    ids = torch.tensor([tok.prompt("Which kidney is larger?", 1000)[0]])
    with torch.no_grad():
        a = m(ids, features=pred.features, grid_thw=pred.grid_thw, budget="full").logits
        b = m(ids, features=pred.features, grid_thw=pred.grid_thw, use_its=False).logits
    assert torch.allclose(a, b, atol=1e-5)


def test_two_asks_encode_once(tiny_model_dir):
    p = Predictor(tiny_model_dir, device="cpu")
    calls = []
    p.model.visual.register_forward_hook(lambda *a: calls.append(1))
    p.set_volume(_frames(1))
    p.ask("Is there a lesion in the liver?", max_new_tokens=2)
    p.ask("Is there a lesion in the liver?", budget="25%", max_new_tokens=2)
    assert len(calls) == 1 and p.encode_calls == 1


def test_ask_many_rows_equal_single_asks(pred):
    qs = ["Is there a lesion in the liver?", "How many lesions are in the left kidney?"]
    many = pred.ask_many(qs, ["auto", "top_k:100"], max_new_tokens=4)
    one = [pred.ask(qs[0], "auto", max_new_tokens=4), pred.ask(qs[1], "top_k:100", max_new_tokens=4)]
    for a, b in zip(many, one):
        assert a.text == b.text and a.kept_indices == b.kept_indices
        assert np.allclose(a.rho, b.rho, atol=1e-5)


def test_deterministic_greedy(pred):
    a = pred.ask("Is there a lesion in the liver?", max_new_tokens=6)
    b = pred.ask("Is there a lesion in the liver?", max_new_tokens=6)
    assert a.text == b.text and a.kept_indices == b.kept_indices


def test_visual_count_mismatch_is_a_clear_error(pred):
    m, tok = pred.model, pred.tokenizer
    ids = torch.tensor([tok.prompt("Is it?", 999)[0]])
    with pytest.raises(ValueError, match="999 <\\|video_pad\\|> tokens but the volume gives 1000"):
        m(ids, features=pred.features, grid_thw=pred.grid_thw)


def test_budget_parse_errors():
    assert Budget.parse("25%") == Budget("ratio", 0.25)
    assert Budget.parse("300") == Budget("top_k", 300)
    for bad in ("ratio:2", "banana", "top_k:-1"):
        with pytest.raises(ValueError):
            Budget.parse(bad)


def test_sgp_backward_matches_the_formula_by_hand():
    torch.manual_seed(3)
    B, L, D = 1, 7, 4
    x = torch.randn(B, L, D, requires_grad=True)
    vis = torch.tensor([[0, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    p = torch.tensor([[0.0, 0.9, 0.2, 0.7, 0.6, 0.1, 0.0]], requires_grad=True)
    presence = ~vis | (p > 0.5)
    idx, valid = pack_indices(presence, "left")
    out = surrogate_gather(x, p, vis, idx, valid)
    go = torch.randn_like(out)
    out.backward(go)
    # by hand
    g = torch.zeros(L, D)
    for n, j in enumerate(idx[0].tolist()):
        if valid[0, n]:
            g[j] = go[0, n]
    xv = x.detach()[0]
    js = [1, 2, 3, 4, 5]
    imp = [float((xv[j] * g[j]).sum()) for j in js]
    mag = [float((xv[j] * g[j]).abs().sum()) for j in js]
    mu = sum(imp) / 5
    sd = max(math.sqrt(sum((i - mu) ** 2 for i in imp) / 5), 3e-3)
    z = [max(-1.5, min(1.5, (i - mu) / sd)) for i in imp]
    d = [0.5 - (0.5 + 0.5 * math.tanh(v)) for v in z]
    dm = sum(d) / 5
    mm = sum(mag) / 5
    expected = torch.zeros(L)
    for n, j in enumerate(js):
        pj = p[0, j].item()
        scale = max(0.5, min(2.0, mag[n] / (mm + 1e-6)))
        expected[j] = 0.8 * (d[n] - dm) * scale * max(pj * (1 - pj), 5e-3)
    assert torch.allclose(p.grad[0], expected, atol=1e-6)
    assert torch.allclose(x.grad[0], g, atol=1e-7)
    assert float(x.grad[0, 2].abs().sum()) == 0.0          # dropped token: no gradient


@pytest.mark.parametrize("phase", [1, 2, 3])
@pytest.mark.parametrize("reg", ["none", "robust", "flip"])
def test_training_step_each_phase_and_regulariser(tiny_model_dir, phase, reg):
    m = load_model(tiny_model_dir, "cpu")
    tok = Tokenizer(tiny_model_dir)
    m.train()
    rows, labs = [], []
    for q, a in [("Is there a lesion in the liver?", "yes"), ("How many lesions are in the spleen?", "2")]:
        ids, a0 = tok.prompt(q, 1000, a)
        rows.append(ids)
        labs.append([-100] * a0 + ids[a0:])
    ids, mask, labels = batch_prompts(rows, m.config.pad_token_id, labs)
    from photon_core.io.preprocess import patchify

    pv, grid = patchify(_frames(2))
    feats = m.encode_volume(pv, grid)
    schedule = Schedule(phase=phase, flip=reg == "flip" and phase == 3)
    out = m(ids, mask, features=torch.cat([feats, feats]), grid_thw=grid, schedule=schedule)
    losses = photon_loss(out, labels, schedule, band=(0.3, 0.8), robust=reg == "robust")
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    mlp_grad = m.its_module.predictor.mlp[2].bias.grad
    if phase == 1:
        assert mlp_grad is None and "band" not in losses
    else:
        assert ("band" in losses) == (reg != "flip" or phase < 3)
        assert mlp_grad is not None and torch.isfinite(mlp_grad).all() and float(mlp_grad.abs().sum()) > 0
    assert m.visual.vision_patch_embed.proj.weight.grad is not None


def test_checkpoint_round_trip_and_shards(tiny_model_dir, tmp_path):
    m = load_model(tiny_model_dir, "cpu")
    files = save_model(m, tmp_path / "out", max_shard_bytes=200_000)
    assert len(files) > 1 and (tmp_path / "out" / "model.safetensors.index.json").is_file()
    m2 = load_model(tmp_path / "out", "cpu")
    for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k


def test_checkpoint_ignores_pickles_and_strangers_beside_safetensors(tiny_model_dir, tmp_path):
    """Official folders carry args.json, README.md, results.zip, even training_args.bin: ignored, never
    opened (a pickle-only folder is refused: tests/test_official.py)."""
    import shutil

    d = tmp_path / "m"
    shutil.copytree(tiny_model_dir, d)
    (d / "pytorch_model.bin").write_bytes(b"not even read")
    (d / "run.sh").write_text("echo hi")
    load_model(d)
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="pickle"):
        load_model(d)
    shutil.copy(tiny_model_dir / "model.safetensors", d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["hidden_size"] = 33
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="divisible"):
        load_model(d)
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path)


def test_shape_mismatch_is_an_error_not_a_reinit(tiny_model_dir, tmp_path):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(tiny_model_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["vision_config"]["in_chans"] = 3
    cfg["vision_config"]["in_channels"] = 3
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape"):
        load_model(d)


def test_official_config_keys():
    c = PhotonConfig.from_hf_dict({"model_type": "qwen2_5_vl", "hidden_size": 2048, "num_hidden_layers": 36,
                                   "num_attention_heads": 16, "num_key_value_heads": 2,
                                   "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
                                   "vision_config": {"in_channels": 3, "in_chans": 1, "depth": 32,
                                                     "out_hidden_size": 2048}})
    assert c.vision.in_chans == 1 and c.its_layer == 8 and c.head_dim == 128
    with pytest.raises(ValueError, match="model_type"):
        PhotonConfig.from_hf_dict({"model_type": "llama"})
    assert PhotonConfig.from_hf_dict({"model_type": "qwen2_5_vl", "pad_token_id": None}).pad_token_id is None
    with pytest.raises(ValueError, match=r"rope_scaling.mrope_section is \[16, 24, '24'\]"):
        PhotonConfig.from_hf_dict({"model_type": "qwen2_5_vl",
                                   "rope_scaling": {"mrope_section": [16, 24, "24"]}})


def test_ask_cli_json(tiny_model_dir):
    import subprocess
    import sys

    from conftest import ROOT, SAMPLES

    r = subprocess.run([sys.executable, "-m", "photon_core.inference.ask",
                        "--scan", str(SAMPLES / "abdomen_ct/ct.nii.gz"),
                        "--question", "Is there a lesion in the liver?", "--budget", "25%", "--model",
                        str(tiny_model_dir), "--device", "cpu", "--max-new-tokens", "3", "--json"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout.strip().splitlines()[-1])
    assert d["kept"] == 250 and d["total"] == 1000 and d["budget"] == "25%"
    bad = subprocess.run([sys.executable, "-m", "photon_core.inference.ask", "--scan", "/nonexistent.nii.gz",
                          "--question", "x?", "--model", str(tiny_model_dir)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr


def test_ask_cli_text_marks_what_the_card_marks(capsys):
    """The plain-text answer says what the app's card says: a question of a kind the demo model was never
    trained on gets its note; a trained kind does not."""
    from conftest import SAMPLES

    from photon_core.inference.ask import main

    scan = str(SAMPLES / "abdomen_ct/ct.nii.gz")
    for question, noted in (("Describe the findings of this scan.", True), ("Is there a lesion in the liver?",
                                                                           False)):
        assert main(["--scan", scan, "--question", question, "--device", "cpu", "--max-new-tokens", "4"]) == 0
        out = capsys.readouterr().out
        assert ("this question is none of them, so its answer means nothing" in out) is noted, out
        assert "visual tokens kept:" in out
    from photon_core.inference import predictor

    ask = predictor.Predictor.ask                     # an answer that does not parse for its question
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(predictor.Predictor, "ask", lambda *a, **k: replace(ask(*a, **k), text="82whichno1",
                                                                       readable=False))
        assert main(["--scan", scan, "--question", "Is there a lesion in the liver?", "--device", "cpu",
                     "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("unreadable answer (not an answer of this question's type): "
                                              "'82whichno1'")


@pytest.mark.parametrize("n", ["0", "300"])
def test_ask_cli_refuses_an_answer_length_before_loading_anything(n, monkeypatch, capsys):
    """--max-new-tokens outside 1..256 was found only by the model, after the scan and the checkpoint had
    loaded; now it is the usage error it is, and --help states the default and the limit."""
    from photon_core.inference import predictor
    from photon_core.inference.ask import main

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the mistake was found")

    monkeypatch.setattr(predictor, "Predictor", no_load)
    with pytest.raises(SystemExit) as e:
        main(["--scan", "missing.nii.gz", "--question", "Is there a lesion?", "--max-new-tokens", n])
    assert e.value.code == 2 and "--max-new-tokens must be between 1 and 256" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "(default: 32, at most 256)" in " ".join(capsys.readouterr().out.split())


def test_saliency_guidance_raises_the_targeted_tokens(tiny_model_dir):
    """Training-only guidance: a few steps on the guide loss alone make ρ of the target blocks exceed
    the rest; the gradient reaches only layers up to the ITS layer (plus embeddings and vision)."""
    m = load_model(tiny_model_dir, "cpu", torch.float32)
    tok = Tokenizer(tiny_model_dir)
    m.train()
    schedule = Schedule(phase=1, saliency_graph=True)
    ids, _ = tok.prompt("Is there a lesion in the liver?", 1000)
    ids = torch.tensor([ids])
    from photon_core.io.preprocess import patchify
    pv, grid = patchify(_frames())
    target = torch.zeros(1, 1000)
    target[0, 100:130] = 1.0
    with torch.no_grad():
        feats = m.encode_volume(pv, grid)
    before = m(ids, features=feats, grid_thw=grid, schedule=schedule).its.rho[0]
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    for _ in range(15):
        out = m(ids, features=feats, grid_thw=grid, schedule=schedule)
        opt.zero_grad()
        guide_loss(out.its.u_graph, target).backward()
        later = [p.grad for p in m.model.layers[m.its_layer + 1].parameters()]
        assert all(g is None or float(g.abs().sum()) == 0 for g in later)
        opt.step()
    rho = m(ids, features=feats, grid_thw=grid, schedule=schedule).its.rho[0]
    gain = lambda r: float(r[100:130].mean() - torch.cat([r[:100], r[130:]]).mean())
    assert gain(rho) > gain(before) + 0.2
    # not asked for → no differentiable saliency (the hot path keeps u detached)
    assert m(ids, features=feats, grid_thw=grid, schedule=Schedule(phase=1)).its.u_graph is None


def test_keep_guidance_moves_the_kept_set_to_the_target(tiny_model_dir):
    """Training-only keep-set guidance: steps on its BCE alone move the tokens ITS keeps at the auto
    budget onto the target (ranking and θ both train); it needs a phase with a decision (> 1)."""
    m = load_model(tiny_model_dir, "cpu", torch.float32)
    tok = Tokenizer(tiny_model_dir)
    m.train()
    schedule = Schedule(phase=3, saliency_graph=True)
    ids, a0 = tok.prompt("Is there a lesion in the liver?", 1000, "yes")
    labels = torch.tensor([[-100] * a0 + ids[a0:]])
    ids = torch.tensor([ids])
    from photon_core.io.preprocess import patchify
    pv, grid = patchify(_frames())
    target = torch.zeros(1, 1000)
    target[0, 300:450] = 1.0
    with torch.no_grad():
        feats = m.encode_volume(pv, grid)

    def overlap():
        keep = m(ids, features=feats, grid_thw=grid, schedule=schedule).its.keep[0]
        return float((keep & (target[0] > 0)).sum() / (keep | (target[0] > 0)).sum().clamp_min(1))

    before = overlap()
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    for _ in range(20):
        st = m(ids, features=feats, grid_thw=grid, schedule=schedule).its
        opt.zero_grad()
        keep_guide_loss(st.u_graph, st.theta, target).backward()
        opt.step()
    after = overlap()
    assert after > before + 0.2, (before, after)
    cfg = TrainConfig(keep_guide=1.0)
    for phase, expected in ((1, False), (3, True)):
        sch = Schedule(phase=phase, saliency_graph=True)
        out = m(ids, features=feats, grid_thw=grid, schedule=sch)
        assert ("keep_guide" in step_losses(out, {}, labels, sch, cfg, False, None, target, None)) == expected


def test_contrast_guidance_tells_two_questions_apart(tiny_model_dir):
    """Training-only pairwise contrast: steps on it alone make each of two questions on the same scan
    rank the tokens only its own keep target holds above where the other question ranks them; rows of
    different scans, or with the same target, give no term."""
    m = load_model(tiny_model_dir, "cpu", torch.float32)
    tok = Tokenizer(tiny_model_dir)
    m.train()
    from photon_core.io.preprocess import patchify
    ids, mask, _ = batch_prompts([tok.prompt(q, 1000)[0] for q in ("Is there a lesion in the liver?",
                                                                    "Is there a lesion in the spleen?")], 0)
    pv, grid = patchify(_frames())
    with torch.no_grad():
        feats = m.encode_volume(pv, grid).repeat(2, 1)
    target = torch.zeros(2, 1000)
    target[0, 200:350], target[1, 600:750] = 1.0, 1.0
    kw = dict(attention_mask=mask, features=feats, grid_thw=grid, schedule=Schedule(saliency_graph=True))

    def apart():
        d = m(ids, **kw).its.rho[0] - m(ids, **kw).its.rho[1]
        return float(d[200:350].mean()), float(-d[600:750].mean())     # each question's lead on its own

    lead = apart()
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    for _ in range(40):
        u = m(ids, **kw).its.u_graph
        opt.zero_grad()
        contrast_loss(u, target, [0, 0]).backward()
        opt.step()
    lead2 = apart()
    assert lead2[0] > lead[0] + 0.1 and lead2[1] > lead[1] + 0.1, (lead, lead2)
    u = m(ids, **kw).its.u_graph
    assert float(contrast_loss(u, target, [0, 1])) == 0.0                               # different scans
    assert float(contrast_loss(u, target[:1].repeat(2, 1), [0, 0]).detach()) == 0.0    # nothing to tell apart


def test_robustness_perturbations_stay_on_the_scan_device():
    """Every robustness input is drawn on the scan's device: a CPU mask times a CUDA scan fails on the
    GPU. The meta device refuses CPU operands as CUDA does, so the check runs here."""
    import random

    from photon_core.train.loop import perturb
    kinds = set()
    for seed in range(30):
        rng = random.Random(seed)
        kinds.add(random.Random(seed).choice(["shuffle", "drop", "voxels", "noise", "zeros"]))
        assert perturb(torch.zeros(28, 28, 28, device="meta"), rng).device.type == "meta"
    assert kinds == {"shuffle", "drop", "voxels", "noise", "zeros"}
    x = torch.rand(28, 28, 28) + 0.5                        # no zero voxel of its own
    kinds = ["shuffle", "drop", "voxels", "noise", "zeros"]
    seed = next(s for s in range(30) if random.Random(s).choice(kinds) == "drop")
    y = perturb(x, random.Random(seed))
    patches = y.reshape(2, 14, 2, 14, 2, 14).permute(0, 2, 4, 1, 3, 5).reshape(8, -1)
    assert y.shape == x.shape and all(bool((p == 0).all()) or bool((p != 0).all())
                                      for p in patches)   # whole patches

def test_keep_target_is_the_organ_and_its_nearest_blocks():
    from photon_core.train.targets import keep_target, token_targets
    organs = {"liver": torch.zeros(140, 280, 280, dtype=torch.bool),
              "left kidney": torch.zeros(140, 280, 280, dtype=torch.bool)}
    organs["liver"][:28, :56, :56] = True                  # blocks (0-1, 0-1, 0-1): 8 blocks at a corner
    organs["left kidney"][112:, 224:, 224:] = True         # the opposite corner, 8 blocks
    tg = token_targets(organs, torch.zeros(140, 280, 280))
    liver = keep_target("Is there a lesion in the liver?", tg, 0.1)
    kidney = keep_target("Is there a cyst in the left kidney?", tg, 0.1)
    assert int(liver.sum()) == 100 and int(kidney.sum()) == 100
    assert liver[0] == 1 and liver[111] == 1 and kidney[999] == 1 and kidney[888] == 1
    assert not (liver.bool() & kidney.bool()).any()        # two far organs: disjoint targets
    zz, yy, xx = torch.meshgrid(*(torch.arange(10.0),) * 3, indexing="ij")
    d = (torch.stack([zz, yy, xx], -1).reshape(-1, 3) - 1).clamp_min(0).norm(dim=-1)   # distance to the liver
    assert float(d[liver.bool()].max()) <= float(d[~liver.bool()].min())               # nearest first
    assert int(keep_target("Is there a lesion in the liver?", tg, 0.001).sum()) == 8   # never fewer than
                                                                                       # the organ
    none = {**tg, "organ_known": torch.zeros_like(tg["organ_known"])}
    assert not keep_target("Is there a lesion in the liver?", none, 0.1).any()       # no target: row skipped


def test_token_targets_and_guide_targets_follow_the_question():
    from photon_core.organs import ORGANS
    from photon_core.train.aux_head import AuxHead
    from photon_core.train.targets import guide_target, token_targets
    organs = {"liver": torch.zeros(140, 280, 280, dtype=torch.bool),
              "left kidney": torch.zeros(140, 280, 280, dtype=torch.bool),
              "right kidney": torch.zeros(140, 280, 280, dtype=torch.bool)}
    organs["liver"][:14, :28, :56] = True                  # token blocks 0 and 1
    organs["left kidney"][14:28, 28:56, :28] = True        # block 110
    organs["right kidney"][14:28, 28:56, 28:56] = True     # block 111
    truth = torch.zeros(140, 280, 280)
    truth[2:6, 2:6, 30:34] = 12.0                          # a 12 mm finding in block 1
    tg = token_targets(organs, truth)
    assert tg["organ"].shape == (1000, len(ORGANS)) and tg["organ"][0, 0] == 1.0
    assert tg["lesion"].nonzero().flatten().tolist() == [1] and float(tg["diameter"][1]) == 12.0
    assert guide_target("Is there a lesion in the liver?", tg).nonzero().flatten().tolist() == [0, 1]
    assert guide_target("Which side is the kidney lesion on?", tg).nonzero().flatten().tolist() == [110, 111]
    assert guide_target("Is the left kidney lesion a cyst?", tg).nonzero().flatten().tolist() == [110]
    assert guide_target("Is there any abnormality in this scan?", tg).nonzero().flatten().tolist() == [1]
    soft = guide_target("Is there a lesion in the liver?", tg, floor=0.05)
    assert soft[:2].tolist() == [1.0, 1.0] and torch.allclose(soft[2:], torch.full((998,), 0.05))
    halo = guide_target("Is there a lesion in the liver?", tg, floor=0.05, halo=1.0)   # grid 10×10×10
    assert halo[:2].tolist() == [1.0, 1.0]
    near, far = halo[2], halo[999]                   # one block from the liver;
                                                     # (9, 9, 9): 8 blocks (beyond reach)
    assert torch.isclose(near, torch.tensor(0.05 + 0.5 * math.exp(-1.0)))
    assert torch.isclose(far, torch.tensor(0.05 + 0.5 * math.exp(-7.0)))
    assert torch.isclose(halo[100], near) and torch.isclose(halo[111], near)   # (1,0,0) and (1,1,1)
                                                                               # touch it too
    none = {**tg, "organ_known": torch.zeros_like(tg["organ_known"])}
    assert not guide_target("Is there a lesion in the liver?", none, floor=0.05).any()   # still no guidance
    head = AuxHead(16, len(ORGANS))
    loss = head.loss(torch.randn(1000, 16, requires_grad=True), [tg])
    assert torch.isfinite(loss) and loss.requires_grad
    organs_only = AuxHead(16, len(ORGANS), findings=0.0)             # --aux-findings 0: organ shares alone
    organs_only.load_state_dict(head.state_dict())
    feats = torch.randn(1000, 16)
    y = organs_only.proj(feats)[:, :len(ORGANS)][:, tg["organ_known"]]
    expect = torch.nn.functional.binary_cross_entropy_with_logits(y, tg["organ"][:, tg["organ_known"]])
    assert torch.allclose(organs_only.loss(feats, [tg], detect=True), expect)
    assert head.loss(feats, [tg], detect=True) > expect + 0.1
    # --aux-standardise: the read-out sees deviations from the scan's mean token over their spread,
    # so a common vector added to every token (or a scale) changes nothing; a raw read-out moves
    std = AuxHead(16, len(ORGANS), standardise=True)
    std.load_state_dict(head.state_dict())
    common = torch.randn(16) * 50
    assert torch.allclose(std.loss(feats, [tg], detect=True), std.loss(3 * feats + common, [tg], detect=True),
                          atol=1e-4)
    assert not torch.allclose(head.loss(feats, [tg]), head.loss(feats + common, [tg]), atol=1e-2)
    z = (feats - feats.mean(0)) / (feats.std(0) + 1e-6)
    assert torch.allclose(std.loss(feats, [tg]), head.loss(z, [tg]), atol=1e-5)


def test_fold_standardise_makes_the_merger_emit_standardised_tokens(tiny_model_dir):
    """--fold-scans: one fixed affine map folded into the merger's last Linear, so the tokens it was
    measured on come out as deviations from their mean over each channel's spread; nothing else moves."""
    from photon_core.io.preprocess import patchify
    from photon_core.model.checkpoint import load_model
    from photon_core.train.aux_head import fold_standardise
    m = load_model(tiny_model_dir, "cpu", torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    pv, grid = patchify(torch.rand(56, 1, 112, 112, generator=g))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        f = m.encode_volume(pv, grid)
        fold_standardise(m, f)
        z = m.encode_volume(pv, grid)
    assert torch.allclose(z, (f - f.mean(0)) / (f.std(0) + 1e-6), atol=1e-3)
    assert torch.allclose(z.mean(0), torch.zeros(z.shape[1]), atol=1e-4)
    assert torch.allclose(z.std(0), torch.ones(z.shape[1]), atol=1e-3)
    moved = {k for k, v in m.state_dict().items() if not torch.equal(v, before[k])}
    assert moved == {"visual.merger.mlp.2.weight", "visual.merger.mlp.2.bias"}


def test_slab_targets_are_the_targets_of_the_slab_alone():
    """--slabs trains the tower on one depth slab: its targets must be those of that slab's own
    token grid (tokens run depth-major), finding map and all."""
    from photon_core.train.targets import slab_targets, token_targets
    g = torch.Generator().manual_seed(0)
    organs = {"liver": torch.rand(42, 56, 56, generator=g) > 0.6,
              "spleen": torch.rand(42, 56, 56, generator=g) > 0.9}
    truth = (torch.rand(42, 56, 56, generator=g) > 0.97) * 9.0
    whole = token_targets(organs, truth, (3, 2, 2))
    for i in range(3):
        sl = slice(14 * i, 14 * (i + 1))
        alone = token_targets({o: m[sl] for o, m in organs.items()}, truth[sl], (1, 2, 2))
        got = slab_targets(whole, i, (3, 2, 2))
        assert set(got) == set(alone) and all(torch.equal(got[k], alone[k]) for k in alone)
    assert not torch.equal(slab_targets(whole, 0, (3, 2, 2))["organ"],
                           slab_targets(whole, 1, (3, 2, 2))["organ"])


def test_visionzip_plan_dominant_plus_merged_contextual_tokens():
    from photon_core.model.baselines import visionzip_plan
    g = torch.Generator().manual_seed(0)
    dominance = torch.rand(1000, generator=g)
    keys = torch.randn(1000, 8, generator=g)
    keep, merge = visionzip_plan(128, dominance, keys)
    assert int(keep.sum()) == 128
    n_dom = round(128 * 54 / 64)
    top = torch.sort(dominance, descending=True).indices[:n_dom]
    assert bool(keep[top].all())                                  # the dominant tokens
    dropped = (~keep).nonzero().flatten()
    assert bool((merge[dropped] >= 0).all()) and bool(keep[merge[dropped]].all())   # each merges into
                                                                                    # a kept token
    assert set(merge[dropped].unique().tolist()).isdisjoint(top.tolist())           # ... a contextual one
    assert bool((merge[keep] == -1).all())
    # a dropped token joins its most similar contextual token
    ctx = merge[dropped].unique()
    j = int(dropped[0])
    sims = torch.nn.functional.normalize(keys, dim=-1)[ctx] @ torch.nn.functional.normalize(keys[j], dim=-1)
    assert int(merge[j]) == int(ctx[sims.argmax()])


def test_visionzip_merges_hidden_states(pred):
    """A visionzip budget carries a merge plan; merging changes exactly the contextual tokens."""
    m, tok = pred.model, pred.tokenizer
    ids = torch.tensor([tok.prompt("Is there a lesion in the liver?", 1000)[0]])
    with torch.no_grad():
        vz = m(ids, features=pred.features, grid_thw=pred.grid_thw, budget="visionzip:100")
        kept = vz.its.keep[0].nonzero().flatten().tolist()
        from photon_core.model.budget import Budget
        same = m(ids, features=pred.features, grid_thw=pred.grid_thw, budget=Budget("top_k", 100))
    assert int(vz.its.keep.sum()) == 100 and vz.its.merge is not None and same.its.merge is None
    h = torch.randn(1, ids.shape[1], 8)
    vision, _ = m.masks(ids, torch.ones_like(ids))
    merged = merge_dropped(h, vision, vz.its.merge)
    vi = vision[0].nonzero().flatten()
    ctx = vz.its.merge[0][vz.its.merge[0] >= 0].unique()
    assert not torch.allclose(merged[0, vi[ctx]], h[0, vi[ctx]])
    others = [t for t in kept if t not in set(ctx.tolist())]
    assert torch.equal(merged[0, vi[others]], h[0, vi[others]])      # dominant tokens untouched


def test_vision_tower_sees_each_depth_slab_alone(tiny_model_dir):
    """The tower's attention (full and windowed) and 2-D rotary positions stay inside one 14-slice slab,
    so a slab encoded alone gives exactly that slab's tokens of the whole volume (the model card's
    slab training relies on it); the LLM is where depth context is built."""
    import torch

    from photon_core.io.preprocess import patchify
    from photon_core.model.checkpoint import load_model
    model = load_model(tiny_model_dir, "cpu", torch.float32).eval()
    frames = torch.rand(42, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = model.encode_volume(*patchify(frames[:, None]))
        middle = model.encode_volume(*patchify(frames[14:28, None]))
    per_slab = whole.shape[0] // 3
    torch.testing.assert_close(middle, whole[per_slab:2 * per_slab], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(middle, whole[:per_slab])


def test_counterfactual_twin_is_trained_on_the_same_depth_slabs(tmp_path, monkeypatch):
    """--vision-only --counterfactual --slabs: the clean twin is cut at the slabs of its scan with
    findings (so each finding token has its own clean token as a negative), one of which holds a finding."""
    import photon_core.train.loop as train
    seen = []
    real = train.slab_targets

    def record(targets, i, grid):
        seen.append((i, bool((targets["lesion"].reshape(grid[0], -1)[i] > 0).any()),
                     bool((targets["lesion"] > 0).any())))
        return real(targets, i, grid)

    monkeypatch.setattr(train, "slab_targets", record)
    cfg = train.TrainConfig(out=str(tmp_path / "cf"), preset="tiny", steps=3, scans_per_step=2, pool=0,
                            warmup=1, device="cpu", downsample=2.5, vision_only=True, aux=1.0, slabs=2,
                            counterfactual=1.0, log_every=100, save_every=100)
    train.train(cfg)
    assert len(seen) == 3 * 2 * 2                       # 3 steps × (scan + twin) × 2 slabs
    for k in range(0, len(seen), 4):
        scan, twin = seen[k:k + 2], seen[k + 2:k + 4]
        assert [i for i, _, _ in scan] == [i for i, _, _ in twin]
        assert not any(has for _, _, has in twin)      # the twin holds no finding
        if scan[0][2]:                                  # the scan has one: a chosen slab holds it
            assert any(h for _, h, _ in scan)
