"""The embedded demo model: loaded by default, answers a suggested question on a sample case,
deterministically."""
import json

from conftest import SAMPLES

from photon_core.inference.predictor import DEMO_MODEL, Predictor
from photon_core.io.volume import load_volume


def test_demo_model_answers_a_suggested_question_deterministically():
    assert (DEMO_MODEL / "config.json").is_file() and (DEMO_MODEL / "MODEL_CARD.md").is_file()
    size = sum(f.stat().st_size for f in DEMO_MODEL.glob("*.safetensors"))
    assert size <= 40 * 2**20 and all(f.stat().st_size <= 16 * 2**20
                                      for f in DEMO_MODEL.glob("*.safetensors"))
    case = json.loads((SAMPLES / "cases.json").read_text())["cases"][0]
    p = Predictor(device="cpu")                                   # default = the embedded demo model
    assert "demo" in p.name.lower()
    p.set_volume(load_volume(SAMPLES / case["file"]))
    q = case["questions"][0]
    a, b = p.ask(q), p.ask(q)
    assert a.text and a.text == b.text
    assert a.kept_indices == b.kept_indices and 0 < a.kept < 1000
    assert a.text.split()[0].lower().strip(".,") in {"yes", "no"}   # an existence question gets yes/no
