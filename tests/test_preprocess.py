"""The official preparation (reproduced against the reference's fixture) and Geometry round trips."""
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from photon_core.io.preprocess import load_step, patchify, prepare
from photon_core.io.volume import volume_from_array


def test_load_step_reproduces_official_fixture(parity_dir, abdomen):
    """Reference: SimpleITK array (z,y,x) of example_ct -> monai Resize/ScaleIntensity -> flip W.

    Tolerance stated by the fixture: 1e-5 (we measure exact equality on this CPU)."""
    fx = load_file(str(parity_dir / "preprocess" / "preprocess.safetensors"))
    frames = load_step(abdomen.hu.transpose(2, 1, 0))          # nibabel (i,j,k) -> SimpleITK (z,y,x)
    assert frames.shape == (140, 1, 280, 280)
    rows, grid = patchify(frames)
    assert grid.tolist() == fx["video_grid_thw"].tolist() == [[10, 20, 20]]
    idx = fx["pixel_values_videos.sample_indices"]
    assert torch.allclose(rows[idx], fx["pixel_values_videos.sample_patches"], atol=1e-5)
    stats = torch.stack([rows.mean(1), rows.std(1), rows.min(1).values, rows.max(1).values], 1)
    assert torch.allclose(stats, fx["pixel_values_videos.patch_stats"], atol=1e-5)
    s = frames[:, 0].flatten(1)
    sl = torch.stack([s.mean(1), s.std(1), s.min(1).values, s.max(1).values], 1)
    assert torch.allclose(sl, fx["volume.slice_stats"], atol=1e-5)
    assert torch.allclose(frames[70, 0, ::4, ::4], fx["volume.center_slice_downsampled"], atol=1e-5)


def test_patchify_row_order():
    """Rows: t, h/2, w/2, h%2, w%2; inside a row: channel, temporal, y, x (Qwen2-VL processor)."""
    frames = torch.arange(28 * 56 * 56, dtype=torch.float32).reshape(28, 1, 56, 56)
    rows, grid = patchify(frames)
    assert grid.tolist() == [[2, 4, 4]] and rows.shape == (32, 2744)
    # row 1 = (t0, bh0, bw0, mh0, mw1): the patch at y 0..13, x 14..27
    assert torch.equal(rows[1].reshape(14, 14, 14), frames[:14, 0, :14, 14:28])
    # row 4 = (t0, bh0, bw1, mh0, mw0): x 28..41
    assert torch.equal(rows[4].reshape(14, 14, 14), frames[:14, 0, :14, 28:42])


def test_prepare_shapes_and_range(abdomen):
    p = prepare(abdomen, "cpu")
    assert p.frames.shape == (140, 1, 280, 280) and p.pixel_values.shape == (4000, 2744)
    assert float(p.frames.min()) == 0.0 and float(p.frames.max()) == 1.0


@pytest.mark.parametrize("axcodes_affine", [
    np.diag([3.0, 3.0, 3.0, 1.0]),                                   # RAS, 3 mm
    np.array([[-1.5, 0, 0, 10], [0, -1.5, 0, 20], [0, 0, 2.0, -30], [0, 0, 0, 1]]),   # LPS-like
    np.array([[0, 0, 2.5, 0], [1.2, 0, 0, 0], [0, -0.9, 0, 0], [0, 0, 0, 1]]),        # permuted axes
])
def test_geometry_round_trip_point_lands_in_right_block(axcodes_affine):
    """A bright point marked in the ORIGINAL scan lands in the token block Geometry predicts."""
    shape = (90, 100, 70)
    hu = np.full(shape, -1000.0, np.float32)
    ijk = np.array([60, 30, 41])
    hu[ijk[0] - 1:ijk[0] + 2, ijk[1] - 1:ijk[1] + 2, ijk[2] - 1:ijk[2] + 2] = 1000.0
    vol = volume_from_array(hu, axcodes_affine)
    p = prepare(vol, "cpu")
    g = p.geometry
    # the brightest model voxel maps back onto the marked original voxel (within a voxel)
    f = p.frames[:, 0]
    dhw = np.unravel_index(int(torch.argmax(f)), f.shape)
    back = g.model_to_original(np.array(dhw))[0]
    assert np.abs(back - ijk).max() <= 2.5
    # original -> model -> original is the identity
    pts = np.array([[0, 0, 0], [10.5, 20.25, 30], [89, 99, 69]], float)
    assert np.allclose(g.model_to_original(g.original_to_model(pts)), pts, atol=1e-6)
    # the block predicted for the marked voxel holds the brightest patch rows
    cell = g.token_of_original_voxel(ijk)[0]
    tok = cell[0] * 100 + cell[1] * 10 + cell[2]
    merged = p.pixel_values.reshape(1000, 4, -1).amax((1, 2))
    assert int(torch.argmax(merged)) == tok
    # the token index volume agrees
    assert g.token_index_volume()[tuple(ijk)] == tok


def test_geometry_world_coordinates(abdomen):
    p = prepare(abdomen, "cpu")
    g = p.geometry
    x = np.array([[12.0, 40.0, 60.0]])
    world = x @ abdomen.affine[:3, :3].T + abdomen.affine[:3, 3]
    assert np.allclose(g.world_to_model(world), g.original_to_model(x), atol=1e-6)
    # 1 model voxel = 2.6 mm along d and 1.3 mm along h, w (364 mm field of view)
    col = np.linalg.norm(g.model_to_world[:3, :3], axis=0)
    assert np.allclose(col, [2.6, 1.3, 1.3], atol=1e-6)
    corners = g.token_block_corners(0, 0, 0)
    ext = corners.max(0) - corners.min(0)
    assert np.allclose(sorted(ext), [36.4, 36.4, 36.4], atol=1e-6)


