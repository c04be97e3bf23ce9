"""The app's handlers without a browser: state that cannot lie, failed loads, files replaced, budgets,
answers that do not parse, the asked organ as data, and messages without server paths."""
import html
import json
import re
import time

import nibabel as nib
import numpy as np
import pytest
from conftest import SAMPLES


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from app.service import Engine, Settings

    e = Engine(Settings(model_dir=str(tiny_model_dir), device="cpu", max_new_tokens=4, cache_volumes=2))
    yield e
    e.close()


@pytest.fixture()
def store(tmp_path):
    from app.view import FileStore

    s = FileStore(tmp_path / "served")
    yield s
    s.close()


ABDOMEN, CHEST = "Abdomen/pelvis CT (3 mm)", "Chest/abdomen CT angiography, aortic dissection (1.5 mm)"
SLICE_CONTROLS = (400, 40, 0.35)


def _ask(engine, out, question="Is there a cyst in the left kidney?", mode="Auto", tokens=300, percent=25,
         theta=0.5):
    from app import handlers as h

    return h.ask(out["session"], out["view"], question, mode, tokens, percent, theta, *SLICE_CONTROLS,
                 engine=engine)


def test_a_new_case_resets_every_view_of_the_previous_one(engine, store):
    from app import handlers as h

    a = h.load_case(ABDOMEN, None, None, engine=engine, store=store)
    assert "Abdomen" in a["status"] and a["model3d"].endswith(".glb") and a["slices"].endswith(".png")
    asked = _ask(engine, a)
    assert "Visual tokens kept" in asked["card"] and "Abdomen" in asked["card"]
    b = h.load_case(CHEST, asked["session"], a["view"], engine=engine, store=store)
    # every output that showed the previous answer is reset by the load, none is left out
    assert "Visual tokens kept" not in b["card"] and "Chest" in b["card"] and "θ" not in b["card"]
    for name in ("hist", "retention", "cmp_plot", "exp_files"):
        assert b[name] is None
    assert b["cmp_table"] == "" and b["session"].answer is None and b["session"].title == CHEST
    assert b["question"] == "Is there an abnormality of the aorta?"


def test_a_budget_control_released_where_the_answer_stands_asks_nothing(engine, store, monkeypatch):
    """Clicking into a slider's number box releases it at its value (Gradio): that re-asked the answer
    shown, and the typed value's ask, sent just after, could be answered first and dropped as the older
    (seen: the slider at 60 %, the card at 45 %). A release that changes neither budget nor question
    asks nothing; one that changes the budget, or the question, asks."""
    from app import handlers as h
    from photon_core.model.budget import Budget

    a = h.load_case(ABDOMEN, None, None, engine=engine, store=store)
    q = "Is there a cyst in the left kidney?"
    first = _ask(engine, a, q, mode="Percent", percent=45)
    answered = []
    real = engine.answer
    monkeypatch.setattr(engine, "answer", lambda *x, **k: answered.append(x[2]) or real(*x, **k))

    def reask(question=q, percent=45.0, mode="Percent"):
        return h.reask(first["session"], a["view"], question, mode, 300, percent, 0.5, *SLICE_CONTROLS,
                       engine=engine)

    assert reask() == {} and reask(question=f"  {q} ") == {} and answered == []
    moved = reask(percent=60)
    assert answered == [Budget("ratio", 0.6)] and "Visual tokens kept" in moved["card"]
    assert reask(percent=60) == {} and len(answered) == 1
    assert "Visual tokens kept" in reask(question="Is the spleen enlarged?", percent=60)["card"]
    assert "Visual tokens kept" in reask(mode="Tokens")["card"] and len(answered) == 3


