"""Anatomy: the TotalSegmentator class map, names for an uploaded label map, and an audit that never hides a
structure smaller than a token block."""
import json
import re

import numpy as np
import pytest
import torch
from conftest import SAMPLES

from photon_core.inference.audit import organ_retention
from photon_core.io.volume import load_label_map
from photon_core.organs import (
    BLOCK_FRACTION,
    MIRROR,
    N_BLOCKS,
    ORGANS,
    TOTALSEG_CLASSES,
    block_cover,
    label_blocks,
    label_names,
    organs_in_question,
    read_label_table,
)

CASES = json.loads((SAMPLES / "cases.json").read_text())["cases"]


# ------------------------------------------------------------------ TotalSegmentator's "total" classes

def test_the_class_map_is_totalsegmentators_117_classes():
    assert sorted(TOTALSEG_CLASSES) == list(range(1, 118))
    assert len(set(TOTALSEG_CLASSES.values())) == 117
    assert all(re.fullmatch(r"[a-z0-9_A-Z]+", n) for n in TOTALSEG_CLASSES.values())


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_the_class_map_agrees_with_the_sample_cases(case):
    """cases.json names were written from TotalSegmentator's map; ids 200+ are the aorta report's extras."""
    for lid, name in case["labels"].items():
        if int(lid) in TOTALSEG_CLASSES:
            assert TOTALSEG_CLASSES[int(lid)] == name, (lid, name)
        else:
            assert int(lid) >= 200


def test_organs_ids_name_those_organs():
    """ORGANS' ids are TotalSegmentator ids of the organ named, on the side named."""
    for organ, ids in ORGANS.items():
        words = organ.split()
        side = next((w for w in words if w in ("left", "right")), None)
        for i in ids:
            parts = TOTALSEG_CLASSES[i].split("_")
            assert words[-1] in parts or words[-1].replace(" ", "_") in TOTALSEG_CLASSES[i], (organ, i)
            assert side is None or side in parts, (organ, i)
    assert all(MIRROR[MIRROR[o]] == o for o in MIRROR)


# ------------------------------------------------------------------ names of an uploaded label map

def test_totalsegmentator_ids_get_its_names_with_a_note():
    names, note = label_names([0, 1, 2, 3, 5, 5, 3])
    assert names == {1: "spleen", 2: "kidney_right", 3: "kidney_left", 5: "liver"}
    assert "TotalSegmentator" in note and "assumed" in note
    # ...so the asked-organ check finds the organ a question names
    assert organs_in_question("Is there a cyst in the left kidney?", list(names.values())) == ["kidney_left"]


def test_a_real_sample_label_map_is_named_from_its_ids():
    case = next(c for c in CASES if c["id"] == "abdomen_ct")
    labels, _ = load_label_map(SAMPLES / case["label_map"])
    names, note = label_names(np.unique(labels))
    assert names == {int(k): v for k, v in case["labels"].items()} and note


@pytest.mark.parametrize("ids", [[1], [1, 2], [1, 5, 250]])
def test_a_mask_or_foreign_ids_stay_numbered_with_a_note(ids):
    """A binary mask (1 = lesion) must not be called 'spleen'; ids beyond the map are not guessed."""
    names, note = label_names([0] + ids)
    assert names == {i: f"label_{i}" for i in ids}
    assert "shown as numbers" in note and "names table" in note


def test_no_labels():
    assert label_names([0]) == ({}, None)


