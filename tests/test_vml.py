"""The guard against oneMKL's first-call race (photon_core.vml): wired where CPU math starts, covering the
ops ATen hands to oneMKL, and the measuring script runs (scripts/vml_race.py; its figures are in
photon_core/vml.py)."""
import importlib.util
import subprocess
import sys

import torch
from conftest import ROOT


def test_importing_the_model_or_the_preparation_warms_the_vector_math_up():
    for module in ("photon_core.model", "photon_core.io.preprocess"):
        code = f"import {module}, photon_core.vml as v; print(v._done)"
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                             check=True)
        assert out.stdout.strip() == "True", module


def test_every_vml_op_is_a_torch_op_and_is_warmed_on_both_float_dtypes(monkeypatch):
    from photon_core import vml

    called = []
    for name in vml.VML_OPS:
        op = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda x, _op=op, _n=name: called.append((_n, x.dtype)) or _op(x))
    monkeypatch.setattr(vml, "_done", False)
    vml.warm_up()
    assert sorted(map(str, called)) == sorted(str((n, d)) for n in vml.VML_OPS for d in (torch.float32,
                                                                                          torch.float64))
    assert {"cos", "sin", "exp", "erf", "tanh", "sqrt", "log"} <= set(vml.VML_OPS)


def test_the_race_script_runs_and_finds_warmed_processes_accurate():
    spec = importlib.util.spec_from_file_location("vml_race", ROOT / "scripts" / "vml_race.py")
    race = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(race)
    result = race.main(["--runs", "2", "--jobs", "2"])
    assert result["bare"]["runs"] == result["warmed"]["runs"] == 2
    assert result["warmed"]["low_accuracy"] == 0 and result["warmed"]["worst"] < race.BAD
