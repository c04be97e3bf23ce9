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