def test_the_crosshair_stays_where_it_was_put_across_budgets_of_one_question(engine, store):
    """Each answer reopened the slices at the asked structure: a crosshair moved to a spot, to see how its
    coverage changes across budgets, jumped back at every re-ask. A re-ask of the same question keeps it;
    a new question opens at its own structure."""
    from app import handlers as h

    a = h.load_case(ABDOMEN, None, None, engine=engine, store=store)
    first = _ask(engine, a, "Is there a lesion in the liver?", mode="Percent", percent=45)
    opened = (first["pt_i"], first["pt_j"], first["pt_k"])
    put = tuple(max(1, v // 2) for v in opened)
    assert put != opened
    h.move_point(first["session"], a["view"], *put, *SLICE_CONTROLS)
    again = h.reask(first["session"], a["view"], "Is there a lesion in the liver?", "Percent", 300, 20, 0.5,
                    *SLICE_CONTROLS, engine=engine)
    assert "budget 20%" in re.sub("<[^>]+>", "", html.unescape(again["card"]))
    assert (again["pt_i"], again["pt_j"], again["pt_k"]) == put
    other = _ask(engine, a, "Is the spleen enlarged?", mode="Percent", percent=20)
    assert (other["pt_i"], other["pt_j"], other["pt_k"]) != put               # opened at the spleen
    back = _ask(engine, a, "Is there a lesion in the liver?", mode="Percent", percent=45)
    assert (back["pt_i"], back["pt_j"], back["pt_k"]) == opened               # and at the liver again


def test_a_failed_load_keeps_the_previous_scan_and_says_so(engine, store, tmp_path):
    from app import handlers as h

    a = h.load_case(ABDOMEN, None, None, engine=engine, store=store)
    asked = _ask(engine, a)
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00garbage" * 10)
    out = h.load_upload([str(bad)], None, None, None, None, asked["session"], a["view"], engine=engine,
                        store=store)
    assert set(out) == {"status"}          # nothing else changes: the answer still matches the scan
    status = html.unescape(out["status"])
    assert "Could not load 'broken.nii.gz'" in status and "still active" in status
    assert ABDOMEN in status and str(tmp_path) not in status
    again = _ask(engine, a, "Is the spleen enlarged?")
    assert ABDOMEN in html.unescape(again["card"])     # asked about the scan the screen names


def test_served_files_are_replaced_not_accumulated(engine, store, monkeypatch):
    from app import handlers as h
    from app.view import Files

    monkeypatch.setattr(Files, "grace_s", 0.0)         # replaced files go at the next write
    a = h.load_case(ABDOMEN, None, None, engine=engine, store=store)
    for k in (100, 200, 300):
        _ask(engine, a, mode="Tokens", tokens=k)
    out = h.export(a["session"], a["view"], *SLICE_CONTROLS, engine=engine)
    assert any(p.endswith("kept_blocks.nii.gz") for p in out["exp_files"])
    _ask(engine, a, mode="Tokens", tokens=400)        # a new answer: the old export goes
    files = sorted(p.name for p in a["view"].files.folder.iterdir())
    assert [f.split("_")[0] for f in files] == ["scene", "slices"], files
    h.session_ended(None, store=store)
    assert not a["view"].files.folder.exists()
    back = _ask(engine, a, mode="Tokens", tokens=250)     # a browser that comes back after its files went
    assert back["model3d"].endswith(".glb") and a["view"].files.folder.is_dir()


def test_files_written_after_the_browser_left_go_unless_it_came_back(tmp_path, monkeypatch):
    """A render still running when its browser leaves writes after the session's files went: the answer
    in flight can return its file, which goes shortly after (else it stays until the app stops). A request
    begun after the end is a browser that came back: its files stay."""
    from app.view import Files, FileStore, handling

    monkeypatch.setattr(Files, "late_s", 0.2)
    store = FileStore(tmp_path / "served")
    f = store.session("abc")
    with handling():                                  # one request, in flight across the end
        f.write("scene", ".glb", b"1")
        store.drop("abc")
        late = f.write("slices", ".png", b"2")
        assert late.is_file()
    for _ in range(50):
        if not f.folder.exists():
            break
        time.sleep(0.1)
    assert not f.folder.exists()
    with handling():                                  # a request begun after the end
        back = f.write("scene", ".glb", b"3")
    time.sleep(0.6)
    assert back.is_file()
    store.close()


def test_a_replaced_file_stays_a_while_for_a_browser_still_fetching_it(tmp_path, monkeypatch):
    """Crosshair values typed in quick succession: the browser was told of slices_1 and is fetching it
    when slices_2 replaces it. slices_1 stays ``grace_s`` (it was deleted at once: a 403 in the page)."""
    from app.view import Files

    monkeypatch.setattr(Files, "grace_s", 0.3)
    f = Files(tmp_path / "s")
    first = f.write("slices", ".png", b"1")
    second = f.write("slices", ".png", b"2")
    assert first.is_file() and second.is_file()
    time.sleep(0.4)
    third = f.write("slices", ".png", b"3")             # past the grace: the first goes, the second stays
    assert not first.exists() and second.is_file() and third.is_file()
    fourth = f.write("slices", ".png", b"4")            # within the grace: still two files of a kind at most
    assert not second.exists() and third.is_file() and fourth.is_file()
    f.remove()
    assert not f.folder.exists()


def test_a_load_still_running_when_its_browser_left_leaves_no_files(tmp_path, monkeypatch):
    """A load begun before its session ended asks the store for the session's files only after the end
    (the view is built last): what it writes goes shortly after, and a browser that comes back later
    gets files that stay."""
    from app.view import Files, FileStore, handling

    monkeypatch.setattr(Files, "late_s", 0.2)
    store = FileStore(tmp_path / "served")
    store.session("abc").write("scene", ".glb", b"0")
    with handling():                                  # the load, in flight across the end
        store.drop("abc")
        late = store.session("abc")
        written = [late.write("scene", ".glb", b"1"), late.write("slices", ".png", b"2")]
        assert all(p.is_file() for p in written)
    for _ in range(50):
        if not late.folder.exists():
            break
        time.sleep(0.1)
    assert not late.folder.exists()
    with handling():                                  # a request begun after the end: the browser came back
        back = store.session("abc").write("scene", ".glb", b"3")
    time.sleep(0.6)
    assert back.is_file() and store.session("abc").folder == back.parent
    store.close()


def test_budgets_below_the_floor_are_refused_with_a_message(engine, store):
    from app import handlers as h
    from photon_core.model.budget import MIN_KEEP_TOKENS

    a = h.load_case(ABDOMEN, None, None, engine=engine, store=store)
    out = _ask(engine, a, mode="Tokens", tokens=0)
    assert set(out) == {"card"} and "Not asked" in out["card"] and str(MIN_KEEP_TOKENS) in out["card"]
    ok = _ask(engine, a, mode="Tokens", tokens=MIN_KEEP_TOKENS)
    assert f"Visual tokens kept: <b>{MIN_KEEP_TOKENS}</b>" in ok["card"]
    refused = _ask(engine, a, mode="Percent", percent=0.5)
    assert "Not asked" in refused["card"] and "previous answer" in refused["card"]


def test_the_asked_organ_is_data_and_is_highlighted(engine, store):
    from app import handlers as h
    from app.view import asked_mask, highlighted

    a = h.load_case(ABDOMEN, None, None, engine=engine, store=store)
    out = _ask(engine, a, "Is there a cyst in the left kidney?")
    s, v = out["session"], a["view"]
    assert s.audit.asked == ("kidney_left",)          # TotalSegmentator's name, from the question's words
    assert set(s.audit.retention) == set(s.blocks)    # retention of every structure, computed once
    assert highlighted(v, s) == ["kidney_left"] and "(asked)" in out["legend"]
    mask = asked_mask(v, s)
    assert mask is not None and mask[tuple(v.point)]  # the slices open inside the asked organ


def test_unreadable_answers_are_not_shown_as_answers(engine, store):
    from app import handlers as h
    from app.render import answer_card
    from app.service import Audit

    a = h.load_case(ABDOMEN, None, None, engine=engine, store=store)
    out = _ask(engine, a)
    s = out["session"]
    s.answer.text = "norightno"
    card = answer_card(s, s.answer, Audit({}, (), {}, "", (), False, 0.42), {"name": "m"})
    assert "unreadable answer" in card and "norightno" in card and "probability 42%" in card
    assert "<span id='answer-text'>norightno" not in card


def test_uploaded_label_map_small_structure_counts_by_overlap(engine, store, tmp_path):
    """A 1.3 ml lesion label (a fraction of one block) stays in the audit, named as counted by overlap."""
    from app import handlers as h

    img = nib.load(str(SAMPLES / "abdomen_ct/ct.nii.gz"))
    lab = np.zeros(img.shape, np.int16)
    lab[60:64, 50:54, 50:53] = 5                        # 4·4·3 voxels of 3 mm: 1.3 ml, in the liver's id
    nib.save(nib.Nifti1Image(lab, img.affine), str(tmp_path / "labels.nii.gz"))
    ct = str(SAMPLES / "abdomen_ct/ct.nii.gz")
    out = h.load_upload([ct], str(tmp_path / "labels.nii.gz"), None, None, None, None, None, engine=engine,
                        store=store)
    s = out["session"]
    name = next(iter(s.blocks))
    assert s.small_structures == [name] and "counted by any overlap" in out["status"]
    asked = _ask(engine, out, f"Is there a lesion in the {name.replace('_', ' ')}?")
    assert name in asked["session"].audit.retention


def test_uploaded_label_maps_take_totalsegmentator_names(engine, store):
    from app import handlers as h

    ct, labels = str(SAMPLES / "abdomen_ct/ct.nii.gz"), str(SAMPLES / "abdomen_ct/labels.nii.gz")
    out = h.load_upload([ct], labels, None,
                        None, None, None, None, engine=engine, store=store)
    assert "kidney_left" in out["session"].blocks
    asked = _ask(engine, out, "Is there a cyst in the left kidney?")
    assert asked["session"].audit.asked == ("kidney_left",)


def test_label_names_from_a_table(engine, store, tmp_path):
    from app import handlers as h

    img = nib.load(str(SAMPLES / "abdomen_ct/ct.nii.gz"))
    lab = np.zeros(img.shape, np.int16)
    lab[40:80, 30:70, 40:70] = 7
    nib.save(nib.Nifti1Image(lab, img.affine), str(tmp_path / "labels.nii.gz"))
    (tmp_path / "names.json").write_text(json.dumps({"7": "tumour"}))
    out = h.load_upload([str(SAMPLES / "abdomen_ct/ct.nii.gz")], str(tmp_path / "labels.nii.gz"),
                        str(tmp_path / "names.json"), None, None, None, None, engine=engine, store=store)
    assert list(out["session"].blocks) == ["tumour"]


def test_a_names_table_in_german_gives_the_asked_structure_and_its_outline(engine, store, tmp_path):
    """The sample's label map named in German, as a local tool exports it: the English question about the
    left kidney asks 'Niere links' (retention warning, outline and the slices opening in it)."""
    from app import handlers as h
    from app.view import asked_mask, highlighted

    german = {2: "Niere rechts", 3: "Niere links", 5: "Leber", 1: "Milz", 7: "Pankreas"}
    (tmp_path / "namen.json").write_text(json.dumps({str(k): v for k, v in german.items()}))
    ct, labels = str(SAMPLES / "abdomen_ct/ct.nii.gz"), str(SAMPLES / "abdomen_ct/labels.nii.gz")
    out = h.load_upload([ct], labels, str(tmp_path / "namen.json"), None, None, None, None, engine=engine,
                        store=store)
    asked = _ask(engine, out, "Is there a cyst in the left kidney?")
    s, v = asked["session"], out["view"]
    assert s.audit.asked == ("Niere links",) and highlighted(v, s) == ["Niere links"]
    mask = asked_mask(v, s)
    assert mask is not None and mask[tuple(v.point)]


def test_messages_never_show_server_paths_nor_cut_words():
    from app.handlers import MAX_MESSAGE, message
    from photon_core.io.volume import VolumeError

    m = message(VolumeError("'/tmp/gradio/3f2a/upload/scan.nii.gz' is not a readable NIfTI file (Image"
                            "FileError: Cannot work out file type of \"/tmp/gradio/3f2a/scan.nii.gz\")"))
    assert "/tmp" not in m and "scan.nii.gz" in m
    assert message(ValueError("C:\\Users\\jane\\scan.nii is bad")) == "scan.nii is bad"
    assert message(ValueError("a 3/4 of the Abdomen/pelvis")) == "a 3/4 of the Abdomen/pelvis"
    long = message(ValueError("word " * 200))
    assert len(long) <= MAX_MESSAGE + 2 and long.endswith("word…")
    assert "secret" not in message(KeyError("/secret/path/patient_Jane"))
    assert message(VolumeError("/srv/data/x.dcm is one image")) == "x.dcm is one image"


def test_a_study_with_several_series_lists_them_and_loads_the_one_picked(engine, store, monkeypatch,
                                                                         tmp_path):
    """A PACS export (localizer + two kernels): the series are listed for a dropdown; the default load
    asks the loader for its default (None), a pick loads that uid."""
    import types

    from app import handlers as h
    from app import service
    from photon_core.io.volume import load_volume

    series = [types.SimpleNamespace(uid=u, label=f"{d} · {n} slices · {k}", description=d, slices=n, kernel=k,
                                    orientation=o, modality="CT")
              for u, d, n, k, o in (("1.1", "Topogram", 1, "T20f", "coronal"),
                                    ("1.2", "Abdomen 3.0 B31f", 112, "B31f", "axial"),
                                    ("1.3", "Abdomen 3.0 B70f", 112, "B70f", "axial"))]
    asked = []
    monkeypatch.setattr(service, "list_series", lambda files, limits: series)
    monkeypatch.setattr(service, "load_volume", lambda src, limits, series=None, step=None:
                        asked.append(series) or load_volume(SAMPLES / "abdomen_ct/ct.nii.gz"))
    files = [str(tmp_path / f"im{i}.dcm") for i in range(3)]
    out = h.load_upload(files, None, None, None, None, None, None, engine=engine, store=store)
    assert asked == [None] and out["series"]["visible"] is True and out["series"]["value"] == "1.1"
    assert [c[1] for c in out["series"]["choices"]] == ["1.1", "1.2", "1.3"]
    assert "holds 3 series" in out["status"]
    out = h.load_upload(files, None, None, None, "1.3", out["session"], out["view"], engine=engine,
                        store=store)
    assert asked == [None, "1.3"] and out["series"]["value"] == "1.3" and out["session"].series_uid == "1.3"


def test_load_warnings_reach_the_status_line_the_api_and_the_answer_card(engine, store, monkeypatch):
    from app import api, service
    from app import handlers as h
    from photon_core.io.volume import load_volume
    from photon_core.model.budget import Budget

    said = ["12 voxels outside [-2000, 4000] HU were clipped", "slices are 50 mm thick (over 5 mm)"]

    def with_warnings(src, limits, series=None, step=None):
        vol = load_volume(SAMPLES / "abdomen_ct/ct.nii.gz")
        vol.warnings = list(said)
        return vol

    monkeypatch.setattr(service, "load_volume", with_warnings)
    out = h.load_upload([str(SAMPLES / "abdomen_ct/ct.nii.gz")], None, None, None, None, None, None,
                        engine=engine, store=store)
    assert "load-warnings" in out["status"] and all(html.escape(w) in out["status"] for w in said)
    s = out["session"]
    ans, audit = engine.answer(s, "Is there a lesion in the liver?", Budget("auto"))
    assert api.result(engine, s, ans, audit)["warnings"][:2] == said
    card = _ask(engine, out, "Is there a lesion in the liver?")["card"]     # beside the answer too: the
    assert "card-scan-warnings" in card and all(html.escape(w) in card for w in said)   # status may be
    assert f"loaded with {len(s.warnings)} warnings" in card                           # off-screen
    monkeypatch.undo()
    clean = h.load_case(ABDOMEN, None, None, engine=engine, store=store)
    assert "card-scan-warnings" not in _ask(engine, clean, "Is there a lesion in the liver?")["card"]


def test_a_question_about_a_structure_the_label_map_lacks_says_so(engine, store):
    """The chest CTA's label map holds its vessels, not its lungs: "Is there a nodule in the lung?" gave
    an answer with no asked structure and nothing said. The card says the lungs cannot be checked there;
    a structure the map holds gets its retention instead, and a question naming none says nothing."""
    from app import handlers as h

    chest = h.load_case(CHEST, None, None, engine=engine, store=store)
    card = _ask(engine, chest, "Is there a nodule in the lung?")["card"]
    assert "unlabelled-note" in card and "lung: not in this scan's label map" in html.unescape(card)
    card = _ask(engine, chest, "Is there an abnormality of the aorta?")["card"]
    assert "unlabelled-note" not in card and "asked structure: aorta" in card
    abdomen = h.load_case(ABDOMEN, None, None, engine=engine, store=store)
    for q in ("Which side is the kidney lesion on?", "Describe the findings."):
        assert "unlabelled-note" not in _ask(engine, abdomen, q)["card"]


@pytest.mark.parametrize("make", [
    lambda hu: np.zeros_like(hu),                                   # a constant volume
    lambda hu: np.where(hu > 0, 1.0, 0.0).astype(np.float32),       # a mask saved as a scan
    lambda hu: np.where(hu > 1000, 9e8, hu).astype(np.float32),     # values far outside CT's range
])
def test_the_loaders_own_warnings_reach_the_status_line(engine, store, tmp_path, make):
    from app import handlers as h
    from photon_core.io.volume import load_volume

    img = nib.load(str(SAMPLES / "abdomen_ct/ct.nii.gz"))
    path = tmp_path / "odd.nii.gz"
    nib.save(nib.Nifti1Image(make(np.asanyarray(img.dataobj).astype(np.float32)), img.affine), str(path))
    said = load_volume(path).warnings
    assert said                                                      # the loader warns about each of these
    out = h.load_upload([str(path)], None, None, None, None, None, None, engine=engine, store=store)
    assert "load-warnings" in out["status"] and all(html.escape(w) in out["status"] for w in said)


def test_the_card_histogram_and_legend_mark_the_cut_the_budget_applied(engine, store):
    """Under a manual budget the marks show where the budget cut the saliency ρ, and the model's own θ
    (which it did not apply) apart from it: a θ line at the model's θ under a 0.3 threshold misled."""
    from app import handlers as h
    from photon_core.model.budget import MIN_KEEP_TOKENS

    a = h.load_case(ABDOMEN, None, None, engine=engine, store=store)

    def words(out, key="card"):                         # what the page shows, entities read
        return html.unescape(out[key])

    def marks(out):                                     # (x, dash) of the histogram's vertical lines
        return sorted((round(sh.x0, 6), sh.line.dash) for sh in out["hist"].layout.shapes)

    auto = _ask(engine, a)
    ans = auto["session"].answer
    rho, theta = ans.rho.ravel(), ans.theta
    assert marks(auto) == [(round(theta, 6), "dash")]
    assert "Photon's own θ</b> · θ = " in words(auto) and "not applied" not in words(auto)
    assert f"black tick: θ at ρ = {theta:.3f}" in words(auto, "legend")

    tokens = _ask(engine, a, mode="Tokens", tokens=300)
    t = tokens["session"].answer
    cut = float(t.rho.ravel()[t.keep_grid.ravel()].min())
    assert t.kept == 300 and marks(tokens) == sorted([(round(cut, 6), "dash"), (round(theta, 6), "dot")])
    assert tokens["hist"].layout.xaxis.range == (0, 1)                    # labels do not widen the ρ axis
    assert (f"300 tokens</b>, the most salient (cut at ρ = {cut:.3f}) · Photon's own θ = {theta:.3f}, not "
            f"applied") in words(tokens)
    assert f"black tick: the cut at ρ = {cut:.3f}" in words(tokens, "legend")

    mine = float(np.round(np.median(rho), 2))           # a θ of the user's that about half the tokens pass
    user = _ask(engine, a, mode="Threshold", theta=mine)
    assert user["session"].answer.kept > MIN_KEEP_TOKENS
    assert marks(user) == sorted([(round(mine, 6), "dash"), (round(theta, 6), "dot")])
    assert f"θ = {mine:g} (yours)</b> · Photon's own θ = {theta:.3f}, not applied" in words(user)

    floor = _ask(engine, a, mode="Threshold", theta=1.0)  # no token passes: the floor keeps the most salient
    f = floor["session"].answer
    assert f.kept == MIN_KEEP_TOKENS and f"so the {MIN_KEEP_TOKENS} most salient were kept" in words(floor)

    full = _ask(engine, a, mode="Full")
    assert marks(full) == [(round(theta, 6), "dot")] and "all tokens</b>" in words(full)


def test_the_compare_table_names_its_question_and_goes_when_another_is_asked(engine, store):
    """The Compare table answers the question in the box, which need not be the card's: it says which
    question and scan it answers, stays while the card answers that question, and goes when the card
    answers another."""
    from app import handlers as h

    a = h.load_case(ABDOMEN, None, None, engine=engine, store=store)
    first = _ask(engine, a, "Is the spleen enlarged?")
    s = first["session"]
    table = h.compare(s, "  Which kidney is larger? ", engine=engine)["cmp_table"]
    assert "Q: Which kidney is larger? — on <b>Abdomen/pelvis CT (3 mm)</b>" in html.unescape(table)
    same = _ask(engine, a, "Which kidney is larger?")
    assert "cmp_table" not in same and "cmp_plot" not in same          # it answers the card's question
    other = _ask(engine, a, "Is there a lesion in the liver?")
    assert other["cmp_table"] == "" and other["cmp_plot"] is None and s.compared is None


def test_asks_wait_for_a_load_of_the_same_browser_and_a_typed_question_survives_it(engine, store):
    """An ask sent while the same browser's load runs was answered about the scan being replaced, then
    wiped with the question the user typed: it is refused in words, and the box keeps the user's own
    question (a sample case's suggestion is replaced by the new case's)."""
    import threading

    from app import handlers as h

    class Request:
        session_hash = "tab-1"

    a = h.load_case(ABDOMEN, None, None, engine=engine, store=store, request=Request())
    started, release = threading.Event(), threading.Event()
    load_case = engine.load_case

    def slow_load(title, progress):
        started.set()
        release.wait(30)
        return load_case(title, progress)

    engine.load_case = slow_load
    try:
        out = {}
        loader = threading.Thread(target=lambda: out.update(h.load_case(
            CHEST, a["session"], a["view"], "Is the portal vein patent?", engine=engine, store=store,
            request=Request())))
        loader.start()
        assert started.wait(30)
        asked = h.ask(a["session"], a["view"], "Is the spleen enlarged?", "Auto", 300, 25, 0.5,
                      *SLICE_CONTROLS, Request(), engine=engine)
        assert set(asked) == {"card"} and h.LOADING_MESSAGE.split(":")[0] in html.unescape(asked["card"])
        other = h.compare(a["session"], "Is the spleen enlarged?", Request(), engine=engine)
        assert "A new scan is loading" in html.unescape(other["cmp_table"])

        class Elsewhere:
            session_hash = "tab-2"
        elsewhere = h.ask(a["session"], a["view"], "Is the spleen enlarged?", "Auto", 300, 25, 0.5,
                          *SLICE_CONTROLS, Elsewhere(), engine=engine)
        assert "Visual tokens kept" in elsewhere["card"]                 # another browser is not held up
        release.set()
        loader.join(60)
    finally:
        engine.load_case = load_case
        release.set()
    assert "Chest" in out["status"] and "question" not in out          # the typed question stays
    suggested = h.load_case(ABDOMEN, None, None, "Is there an abnormality of the aorta?", engine=engine,
                            store=store)
    assert suggested["question"] != "Is there an abnormality of the aorta?"   # a suggestion: the new case's


def test_uploads_are_told_apart_and_a_prior_of_another_region_is_warned(engine, store, tmp_path):
    """An upload is named by its format, grid and load time (never its file name, which may hold a
    patient's), not "uploaded scan"; a prior scan covering a much smaller region gets a warning."""
    from app import handlers as h

    ct = SAMPLES / "abdomen_ct/ct.nii.gz"
    img = nib.load(str(ct))
    named = tmp_path / "Doe_Jane_CT.nii.gz"
    nib.save(img, str(named))
    out = h.load_upload([str(named)], None, None, None, None, None, None, engine=engine, store=store)
    s = out["session"]
    shape = "×".join(str(n) for n in img.shape)
    assert re.fullmatch(rf"NIfTI upload, {shape} voxels of [\d.×]+ mm, \d\d:\d\d:\d\d", s.title)
    assert "Doe" not in out["status"] and s.title in html.unescape(out["status"])
    assert not any("prior" in w for w in s.warnings)

    part = img.slicer[:, :, 40:60]                      # 20 of its slices: a sixth of the head–foot length
    nib.save(part, str(tmp_path / "prior.nii.gz"))
    out = h.load_upload([str(ct)], None, None, str(tmp_path / "prior.nii.gz"), None, None, None,
                        engine=engine, store=store)
    warned = [w for w in out["session"].warnings if w.startswith("The prior scan covers")]
    assert len(warned) == 1 and "may not show the same region" in warned[0]
    same = h.load_upload([str(ct)], None, None, str(ct), None, None, None, engine=engine, store=store)
    assert not any(w.startswith("The prior scan covers") for w in same["session"].warnings)


def test_the_exported_report_holds_what_the_card_showed(engine, store):
    """report.json carries the answer's probability, the budget in words and its cut, the asked
    structures, the retention warning and the loader's warnings, as the card showed them."""
    from app import handlers as h

    a = h.load_case(ABDOMEN, None, None, engine=engine, store=store)
    out = _ask(engine, a, "Is there a cyst in the left kidney?", mode="Tokens", tokens=40)
    s = out["session"]
    files = h.export(s, a["view"], *SLICE_CONTROLS, engine=engine)["exp_files"]
    report = json.loads(next(open(f).read() for f in files if f.endswith("report.json")))
    t = s.answer
    assert report["answer_probability"] == round(s.audit.probability, 4)
    assert report["budget_description"] == "40 tokens"
    assert report["cut_rho"] == round(float(t.rho.ravel()[t.keep_grid.ravel()].min()), 4)
    assert report["asked_structures"] == ["kidney_left"] and "kidney_left" in report["asked_retention"]
    assert report["retention_warning"] == (s.audit.warning or None)
    assert report["load_warnings"] == s.warnings and report["case"] == s.title
    _ask(engine, a, "Is there a cyst in the left kidney?", mode="Threshold", theta=1.0)   # the floor keeps
    files = h.export(s, a["view"], *SLICE_CONTROLS, engine=engine)["exp_files"]
    report = json.loads(next(open(f).read() for f in files if f.endswith("report.json")))
    from photon_core.model.budget import MIN_KEEP_TOKENS

    assert report["budget_description"].startswith(f"θ = 1 (yours): fewer than {MIN_KEEP_TOKENS} tokens pass")


def test_the_demo_model_says_when_a_question_is_none_of_those_it_was_trained_on(engine, store, monkeypatch):
    """The embedded model knows only its training questions' kinds: a question of another kind (another
    language, "describe the findings") gets a note that its answer means nothing; one of its kinds none."""
    from app import handlers as h
    from app.service import Engine, Settings

    demo = Engine(Settings(model_dir=None, device="cpu", max_new_tokens=4, cache_volumes=1))
    try:
        a = h.load_case(ABDOMEN, None, None, engine=demo, store=store)
        for question in ("Gibt es eine Läsion in der Leber?", "Describe the findings."):
            assert "untrained-note" in _ask(demo, a, question)["card"]
        assert "untrained-note" not in _ask(demo, a, "Is there a lesion in the liver?")["card"]
    finally:
        demo.close()
    monkeypatch.setattr(Engine, "is_demo", property(lambda self: False))   # a real checkpoint
    assert "untrained-note" not in _ask(engine, h.load_case(ABDOMEN, None, None, engine=engine, store=store),
                                        "Describe the findings.")["card"]


def test_a_failed_label_map_or_prior_is_named_not_the_scan(engine, store, tmp_path):
    """"Could not load 'ct.nii.gz': The label map grid … does not match" named the wrong file: a label map,
    names table or prior scan that cannot be used is named itself; the scan loaded before stays."""
    from app import handlers as h

    ct = str(SAMPLES / "abdomen_ct/ct.nii.gz")
    before = h.load_case(ABDOMEN, None, None, engine=engine, store=store)
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.int16), np.eye(4)), str(tmp_path / "seg.nii.gz"))
    (tmp_path / "names.csv").write_text("id,name\nnot a number,liver\n")
    (tmp_path / "old.nii.gz").write_bytes(b"not a scan")
    for label, table, prior, named in ((tmp_path / "seg.nii.gz", None, None, "seg.nii.gz"),
                                       (SAMPLES / "abdomen_ct/labels.nii.gz", tmp_path / "names.csv", None,
                                        "names.csv"),
                                       (None, None, tmp_path / "old.nii.gz", "old.nii.gz")):
        out = h.load_upload([ct], label and str(label), table and str(table), prior and str(prior), None,
                            before["session"], before["view"], engine=engine, store=store)
        status = html.unescape(out["status"])
        assert set(out) == {"status"} and f"'{named}'" in status and "'ct.nii.gz'" not in status, status


