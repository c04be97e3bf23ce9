"""Answers the model cannot form: unreadable answers are flagged per question type, and budgets too small
to answer from are refused."""
import pytest
import torch

from photon_core.inference.answers import question_type, readable
from photon_core.model.budget import MIN_KEEP_RATIO, MIN_KEEP_TOKENS, SCAN_TOKENS, Budget, decide
from photon_core.train.synthetic import questions as templates

# ------------------------------------------------------------------ question types


@pytest.mark.parametrize("question,kind", [
    ("Is there a lesion in the liver?", "yes_no"),
    ("Has the liver lesion grown since the prior scan?", "yes_no"),
    ("Is there a nodule or mass in the lung?", "yes_no"),            # existence, despite the 'or'
    ("Which organ shows the abnormality?", "organ"),
    ("Where is the lesion located?", "organ"),
    ("Which side is the kidney lesion on?", "side"),
    ("Is the kidney lesion on the left or the right?", "side"),
    ("Which kidney is larger?", "side"),
    ("Is the liver lesion a cyst or a solid lesion?", "choice"),
    ("Compared with the prior scan, is the liver lesion larger, smaller or stable?", "choice"),
    ("How many lesions are in the liver?", "count"),
    ("Count the lesions in the spleen.", "count"),
    ("What is the diameter of the lesion in the liver in mm?", "measurement"),
    ("Estimate the liver volume (ml).", "measurement"),
    ("Describe the findings.", "open"),
])
def test_question_types(question, kind):
    assert question_type(question) == kind


def test_every_demo_question_reads_the_answer_the_data_gives_it():
    """The synthetic data's questions with the answers it writes for them (every family): all readable."""
    import random

    import numpy as np

    from photon_core.train.synthetic.findings import Finding

    names = ("liver", "spleen", "left kidney", "right kidney", "left lung", "right lung")
    organs = {o: np.ones((2, 2, 2), bool) for o in names}
    at = (0, 0, 0)
    pool = [Finding("cyst", "liver", at, 12.0, 0.9), Finding("hypodense", "left kidney", at, 8.0, 0.3),
            Finding("nodule", "right lung", at, 6.0, 0.1), Finding("effusion", "left lung", at, 0, 80.0),
            Finding("enlargement", "spleen", at, 0, 0.0)]
    changes = [dict(organ="liver", change=c, prior_mm=10.0, current_mm=14.0) for c in templates.CHANGES]
    asked = 0
    for seed in range(30):
        rng = random.Random(seed)
        qa = templates.make_questions(rng.sample(pool, rng.randint(0, 3)), organs, rng, enlargement=True)
        qa += templates.make_temporal_questions([rng.choice(changes)], organs, rng)
        for r in qa:
            assert readable(r["question"], r["answer"]), r
            asked += 1
    assert asked > 300


# ------------------------------------------------------------------ readable answers

GARBLED = ["norightno", "82whichno1", "", "   ", "<|im_end|>", "yesno", "!!!", "\ufffd\ufffd"]


@pytest.mark.parametrize("question,good,bad", [
    ("Is there a lesion in the liver?", ["yes", "No.", "Yes, a 2 cm lesion in segment 7."],
     ["right", "liver", "yes no", "12"]),
    ("Which organ shows the abnormality?", ["liver", "The left kidney", "kidney_left", "aorta", "none"],
     ["right", "yes", "12 mm"]),
    ("Which side is the kidney lesion on?", ["left", "on the right side", "both"], ["yes", "liver", "12"]),
    ("Which kidney is larger?", ["left", "Right kidney", "equal"], ["liver", "no"]),
    ("Is the liver lesion a cyst or a solid lesion?", ["cyst", "solid", "a solid lesion"], ["yes", "liver"]),
    ("Is the lesion in the liver cystic or solid?", ["cyst", "solid"], ["left"]),
    ("How many lesions are in the liver?", ["2", "two", "3 lesions", "none", "no lesions"],
     ["no", "2.5", "many"]),
    ("What is the diameter of the lesion in the liver in mm?", ["12 mm", "12", "12mm", "1.2 cm"],
     ["12 ml", "big", "yes"]),
    ("How large is the liver lesion?", ["12 mm", "1.5 cm"], ["12", "large"]),
    ("Estimate the liver volume (ml).", ["1,250 ml", "1250"], ["1250 mm"]),
    ("Describe the findings.", ["A small cyst in the left kidney.", "hello", "The 2nd lesion, on 3D views"],
     ["leftkidney", "noliver"]),
])
def test_readable_per_question_type(question, good, bad):
    for text in good:
        assert readable(question, text), (question, text)
    for text in bad + GARBLED:
        assert not readable(question, text), (question, text)


def test_names_of_the_loaded_label_map_count_as_organs():
    assert not readable("Which structure is abnormal?", "tumour")
    assert readable("Which structure is abnormal?", "tumour", names=["tumour"])


