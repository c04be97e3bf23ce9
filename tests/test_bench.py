"""The GPU run's whole code path on CPU (`SMOKE=1 bench/gpu_run.sh`: tiny model, small volume): a GPU lease
is short, so the script, every section of the benchmark, the merge and the files it leaves must work here."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT


@pytest.mark.slow
def test_gpu_run_smoke_writes_every_section(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), SMOKE="1", PYTHON=sys.executable)
    r = subprocess.run(["bash", "bench/gpu_run.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=1800)
    log = (tmp_path / "run.log").read_text()
    assert r.returncode == 0, log[-3000:]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["run.log", "tests.log", "tests.xml", "bench_ours.json", "profile.txt",
                            "bench_peer.json", "gpu_bench.json"]), names
    assert len(names) <= 8                                       # what comes back from the GPU machine
    ours = json.loads((tmp_path / "bench_ours.json").read_text())
    bad = {k: v["status"] for k, v in ours["parts"].items()
           if not v["status"].startswith(("ok", "skipped: --smoke"))}
    assert not bad, (bad, log[-3000:])
    rows = ours["rows"]
    b = rows["B Photon, no ITS"]
    a = rows["A stock geometry"]
    assert a["visual_tokens"] == 7 * b["visual_tokens"]            # temporal patch 2 vs 14: 7× the tokens
    k = round(0.39 * b["visual_tokens"])
    c, d = rows[f"C ITS top-{k}"], rows[f"D FastV top-{k}"]
    assert c["kept"] == d["kept"] == k
    assert rows["C ITS 10%"]["kept"] == max(1, round(0.1 * b["visual_tokens"]))
    for f in ("vision_s", "prefill_s", "ttft_s", "answer_s", "answer_cached_features_s", "decode_tok_s_b1",
              "decode_tok_s_b8", "train_step_s"):
        assert c[f] > 0, f
    assert c["decode_path_b1"] == "eager" and "peak_mem_gib_b1" not in c          # no GPU figures on CPU
    for f in ("vision_s_separate", "prefill_s_separate", "decode_tok_s_b1_separate",
              "decode_tok_s_b1_matmul_kernel", "decode_tok_s_b1_sdpa_kernel"):
        assert c[f] > 0, f
    steps = ours["decode_step_profile"]
    fused, separate = steps["ours eager"], steps["ours eager, separate projections"]
    assert 0 < fused["launches_per_step"] < separate["launches_per_step"]    # fusion: fewer ops per step
    assert fused["ms_per_step"] > 0 and fused["top"]
    sdpa = steps["ours eager, sdpa decode attention"]
    assert sdpa["launches_per_step"] < steps["ours eager, matmul decode attention"]["launches_per_step"]
    s = ours["service"]
    assert s["sessions"] == 8 and s["batch_sizes_seen"] == [8] and s["one_ask_s"] > 0
    assert s["batcher_stats"]["max_rows"] == 8
    assert set(ours["profile"]) == {"prefill", "prefill, captured spans",
                                    "eager decode, 8 steps (prefill included)"}
    assert c["prefill_path"] == "eager" and c["prefill_eager_layers_s"] > 0     # no captured spans on a CPU
    peer = json.loads((tmp_path / "bench_peer.json").read_text())
    assert all(v["status"] == "ok" for v in peer["parts"].values()), peer["parts"]
    p = peer["rows"]["stock transformers, Photon geometry (no drop)"]
    assert p["decode_tok_s_b1_eager"] > 0 and p["decode_tok_s_b1_static_compile"] > 0
    assert peer["decode_step_profile"]["peer eager"]["launches_per_step"] > 0
    merged = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert set(merged["decode_step_profile"]) >= {"ours eager", "peer eager"}
    assert merged["meta"]["device"].startswith("cpu") and merged["meta"]["attention"] == "PyTorch SDPA"
    assert "decode_b1_vs_stock_compiled (≥ 2.4)" in merged["targets"]
    assert "skipped" in (tmp_path / "tests.log").read_text()      # the GPU tests skip cleanly without CUDA


def test_cpu_ops_counts_fewer_kernels_fused(tmp_path):
    """bench/cpu_ops.py runs, and the fused projections launch fewer operations per decode step and
    fewer matmuls per layer than the separate ones."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    def run(*extra):
        r = subprocess.run([sys.executable, "bench/cpu_ops.py", *extra], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return json.loads(r.stdout)

    fused, separate = run(), run("--separate")
    assert fused["fused"] and not separate["fused"]
    assert fused["decode_step_ops"] < separate["decode_step_ops"]
    assert fused["decode_step_matmuls_per_layer"] < separate["decode_step_matmuls_per_layer"]
    assert fused["prefill_ops"] < separate["prefill_ops"]


def test_cpu_official_smoke_measures_each_part(tmp_path):
    """bench/cpu_official.py runs (tiny shape) and writes every figure it prints."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "bench/cpu_official.py", "--smoke", "--json", str(tmp_path / "o.json")]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads((tmp_path / "o.json").read_text())
    assert out["visual_tokens"] == 64 and out["meta"]["smoke"] is True
    for k in ("vision_s", "prefill_its_25_s", "decode_s_per_token", "answer_32_tokens_s",
              "prefill_all_tokens_s"):
        assert out[k] > 0, k


@pytest.mark.slow
def test_device_call_prepares_runs_both_parts_and_packs_them_into_what_comes_back(tmp_path):
    """scripts/device_call.sh, the one command a session's device time holds, end to end on the CPU
    (SMOKE=1): `prepare` makes the carried folder (bodies; no parity fixtures here: it says so and goes
    on) and checks what travels; `run` runs the engine check and then trains in the time left, and leaves
    at most 8 files of ≤ 16 MiB with plain names in OUT, the weights beside the packed model folder;
    `unpack` puts the model folder back together where the Predictor loads it, and files the engine's
    results and the trainer's metrics without overwriting earlier ones."""
    from photon_core.inference.predictor import Predictor

    carried, out = tmp_path / "gpu", tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, GPU_DIR=str(carried),
               SHARED_PARITY=str(tmp_path / "no-parity-here"))
    r = subprocess.run(["bash", "scripts/device_call.sh", "prepare"], cwd=ROOT, env=dict(env, SMOKE="1"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "no parity fixtures" in r.stderr and "of 64" in r.stdout
    assert '"bash scripts/device_call.sh run"' in r.stdout
    assert (carried / "bodies.safetensors.xz").is_file() and not (carried / "parity").exists()

    run_env = dict(env, OUT=str(out), SMOKE="1", ENGINE_LIMIT_S="2", CALL_LIMIT_S="55", PACK_S="10",
                   TRAIN_MIN_S="25",
                   SEPARATE_BYTES="4096", TRAIN_ARGS="--stages vision:0.5,llm:0.5")
    r = subprocess.run(["bash", "scripts/device_call.sh", "run"], cwd=ROOT, env=run_env, capture_output=True,
                       text=True, timeout=400)
    log = (out / "call.log").read_text()
    assert r.returncode == 0, log[-3000:]
    files = sorted(p for p in out.rglob("*") if p.is_file())
    names = [p.name for p in files]
    assert {"call.log", "engine.tar.gz", "demo.tar.gz", "demo_model.safetensors"} <= set(names), (names, log)
    assert len(files) <= 8 and all(p.stat().st_size <= 16 * 2**20 for p in files)
    assert all(p.parent == out and all(c.isalnum() or c in "._-" for c in p.name) for p in files)
    assert "== engine: start" in log and "== train: exit 0" in log, log[-3000:]

    results, runs, device = tmp_path / "results", tmp_path / "gpu_runs", tmp_path / "device"
    results.mkdir()
    runs.mkdir()
    unpack_env = dict(env, RESULTS=str(results), GPU_RUNS=str(runs), DEVICE_RUNS=str(device))
    for _ in (1, 2):                                   # the second files beside the first, never over it
        r = subprocess.run(["bash", "scripts/device_call.sh", "unpack", str(out)], cwd=ROOT, env=unpack_env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
    assert "photon-eval --model" in r.stdout
    assert "engine targets:" in r.stdout and '"vision_probe"' in r.stdout     # the figures to read first
    metrics = sorted(p.name for p in runs.glob("*_call1_metrics*.json"))
    assert len(metrics) == 2 and metrics[0].endswith("_call1_metrics-2.json"), metrics
    assert len(list(results.glob("gpu_nogpu_*.json"))) == 2
    folders = sorted(device.iterdir())
    assert len(folders) == 2
    model = folders[0] / "demo" / "model"
    assert json.loads((model / "train_state.json").read_text())["done"] == ["vision", "llm"]
    p = Predictor(model, device="cpu")
    p.set_volume(torch.rand(140, 280, 280))
    assert isinstance(p.ask("Is there a lesion in the liver?", max_new_tokens=4).text, str)
