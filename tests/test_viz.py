"""viz: valid GLB with BLEND materials, off-screen PNG, overlays and exports on the original grid."""
import json

import nibabel as nib
import numpy as np
import pytest
from conftest import SAMPLES, nifti_with_two_placements

from photon_core.inference.audit import export_audit, kept_mask_original, organ_retention
from photon_core.io.preprocess import TOKEN_GRID, prepare
from photon_core.io.volume import load_label_map, volume_from_array
from photon_core.organs import label_blocks, organs_in_question
from viz import scene as vs
from viz.glb import accessor, read_glb
from viz.slices import pick, slice_rgb, to_ras, triplanar


@pytest.fixture(scope="module")
def phantom():
    """A 3 mm LPS phantom: body cylinder with a bright 'organ' at a known place."""
    hu = np.full((100, 90, 80), -1000.0, np.float32)
    ii, jj = np.meshgrid(np.arange(100), np.arange(90), indexing="ij")
    body = (ii - 50) ** 2 + (jj - 45) ** 2 < 35 ** 2
    hu[body] = 40.0
    hu[60:75, 30:45, 20:40] = 600.0
    labels = np.zeros(hu.shape, np.int16)
    labels[60:75, 30:45, 20:40] = 5
    aff = np.array([[-3.0, 0, 0, 150], [0, -3.0, 0, 140], [0, 0, 3.0, -100], [0, 0, 0, 1]])
    vol = volume_from_array(hu, aff)
    prep = prepare(vol, "cpu")
    return vol, labels, prep


def _corners(geom):
    return np.stack([geom.token_block_corners(a, b,
                                              c) for a in range(10) for b in range(10) for c in range(10)])


def test_glb_is_binary_gltf_with_blend(phantom):
    vol, labels, prep = phantom
    surf = vs.anatomy_surfaces(vol.hu, vol.affine, labels, {"5": "liver"})
    keep = np.zeros(1000, bool)
    keep[[5, 123, 456]] = True
    rho = np.linspace(0, 1, 1000)
    scene = vs.AnatomyScene.build(surf, vs.orientation_marker(vs.world_bounds(vol.shape, vol.affine)))
    js, binary = read_glb(scene.glb(vs.kept_region(_corners(prep.geometry), keep, rho)))
    assert js["asset"]["version"] == "2.0"
    names = [m["name"] for m in js["meshes"]]
    assert {"body", "bone", "liver"} <= set(names) and any(n.startswith("kept") for n in names)
    assert {f"marker {x}" for x in "RLAPSI"} <= set(names)
    kept_mats = [m for m in js["materials"] if m["name"].startswith("kept")]
    assert kept_mats and all(m["alphaMode"] == "BLEND" for m in kept_mats)
    assert js["buffers"][0]["byteLength"] == len(binary)
    # three separate kept blocks = 3 boxes × 6 faces × 2 triangles
    tri = sum(js["accessors"][p["indices"]]["count"] // 3 for m in js["meshes"]
              if m["name"].startswith("kept") for p in m["primitives"])
    assert tri == 36


def test_kept_region_draws_only_outer_faces(phantom):
    """Two neighbouring kept blocks share a face that is not drawn: 10 quads, not 12."""
    vol, labels, prep = phantom
    keep = np.zeros(1000, bool)
    keep[[0, 1]] = True                                  # (0, 0, 0) and (0, 0, 1)
    items = vs.kept_region(_corners(prep.geometry), keep, np.full(1000, 0.7))
    assert sum(i["mesh"].n_cells for i in items) == 10
    full = vs.kept_region(_corners(prep.geometry), np.ones(1000, bool), np.full(1000, 0.7))
    assert sum(i["mesh"].n_cells for i in full) == 6 * 100    # everything kept: the grid's hull only