def test_an_upload_suggests_questions_and_keeps_the_typed_one(engine, store):
    from app import handlers as h

    ct = str(SAMPLES / "abdomen_ct/ct.nii.gz")
    out = h.load_upload([ct], None, None, None, None, None, None, engine=engine, store=store)
    choices = [c[0] if isinstance(c, tuple) else c for c in out["suggested"]["choices"]]
    assert "Is there a lesion in the liver?" in choices and "question" not in out


def test_a_refused_budget_puts_its_slider_back_to_the_answer_shown(engine, store):
    """After a budget under the floor is refused, the slider showed the refused value beside the previous
    answer: it goes back to that answer's budget; switching mode keeps each slider's visibility."""
    from app import handlers as h
    from photon_core.model.budget import MIN_KEEP_TOKENS

    a = h.load_case(ABDOMEN, None, None, engine=engine, store=store)
    shown = _ask(engine, a, mode="Tokens", tokens=50)
    assert shown["session"].answer.kept == 50
    refused = _ask(engine, a, mode="Tokens", tokens=MIN_KEEP_TOKENS - 15)
    assert "Not asked" in refused["card"] and refused["tokens"] == 50
    switched = h.mode_changed(a["session"], a["view"], "Is there a cyst in the left kidney?", "Percent",
                              50, 0.5, 0.5, *SLICE_CONTROLS, engine=engine)   # 0.5% is under the floor
    assert "Not asked" in switched["card"]
    assert switched["tokens"] == {"__type__": "update", "visible": False, "value": 50}
    assert switched["percent"]["visible"] is True and "value" not in switched["percent"]


