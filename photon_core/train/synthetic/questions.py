"""Questions and answers of the synthetic demo data, decided by the findings and the visible organs.

3D-RAD-style families (existence, anomaly detection, image observation, measurement, temporal) and
DeepTumorVQA-style counting/size questions, several phrasings each. The organ in the question decides
the answer, so the model has a reason to keep instruction-dependent regions.
"""
from __future__ import annotations

import math
import random

from photon_core.organs import ORGANS, PAIRED
from photon_core.train.synthetic.anatomy import VOXEL_MM
from photon_core.train.synthetic.findings import NO_LESIONS, Finding, count, lesion_sites


EXIST = ["Is there a lesion in the {o}?", "Does the {o} contain a lesion?", "Is any focal lesion seen in the {o}?",
         "Are there lesions in the {o}?"]
NORMAL_QUESTION = "Is this scan normal?"       # the one closed question whose "yes" means no finding
ANOMALY = ["Is there any abnormality in this scan?", "Does this CT show an abnormal finding?", NORMAL_QUESTION]
FINDING_FAMILIES = ("existence", "anomaly_detection")   # yes/no questions a finding decides
WHICH = ["Which organ contains the lesion?", "Where is the lesion located?", "In which organ is the abnormality?",
         "Which organ shows the abnormality?"]
# The bundled cases' suggested questions in the generator's words (so the demo model answers them in kind)
CYST = ["Is there a cyst in the {o}?"]
NODULE = ["Is there a nodule in the {o}?"]
ORGAN_ABNORMAL = ["Is there an abnormality of the {o}?"]
LARGER = ["Which {p} is larger?"]
LARGER_RATIO = 1.15                      # asked only when one organ of the pair is this much larger
SIDE = ["Which side is the {p} lesion on?", "Is the {p} lesion on the left or the right?"]
SIZE = ["What is the diameter of the lesion in the {o} in mm?", "How large is the {o} lesion in millimetres?",
        "Measure the largest {o} lesion (mm)."]
COUNT = ["How many lesions are in the {o}?", "Count the lesions in the {o}.", "What is the number of {o} lesions?"]
TYPE = ["Is the {o} lesion a cyst or a solid lesion?", "Is the lesion in the {o} cystic or solid?"]
EFFUSION = ["Is there a pleural effusion?", "Is pleural fluid present?"]
EFFUSION_SIDE = ["Which side is the pleural effusion on?"]
ENLARGED = ["Is the {o} enlarged?", "Does the {o} look enlarged?", "Is there enlargement of the {o}?"]
ORGAN_VOLUME = ["What is the volume of the {o} in ml?", "Estimate the {o} volume (ml)."]
ENLARGE_ORGANS = ("liver", "spleen", "left kidney", "right kidney")
# Longitudinal (prior + current scan)
CHANGE = ["Compared with the prior scan, is the {o} lesion larger, smaller or stable?",
          "How has the {o} lesion changed since the prior scan: larger, smaller or stable?"]
GROWN = ["Has the {o} lesion grown since the prior scan?", "Is the {o} lesion larger than on the prior scan?"]
NEW = ["Is there a new lesion in the {o} since the prior scan?", "Has a new {o} lesion appeared since the prior?"]
RESOLVED = ["Has the {o} lesion seen on the prior scan resolved?"]
PRIOR_SIZE = ["What was the diameter of the {o} lesion on the prior scan in mm?"]
CHANGES = ("larger", "smaller", "stable", "new", "resolved")