def _table(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


@pytest.mark.parametrize("name,text", [
    ("names.json", '{"5": "liver", "200": "tumour"}'),
    ("dataset.json", '{"labels": {"background": 0, "liver": 5, "tumour": 200}}'),      # nnU-Net
    ("list.json", '[{"id": 5, "name": "liver"}, {"id": 200, "name": "tumour"}]'),
    ("pairs.json", '[[5, "liver"], [200, "tumour"]]'),
    ("names.csv", "id,name\n5,liver\n200,tumour\n"),
    ("names.tsv", "# exported\n5\tliver\n200\ttumour\n"),
    ("colors.ctbl", "# Color table file\n0 Background 0 0 0 0\n5 liver 221 130 101 255\n"
                    "200 tumour 255 0 0 255\n"),                                        # 3D Slicer
    ("itksnap.txt", '    0     0    0    0        0  0  0    "Clear Label"\n'
                    '    5   221  130  101        1  1  1    "liver"\n'
                    '  200   255    0    0        1  1  1    "tumour"\n'),              # ITK-SNAP
])
def test_user_tables(tmp_path, name, text):
    names, note = label_names([0, 5, 200], _table(tmp_path, name, text))
    assert names == {5: "liver", 200: "tumour"} and note is None


def test_a_list_of_names_starts_at_the_background(tmp_path):
    names, _ = label_names([1, 2], _table(tmp_path, "l.json", '["background", "tumour", "cyst"]'))
    assert names == {1: "tumour", 2: "cyst"}


def test_a_table_that_misses_ids_numbers_them_and_says_so(tmp_path):
    names, note = label_names([0, 5, 7, 9], _table(tmp_path, "t.json", '{"5": "liver"}'))
    assert names == {5: "liver", 7: "label_7", 9: "label_9"}
    assert "2 label ids" in note and "7, 9" in note and "t.json" in note


def test_two_ids_with_one_name_stay_apart(tmp_path):
    names, _ = label_names([1, 2], _table(tmp_path, "t.csv", "1,lesion\n2,Lesion\n"))
    assert len(set(names.values())) == 2 and names[1] == "lesion"


@pytest.mark.parametrize("name,text,match", [
    ("a.json", "{oops", r"not valid JSON \(line 1"),
    ("b.json", '["tumour", "cyst"]', r"first entry \('tumour'\) would be id 0"),
    ("c.json", '{"5": "liver", "x": 3}', "must map ids to names"),
    ("d.csv", "5,liver\nfoo,bar\n", r"line 2: expected 'id,name'"),
    ("e.json", '{"5": ""}', "id 5 has an empty name"),
    ("f.json", '{"5": "liver", "-3": "x"}', "must map ids to names"),
    ("g.json", '{"5": 7}', "name of id 5 is not text"),
    ("h.json", '{"99999": "x"}', "too large"),
    ("i.json", '{"0": "background"}', "names no label"),
    ("j.csv", "5,liver\n5,spleen\n", "names id 5 twice"),
    ("k.json", '{"5": "' + "x" * 100 + '"}', "100 characters long"),
    ("l.csv", "", "is empty"),
])
def test_bad_tables_are_refused_in_words(tmp_path, name, text, match):
    with pytest.raises(ValueError, match=match) as e:
        read_label_table(_table(tmp_path, name, text))
    assert str(tmp_path) not in str(e.value) and f"'{name}'" in str(e.value)


def test_a_table_that_is_not_text(tmp_path):
    p = tmp_path / "names.csv"
    p.write_bytes(b"\xff\xfe\x00\x81 binary")
    with pytest.raises(ValueError, match="not UTF-8 text"):
        read_label_table(p)


# ------------------------------------------------------------------ the audit never hides a small structure

@pytest.fixture(scope="module")
def abdomen_grid():
    """The abdomen sample, its label map and the flat token index of every voxel (official geometry)."""
    from photon_core.io.preprocess import prepare
    from photon_core.io.volume import load_volume

    case = next(c for c in CASES if c["id"] == "abdomen_ct")
    vol = load_volume(SAMPLES / case["file"])
    labels, _ = load_label_map(SAMPLES / case["label_map"], like=vol)
    geometry = prepare(vol, "cpu").geometry
    return vol, labels, geometry.token_index_volume(), geometry


def _ball(shape, spacing, centre, ml):
    """The voxels within the radius whose ball holds ``ml`` millilitres (on an anisotropic grid)."""
    r = (3 * ml * 1000 / (4 * np.pi)) ** (1 / 3)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    return (((grid - centre) * np.asarray(spacing)) ** 2).sum(-1) <= r * r


def test_a_1_4_ml_tumour_appears_in_the_audit_flagged(abdomen_grid):
    vol, labels, token_index, _ = abdomen_grid
    liver = np.argwhere(labels == 5)
    centre = liver[np.argmin(((liver - liver.mean(0)) ** 2).sum(1))]      # a liver voxel near its middle
    tumour = _ball(vol.shape, vol.spacing, centre, 1.4)
    ml = tumour.sum() * np.prod(vol.spacing) / 1000
    assert 1.2 <= ml <= 1.6, ml
    labels = labels.copy()
    labels[tumour] = 200
    names = {5: "liver", 200: "tumour", 1: "spleen"}

    # the old rule (≥ 25 % of a block) would have dropped it: no block is a quarter tumour
    valid = token_index >= 0
    per_block = np.maximum(np.bincount(token_index[valid], minlength=N_BLOCKS), 1)
    hits = np.bincount(token_index[tumour & valid], minlength=N_BLOCKS)
    assert hits.max() > 0 and (hits / per_block).max() < BLOCK_FRACTION

    blocks, small = label_blocks(token_index, labels, names)
    assert "tumour" in blocks and small == ["tumour"]
    assert np.array_equal(blocks["tumour"], hits > 0)                       # every block it touches
    liver_hits = np.bincount(token_index[(labels == 5) & valid], minlength=N_BLOCKS)
    assert np.array_equal(blocks["liver"], liver_hits >= BLOCK_FRACTION * per_block)   # the paper's rule
    assert blocks["liver"].sum() < (liver_hits > 0).sum()

    # and the per-organ chart has a value for it: kept or not
    keep = np.zeros(N_BLOCKS, bool)
    keep[np.flatnonzero(blocks["tumour"])[0]] = True
    retention = organ_retention(blocks, keep)
    assert retention["tumour"] == pytest.approx(1 / blocks["tumour"].sum())


def test_a_tumour_on_a_block_corner_counts_in_every_block_it_touches(abdomen_grid):
    vol, labels, token_index, _ = abdomen_grid
    # the voxel where most neighbouring tokens meet: a 2×2×2 cube of voxels spanning the most blocks
    best, where = 0, None
    for i in range(0, vol.shape[0] - 1, 3):
        for j in range(0, vol.shape[1] - 1, 3):
            for k in range(0, vol.shape[2] - 1, 3):
                cube = token_index[i:i + 2, j:j + 2, k:k + 2]
                n = len(np.unique(cube[cube >= 0]))
                if n > best:
                    best, where = n, (i, j, k)
    assert best >= 4
    labels = np.zeros_like(labels)
    i, j, k = where
    labels[i:i + 2, j:j + 2, k:k + 2] = 7
    blocks, small = label_blocks(token_index, labels, {7: "lesion"})
    assert small == ["lesion"] and blocks["lesion"].sum() == best


def test_block_cover_any_array_type():
    share = np.zeros(N_BLOCKS)
    share[[3, 4]] = [0.5, 0.1]
    assert np.flatnonzero(block_cover(share)).tolist() == [3]
    share[3] = 0.2                                  # nowhere a quarter: any overlap
    assert np.flatnonzero(block_cover(share)).tolist() == [3, 4]
    t = torch.zeros(N_BLOCKS)
    t[9] = 0.01
    assert torch.nonzero(block_cover(t)).flatten().tolist() == [9]
    assert not block_cover(np.zeros(N_BLOCKS)).any()


def test_the_exported_report_keeps_the_case_title_readable(abdomen_grid, tmp_path):
    import types

    from photon_core.inference.audit import export_audit

    _, _, token_index, geometry = abdomen_grid
    keep = np.zeros((10, 10, 10), bool)
    keep[4:6] = True
    answer = types.SimpleNamespace(keep_grid=keep, text="norightno", budget="auto", total=1000, kept=200,
                                   keep_fraction=0.2, theta=0.5, kept_indices=np.flatnonzero(keep).tolist(),
                                   prefill_s=0.1, decode_s=0.2, device="cpu", prior_total=0, readable=False)
    for title, expected in [("Abdomen/pelvis CT (3 mm)", "Abdomen/pelvis CT (3 mm)"),
                            ("/srv/photon/cache/tmpab12/scan.nii.gz", "scan.nii.gz"), ("", "scan")]:
        export_audit(tmp_path, geometry, token_index, answer, "Is there a lesion?", "demo", case_title=title)
        report = json.loads((tmp_path / "report.json").read_text())
        assert report["case"] == expected and report["answer_readable"] is False


@pytest.mark.parametrize("question, expected", [
    ("Is there a lesion in the pancreatic head?", ["pancreas"]),
    ("Is the gall bladder distended?", ["gallbladder"]),
    ("Is there a fracture of L4?", ["vertebrae_L4"]),
    ("Is there a compression fracture at T12?", ["vertebrae_T12"]),
    ("Is there a left renal cyst?", ["kidney_left"]),
    ("Is the bladder wall thickened?", ["urinary_bladder"]),
    ("Is there a fracture of the left 12th rib?", ["rib_left_12"]),
    ("Is there an aortic dissection?", ["aorta"]),
    ("Is there a cystic lesion in the liver?", ["liver"]),        # 'cystic' is not the gallbladder's duct
])
def test_radiologists_terms_name_the_label_maps_structures(question, expected):
    """The asked structure is found from the words radiologists use: an adjective, a part of the organ,
    two words for one, a vertebral level, an ordinal rib."""
    names = list(TOTALSEG_CLASSES.values())
    assert sorted(organs_in_question(question, names)) == sorted(expected)


def test_names_with_punctuation_or_a_bracketed_abbreviation_are_matched():
    """A names table's 'Inferior vena cava (IVC)', 'Right adrenal gland (RAG)' (FLARE's), 'kidney-left' or
    'Liver.' was never the asked structure: its punctuation and abbreviation counted as words the question
    had to hold, so the card named no asked structure and no retention warning could come."""
    names = ["Liver.", "kidney-left", "Right kidney", "Inferior vena cava (IVC)", "Right adrenal gland (RAG)",
             "Left adrenal gland (LAG)", "(spleen)", "stomach, body"]
    for question, expected in [("Is there a lesion in the liver?", ["Liver."]),
                               ("Is there a cyst in the left kidney?", ["kidney-left"]),
                               ("Is there a thrombus in the vena cava?", []),
                               ("Is there a thrombus in the inferior vena cava?", [names[3]]),
                               ("Is there a right adrenal nodule?", ["Right adrenal gland (RAG)"]),
                               ("Is the spleen enlarged?", ["(spleen)"]),
                               ("Is the stomach distended?", ["stomach, body"])]:   # a part of it
        assert organs_in_question(question, names) == expected, question


def test_a_part_of_a_structure_answers_to_the_structure_and_its_own_name():
    """A names table that labels parts ('Pancreas head', 'Head of pancreas', 'liver segment 8', TotalSeg's
    lung lobes) had no asked structure for "Is there a mass in the pancreas?": every word of the name had to
    be in the question. A part now answers to its structure; a question naming a part keeps that part."""
    names = ["Pancreas head", "pancreas_body", "Tail of the pancreas", "liver segment 7", "Liver segment 8",
             "gallbladder", "lung_upper_lobe_left", "lung_upper_lobe_right", "lung_middle_lobe_right",
             "lung_lower_lobe_right", "vertebrae_L4", "rib_left_12"]
    pancreas = names[:3]
    for question, expected in [
            ("Is there a mass in the pancreas?", pancreas),
            ("Is there a lesion in the pancreatic head?", ["Pancreas head"]),
            ("Is the tail of the pancreas atrophic?", ["Tail of the pancreas"]),
            ("Is the pancreatic body or tail dilated?", ["pancreas_body", "Tail of the pancreas"]),
            ("Is there a hepatic lesion?", ["liver segment 7", "Liver segment 8"]),
            ("Is there a lesion in liver segment 8?", ["Liver segment 8"]),
            ("Is there a nodule in the right lung?", names[7:10]),
            ("Is there a nodule in the right upper lobe of the lung?", ["lung_upper_lobe_right"]),
            ("Is there a nodule in the lung?", names[6:10]),
            ("Is the gallbladder distended?", ["gallbladder"]),
            ("Is there a fracture of the vertebrae?", []),            # a level is not a part: L4 is asked
            ("Is there a fracture of L4?", ["vertebrae_L4"]),
            ("Is there a rib fracture?", [])]:
        assert organs_in_question(question, names) == expected, question


_TABLES = {   # names as local tools export them: liver, spleen, kidneys, pancreas parts, lobes, gallbladder
    "de": ["Leber", "Milz", "Niere links", "Niere rechts", "Pankreas – Kopf", "Pankreasschwanz",
           "Lungenoberlappen rechts", "Lungenunterlappen rechts", "Lungenoberlappen links", "Gallenblase"],
    "fr": ["Foie", "Rate", "Rein gauche", "Rein droit", "Tête du pancréas", "Queue du pancréas",
           "Lobe supérieur du poumon droit", "Lobe inférieur du poumon droit",
           "Lobe supérieur du poumon gauche", "Vésicule biliaire"],
    "es": ["Hígado", "Bazo", "Riñón izquierdo", "Riñón derecho", "Cabeza del páncreas", "Cola del páncreas",
           "Lóbulo superior del pulmón derecho", "Lóbulo inferior del pulmón derecho",
           "Lóbulo superior del pulmón izquierdo", "Vesícula biliar"],
    "it": ["Fegato", "Milza", "Rene sinistro", "Rene destro", "Testa del pancreas", "Coda del pancreas",
           "Lobo superiore del polmone destro", "Lobo inferiore del polmone destro",
           "Lobo superiore del polmone sinistro", "Colecisti"],
}


@pytest.mark.parametrize("language", sorted(_TABLES))
def test_label_names_in_another_language_answer_to_english_questions(language):
    """A names table in German, French, Spanish or Italian ('Niere links', 'Rein gauche', 'Lóbulo superior
    del pulmón derecho') named nothing an English question could ask: no asked structure, no retention
    warning, no outline. Its words are read in English now, sides and parts included."""
    n = _TABLES[language]
    for question, expected in [
            ("Is there a lesion in the liver?", [n[0]]), ("Is the spleen enlarged?", [n[1]]),
            ("Is there a cyst in the left kidney?", [n[2]]), ("Is there a renal cyst?", n[2:4]),
            ("Is there a mass in the pancreas?", n[4:6]),
            ("Is there a lesion in the pancreatic head?", [n[4]]),
            ("Is there a nodule in the right lung?", n[6:8]),
            ("Is there a nodule in the right upper lobe of the lung?", [n[6]]),
            ("Is the gall bladder distended?", [n[9]]), ("Is there an aortic dissection?", [])]:
        assert organs_in_question(question, n) == expected, (language, question)


def test_english_label_names_read_as_they_did_and_questions_are_never_translated():
    """Every TotalSegmentator class (and FLARE's names) reads as before: their words are not another
    language's. A question is not read as another language: 'rate' is the French spleen in a label only."""
    from photon_core.organs import _name_words

    for name in [*TOTALSEG_CLASSES.values(), "Inferior vena cava (IVC)", "Right adrenal gland (RAG)"]:
        plain = re.sub(r"[\W_]+", " ", re.sub(r"\([^)]*\)", " ", name.lower())).split()
        assert _name_words(name) == plain, name
    assert organs_in_question("Is the heart rate of the fetus normal?", ["Rate", "spleen"]) == []
    assert organs_in_question("Is the spleen enlarged?", ["Rate", "Foie"]) == ["Rate"]
    assert organs_in_question("Is there a thrombus in the inferior vena cava?",
                              ["Vena cava inferior", "Vena cava superior"]) == ["Vena cava inferior"]


def _label_blocks_one_label_at_a_time(token_index, labels, names, fraction=0.5, n_blocks=1000):
    """The rule as first written (a pass per label), the reference for the one-pass count."""
    valid = token_index >= 0
    tok, lab = token_index[valid], labels[valid]
    per_block = np.maximum(np.bincount(tok, minlength=n_blocks), 1).astype(np.float64)
    out, small = {}, []
    for lid, name in names.items():
        hits = np.bincount(tok[lab == int(lid)], minlength=n_blocks)
        if not hits.any():
            continue
        blocks = hits >= fraction * per_block
        if not blocks.any():
            blocks = hits > 0
            small.append(name)
        out[name] = blocks
    return out, small


@pytest.mark.parametrize("order", ["C", "F"])
def test_block_counts_in_one_pass_are_the_counts_label_by_label(abdomen_grid, order):
    """Counting every label's voxels per block in one pass (6.9 s → 1–2 s for 61 structures of a
    512 × 512 × 300 map) gives each structure the blocks, and the small-structure fallback, that counting
    one label at a time gave: the sample's map in either memory order, with named ids absent from the map,
    an unnamed label, background named and the model volume's edge cutting the scan."""
    from photon_core.organs import BLOCK_FRACTION, label_blocks

    _, labels, token_index, geometry = abdomen_grid
    labels = np.asarray(labels, order=order).copy(order=order)
    token_index = token_index.copy()
    token_index[:7] = -1                                  # a slab outside the model volume
    present = [int(i) for i in np.unique(labels)]
    names = {str(i): f"s{i}" for i in present[:-1]}       # the last label left unnamed
    names.update({"0": "background", "250": "absent", "31000": "far"})
    got = label_blocks(token_index, labels, names)
    ref = _label_blocks_one_label_at_a_time(token_index, labels, names, BLOCK_FRACTION)
    assert list(got[0]) == list(ref[0]) and got[1] == ref[1] and ref[1]
    for name in ref[0]:
        assert np.array_equal(got[0][name], ref[0][name]), name
    assert "absent" not in got[0] and "far" not in got[0]
    # the app's token map (its 1-D lookups, read a slab at a time), and slabs of a few slices
    from photon_core.organs import _label_block_counts

    tm = geometry.token_map()
    got, plain = label_blocks(tm, labels, names), _label_blocks_one_label_at_a_time(tm.whole(), labels, names,
                                                                                   BLOCK_FRACTION)
    assert list(got[0]) == list(plain[0]) and got[1] == plain[1]
    assert all(np.array_equal(got[0][n], plain[0][n]) for n in plain[0])
    ids = [int(k) for k in names]
    whole = _label_block_counts(tm.whole(), labels, ids, 1000)
    for chunk in (30_000, 1):                                  # slabs of a few slices, of one slice
        slabs = _label_block_counts(tm, labels, ids, 1000, chunk=chunk)
        assert slabs.keys() == whole.keys() and all(np.array_equal(slabs[i], whole[i]) for i in whole)


def test_the_ids_of_a_label_map_and_their_counts_are_np_uniques(abdomen_grid):
    from photon_core.organs import label_counts

    _, labels, _, _ = abdomen_grid
    edited = np.asfortranarray(labels.astype(np.int16))
    edited[0, 0, :3] = (-32768, 32767, -5)              # int16's ends and a negative id
    for lab in (labels, edited, edited[::2, 1:, ::-1]):
        ids, counts = label_counts(lab, chunk=10_000)
        ref_ids, ref_counts = np.unique(lab, return_counts=True)
        assert ids.dtype == lab.dtype and np.array_equal(ids, ref_ids) and np.array_equal(counts, ref_counts)
        assert np.array_equal(label_counts(lab)[0], ref_ids)
    wide = labels.astype(np.int32) * 1000                  # not an int16 map: np.unique's answer still
    assert np.array_equal(label_counts(wide)[0], np.unique(wide))
    assert np.array_equal(label_counts(labels.astype(np.uint8))[0], np.unique(labels.astype(np.uint8)))
    for small in (labels.astype(np.uint8), labels.astype(np.int8) - 60):     # 8-bit maps, counted unshifted
        got, want = label_counts(small, chunk=10_000), np.unique(small, return_counts=True)
        assert got[0].dtype == small.dtype and all(np.array_equal(x, y) for x, y in zip(got, want))


def test_vertebral_levels_as_german_tools_write_them_answer_to_the_level():
    """'LWK 4', 'BWK 12', 'Th12', 'HWK 2' (German reports' and tools' names of the lumbar, thoracic and
    cervical vertebrae) named nothing "Is there a fracture of L4?" could ask; they read as TotalSegmentator's
    vertebrae_L4 / _T12 / _C2 now, as do 'Wirbelkörper L4', 'Vertèbre L4' and the sacrum's names."""
    from photon_core.organs import _name_words

    for name, words in [("LWK 4", ["vertebrae", "l4"]), ("LWK4", ["vertebrae", "l4"]),
                        ("BWK 12", ["vertebrae", "t12"]), ("Th12", ["vertebrae", "t12"]),
                        ("HWK-2", ["vertebrae", "c2"]), ("SWK 1", ["vertebrae", "s1"]),
                        ("Wirbelkörper L4", ["vertebrae", "l4"]), ("Vertèbre L4", ["vertebrae", "l4"]),
                        ("Kreuzbein", ["sacrum"]), ("Osso sacro", ["sacrum"]),
                        ("LWK 13", ["lwk", "13"]), ("12th rib", ["12th", "rib"])]:
        assert _name_words(name) == words, name
    names = ["LWK 3", "LWK 4", "BWK 12", "HWK 2", "Kreuzbein", "Leber"]
    for question, expected in [("Is there a fracture of L4?", ["LWK 4"]),
                               ("Is there a compression fracture at T12?", ["BWK 12"]),
                               ("Is the dens of C2 fractured?", ["HWK 2"]),
                               ("Is the sacrum fractured?", ["Kreuzbein"]),
                               ("Is there a fracture of the vertebrae?", []),    # as for vertebrae_L4
                               ("Is there a lesion in the liver?", ["Leber"])]:
        assert organs_in_question(question, names) == expected, question