def test_a_detached_nrrd_header_uploads_with_its_compressed_data(engine, store, tmp_path):
    """pynrrd and Slicer write a detached header's data as .raw.gz: the app refused the pair as "2 files
    … including scan.raw.gz" (its own check, above the loader that reads such pairs)."""
    import nrrd

    from app import handlers as h

    img = nib.load(str(SAMPLES / "abdomen_ct/ct.nii.gz"))
    nrrd.write(str(tmp_path / "scan.nhdr"), np.asarray(img.dataobj).astype(np.int16),
               {"space": "right-anterior-superior", "space directions": img.affine[:3, :3],
                "space origin": img.affine[:3, 3]}, detached_header=True)
    files = [str(tmp_path / "scan.nhdr"), str(tmp_path / "scan.raw.gz")]
    out = h.load_upload(files, None, None, None, None, None, None, engine=engine, store=store)
    assert out["session"].volume.shape == img.shape and out["session"].title.startswith("NRRD upload")


def test_the_api_without_a_budget_asks_under_the_checkpoints_default(engine, tiny_model_dir, tmp_path):
    """/ask and /export without a budget sent 'auto', which an S1 checkpoint (no θ) refuses: an integrator's
    first call to an S1 server failed. Now none means the checkpoint's default, as for photon-ask."""
    import shutil

    from safetensors.torch import load_file, save_file

    from app import api
    from app.service import Engine, Settings

    s1 = shutil.copytree(tiny_model_dir, tmp_path / "s1")
    weights = load_file(s1 / "model.safetensors")
    save_file({k: v for k, v in weights.items() if ".atp." not in k}, s1 / "model.safetensors")
    config = json.loads((s1 / "config.json").read_text())
    config["photon"]["has_its"] = False                 # an S1 folder: no threshold MLP
    (s1 / "config.json").write_text(json.dumps(config))
    e1 = Engine(Settings(model_dir=str(s1), device="cpu", max_new_tokens=2))
    try:
        assert e1.predictor.checkpoint.stage == "S1"
        for budget in (None, ""):                       # omitted, or an empty field from a client
            r = api.ask("Is there a lesion in the liver?", sample="abdomen_ct", budget=budget, engine=e1)
            assert r["budget"] == "full" and r["kept"] == r["total"] == 1000
    finally:
        e1.close()
    r = api.ask("Is there a lesion in the liver?", sample="abdomen_ct", engine=engine)
    assert r["budget"] == "auto" and r["kept"] < r["total"]


def test_toasts_show_user_text_as_written(engine, store, tmp_path, monkeypatch):
    """Gradio renders a toast's message as (sanitised) HTML: a file named 'a&amp;b.nii.gz' was toasted as
    'a&b.nii.gz', and markup in a message would be drawn, while the status line showed the name as written.
    Toasts are escaped as the status line is."""
    from app import handlers as h

    toasts = []
    monkeypatch.setattr(h.gr, "Warning", lambda text, **kw: toasts.append(text))
    bad = tmp_path / "a&amp;b.nii.gz"
    bad.write_bytes(b"not a scan")
    out = h.load_upload([str(bad)], None, None, None, None, None, None, engine=engine, store=store)
    assert "a&amp;amp;b.nii.gz" in out["status"]
    assert toasts and "a&amp;amp;b.nii.gz" in toasts[0] and "<" not in toasts[0]


def test_two_asks_of_one_session_at_once_each_show_one_answer(engine, store, monkeypatch):
    """Gradio runs an Ask and a budget change of the same browser side by side, on the same session:
    the card, its audit and the export mixed the two (the card of one question naming the other's asked
    structure; the session's answer paired with the other question's audit, which the export wrote).
    Each answer now shows as a whole, and the session ends holding one answer with its own audit."""
    import threading

    from app import handlers as h
    from app.service import Engine
    from photon_core.inference.audit import organ_retention
    from photon_core.organs import organs_in_question

    a = h.load_case(ABDOMEN, None, None, engine=engine, store=store)
    s = a["session"]
    first_waits, both = threading.Event(), threading.Barrier(2)
    real_audit = Engine.audit

    def audit(self, s_, question, ans):       # the first ask audits while the second one asks
        if threading.current_thread().name == "first":
            first_waits.set()
        try:
            both.wait(timeout=2)
        except threading.BrokenBarrierError:
            pass                              # the second ask waits for the first: no meeting
        if threading.current_thread().name == "first":
            time.sleep(0.3)
        return real_audit(self, s_, question, ans)

    monkeypatch.setattr(Engine, "audit", audit)
    outs = {}
    asks = {"first": ("Is there a cyst in the left kidney?", "Tokens"), "second": ("Is the spleen enlarged?",
                                                                                   "Full")}

    def run(name):
        q, mode = asks[name]
        outs[name] = h.ask(s, a["view"], q, mode, 60, 25, 0.5, *SLICE_CONTROLS, engine=engine)

    first = threading.Thread(target=run, args=("first",), name="first")
    first.start()
    assert first_waits.wait(60)
    second = threading.Thread(target=run, args=("second",), name="second")
    second.start()
    first.join(60)
    second.join(60)
    monkeypatch.setattr(Engine, "audit", real_audit)
    for out in outs.values():
        card = html.unescape(out["card"])
        if "spleen" in card.split("Q: ", 1)[1].split(" — ")[0]:
            assert "asked structure: spleen" in card and "kept: <b>1000</b>" in card
        else:
            assert "asked structure: kidney left" in card and "kept: <b>60</b>" in card
    assert s.audit.asked == tuple(organs_in_question(s.question, list(s.blocks)))
    assert s.audit.retention == organ_retention(s.blocks, s.answer.keep_grid)
    assert (s.answer.kept == 1000) == (s.question == "Is the spleen enlarged?")


def test_compare_names_its_question_and_draws_every_row_with_a_prior(engine, store):
    """/compare returned "question": "" (the session's last asked question: none on the scan it loads);
    with a prior scan Full keeps 2,000 tokens, drawn above the plot's fixed 0–1,050 axis and listed
    without the total it is of."""
    from app import api
    from app import handlers as h

    r = api.compare("  Is the spleen enlarged? ", sample="abdomen_ct", engine=engine)
    assert r["question"] == "Is the spleen enlarged?"
    ct = str(SAMPLES / "abdomen_ct/ct.nii.gz")
    out = h.load_upload([ct], None, None, ct, None, None, None, engine=engine, store=store)
    cmp = h.compare(out["session"], "Is the spleen enlarged?", engine=engine)
    kept = list(cmp["cmp_plot"].data[0].y)
    assert kept[-1] == 2000 and cmp["cmp_plot"].layout.yaxis.range[1] >= max(kept)
    assert "<td>2000 / 2000</td>" in cmp["cmp_table"] and "<td>250 / 1000</td>" not in cmp["cmp_table"]


def test_the_card_counts_the_kept_tokens_the_slices_cannot_show(engine, store, tmp_path):
    """On a scan smaller than the model's field the card said e.g. 90 tokens kept while the slices and
    the mask showed 59 blocks (the other 31 lie in the padding, drawn in 3-D beside the anatomy): only
    report.json said so. The card and /ask's JSON now count them, as the export does."""
    from app import api
    from app import handlers as h
    from photon_core.io.preprocess import TOKEN_GRID

    hu = np.full((60, 50, 40), -1000.0, np.float32)
    hu[10:50, 5:45, 5:35] = 40.0
    small = tmp_path / "small.nii.gz"
    nib.save(nib.Nifti1Image(hu, np.diag([3.0, 3.0, 3.0, 1.0])), str(small))
    out = h.load_upload([str(small)], None, None, None, None, None, None, engine=engine, store=store)
    s = out["session"]
    asked = _ask(engine, out, "Is the spleen enlarged?", mode="Full")
    tokens = s.token_index.whole()
    shown = set(np.unique(tokens[tokens >= 0]).tolist())
    padding = int(np.prod(TOKEN_GRID)) - len(shown)
    assert padding > 0
    assert f"{padding} of the kept tokens lie wholly in the padding" in html.unescape(asked["card"])
    files = h.export(s, out["view"], *SLICE_CONTROLS, engine=engine)["exp_files"]
    report = json.loads(next(open(f).read() for f in files if f.endswith("report.json")))
    assert report["kept_tokens_outside_scan"] == padding
    r = api.ask("Is the spleen enlarged?", [str(small)], budget="full", engine=engine)
    assert r["kept_tokens_outside_scan"] == padding
    whole = _ask(engine, h.load_case(ABDOMEN, None, None, engine=engine, store=store), mode="Full")
    assert "outside-note" not in whole["card"]          # a scan that fills the field: no note


def test_review_with_a_prior_scan_leaves_a_value_its_slider_takes(engine, store):
    """Review keeps at least twice Auto's tokens, set in the Tokens slider: with a prior scan (2,000 tokens)
    that count can pass the slider's 1,000, and Gradio then refused every later ask or budget change of
    the page ("Value 1200 is greater than maximum value 1000"). Such a count is set as its share, in
    Percent."""
    import gradio as gr

    from app import handlers as h
    from photon_core.model.budget import Budget

    ct = str(SAMPLES / "abdomen_ct/ct.nii.gz")
    out = h.load_upload([ct], None, None, ct, None, None, None, engine=engine, store=store)
    s, q = out["session"], "Is the spleen enlarged?"
    auto = engine.ask(s, q, Budget("auto"))
    k = min(auto.total, max(2 * auto.kept, 100))
    assert k > 1000                                   # the tiny model keeps about half of the 2,000
    r = h.review(s, out["view"], q, 300, 25, 0.5, *SLICE_CONTROLS, engine=engine)
    assert s.answer.kept == k and f"kept: <b>{k}</b> / 2000" in r["card"]
    for name, top in (("tokens", 1000), ("percent", 100)):
        value = r[name].get("value")
        if value is not None:
            gr.Slider(0, top).preprocess(value)       # what Gradio does with it at the next ask
    assert r["mode"] == "Percent" and r["percent"]["visible"] and not r["tokens"]["visible"]


def test_a_token_count_typed_with_decimals_shows_the_count_asked(engine, store):
    """A Tokens value typed as 33.7 was asked as 34 tokens while the box kept showing 33.7 beside the
    card's "34 tokens": the box now shows the count asked."""
    from app import handlers as h

    a = h.load_case(ABDOMEN, None, None, engine=engine, store=store)
    out = _ask(engine, a, mode="Tokens", tokens=33.7)
    assert out["session"].answer.kept == 34 and out["tokens"] == 34
    assert "tokens" not in _ask(engine, a, mode="Tokens", tokens=40)      # a whole count is left as typed