def test_marker_letters_sit_on_their_sides_of_the_patient(phantom):
    """R is beyond the patient's right (+x in RAS, +x in glTF), S above (glTF +y), A in front (glTF −z)."""
    vol, labels, prep = phantom
    lo, hi = vs.world_bounds(vol.shape, vol.affine)
    scene = vs.AnatomyScene.build([], vs.orientation_marker(np.stack([lo, hi])))
    js, binary = read_glb(scene.glb())
    centre = {}
    for m in js["meshes"]:
        pos = accessor(js, binary, m["primitives"][0]["attributes"]["POSITION"])
        centre[m["name"]] = pos.mean(0)
    mid = (lo + hi) / 2
    assert centre["marker R"][0] > hi[0] and centre["marker L"][0] < lo[0]
    assert centre["marker S"][1] > hi[2] and centre["marker I"][1] < lo[2]
    assert centre["marker A"][2] < -hi[1] and centre["marker P"][2] > -lo[1]
    assert abs(centre["marker R"][1] - mid[2]) < 1e-3 * (hi - lo).max() + 5


def test_triplanar_click_moves_the_crosshair_to_the_clicked_voxel(phantom):
    vol, labels, prep = phantom
    hu_ras, sp = to_ras(vol.hu, vol.affine)
    point = (30, 40, 50)
    img, layout = triplanar(hu_ras, sp, point, (400, 40))
    assert img.shape[:2] == (layout.size[1], layout.size[0])
    for panel in layout.panels:                       # a click at another voxel of each plane
        target = (10, 20, 30)
        from viz.slices import _to_pixel

        x, y = _to_pixel(panel, target)
        new = pick(layout, x, y, point)
        moved = {"axial": (0, 1), "coronal": (0, 2), "sagittal": (1, 2)}[panel.view]
        for ax in range(3):
            assert new[ax] == (target[ax] if ax in moved else point[ax]), (panel.view, new)
    assert pick(layout, layout.size[0] + 5, 0, point) is None