def test_rai_orientation_convention():
    """After prep: d runs superior->inferior, h posterior->anterior, w (after the flip) right->left."""
    vol = volume_from_array(np.zeros((40, 40, 40), np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    m = prepare(vol, "cpu").geometry.model_to_world
    assert m[2, 0] < 0      # +d -> -z (inferior)
    assert m[1, 1] > 0      # +h -> +y (anterior)
    assert m[0, 2] < 0      # +w -> -x (patient left, radiological display)


@pytest.mark.parametrize("shape,grid", [((140, 280, 280), (10, 10, 10)), ((56, 112, 112), (4, 4, 4))])
def test_block_fractions_bool_fast_path_equals_the_mean(shape, grid):
    from photon_core.io.preprocess import block_fractions
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(shape, generator=g) > 0.8
    mask[:14] = True                                   # a full first slab of blocks
    from photon_core.io.preprocess import blocks
    fast, slow = block_fractions(mask, grid), blocks(mask.float(), grid).mean((1, 3, 5)).flatten()
    assert fast.shape == (grid[0] * grid[1] * grid[2],) and torch.allclose(fast, slow, atol=1e-6)
    assert torch.all(fast[: grid[1] * grid[2]] == 1.0)


@pytest.mark.parametrize("perm", [(0, 1, 2), (2, 0, 1), (1, 2, 0)])
def test_the_token_index_volume_is_the_general_mapping_voxel_for_voxel(abdomen, perm):
    """Every original voxel's token block, worked out per axis (the preparation only reorients, resamples
    and crops each axis; 45 s → 0.2 s for 512 × 512 × 300), equals the general mapping of every voxel
    through the 4 × 4 transform: any orientation, flips, odd spacings, a scan smaller than the model's
    field and one larger."""
    import dataclasses

    from photon_core.io.preprocess import Geometry

    rng = np.random.default_rng(sum(perm))
    for crop, flips, mm in [((60, 101, 40), (1, -1, 1), (0.5, 1.5)), (None, (-1, 1, -1), (3.2, 3.6))]:
        hu = abdomen.hu if crop is None else abdomen.hu[:crop[0], :crop[1], :crop[2]]
        affine = np.eye(4)
        affine[:3, :3] = 0
        for r, c in enumerate(perm):
            affine[c, r] = flips[c] * rng.uniform(*mm)
        affine[:3, 3] = rng.uniform(-100, 100, 3)
        g = prepare(dataclasses.replace(abdomen, hu=np.ascontiguousarray(hu), affine=affine), "cpu").geometry
        inv = np.linalg.inv(g.model_to_orig)
        general = Geometry._token_index_general(g.orig_shape, inv[:3, :3].T.astype(np.float32),
                                                inv[:3, 3].astype(np.float32))
        fast = g.token_index_volume()
        assert fast.dtype == general.dtype == np.int16 and fast.shape == general.shape == hu.shape
        assert np.array_equal(fast, general)
        assert (general == -1).any() == (crop is None)       # only the large scan reaches outside the field
        assert len(np.unique(general)) > 8
        _token_map_reads_as_its_volume(g.token_map(), general, affine, rng)


def _token_map_reads_as_its_volume(tm, whole, affine, rng):
    """A `TokenMap` held as its 1-D lookups reads, part by part, as the whole volume it stands for: planes
    and boxes, on its own grid and reoriented to RAS, the voxels of a token, the tokens it covers."""
    from photon_core.inference.audit import covered_tokens
    from photon_core.io.orientation import reorient

    assert tm.parts is not None and tm.shape == whole.shape
    ras, to_source = tm.reoriented(affine, "RAS")
    want, want_to_source = reorient(whole, affine, "RAS")
    assert np.array_equal(to_source, want_to_source) and ras.shape == want.shape
    for m, w in ((tm, whole), (ras, want)):
        assert np.array_equal(m.whole(), w)
        for axis in range(3):
            for i in (0, w.shape[axis] // 2, -1):
                index = tuple(i if a == axis else slice(None) for a in range(3))
                assert np.array_equal(m[index], w[index]), index
        box = tuple(slice(int(rng.integers(0, n // 2)), int(rng.integers(n // 2, n))) for n in w.shape)
        assert np.array_equal(m[box], w[box]) and np.array_equal(m[3, 4], w[3, 4])
        assert m[1, 2, 3] == w[1, 2, 3]
        for token in (*rng.choice(np.unique(w[w >= 0]), 3), 1000):
            assert np.array_equal(m.voxels_of(int(token)), np.argwhere(w == token)), token
    assert np.array_equal(tm.covered(1000), covered_tokens(whole))


def test_the_preparation_reports_each_axis_and_stops_where_its_step_raises(abdomen, monkeypatch):
    """A server stops a load whose client is gone at its next step; the preparation (seconds on a large
    scan) was one step. It now tells ``step`` the share done after each axis, changes nothing by it, and
    stops where ``step`` raises, before the next axis."""
    from photon_core.io import preprocess

    told = []
    with_step = prepare(abdomen, "cpu", told.append)
    assert told == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert torch.equal(with_step.pixel_values, prepare(abdomen, "cpu").pixel_values)

    axes, real = [], preprocess._resample_axis
    monkeypatch.setattr(preprocess, "_resample_axis",
                        lambda x, axis, *a: axes.append(axis) or real(x, axis, *a))

    class Gone(Exception):
        pass

    def stop(done):
        raise Gone

    with pytest.raises(Gone):
        prepare(abdomen, "cpu", stop)
    assert len(axes) == 1