def make_questions(findings: list[Finding], organs: dict, rng: random.Random, enlargement: bool = False,
                   voxel_ml: float = math.prod(VOXEL_MM) / 1000) -> list[dict]:
    """All question/answer records that the findings and the visible organs support (one scan).
    ``enlargement``: also ask whether organs are enlarged and their volumes (ml)."""
    qa = []
    lesions = [f for f in findings if f.focal]
    effusions = [f for f in findings if f.kind == "effusion"]
    by_organ: dict[str, list[Finding]] = {}
    for f in lesions:
        by_organ.setdefault(f.organ, []).append(f)
    visible = list(organs)
    for o in visible:
        yes = o in by_organ
        qa.append(dict(family="existence", answer_type="closed", organ=o,
                       question=rng.choice(EXIST).format(o=o), answer="yes" if yes else "no"))
    if "lung" in " ".join(organs):
        qa.append(dict(family="existence", answer_type="closed", organ="lung",
                       question=rng.choice(EFFUSION), answer="yes" if effusions else "no"))
    normal_q = rng.choice(ANOMALY)
    abnormal = bool(findings)
    ans = ("no" if abnormal else "yes") if normal_q == NORMAL_QUESTION else ("yes" if abnormal else "no")
    qa.append(dict(family="anomaly_detection", answer_type="closed", organ=None, question=normal_q, answer=ans))
    # the bundled cases' suggested questions (before any draw that depends on the findings, so that
    # counterfactual() replays these words)
    lungs, solid = lesion_sites(visible)
    if solid:
        o = rng.choice(solid)
        yes = any(f.kind == "cyst" for f in by_organ.get(o, []))
        qa.append(dict(family="existence", answer_type="closed", organ=o, question=rng.choice(CYST).format(o=o),
                       answer="yes" if yes else "no"))
    if lungs:
        o = rng.choice(lungs + ["lung"])
        hit = [f for f in lesions if f.kind == "nodule" and (f.organ == o or o == "lung")]
        qa.append(dict(family="existence", answer_type="closed", organ=o, question=rng.choice(NODULE).format(o=o),
                       answer="yes" if hit else "no"))
    if visible:
        o = rng.choice(visible)
        hit = [f for f in findings if f.organ == o]
        qa.append(dict(family="anomaly_detection", answer_type="closed", organ=o,
                       question=rng.choice(ORGAN_ABNORMAL).format(o=o), answer="yes" if hit else "no"))
    left, right = PAIRED["kidney"]             # (the lungs: only their bases are in the abdomen scans)
    if left in organs and right in organs:
        vl, vr = float(count(organs[left])), float(count(organs[right]))
        if max(vl, vr) >= LARGER_RATIO * min(vl, vr):
            qa.append(dict(family="image_observation", answer_type="open", organ="kidney",
                           question=rng.choice(LARGER).format(p="kidney"), answer="left" if vl > vr else "right"))
    if len(by_organ) == 1:
        o = next(iter(by_organ))
        qa.append(dict(family="image_observation", answer_type="open", organ=o, question=rng.choice(WHICH),
                       answer=o))
    for pair, (left, right) in PAIRED.items():
        hits = [s for s in (left, right) if s in by_organ]
        if len(hits) == 1:
            qa.append(dict(family="image_observation", answer_type="open", organ=hits[0],
                           question=rng.choice(SIDE).format(p=pair), answer=hits[0].split()[0]))
    if len(effusions) == 1:
        qa.append(dict(family="image_observation", answer_type="open", organ=effusions[0].organ,
                       question=EFFUSION_SIDE[0], answer=effusions[0].side))
    for o, fs in by_organ.items():
        qa.append(dict(family="counting", answer_type="numeric", organ=o,
                       question=rng.choice(COUNT).format(o=o), answer=str(len(fs))))
        big = max(fs, key=lambda f: f.diameter_mm)
        qa.append(dict(family="measurement", answer_type="numeric", organ=o,
                       question=rng.choice(SIZE).format(o=o), answer=f"{int(big.diameter_mm)} mm"))
        if len(fs) == 1 and fs[0].kind in ("cyst", "hypodense", "hyperdense"):
            qa.append(dict(family="image_observation", answer_type="choice", organ=o,
                           question=rng.choice(TYPE).format(o=o), answer="cyst" if fs[0].kind == "cyst" else "solid"))
    if enlargement:
        grown = {f.organ for f in findings if f.kind == "enlargement"}
        for o in (o for o in ENLARGE_ORGANS if o in organs):
            qa.append(dict(family="existence", answer_type="closed", organ=o,
                           question=rng.choice(ENLARGED).format(o=o), answer="yes" if o in grown else "no"))
            if o in grown or rng.random() < 0.25:
                ml = float(count(organs[o])) * voxel_ml
                qa.append(dict(family="measurement", answer_type="numeric", organ=o,
                               question=rng.choice(ORGAN_VOLUME).format(o=o), answer=f"{round(ml)} ml"))
    return qa