def test_the_3d_legend_counts_the_blocks_it_draws_with_a_prior(engine, store):
    """With a prior scan the 3-D legend read "kept region of this answer: 1000 / 2000 tokens" over the
    current scan's 600-odd blocks (the prior's kept tokens are not drawn): it counts the current scan's,
    as the card's split line does."""
    from app import handlers as h

    ct = str(SAMPLES / "abdomen_ct/ct.nii.gz")
    out = h.load_upload([ct], None, None, ct, None, None, None, engine=engine, store=store)
    asked = _ask(engine, out, "Is the spleen enlarged?", mode="Tokens", tokens=1000)
    ans = out["session"].answer
    drawn = int(ans.keep_grid.sum())
    assert ans.prior_kept > 0 and drawn == ans.kept - ans.prior_kept
    legend = html.unescape(asked["legend"])
    assert f"{drawn} / 1000 tokens of the current scan" in legend and f"{ans.kept} / 2000" not in legend


def test_sessions_of_a_sample_case_share_its_arrays_not_their_answers(engine, store):
    """Every page open loads a sample case, and each session held its own copy of the case's scan, labels,
    token maps and views (≈ 14 MB a load of the abdomen case, more in VTK's meshes), for an hour after its
    tab closed. A case is now read and drawn once per server; its sessions share that, read-only, and each
    keeps its own answer, lock and crosshair."""
    import tracemalloc

    from app import handlers as h

    a = h.load_case(ABDOMEN, None, None, engine=engine, store=store)
    tracemalloc.start()
    try:
        more = [h.load_case(ABDOMEN, None, None, engine=engine, store=store) for _ in range(3)]
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    sa, va = a["session"], a["view"]
    assert held / len(more) < sa.volume.hu.size, f"{held / len(more) / 1e6:.1f} MB more per load"
    b = more[0]
    sb, vb = b["session"], b["view"]
    assert sa is not sb and va is not vb and sa.lock is not sb.lock and sa.serial != sb.serial
    for x, y in ((sa.volume.hu, sb.volume.hu), (sa.labels, sb.labels), (va.hu_ras, vb.hu_ras),
                 (va.labels_ras, vb.labels_ras)):
        assert np.shares_memory(x, y)
    assert sa.token_index is sb.token_index and va.token_ras is vb.token_ras
    out = h.ask(sa, va, "Is the spleen enlarged?", "Tokens", 300, 25, 0.5, *SLICE_CONTROLS, engine=engine)
    assert "kept: <b>300</b>" in out["card"]
    assert sa.answer is not None and sb.answer is None and sb.audit is None and sb.question == ""
    h.move_point(sb, vb, 1, 2, 3, *SLICE_CONTROLS)
    assert va.point != vb.point


def test_a_prior_that_is_the_current_scan_itself_is_warned(engine, store, tmp_path):
    """The same file uploaded as scan and as prior (or a copy stored in another axis order) was taken as a
    follow-up without a word: every question about change compared the scan with itself."""
    from app import handlers as h

    ct = SAMPLES / "abdomen_ct/ct.nii.gz"
    img = nib.load(str(ct))
    nib.save(img.as_reoriented(np.array([[0, -1], [1, -1], [2, 1]])), str(tmp_path / "lps.nii.gz"))
    nib.save(img.slicer[2:, :, 3:], str(tmp_path / "earlier.nii.gz"))
    for prior, same in ((ct, True), (tmp_path / "lps.nii.gz", True), (tmp_path / "earlier.nii.gz", False)):
        out = h.load_upload([str(ct)], None, None, str(prior), None, None, None, engine=engine, store=store)
        said = [w for w in out["session"].warnings if "the scan with itself" in w]
        assert len(said) == (1 if same else 0), (prior.name, out["session"].warnings)
        assert ("the scan with itself" in html.unescape(out["status"])) is same


def test_a_prior_study_of_several_series_lists_them_and_loads_the_one_picked(engine, store, tmp_path):
    """A prior given as a PACS export (two kernels and a localizer) loaded its default series and said
    "upload that series alone as the prior" to compare with another: its series are listed under Prior
    series, a pick loads that one as the prior (the scan stays), and the status, API and report name it."""
    import zipfile

    from test_volume import _pacs_export

    from app import api
    from app import handlers as h

    study = _pacs_export(tmp_path)
    prior = tmp_path / "earlier_study.zip"
    with zipfile.ZipFile(prior, "w") as z:
        for f in sorted(study.iterdir()):
            z.write(f, f"study/{f.name}")
    ct = str(SAMPLES / "abdomen_ct/ct.nii.gz")
    out = h.load_upload([ct], None, None, str(prior), None, None, None, engine=engine, store=store)
    s = out["session"]
    said = [w for w in s.warnings if w.startswith("prior scan: This upload holds 3 series")]
    assert len(said) == 1 and "Abdomen 2.0 Br38f" in said[0], s.warnings
    assert "Choose another series" not in said[0] and "“Prior series”" in said[0]
    assert out["series"]["visible"] is False            # the current scan (one NIfTI) has no series to pick
    picker = out["prior_series"]
    assert picker["visible"] is True and len(picker["choices"]) == 3 == len(s.prior_series)
    assert picker["value"] == s.prior_series_uid == picker["choices"][0][1]
    assert "Br38f" in picker["choices"][0][0] and "prior-series-note" in out["status"]
    assert "kernel Br38f" in html.unescape(out["status"])
    lung = next(uid for label, uid in picker["choices"] if "Bl57" in label)
    picked = h.pick_series([ct], None, None, str(prior), None, s, out["view"], lung, engine=engine,
                           store=store)
    p = picked["session"]
    assert p.prior_series_uid == lung and picked["prior_series"]["value"] == lung
    assert p.prior.shape[2] == 17 and s.prior.shape[2] != 17       # the lung series: 17 slices
    assert p.volume.shape == s.volume.shape and "kernel Bl57" in html.unescape(picked["status"])
    assert h.pick_series([ct], None, None, str(prior), None, p, picked["view"], lung, engine=engine,
                         store=store) == {}                  # the series already loaded: nothing to do
    asked = _ask(engine, picked, "Has the liver lesion grown since the prior scan?")
    got = api.result(engine, asked["session"], asked["session"].answer, asked["session"].audit)["prior_scan"]
    assert got["series"] == lung and "kernel Bl57" in got["scan"]
    assert [x["series"] for x in got["series_found"]] == [uid for _, uid in picker["choices"]]
    cleared = h.prior_changed([ct], None, None, None, p)
    assert cleared["prior_series"]["visible"] is False and "pending-note" in cleared["pending"]["value"]
    scan_only = h.load_upload([ct], None, None, None, None, p, picked["view"], lung, engine=engine,
                              store=store)               # a stale pick without a prior is not used
    assert scan_only["session"].prior is None and scan_only["prior_series"]["visible"] is False


def _study_with_a_localizer(monkeypatch, ct: str, localizer: str) -> None:
    """Uploads read as a study of two series: ``ct`` loads the abdomen sample, ``localizer`` (one image)
    cannot be loaded."""
    import types

    from app import service
    from photon_core.io.volume import VolumeError, load_volume

    series = [types.SimpleNamespace(uid=ct, label="Abdomen B31f"), types.SimpleNamespace(uid=localizer,
                                                                                      label="Topogram")]

    def load(src, limits, series=None, step=None):
        if series == localizer:
            raise VolumeError("This DICOM series holds a single image (512×512).")
        return load_volume(SAMPLES / "abdomen_ct/ct.nii.gz")

    monkeypatch.setattr(service, "list_series", lambda files, limits: series)
    monkeypatch.setattr(service, "load_volume", load)


def test_a_prior_series_that_fails_to_load_leaves_its_picker_and_the_scan(engine, store, monkeypatch,
                                                                          tmp_path):
    """A prior series that cannot be loaded (a localizer) is named as the prior's failure; the scan and the
    prior loaded before stay, and the Prior series picker names the one still loaded."""
    from app import handlers as h

    _study_with_a_localizer(monkeypatch, "p1", "p2")
    ct, prior = str(SAMPLES / "abdomen_ct/ct.nii.gz"), str(tmp_path / "prior_study.zip")
    out = h.load_upload([ct], None, None, prior, None, None, None, engine=engine, store=store)
    assert out["prior_series"]["value"] == "p1" and out["series"]["visible"] is False
    failed = h.pick_series([ct], None, None, prior, None, out["session"], out["view"], "p2", engine=engine,
                           store=store)
    assert "prior_study.zip" in failed["status"] and "single image" in failed["status"]
    assert failed["prior_series"]["value"] == "p1" and "session" not in failed


def test_the_report_and_the_api_name_the_prior_scan_an_answer_used(engine, store, tmp_path):
    """report.json said only how many of a prior's tokens were kept, not which prior scan was asked with:
    it names it (format and grid, never a file name) as the status line does, and so does the API."""
    from app import api
    from app import handlers as h

    ct = SAMPLES / "abdomen_ct/ct.nii.gz"
    nib.save(nib.load(str(ct)).slicer[4:118, 2:99, 5:108], str(tmp_path / "Doe_2019.nii.gz"))
    out = h.load_upload([str(ct)], None, None, str(tmp_path / "Doe_2019.nii.gz"), None, None, None,
                        engine=engine, store=store)
    asked = _ask(engine, out, "Has the liver lesion grown since the prior scan?")
    s = asked["session"]
    files = h.export(s, out["view"], *SLICE_CONTROLS, engine=engine)["exp_files"]
    report = json.loads(next(open(f).read() for f in files if f.endswith("report.json")))
    named = report["prior_scan"]["scan"]
    assert "NIfTI" in named and "114×97×103 voxels" in named and "Doe" not in named
    assert report["prior_scan"]["visual_tokens_total"] == s.answer.prior_total == 1000
    assert named in html.unescape(out["status"])
    assert api.result(engine, s, s.answer, s.audit)["prior_scan"]["scan"] == named


def test_a_series_that_fails_to_load_leaves_the_picker_on_the_series_still_loaded(engine, store, monkeypatch,
                                                                                  tmp_path):
    """Picking a series that could not be loaded (a localizer, a label map of another grid) kept the
    previous series on screen while the Series picker named the one that failed."""
    from app import handlers as h

    _study_with_a_localizer(monkeypatch, "s1", "s2")
    files = [str(tmp_path / f"im{i}.dcm") for i in range(3)]
    out = h.load_upload(files, None, None, None, None, None, None, engine=engine, store=store)
    assert out["series"]["value"] == "s1"
    failed = h.load_upload(files, None, None, None, "s2", out["session"], out["view"], engine=engine,
                           store=store)
    assert "single image" in failed["status"] and "still active" in failed["status"]
    assert failed["series"]["value"] == "s1" and "session" not in failed