def test_triplanar_is_radiological_and_windows_freely(phantom):
    """The patient's right is on the image left of the axial and coronal planes; W/L is any pair."""
    vol, labels, prep = phantom
    hu_ras, sp = to_ras(vol.hu, vol.affine)
    right = np.zeros(hu_ras.shape, bool)
    right[-20:] = True                                  # RAS i high = patient right
    img, layout = triplanar(hu_ras, sp, np.array(hu_ras.shape) // 2, (1, 39), overlay=right, opacity=1.0)
    axial = layout.panels[0]
    half = img[axial.y0:axial.y0 + axial.h, axial.x0:axial.x0 + axial.w]
    green = (half[..., 1] > 150) & (half[..., 0] < 100)
    assert green[:, : axial.w // 2].sum() > 10 * green[:, axial.w // 2:].sum()
    narrow, _ = triplanar(hu_ras, sp, np.array(hu_ras.shape) // 2, (1, 39))
    wide, _ = triplanar(hu_ras, sp, np.array(hu_ras.shape) // 2, (4000, 0))
    assert (narrow != wide).any()


def test_png_renders_offscreen(phantom):
    vol, labels, prep = phantom
    png = vs.render_png(vs.anatomy_surfaces(vol.hu, vol.affine), [], size=(200, 150), view="anterior")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import io

    from PIL import Image

    im = np.asarray(Image.open(io.BytesIO(png)))
    assert im.shape[:2] == (150, 200) and im.std() > 5          # something was drawn


def test_overlay_lands_on_the_right_voxels(phantom):
    """Keep only the block holding the bright organ: the overlay covers the organ, not the far corner."""
    vol, labels, prep = phantom
    g = prep.geometry
    tok = g.token_index_volume()
    organ_tokens = np.unique(tok[labels == 5])
    keep = np.zeros(1000, bool)
    keep[organ_tokens] = True
    mask = kept_mask_original(tok, keep)
    assert mask[labels == 5].all()
    assert mask.mean() < 0.5
    # the slice overlay uses the same mask reoriented like the scan
    hu_ras, sp = to_ras(vol.hu, vol.affine)
    m_ras, _ = to_ras(mask, vol.affine)
    img = slice_rgb(hu_ras, sp, "axial", 30 / 79, "Soft tissue", m_ras, opacity=1.0, colour=(0, 1, 0),
                    out_px=300)
    assert img.shape[2] == 3 and (img[..., 1] > 200).any()


def test_retention_and_organ_words(phantom):
    vol, labels, prep = phantom
    tok = prep.geometry.token_index_volume()
    blocks, small = label_blocks(tok, labels, {"5": "liver"})
    assert small == []
    keep = np.zeros(1000, bool)
    keep[np.flatnonzero(blocks["liver"])[:1]] = True
    r = organ_retention(blocks, keep)["liver"]
    assert 0 < r < 1 and abs(r - 1 / blocks["liver"].sum()) < 1e-9
    names = ["liver", "kidney_left", "kidney_right", "lung_upper_lobe_left"]
    assert organs_in_question("Is there a lesion in the liver?", names) == ["liver"]
    assert organs_in_question("Which kidney is larger?", names) == ["kidney_left", "kidney_right"]
    assert organs_in_question("Cyst in the left kidney?", names) == ["kidney_left"]
    assert organs_in_question("Is there a nodule in the left lung?", names) == ["lung_upper_lobe_left"]


def test_export_mask_aligns_with_the_original_scan(phantom, tmp_path):
    vol, labels, prep = phantom
    tok = prep.geometry.token_index_volume()

    class A:  # minimal answer
        text, budget, total, theta, prefill_s, decode_s, device = "yes", "auto", 1000, 0.4, 0.1, 0.2, "cpu"
        prior_total = 0                                   # no prior scan
        keep_grid = np.zeros(TOKEN_GRID, bool)
    A.keep_grid.ravel()[np.unique(tok[labels == 5])] = True
    A.kept = int(A.keep_grid.sum())
    A.keep_fraction = A.kept / 1000
    A.kept_indices = np.flatnonzero(A.keep_grid).tolist()
    paths = export_audit(tmp_path, prep.geometry, tok, A, "Is there a lesion in the liver?", "demo",
                         {"liver": 1.0}, {"view3d": b"\x89PNG"},
                         case_title="/home/someone/patient_jane.nii.gz")
    img = nib.load(str(tmp_path / "kept_blocks.nii.gz"))
    assert img.shape == vol.shape and np.allclose(img.affine, vol.affine)
    assert np.asarray(img.dataobj)[labels == 5].all()
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["visual_tokens_kept"] == A.kept and rep["per_organ_retention"] == {"liver": 1.0}
    assert rep["kept_tokens_outside_scan"] == 0                   # the liver's blocks are in the scan
    assert "/home" not in json.dumps(rep)
    assert {p.name for p in paths} == {"kept_blocks.nii.gz", "report.json", "view3d.png"}


def test_export_carries_the_scans_qform_and_sform(tmp_path):
    """A NIfTI whose qform and sform disagree (a registration that updated one): nibabel, and so the app,
    places it by the sform, ITK (3D Slicer) by the qform unless the sform's code is 1. The mask written
    with the sform alone lay 20 mm off the scan there; written with both and their codes, every reader
    places mask and scan alike."""
    from photon_core.io.volume import load_volume

    hu = np.full((48, 44, 32), -1000, np.int16)
    hu[8:40, 6:38, 4:28] = 40
    qform, sform = nifti_with_two_placements(tmp_path / "scan.nii.gz", hu)
    vol = load_volume(tmp_path / "scan.nii.gz")
    prep = prepare(vol, "cpu")

    class A:  # minimal answer: every block kept
        text, budget, total, theta, prior_total = "yes", "full", 1000, 0.4, 0
        prefill_s, decode_s, device = 0.1, 0.2, "cpu"
        keep_grid = np.ones(TOKEN_GRID, bool)
        kept, keep_fraction, kept_indices = 1000, 1.0, list(range(1000))

    export_audit(tmp_path / "out", prep.geometry, prep.geometry.token_index_volume(), A, "Lesion?", "demo")
    out = nib.load(str(tmp_path / "out" / "kept_blocks.nii.gz")).header
    inside = np.unique(prep.geometry.token_index_volume())
    outside = 1000 - inside[inside >= 0].size                      # a 96 mm scan in the model's field
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["kept_tokens_outside_scan"] == outside > 0
    for get, want, code in ((out.get_qform, qform, 1), (out.get_sform, sform, 2)):
        got, got_code = get(coded=True)
        assert got_code == code and np.allclose(got, want)


def test_label_map_in_another_axis_order_is_moved_onto_the_scan():
    from photon_core.io.volume import load_volume

    dcm = load_volume(SAMPLES / "dicom_ct/series")
    labels, aff = load_label_map(SAMPLES / "dicom_ct/labels.nii.gz", like=dcm)
    assert labels.shape == dcm.shape and np.allclose(aff, dcm.affine, atol=1e-2)


def test_the_retention_chart_reads_as_words_and_percent_the_asked_structure_on_top():
    from viz.charts import retention_bars

    fig = retention_bars({"rib_left_12": 0.5, "kidney_left": 0.2, "liver": 0.9, "spleen": 0.1},
                         asked="kidney_left", small=("rib_left_12",))
    bar = fig.data[0]
    assert list(bar.y) == ["spleen", "rib left 12 ◦", "liver", "kidney left (asked)"]   # drawn bottom up
    assert list(bar.x) == [10, 50, 90, 20] and fig.layout.xaxis.range == (0, 100)
    assert bar.marker.color[-1] == "#d62728"                    # the asked structure, below half: red


def test_names_from_a_users_table_reach_the_charts_as_text_not_markup():
    """Plotly reads a label as pseudo-HTML: a names table's '<a href=…>liver</a>' drew a link to another site
    labelled 'liver', '<b>' bold text, '<br>' a line break. Names and answers reach plotly escaped, so the
    chart shows what the table says (as the status line and the legend do)."""
    from viz.charts import kept_vs_budget, retention_bars

    evil = "<a href='https://example.org/login'>liver</a> & <b>x</b>"
    bar = retention_bars({evil: 0.5, "spleen": 0.2}, asked=[evil]).data[0]
    shown = "&lt;a href='https://example.org/login'&gt;liver&lt;/a&gt; &amp; &lt;b&gt;x&lt;/b&gt; (asked)"
    assert shown in bar.y
    assert not any("<" in label for label in bar.y)
    line = kept_vs_budget([{"budget": "Auto", "kept": 10, "total": 1000, "answer": "<b>yes</b>"}]).data[0]
    assert list(line.text) == ["&lt;b&gt;yes&lt;/b&gt;"]


def test_no_two_structures_drawn_share_a_colour():
    """The legend named spleen and a lung lobe in one blue: 8 colours for up to 10 structures."""
    import inspect

    from viz.scene import ORGAN_COLOURS, anatomy_surfaces

    limit = inspect.signature(anatomy_surfaces).parameters["max_organs"].default
    assert len(set(ORGAN_COLOURS)) == len(ORGAN_COLOURS) >= limit


def test_anterior_png_shows_the_patient_from_the_front(phantom):
    """The exported anterior view: the patient's right on the image left, superior up, as on the slices
    and the marker letters. A sphere at the right-superior corner of the scan's box lands in the image's
    upper left quadrant, one at the left-inferior corner in the lower right."""
    import io

    from PIL import Image

    vol, _, _ = phantom
    lo, hi = vs.world_bounds(vol.shape, vol.affine)
    pv = vs._pv()
    r = 0.08 * float((hi - lo).max())
    mid = (lo + hi) / 2
    spheres = [dict(name=name, mesh=pv.Sphere(radius=r, center=c), rgba=(*rgb, 1.0)) for name, c, rgb in (
        ("right-superior", (hi[0] - r, mid[1], hi[2] - r), (1.0, 0.0, 0.0)),
        ("left-inferior", (lo[0] + r, mid[1], lo[2] + r), (0.0, 0.0, 1.0)))]
    edges = pv.Box(bounds=(lo[0], hi[0], lo[1], hi[1], lo[2], hi[2])).extract_all_edges()
    box = [dict(name="box", mesh=edges, rgba=(0.5, 0.5, 0.5, 1.0))]
    im = np.asarray(Image.open(io.BytesIO(vs.render_png(box, spheres, size=(240, 240), view="anterior",
                                                        colour_bar=False))).convert("RGB")).astype(int)

    def centre(rgb):
        hit = (np.abs(im - np.array(rgb) * 255).sum(-1) < 150) & (im.max(-1) > 90)
        assert hit.sum() > 20, rgb
        ys, xs = np.nonzero(hit)
        return xs.mean() / im.shape[1], ys.mean() / im.shape[0]

    rx, ry = centre((1.0, 0.0, 0.0))
    lx, ly = centre((0.0, 0.0, 1.0))
    assert rx < 0.5 < lx and ry < 0.5 < ly, ((rx, ry), (lx, ly))


def test_an_organs_surface_is_the_one_of_its_whole_mask():
    """A label's surface is contoured from the strided label map's mask (the whole scan's mask, as a
    float32 copy per organ, cost ≈ 0.3 s an organ at 512 × 512 × 300): the same mesh, point for point."""
    from conftest import SAMPLES

    from photon_core.io.volume import load_label_map, load_volume

    vol = load_volume(SAMPLES / "abdomen_ct/ct.nii.gz")
    labels, _ = load_label_map(SAMPLES / "abdomen_ct/labels.nii.gz", like=vol)
    big = np.repeat(labels, 2, axis=0)                     # over 128 voxels on an axis: strided
    for lab in (labels, big):
        for lid in np.unique(lab)[1:4]:
            whole = vs._contour((lab == lid).astype(np.float32), 0.5, vol.affine, 128, smooth=10,
                                max_triangles=6_000)
            strided = vs._contour(lab, 0.5, vol.affine, 128, smooth=10, max_triangles=6_000,
                                  values=lambda sub, lid=lid: sub == lid)
            assert whole.n_points > 0 and np.array_equal(np.asarray(whole.points), np.asarray(strided.points))
            assert np.array_equal(np.asarray(whole.faces), np.asarray(strided.faces))


@pytest.mark.parametrize("k", [390, 137, 50])
def test_the_saliency_histogram_cuts_where_the_budget_cut_and_its_labels_read_over_the_bars(k):
    """Each trace binned on its own, a bin straddling the cut drew kept tokens left of the red line; and
    the grey θ label lay on the bars unread. The bins are shared and the cut is one of their edges; the
    labels have a white ground."""
    from viz.charts import saliency_histogram

    rho = np.random.default_rng(k).random(1000)
    order = np.argsort(-rho)
    keep = np.zeros(1000, bool)
    keep[order[:k]] = True
    cut = float(rho[order[k - 1]])
    fig = saliency_histogram(rho, 0.4, keep, cut=cut)
    bins = [t.xbins for t in fig.data]
    assert all(b is not None and b.size == bins[0].size and b.start == bins[0].start for b in bins)
    edge = (cut - bins[0].start) / bins[0].size
    assert abs(edge - round(edge)) < 1e-6                                  # the cut is a bin edge
    index = np.floor((rho - bins[0].start) / bins[0].size + 1e-9)
    assert not set(index[keep]) & set(index[~keep])                       # no bin holds both
    assert bins[0].start <= rho.min() and bins[0].end >= rho.max()
    assert len(fig.layout.annotations) == 2 and all(a.bgcolor for a in fig.layout.annotations)