def nothing_seen(qa: list[dict]) -> list[dict]:
    """The questions of ``qa`` as asked of a volume that shows no body (noise, air): every existence and
    anomaly question answered as nothing seen ("no"; "yes" to "Is this scan normal?"), the others kept
    as they are (their answer's form). Training on these gives such a volume a well-formed answer that
    does not come from the body the questions were drawn for."""
    out = []
    for q in qa:
        if q["family"] in FINDING_FAMILIES:
            q = dict(q, answer="yes" if q["question"] == NORMAL_QUESTION else "no")
        out.append(q)
    return out


def make_temporal_questions(changes: list[dict], organs: dict, rng: random.Random) -> list[dict]:
    """Longitudinal questions (3D-RAD's temporal family) about lesions seen on a prior and a current
    scan; ``changes``: {organ, change, prior_mm, current_mm} per lesion. Asked only where the answer
    is unambiguous (one lesion in the organ)."""
    qa = []
    by_organ: dict[str, list[dict]] = {}
    for c in changes:
        by_organ.setdefault(c["organ"], []).append(c)
    q = lambda templates, o, answer, atype: dict(family="temporal", answer_type=atype, organ=o,  # noqa: E731
                                                 question=rng.choice(templates).format(o=o), answer=answer)
    for o in organs:
        cs = by_organ.get(o, [])
        if not cs:
            if o not in NO_LESIONS and rng.random() < 0.3:
                qa.append(q(NEW, o, "no", "closed"))
            continue
        qa.append(q(NEW, o, "yes" if any(c["change"] == "new" for c in cs) else "no", "closed"))
        if len(cs) != 1:
            continue
        c = cs[0]
        if c["change"] in ("larger", "smaller", "stable"):
            qa.append(q(CHANGE, o, c["change"], "choice"))
            qa.append(q(GROWN, o, "yes" if c["change"] == "larger" else "no", "closed"))
            qa.append(q(PRIOR_SIZE, o, f"{int(c['prior_mm'])} mm", "numeric"))
            if rng.random() < 0.5:                      # "resolved?" is asked of lesions that persist too
                qa.append(q(RESOLVED, o, "no", "closed"))
        elif c["change"] == "resolved":
            qa.append(q(RESOLVED, o, "yes", "closed"))
            qa.append(q(PRIOR_SIZE, o, f"{int(c['prior_mm'])} mm", "numeric"))
    return qa


def all_template_text() -> list[str]:
    """Every phrasing and answer word, to train the demo tokenizer."""
    words = list(ORGANS) + ["lung", "kidney", "yes", "no", "left", "right", "cyst", "solid", "mm", "ml"] + \
        [str(i) for i in range(100)]
    texts = EXIST + ANOMALY + WHICH + SIDE + SIZE + COUNT + TYPE + EFFUSION + EFFUSION_SIDE + ENLARGED + \
        ORGAN_VOLUME + CYST + NODULE + ORGAN_ABNORMAL + LARGER + CHANGE + GROWN + NEW + RESOLVED + PRIOR_SIZE + \
        list(CHANGES) + words
    return [t.format(o=o, p=p) for t in texts for o in list(ORGANS) + list(PAIRED) for p in PAIRED]