def test_two_kernels_of_one_acquisition_are_told_apart_on_the_card_and_in_the_export(engine, store,
                                                                                       monkeypatch, tmp_path):
    """The soft-tissue and the lung series of one acquisition have the same grid: the card, the status line
    and report.json named both 'DICOM upload, 512×512×20 voxels …', so which one an answer was about could
    not be told. An upload's name holds the series' reconstruction kernel."""
    import types

    from app import handlers as h
    from app import service
    from photon_core.io.volume import load_volume

    series = [types.SimpleNamespace(uid=u, label=d) for u, d in (("s1", "Abdomen B31f"), ("s2", "Lung B70f"))]

    def load(src, limits, series=None, step=None):
        vol = load_volume(SAMPLES / "abdomen_ct/ct.nii.gz")
        vol.meta = {"format": "DICOM", "ConvolutionKernel": {"s2": "B70f"}.get(series, "B31f")}
        return vol

    monkeypatch.setattr(service, "list_series", lambda files, limits: series)
    monkeypatch.setattr(service, "load_volume", load)
    files = [str(tmp_path / f"im{i}.dcm") for i in range(3)]
    soft = h.load_upload(files, None, None, None, None, None, None, engine=engine, store=store)
    lung = h.load_upload(files, None, None, None, "s2", soft["session"], soft["view"], engine=engine,
                         store=store)
    assert "kernel B31f" in soft["session"].title and "kernel B70f" in lung["session"].title
    asked = _ask(engine, lung, "Is there a lesion in the liver?")
    assert "kernel B70f" in html.unescape(asked["card"]) and "kernel B70f" in html.unescape(lung["status"])
    files = h.export(asked["session"], lung["view"], *SLICE_CONTROLS, engine=engine)["exp_files"]
    report = json.loads(next(open(f).read() for f in files if f.endswith("report.json")))
    assert "kernel B70f" in report["case"]


def test_removing_the_prior_from_its_field_says_it_is_still_asked_with_until_loaded(engine, store):
    """Clearing the prior field (its ×) looked like removing the prior, but every question was still asked
    with it until "Load upload", and nothing said so: a changed Upload-tab file now puts a note under the
    status line naming what questions are asked with; the next load clears it."""
    from app import handlers as h

    ct = str(SAMPLES / "abdomen_ct/ct.nii.gz")
    out = h.load_upload([ct], None, None, ct, None, None, None, engine=engine, store=store)
    assert out["pending"]["visible"] is False and "pending-note" not in out["status"]
    note = h.fields_changed([ct], None, None, None, out["session"])["pending"]["value"]   # prior removed
    assert "pending-note" in note and "with its prior scan" in note and "Load upload" in note
    assert out["session"].title in html.unescape(note)                     # the scan still active, named
    assert "pending-note" in h.upload_changed([], None, None, ct, out["session"])["pending"]["value"]
    again = h.load_upload([ct], None, None, None, None, out["session"], out["view"], engine=engine,
                          store=store)
    assert again["pending"]["visible"] is False
    assert "without a prior" in h.fields_changed([ct], ct, None, None, again["session"])["pending"]["value"]
    hidden = {"pending": {"__type__": "update", "value": "", "visible": False}}
    assert h.fields_changed([ct], None, None, None, again["session"]) == hidden         # what is loaded
    assert h.fields_changed([ct], None, None, None, None) == hidden


def test_a_field_change_answered_after_a_load_keeps_the_loads_message_and_pickers(engine, store, tmp_path):
    """Load (or Stop) pressed while a file was still arriving: the field's change event and the load are
    answered at the same moment, and the change's "files changed" note, written on the status line, could
    land after a load that failed or was stopped, hiding why (the toast alone said it). The note is now its
    own component: the failure's status stays. A change answered after a load of those same files (the
    session already holds them) says nothing and keeps the series pickers the load filled."""
    from app import handlers as h

    shown = h.load_case(ABDOMEN, None, None, engine=engine, store=store)
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not a scan")
    failed = h.load_upload([str(bad)], None, None, None, None, shown["session"], shown["view"],
                           engine=engine, store=store)
    assert "broken.nii.gz" in failed["status"] and "pending" not in failed
    late = h.upload_changed([str(bad)], None, None, None, shown["session"])     # the change, after it
    assert "status" not in late and "pending-note" in late["pending"]["value"]  # the failure's line stays
    assert late["series"]["visible"] is False

    ct = _fresh_scan(tmp_path / "fresh.nii.gz", 31)
    loaded = h.load_upload([ct], None, None, None, None, shown["session"], shown["view"], engine=engine,
                           store=store)
    hidden = {"pending": {"__type__": "update", "value": "", "visible": False}}
    late = h.upload_changed([ct], None, None, None, loaded["session"])
    assert late == hidden                                   # no note, the series pickers left as loaded
    assert h.prior_changed([ct], None, None, None, loaded["session"]) == hidden