# ------------------------------------------------------------------ the budget floor

BELOW = ["0", "5", "top_k:0", f"top_k:{MIN_KEEP_TOKENS - 1}", "fastv:10", "visionzip:1", "random:0", "1%",
         "ratio:0.0", f"ratio:{MIN_KEEP_RATIO / 2}"]


@pytest.mark.parametrize("text", BELOW)
def test_budgets_below_the_floor_are_refused_in_words(text):
    with pytest.raises(ValueError, match=f"below the floor of {MIN_KEEP_TOKENS} tokens") as e:
        Budget.parse(text)
    assert "question alone" in str(e.value)


@pytest.mark.parametrize("text", [str(MIN_KEEP_TOKENS), f"fastv:{MIN_KEEP_TOKENS}", f"{MIN_KEEP_RATIO:.0%}",
                                  "auto", "full", "threshold:1.0", "threshold:0"])
def test_budgets_at_the_floor_are_accepted(text):
    Budget.parse(text)


@pytest.mark.parametrize("text", ["top_k:1e308", "fastv:1e9", "full:3", "auto:0.5", "auto: 1"])
def test_a_budget_with_a_number_it_cannot_mean_is_refused(text):
    """top_k:1e308 was taken and shown as a 309-digit count of tokens; full:3 and auto:0.5 quietly dropped
    their number (a typo for a count, a percent or a threshold)."""
    with pytest.raises(ValueError, match=r"more than any scan has|takes no number") as e:
        Budget.parse(text)
    assert len(str(e.value)) < 200


@pytest.mark.parametrize("text", ["top_k:abc", "random:x", "θ=x", "top_k:", ":", "%", "threshold:0.5:1",
                                  "{'a': 1}", "top_k:" + "9x" * 3000])
def test_unreadable_budgets_say_what_a_budget_looks_like(text):
    """An API budget whose number does not parse was refused with Python's own words ("could not convert
    string to float: 'abc'"); it names the forms a budget takes, with a long text shortened."""
    with pytest.raises(ValueError, match=r"^cannot read budget .*; try auto, full, 300, 25%") as e:
        Budget.parse(text)
    assert "float" not in str(e.value) and len(str(e.value)) < 200


def test_a_share_just_under_the_floor_is_not_written_as_the_floor():
    """1.99% was refused as "A budget of 2.0% … is below the floor of … 2%"."""
    with pytest.raises(ValueError, match="budget of 1.99% of the visual tokens is below") as e:
        Budget.parse("1.99%")
    assert "2.0%" not in str(e.value)


@pytest.mark.parametrize("text", ["150%", "-5%", "nan%"])
def test_a_percent_out_of_range_is_refused_as_a_percent(text):
    """Was "budget mode 'ratio' needs a fraction in [0, 1]" for a budget written as a percent."""
    with pytest.raises(ValueError, match=f"A percent budget lies between {100 * MIN_KEEP_RATIO:g}% and 100%"):
        Budget.parse(text)


def test_the_floor_is_a_share_of_a_scan():
    assert MIN_KEEP_RATIO * SCAN_TOKENS == MIN_KEEP_TOKENS and 0 < MIN_KEEP_RATIO < 0.1


def test_a_threshold_that_leaves_too_few_keeps_the_most_salient():
    order = torch.randperm(SCAN_TOKENS, generator=torch.Generator().manual_seed(0))
    rho = torch.linspace(0, 1, SCAN_TOKENS)[order]
    theta = torch.tensor(0.5)
    keep = decide(Budget("threshold", 1.0), rho, theta)                 # ρ ≤ 1: nothing above θ = 1
    assert int(keep.sum()) == MIN_KEEP_TOKENS
    assert rho[keep].min() >= rho[~keep].max()
    keep = decide(Budget("threshold", 0.5), rho, theta)                 # plenty above: θ decides alone
    assert torch.equal(keep, torch.sigmoid((rho - 0.5) / 0.2) > 0.5) and int(keep.sum()) > MIN_KEEP_TOKENS


def test_auto_is_photons_own_decision_and_is_not_floored():
    rho = torch.linspace(0, 1, SCAN_TOKENS)
    keep = decide(Budget("auto"), rho, torch.tensor(0.999))
    assert int(keep.sum()) < MIN_KEEP_TOKENS


# ------------------------------------------------------------------ the Predictor marks its answers

def test_the_predictor_marks_each_answer(tiny_model_dir):
    from photon_core.inference.predictor import Predictor

    p = Predictor(tiny_model_dir, device="cpu")
    p.set_volume(torch.rand(140, 1, 280, 280, generator=torch.Generator().manual_seed(0)))
    qs = ["Is there a lesion in the liver?", "How many lesions are in the liver?"]
    for q, a in zip(qs, p.ask_many(qs, "auto", max_new_tokens=3)):
        assert a.readable == readable(q, a.text)
        assert a.to_dict()["readable"] == a.readable
