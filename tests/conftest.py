import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# the reference-parity fixtures: ../shared/parity beside the checkout, or where PHOTON_PARITY says
PARITY = Path(os.environ.get("PHOTON_PARITY") or ROOT.parent / "shared" / "parity")
SAMPLES = ROOT / "sample_cases"
torch.set_num_threads(2)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA (skipped without a GPU)")
    config.addinivalue_line("markers", "browser: drives the app in headless Chromium")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def parity_dir():
    if not (PARITY / "fixture.safetensors").is_file():
        pytest.skip("shared/parity fixtures not present")
    return PARITY


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A randomly initialised tiny Photon (same classes, tiny config) with the demo tokenizer."""
    from photon_core.model.checkpoint import save_model
    from photon_core.model.photon import PhotonModel
    from photon_core.train.tokenizer import build_tokenizer, model_config

    d = tmp_path_factory.mktemp("tiny_model")
    tok = build_tokenizer(d, vocab_size=400)
    torch.manual_seed(0)
    m = PhotonModel(model_config("tiny", tok.vocab_size, tok))
    m.init_weights(0.2)
    with torch.no_grad():
        m.its_module.predictor.mlp[2].bias.fill_(0.0)   # keep about half, so drops are visible
    save_model(m, d)
    return d


@pytest.fixture(scope="session")
def abdomen():
    from photon_core.io.volume import load_volume

    return load_volume(SAMPLES / "abdomen_ct" / "ct.nii.gz")


@pytest.fixture(scope="session", autouse=True)
def _prepared_bodies_once():
    """Each sample case prepared into a training body once per test session, not once per generator:
    `anatomy.load_background` (≈ 2.5 s a case on the 2-core CI box, called by every `DemoGenerator`)
    memoised for the modules that call it, each call given its own copy. The first call of a key is
    the real function, so every test still sees its exact result; the tests of the function itself
    import it by name before this runs and call it unmemoised."""
    from photon_core.io import samples
    from photon_core.train.synthetic import anatomy, bodies, generator
    from photon_core.train.synthetic.anatomy import Background

    real, made = anatomy.load_background, {}

    def load_background(case, device="cpu"):
        key = (case, str(torch.device(device)), str(samples.path(samples.case(case)["file"])))
        if key not in made:
            made[key] = real(case, device)
        bg = made[key]
        return Background(bg.name, bg.frames.clone(), {n: m.clone() for n, m in bg.organs.items()},
                          bg.voxel_mm)

    mp = pytest.MonkeyPatch()
    for module in (anatomy, bodies, generator):
        mp.setattr(module, "load_background", load_background)
    yield
    mp.undo()


def nifti_with_two_placements(path: Path, hu, shift_mm: float = 20.0):
    """Write ``hu`` as a NIfTI whose qform (code 1, scanner) and sform (code 2, aligned: a registration
    that updated only it) place the scan ``shift_mm`` apart along x; returns (qform, sform)."""
    import nibabel as nib
    import numpy as np

    qform = np.diag([2.0, 2.0, 3.0, 1.0])
    sform = qform.copy()
    sform[0, 3] = shift_mm
    img = nib.Nifti1Image(hu, None)
    img.header.set_qform(qform, code=1)
    img.header.set_sform(sform, code=2)
    nib.save(img, str(path))
    return qform, sform