def test_a_series_picked_with_the_mouse_loads_once_and_says_a_failure_once(engine, store, monkeypatch,
                                                                           tmp_path):
    """The Series dropdown sends a mouse choice twice at once: the study was decoded and loaded twice
    (a fresh card twice) and a failure came as two identical warnings. The second waits for the first
    and changes nothing; picking the series already loaded does nothing."""
    import threading
    import types

    from app import handlers as h
    from app import service
    from photon_core.io.volume import VolumeError, load_volume

    series = [types.SimpleNamespace(uid=u, label=d) for u, d in (("s1", "Abdomen B31f"), ("s2", "Lung B70f"),
                                                                 ("s3", "Topogram"))]
    loads, toasts = [], []

    def load(src, limits, series=None, step=None):
        loads.append(series)
        time.sleep(0.3)
        if series == "s3":
            raise VolumeError("This DICOM series holds a single image (512×512).")
        return load_volume(SAMPLES / "abdomen_ct/ct.nii.gz")

    monkeypatch.setattr(service, "list_series", lambda files, limits: series)
    monkeypatch.setattr(service, "load_volume", load)
    monkeypatch.setattr(h, "toast", toasts.append)
    files = [str(tmp_path / f"im{i}.dcm") for i in range(3)]
    first = h.load_upload(files, None, None, None, None, None, None, engine=engine, store=store)
    request = types.SimpleNamespace(session_hash="browser-1")

    def twice(uid):
        outs = [None, None]

        def pick(n):
            outs[n] = h.pick_series(files, None, None, None, uid, first["session"], first["view"],
                                    request=request, engine=engine, store=store)
        threads = [threading.Thread(target=pick, args=(n,)) for n in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return outs

    loads.clear()
    outs = twice("s3")
    assert loads == ["s3"] and len(toasts) == 1 and sorted(map(len, outs))[0] == 0
    assert next(o for o in outs if o)["series"]["value"] == "s1"
    loads.clear()
    outs = twice("s2")
    assert loads == ["s2"] and sum("session" in o for o in outs) == 1
    lung = next(o for o in outs if o)
    assert h.pick_series(files, None, None, None, "s2", lung["session"], lung["view"], request=request,
                         engine=engine, store=store) == {} and loads == ["s2"]


def test_an_answer_that_comes_after_another_scan_loaded_does_not_bring_back_the_old_scan(engine, store,
                                                                                          monkeypatch):
    """A load begun while an ask of the same browser ran (asks are refused only while a load runs) landed
    first; the ask's answer then set the page's scan back to the old one, its card and views with it, while
    the status line named the new scan. The late answer is now dropped, with a word."""
    from types import SimpleNamespace

    from app import handlers as h
    from app.service import Engine

    browser = SimpleNamespace(session_hash="browser-1")
    a = h.load_case(ABDOMEN, None, None, request=browser, engine=engine, store=store)
    answer, loaded = Engine.answer, {}

    def answer_while_a_load_lands(self, s, question, budget, *args, **kwargs):
        out = answer(self, s, question, budget, *args, **kwargs)
        if not loaded:
            loaded.update(h.load_case(CHEST, s, a["view"], request=browser, engine=engine, store=store))
        return out

    toasts = []
    monkeypatch.setattr(h.gr, "Warning", lambda text, **kw: toasts.append(text))
    monkeypatch.setattr(Engine, "answer", answer_while_a_load_lands)
    out = h.ask(a["session"], a["view"], "Is the spleen enlarged?", "Auto", 300, 25, 0.5, *SLICE_CONTROLS,
                request=browser, engine=engine)
    assert loaded["session"].title == CHEST
    assert "session" not in out and "card" not in out, "the late answer replaced the page's scan"
    assert toasts and "Abdomen/pelvis" in toasts[-1] and "Ask again" in toasts[-1]
    from pathlib import Path

    scene = Path(loaded["model3d"])              # the new scan's 3-D file stays the browser's current one
    assert loaded["view"].files._current["scene"] == scene
    # an ask about the scan now loaded is shown
    out = h.ask(loaded["session"], loaded["view"], "Is the spleen enlarged?", "Auto", 300, 25, 0.5,
                *SLICE_CONTROLS, request=browser, engine=engine)
    assert out["session"] is loaded["session"] and "Chest" in out["card"]


def test_a_closed_pages_upload_is_let_go_of_unless_the_page_came_back(engine, store, monkeypatch):
    """Gradio keeps a closed page's state an hour; an upload's arrays (≈ 0.5 GB for a 512² × 300 scan) went
    with it. They now go ``RELEASE_AFTER_S`` after the page closed; a page that came back keeps its scan,
    a sample case's arrays (the server's one copy) stay, and a released page says to load again."""
    import gc
    import weakref
    from types import SimpleNamespace

    from app import handlers as h

    def upload(tab):
        page = SimpleNamespace(session_hash=tab)
        out = h.bind(h.load_upload, engine=engine, store=store)(
            [str(SAMPLES / "abdomen_ct/ct.nii.gz")], None, None, None, None, None, None, request=page)
        return page, out

    gone_page, gone = upload("tab-gone")
    back_page, back = upload("tab-back")
    sample_page = SimpleNamespace(session_hash="tab-sample")
    sample = h.load_case(ABDOMEN, None, None, request=sample_page, engine=engine, store=store)
    _ask(engine, gone)
    arrays = weakref.ref(gone["session"].volume.hu)
    for page in (gone_page, back_page, sample_page):
        h.bind(h.session_ended, store=store)(request=page)
    assert h.release_closed() == 0                         # not yet
    ask = h.bind(h.ask, engine=engine)                     # the second page comes back (its first request)
    ask(back["session"], back["view"], "Is the spleen enlarged?", "Auto", 300, 25, 0.5, *SLICE_CONTROLS,
        request=back_page)
    assert h.release_closed(time.monotonic() + h.RELEASE_AFTER_S) == 1
    gc.collect()
    assert arrays() is None, "the closed page's scan is still held"
    assert gone["session"].volume is None and back["session"].volume is not None
    h.bind(h.session_ended, store=store)(request=back_page)     # the page that came back closes again
    assert h.release_closed(time.monotonic() + h.RELEASE_AFTER_S) == 1 and back["session"].volume is None
    assert sample["session"].volume is not None
    again = ask(gone["session"], gone["view"], "Is the spleen enlarged?", "Auto", 300, 25, 0.5,
                *SLICE_CONTROLS, request=gone_page)
    assert "load it again" in html.unescape(again["card"])
    assert h.redraw_slices(gone["session"], gone["view"], *SLICE_CONTROLS) == {}
    assert "No scan loaded" in h.status_html(gone["session"])
    toasts = []
    monkeypatch.setattr(h, "toast", toasts.append)
    export = h.bind(h.export, engine=engine)
    assert export(gone["session"], gone["view"], *SLICE_CONTROLS) == {"exp_files": None}
    assert "load it again" in toasts[-1]


def test_a_scan_edited_in_a_few_voxels_is_encoded_anew_not_taken_from_the_cache(engine, store, tmp_path):
    """The encoded-tokens cache was keyed by every n-th byte of a volume over 4 MB: the same scan with a
    lesion painted into a few voxels (a counterfactual twin) was answered with the first one's tokens."""
    import torch

    from app import handlers as h

    hu = np.full((256, 256, 48), -1000, np.int16)
    hu[40:220, 50:210, 4:44] = 40                          # a body
    affine = np.diag([1.4, 1.4, 5.0, 1.0])
    paths = []
    for n, lesion in enumerate((0, 200)):
        edited = hu.copy()
        edited[120:123, 130:133, 20] += lesion             # 9 voxels: 36 of 12.6 M bytes
        paths.append(tmp_path / f"scan{n}.nii.gz")
        nib.save(nib.Nifti1Image(edited, affine), str(paths[-1]))
    keys, tokens = [], []
    for p in paths:
        s = h.load_upload([str(p)], None, None, None, None, None, None, engine=engine, store=store)["session"]
        keys.append(s.key)
        tokens.append(engine._cache[s.key][0])
    assert keys[0] != keys[1]
    assert not torch.equal(tokens[0], tokens[1])          # the visual features of the twin differ


def test_with_a_prior_scan_the_cut_is_where_the_count_cut_both_scans(engine, store, tmp_path):
    """A count or share keeps the most salient of the prior's and the current scan's tokens together, but
    the card, the histogram, the legend, the 3-D PNG and report.json gave the lowest ρ kept of the current
    scan alone as the cut: above the real one whenever a prior token was the last one kept."""
    import re

    from app import handlers as h

    ct = SAMPLES / "abdomen_ct/ct.nii.gz"
    prior = tmp_path / "earlier.nii.gz"
    nib.save(nib.load(str(ct)).slicer[3:, 2:, :], str(prior))
    out = h.load_upload([str(ct)], None, None, str(prior), None, None, None, engine=engine, store=store)
    s, differs = out["session"], 0
    for tokens in (60, 150, 400, 900):
        card = _ask(engine, out, "Is the spleen enlarged?", mode="Tokens", tokens=tokens)["card"]
        a = s.answer
        assert a.prior_rho is not None and a.prior_rho.shape == a.rho.shape
        both = min(a.rho[a.keep_grid].min(initial=2.0), a.prior_rho[a.prior_keep_grid].min(initial=2.0))
        assert a.kept == tokens and a.cut == pytest.approx(both)
        shown = float(re.search(r"cut at ρ = ([0-9.]+)", card).group(1))
        assert shown == pytest.approx(both, abs=6e-4)
        differs += both < a.rho[a.keep_grid].min() - 1e-3
    assert differs, "no count here cut the prior's tokens lowest: the test shows nothing"


def test_the_page_ends_on_its_newest_ask_when_two_run_side_by_side(engine, store, monkeypatch):
    """Two controls of one page (the Tokens slider, then Review or the mode) run as two events side by
    side; the older one, reaching the session last, was answered last and left the page on the older
    budget while its controls showed the newer one. An ask that a newer one of the page overtook is now
    left unanswered (its outputs unchanged); another page's asks are not affected."""
    import threading
    from types import SimpleNamespace

    from app import handlers as h

    page, other = SimpleNamespace(session_hash="page-1"), SimpleNamespace(session_hash="page-2")
    a = h.load_case(ABDOMEN, None, None, request=page, engine=engine, store=store)
    b = h.load_case(ABDOMEN, None, None, request=other, engine=engine, store=store)
    held, go = threading.Event(), threading.Event()
    real_check = h._check_not_loading

    def check(request):                       # the older ask stalls after it began, before the session
        if threading.current_thread().name == "older":
            held.set()
            assert go.wait(60)
        return real_check(request)

    monkeypatch.setattr(h, "_check_not_loading", check)
    outs = {}

    def run(name, tokens, request, out):
        outs[name] = h.ask(out["session"], out["view"], "Is the spleen enlarged?", "Tokens", tokens, 25, 0.5,
                           *SLICE_CONTROLS, request=request, engine=engine)

    older = threading.Thread(target=run, args=("older", 100, page, a), name="older")
    older.start()
    assert held.wait(60)
    run("newer", 300, page, a)                # begins after the older one and is answered first
    run("other page", 200, other, b)          # another page's ask in between
    go.set()
    older.join(60)
    assert "kept: <b>300</b>" in outs["newer"]["card"] and "kept: <b>200</b>" in outs["other page"]["card"]
    assert outs["older"] == {}, "the overtaken ask was drawn over the newer answer"
    assert a["session"].answer.kept == 300 and b["session"].answer.kept == 200


def test_an_upload_whose_page_closed_while_it_loaded_is_let_go_of_too(engine, store, monkeypatch):
    """A load runs on after its page closed (nothing cancels a running load): the upload landed on a page
    already gone, was never registered as closed, and stayed Gradio's hour."""
    import gc
    import weakref
    from types import SimpleNamespace

    from app import handlers as h
    from app.service import Engine

    page, held = SimpleNamespace(session_hash="tab-closed-mid-load"), {}
    real = Engine.load_upload

    def load_and_close(self, *args, **kwargs):
        s = real(self, *args, **kwargs)
        h.bind(h.session_ended, store=store)(request=page)    # the tab closes before the load returns
        held["hu"] = weakref.ref(s.volume.hu)
        return s

    monkeypatch.setattr(Engine, "load_upload", load_and_close)
    out = h.bind(h.load_upload, engine=engine, store=store)(
        [str(SAMPLES / "abdomen_ct/ct.nii.gz")], None, None, None, None, None, None, request=page)
    assert out["session"].volume is not None
    assert h.release_closed(time.monotonic() + h.RELEASE_AFTER_S) == 1
    gc.collect()
    assert held["hu"]() is None and out["session"].released


def test_the_slices_read_their_masks_plane_by_plane_and_draw_the_same_image(engine, store):
    """A redraw of the three planes built the whole kept-block and asked-organ masks first (1.7 s a
    crosshair move on a 512 × 512 × 300 scan with a label map): now read plane by plane, the image is the
    same pixel for pixel as from the whole masks, wherever the crosshair stands."""
    from app import handlers as h
    from app.view import asked_mask, focus, kept_mask, slices_image, window_of
    from viz.slices import to_ras, triplanar

    a = h.load_case(ABDOMEN, None, None, engine=engine, store=store)
    out = _ask(engine, a, "Is there a cyst in the left kidney?", mode="Tokens", tokens=300)
    s, v = out["session"], a["view"]
    kept, asked = kept_mask(v, s), asked_mask(v, s)
    assert kept is not None and asked is not None
    token_ras = to_ras(s.token_index.whole(), s.volume.affine)[0]                       # as drawn before
    whole_kept = np.concatenate([s.answer.keep_grid.ravel(), [False]])[token_ras]
    whole_asked = np.isin(v.labels_ras, s.ids_of(s.audit.asked))
    assert np.array_equal(kept.whole(), whole_kept) and np.array_equal(asked.whole(), whole_asked)
    assert whole_kept.shape == whole_asked.shape == v.hu_ras.shape and whole_kept.any() and whole_asked.any()
    for point in [v.point, (0, 0, 0), tuple(n - 1 for n in v.hu_ras.shape), (17, 60, 33)]:
        v.point = point
        drawn = slices_image(v, s, *SLICE_CONTROLS)
        ref, _ = triplanar(v.hu_ras, v.spacing_ras, point, window_of(400, 40), whole_kept, 0.35, whole_asked)
        assert np.array_equal(drawn, ref), point
    from app.view import _in

    present = [int(i) for i in np.unique(v.labels_ras) if i > 0]
    for ids in (tuple(present[:1]), tuple(present[:3]), tuple(present[:10]), (present[0], 30000, -1)):
        assert np.array_equal(_in(v.labels_ras, ids), np.isin(v.labels_ras, ids)), ids
    # where the slices open: the asked organ's central voxel, found once and remembered
    centre = focus(v, s)
    assert whole_asked[centre] and v.centres[("organ", tuple(s.ids_of(s.audit.asked)))] == centre


def test_an_uploaded_label_map_is_counted_once_a_load(engine, store, monkeypatch):
    """Its ids (for the names) and its structures' sizes (for the 3-D anatomy's choice of organs) were
    counted in two passes over the map (0.58 s each at 512 × 512 × 300)."""
    from app import handlers as h
    from photon_core import organs

    calls, real = [], organs.label_counts

    def counted(labels, *args, **kwargs):
        calls.append(1)
        return real(labels, *args, **kwargs)

    monkeypatch.setattr(organs, "label_counts", counted)
    case = SAMPLES / "abdomen_ct"
    out = h.load_upload([str(case / "ct.nii.gz")], str(case / "labels.nii.gz"), None, None, None, None, None,
                        engine=engine, store=store)
    assert out["session"].blocks and any(s["ids"] for s in out["view"].surfaces)
    assert len(calls) == 1


@pytest.fixture
def gradio_event(monkeypatch):
    """The Gradio event the handler runs for, as its queue holds it: among the running jobs, alive."""
    from types import SimpleNamespace

    from gradio.context import LocalContext

    event = SimpleNamespace(_id="event-under-test", alive=True)
    queue = SimpleNamespace(active_jobs=[None, [event], None], set_progress=lambda *a, **k: None,
                            log_message=lambda *a, **k: None)
    tokens = [(LocalContext.blocks, LocalContext.blocks.set(SimpleNamespace(_queue=queue))),
              (LocalContext.event_id, LocalContext.event_id.set(event._id))]
    yield event, queue
    for var, token in tokens:
        var.reset(token)


def _fresh_scan(path, seed: int) -> str:
    """A crop of the abdomen sample no cache has seen (each seed its own voxels)."""
    ct = nib.load(str(SAMPLES / "abdomen_ct/ct.nii.gz"))
    a = np.asanyarray(ct.dataobj)[:90, :90, :100].astype(np.int16) + np.int16(seed)
    nib.save(nib.Nifti1Image(a, ct.affine), str(path))
    return str(path)


@pytest.mark.parametrize("gone_at,how", [("prepare", "page closed"), ("prepare", "cancelled"),
                                         ("encode", "cancelled"), ("surface", "cancelled"), (None, None)])
def test_a_load_whose_client_is_gone_stops_at_its_next_step(engine, store, gradio_event, monkeypatch,
                                                            tmp_path, caplog, gone_at, how):
    """A load ran to its end after its client had gone — the request cancelled (Gradio cancels the event's
    task, not the thread running the load) or its page's connection closed (Gradio drops the event's
    messages) — for seconds, on a core of a 2-core server, holding while it prepared the engine's lock
    that every ask waits for. Now it stops at the next step it reports: the encoding after the
    preparation, each surface of the 3-D anatomy. A client still there gets its scan (gone_at None)."""
    from types import SimpleNamespace

    from app import handlers as h
    from app import service
    from viz import scene

    event, queue = gradio_event
    calls = {"encode": 0, "surfaces": 0}

    def leave():
        if how == "page closed":
            event.alive = False                     # what Gradio's clean_events does on a disconnect
        else:
            queue.active_jobs[1] = None             # what a cancelled event's task leaves behind

    real_prepare, real_encode, real_contour = service.prepare, engine.predictor.encode, scene._contour

    def prepare(*a, **k):
        out = real_prepare(*a, **k)
        if gone_at == "prepare":
            leave()
        return out

    def encode(prepared, step=None):
        calls["encode"] += 1
        blocks = []

        def each_block(i, n):                   # the tower's blocks (CPU): a stop between two of them
            blocks.append(i)
            if gone_at == "encode" and i == 1:
                leave()
            return step(i, n)
        out = real_encode(prepared, each_block)
        assert blocks == list(range(len(engine.predictor.model.visual.blocks)))
        return out

    def contour(*a, **k):
        calls["surfaces"] += 1
        if gone_at == "surface":
            leave()
        return real_contour(*a, **k)

    monkeypatch.setattr(service, "prepare", prepare)
    monkeypatch.setattr(engine.predictor, "encode", encode)
    monkeypatch.setattr(scene, "_contour", contour)
    page = SimpleNamespace(session_hash=f"gone-{gone_at}-{how}")
    cached = set(engine._cache)
    with caplog.at_level("INFO", logger="photon_ct"):
        out = h.bind(h.load_upload, engine=engine, store=store)(
            [_fresh_scan(tmp_path / "scan.nii.gz", seed=len(str(how)) + 10 * (gone_at == "surface"))],
            None, None, None, None, None, None, request=page)
    assert not h._LOADS_RUNNING.get(page.session_hash)
    if gone_at is None:
        assert out["session"].volume is not None and calls == {"encode": 1, "surfaces": 2}
        assert "stopped" not in caplog.text
        return
    assert "session" not in out and "Stopped" in out["status"]
    assert "load stopped: its client is gone" in caplog.text and "unexpected" not in caplog.text
    if gone_at == "prepare":
        assert calls == {"encode": 0, "surfaces": 0}          # nothing after the preparation
    elif gone_at == "encode":
        assert calls == {"encode": 1, "surfaces": 0}          # stopped inside the tower: nothing cached
        assert set(engine._cache) == cached
    else:
        assert calls["encode"] == 1 and calls["surfaces"] == 1   # the body drawn, not the bone


def test_a_dicom_upload_says_which_slice_it_reads_and_stops_there(engine, store, gradio_event, monkeypatch):
    """A DICOM series' reading (≈ 1 s for 300 files here, longer compressed or on a slow disk) showed one
    "Reading the upload" and could not be stopped until it ended: the page now hears its headers and its
    slices being read, and Stop loading (or a client gone) stops it at the next of them."""
    from types import SimpleNamespace

    from app import handlers as h
    from photon_core.io import dicom

    event, queue = gradio_event
    monkeypatch.setattr(dicom, "STEP_EVERY_S", 0.0)
    files = sorted(str(f) for f in (SAMPLES / "dicom_ct" / "series").iterdir())
    shown = []

    def set_progress(event_id, iterables):
        shown.extend(it.desc for it in iterables or [] if it.desc)
        if any(d and d.startswith("Reading the DICOM slices: 3 of") for d in shown):
            event.alive = False                     # the page closes while its slices are read

    queue.set_progress = set_progress
    page = SimpleNamespace(session_hash="dicom-read-stopped")
    out = h.bind(h.load_upload, engine=engine, store=store)(files, None, None, None, None, None, None,
                                                             request=page)
    assert "session" not in out and "Stopped" in out["status"]
    n = sum(1 for d in shown if d.startswith("Reading the DICOM headers: file "))
    assert n == len(files) and shown.index(f"Reading the DICOM headers: file {n} of {n}") < shown.index(
        "Reading the DICOM slices: 1 of " + shown[-1].rsplit(" of ", 1)[1])
    assert shown[-1].startswith("Reading the DICOM slices: 3 of")   # nothing read or shown after it


def test_an_api_ask_whose_client_cancelled_stops_before_encoding(engine, gradio_event, monkeypatch, tmp_path):
    from app import api, service

    event, queue = gradio_event
    real_prepare = service.prepare

    def prepare(*a, **k):
        out = real_prepare(*a, **k)
        queue.active_jobs[1] = None
        return out

    monkeypatch.setattr(service, "prepare", prepare)
    monkeypatch.setattr(engine.predictor, "encode", lambda *a, **k: pytest.fail("encoded for nobody"))
    import gradio as gr

    with pytest.raises(gr.Error, match="Stopped"):
        api.ask("Is there a lesion?", [_fresh_scan(tmp_path / "scan.nii.gz", seed=7)], engine=engine)


def test_stop_loading_stops_the_pages_load_asked_for_or_running_and_no_later_one(engine, store, monkeypatch,
                                                                                 tmp_path):
    """"Stop loading" (shown as an upload's load is asked for) stops that load at its next step, whether
    pressed while it runs or before it began (queued, its file still arriving); the page keeps its scan and
    the status says so. A Stop pressed before a load was asked for does not stop it; other pages' loads
    are not stopped."""
    from types import SimpleNamespace

    from app import handlers as h
    from app import service

    page, other = SimpleNamespace(session_hash="stop-page"), SimpleNamespace(session_hash="stop-other")
    shown = h.load_case(ABDOMEN, None, None, engine=engine, store=store, request=page)
    load = h.bind(h.load_upload, engine=engine, store=store)
    stop_while = {"on": False}
    real_prepare = service.prepare

    def prepare(*a, **k):
        if stop_while["on"]:
            h.stop_loading(request=page)
        return real_prepare(*a, **k)

    monkeypatch.setattr(service, "prepare", prepare)

    def upload(seed, request=page, ask=True):
        if ask:
            assert h.show_stop(request=request)["stop_load"]["visible"] is True
        return load([_fresh_scan(tmp_path / f"scan{seed}.nii.gz", seed)], None, None, None, None,
                    shown["session"], shown["view"], request=request)

    stop_while["on"] = True                        # pressed while the load prepares
    out = upload(21)
    assert "session" not in out
    assert "Stopped loading 'scan21.nii.gz' at your request" in html.unescape(out["status"])
    assert "Abdomen" in out["status"]
    stop_while["on"] = False

    h.show_stop(request=page)                      # pressed before the load began
    h.stop_loading(request=page)
    out = upload(22, ask=False)
    assert "session" not in out
    assert "Stopped loading 'scan22.nii.gz' at your request" in html.unescape(out["status"])

    h.stop_loading(request=page)                   # pressed before this load was asked for
    time.sleep(0.01)
    out = upload(23)
    assert out["session"].volume is not None

    h.show_stop(request=other)
    h.stop_loading(request=page)                   # another page's Stop
    assert upload(24, request=other)["session"].volume is not None


def test_an_ask_shows_where_it_is_and_is_given_up_once_its_client_is_gone(engine, store, gradio_event,
                                                                         monkeypatch, caplog):
    """An official model's answer takes minutes on a CPU, under one "Asking Photon" that never moved, and
    ran to its end after the page had closed, keeping the model from every other user. The ask now
    says where it is (waiting, reading, writing its n-th token) and is given up once its client is
    gone; the next ask is answered as usual."""
    from types import SimpleNamespace

    from app import handlers as h

    event, _ = gradio_event
    page = SimpleNamespace(session_hash="ask-gone")
    shown = h.load_case(ABDOMEN, None, None, engine=engine, store=store, request=page)
    real_answer = engine.predictor.answer

    def slow(rows, *a, on_step=None, on_layer=None, **k):    # a slow model: 0.1 s a layer, 0.6 s a token
        def layer(i, n):
            time.sleep(0.1)
            return on_layer(i, n)

        def step(n):
            time.sleep(0.6)
            return on_step(n)
        return real_answer(rows, *a, on_step=step, on_layer=layer, **k)

    said = []

    def progress(fraction, desc=None):
        said.append(desc)
        if desc.startswith("Photon writes the answer"):
            event.alive = False                          # the page closes as the answer is written

    monkeypatch.setattr(engine.predictor, "answer", slow)
    t0 = time.perf_counter()
    with caplog.at_level("INFO"):
        out = h.ask(shown["session"], shown["view"], "Is there a cyst in the left kidney?", "Auto", 300, 25,
                    0.5, *SLICE_CONTROLS, request=page, progress=progress, engine=engine)
        took = time.perf_counter() - t0
        time.sleep(1.0)                                  # the worker meets the given-up ask at its next step
    n = len(engine.predictor.model.model.layers)
    assert any(f"Photon reads the scan and the question: layer {k} of {n}" in said for k in range(1, n + 1))
    assert "Photon writes the answer: 1 token" in said and took < 0.1 * n + 2.0
    assert "Not asked" in out["card"] and shown["session"].answer is None
    assert "ask stopped" in caplog.text and "given up by every caller" in caplog.text
    event.alive = True
    monkeypatch.setattr(engine.predictor, "answer", real_answer)
    again = _ask(engine, shown)
    assert again["session"].answer is not None


def test_stop_asking_gives_up_the_pages_ask_and_keeps_the_answer_shown(engine, store, monkeypatch):
    """An official model's answer takes most of a minute on a CPU, and a wrong question could only be
    waited out. "Stop asking" (shown while an ask or Compare runs) gives up the page's asks asked for
    before it was pressed: the card keeps the answer it showed and says the ask was stopped. A Stop
    pressed before an ask was asked for, or on another page, stops nothing."""
    from types import SimpleNamespace

    from app import handlers as h

    page, other = SimpleNamespace(session_hash="stop-ask"), SimpleNamespace(session_hash="stop-ask-other")
    shown = h.load_case(ABDOMEN, None, None, engine=engine, store=store, request=page)
    first = _ask(engine, shown)
    assert first["session"].answer is not None
    real_answer, press = engine.predictor.answer, {"on": False}

    def slow(rows, *a, on_step=None, on_layer=None, **k):       # 0.3 s a token
        def step(n):
            if press["on"]:
                h.stop_asking(request=page)
            time.sleep(0.3)
            return on_step(n)
        return real_answer(rows, *a, on_step=step, on_layer=on_layer, **k)

    monkeypatch.setattr(engine.predictor, "answer", slow)

    def ask(request=page, **kw):
        assert h.show_ask_stop(request=request)["stop_ask"]["visible"] is True
        return h.ask(first["session"], shown["view"], "Is the spleen enlarged?", "Auto", 300, 25, 0.5,
                     *SLICE_CONTROLS, request=request, engine=engine)

    before = first["session"].answer
    press["on"] = True                                  # pressed while the answer is written
    t0 = time.perf_counter()
    out = ask()
    assert time.perf_counter() - t0 < 3.0
    assert "Stopped at your request" in out["card"] and "cyst" in html.unescape(out["card"]).lower()
    assert first["session"].answer is before            # the answer shown stays the session's
    press["on"] = False
    h.stop_asking(request=page)                         # pressed before this ask was asked for
    time.sleep(0.01)
    assert "Stopped" not in ask()["card"]
    h.show_ask_stop(request=other)
    h.stop_asking(request=page)                         # another page's Stop
    assert "Stopped" not in h.ask(first["session"], shown["view"], "Is the spleen enlarged?", "Auto", 300,
                                  25, 0.5, *SLICE_CONTROLS, request=other, engine=engine)["card"]
    press["on"] = True                                  # Compare, stopped the same way
    h.show_ask_stop(request=page)
    cmp = h.compare(first["session"], "Is the liver enlarged?", request=page, engine=engine)
    assert "Not compared: Stopped at your request" in cmp["cmp_table"]
    # two asks of a page at once: the button stays while the second still runs
    two = SimpleNamespace(session_hash="stop-ask-two")
    h.show_ask_stop(request=two), h.show_ask_stop(request=two)
    assert h.hide_ask_stop(request=two)["stop_ask"]["visible"] is True
    assert h.hide_ask_stop(request=two)["stop_ask"]["visible"] is False
