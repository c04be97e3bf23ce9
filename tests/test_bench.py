"""The GPU benchmark's code path, run on CPU with a tiny model (`--smoke`): a GPU lease is short."""
import json
import subprocess
import sys

from conftest import ROOT


def test_gpu_abcd_smoke_runs_every_row(tmp_path):
    out = tmp_path / "abcd.json"
    r = subprocess.run([sys.executable, "bench/gpu_abcd.py", "--smoke", "--repeats", "1", "--json", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    rows = {x["row"]: x for x in res["rows"]}
    a, b = rows["A stock geometry"], rows["B Photon, no ITS"]
    assert a["visual_tokens"] == 7 * b["visual_tokens"]          # temporal patch 2 vs 14: 7× the tokens
    k = round(0.39 * b["visual_tokens"])
    assert rows[f"C ITS top-{k}"]["kept"] == rows[f"D FastV top-{k}"]["kept"] == k
    assert [rows[f"C ITS {p}%"]["kept"] for p in (10, 25, 50)] == [max(1, round(p / 100 * b["visual_tokens"]))
                                                                  for p in (10, 25, 50)]
    for x in res["rows"]:
        for f in ("vision_s", "prefill_s", "ttft_s", "prefill_plus_32_s", "decode_tok_s_b1", "decode_tok_s_b8",
                  "train_step_s", "prefill_speedup_vs_A", "prefill_speedup_vs_B"):
            assert x[f] > 0, (x["row"], f)
        assert x["peak_mem_gib"] is None and "prefill_llm_roofline_fraction" not in x   # no GPU figures on CPU
    assert res["meta"]["device"].startswith("cpu") and res["meta"]["attention"] == "PyTorch SDPA"
