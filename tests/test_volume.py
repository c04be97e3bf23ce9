"""Loading every sample; a clear error for every kind of bad input and a warning for every doubtful one,
none naming a server path; DICOM uploads holding several series, as a PACS exports them."""
import gzip
import json
import re
import shutil
import time
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import SAMPLES, nifti_with_two_placements

from photon_core.io.volume import (
    HU_RANGE,
    NONFINITE_HU,
    Limits,
    VolumeError,
    clean_text,
    list_series,
    load_label_map,
    load_volume,
    volume_from_array,
)

CASES = json.loads((SAMPLES / "cases.json").read_text())["cases"]
ABSOLUTE_PATH = re.compile(r"(^|[\s'\"(=])(/[\w.~-]+/|[A-Za-z]:\\|~/)")


def no_paths(text: str, tmp_path) -> str:
    """A message or warning shows no server path: not the test's temporary folder, nor any absolute path."""
    assert str(tmp_path) not in text and tmp_path.name not in text, text
    assert not ABSOLUTE_PATH.search(text), text
    return text


def refused(tmp_path, source, match, **kw) -> str:
    with pytest.raises(VolumeError, match=match) as e:
        load_volume(source, **kw)
    return no_paths(str(e.value), tmp_path)


def warned(tmp_path, vol, match) -> str:
    hits = [w for w in vol.warnings if re.search(match, w)]
    assert len(hits) == 1, vol.warnings
    for w in vol.warnings:
        no_paths(w, tmp_path)
    return hits[0]


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_every_sample_loads(case):
    vol = load_volume(SAMPLES / case["file"])
    assert vol.hu.dtype == np.int16 and vol.hu.ndim == 3                  # whole HU: kept as int16
    assert np.allclose(vol.spacing, case["spacing_mm"], atol=0.01)
    assert -1300 < vol.hu.min() < -900 and 1000 < vol.hu.max() < 4000      # HU, rescale applied
    labels, aff = load_label_map(SAMPLES / case["label_map"])
    assert labels.shape == vol.shape
    for lid in case["labels"]:
        assert (labels == int(lid)).any()
    assert vol.warnings == []          # a good scan loads without a word of warning


def test_sample_orientations():
    assert load_volume(SAMPLES / "abdomen_ct/ct.nii.gz").orientation == "RAS"
    assert load_volume(SAMPLES / "chest_aorta_ct/ct.nii.gz").orientation == "LPS"
    dcm = load_volume(SAMPLES / "dicom_ct/series")
    assert dcm.shape == (512, 512, 20) and dcm.source_format == "dicom"
    assert dcm.meta["Modality"] == "CT"
    assert not any(k.lower().startswith("patient") for k in dcm.meta)


def test_dicom_aligns_with_its_nifti_label_map():
    """The JPEG2000 DICOM series and TotalSegmentator's label map must sit on the same world grid."""
    dcm = load_volume(SAMPLES / "dicom_ct/series")
    img = nib.load(str(SAMPLES / "dicom_ct/labels.nii.gz"))
    # every voxel centre of the label map maps to a voxel centre of the DICOM volume
    corners = np.array([[0, 0, 0], [511, 0, 0], [0, 511, 19], [511, 511, 19], [100, 200, 7]], float)
    world = corners @ img.affine[:3, :3].T + img.affine[:3, 3]
    ijk = (world - dcm.affine[:3, 3]) @ np.linalg.inv(dcm.affine[:3, :3]).T
    assert np.allclose(ijk, np.round(ijk), atol=1e-3)
    assert ((ijk >= -1e-3) & (ijk <= np.array(dcm.shape) - 1 + 1e-3)).all()
    # and the liver label covers soft tissue (HU 0..200) in the DICOM at the mapped voxels
    lab = np.asanyarray(img.dataobj)
    pts = np.argwhere(lab == 5)[::50].astype(float)
    w = pts @ img.affine[:3, :3].T + img.affine[:3, 3]
    q = np.round((w - dcm.affine[:3, 3]) @ np.linalg.inv(dcm.affine[:3, :3]).T).astype(int)
    hu = dcm.hu[q[:, 0], q[:, 1], q[:, 2]]
    assert 0 < np.median(hu) < 200


def test_a_label_map_in_another_axis_order_is_moved_onto_the_scan():
    dcm = load_volume(SAMPLES / "dicom_ct/series")                      # LPS; its label map is LAS
    labels, affine = load_label_map(SAMPLES / "dicom_ct/labels.nii.gz", like=dcm)
    assert labels.shape == dcm.shape and np.allclose(affine, dcm.affine, atol=1e-2)
    assert 0 < np.median(dcm.hu[labels == 5]) < 200                     # the liver lands on soft tissue


# ------------------------------------------------------------------ bad inputs: refused in words

def _nifti(tmp_path, arr, name="x.nii.gz", affine=None, scaling=None):
    p = tmp_path / name
    nib.save(nib.Nifti1Image(arr, np.eye(4) if affine is None else affine), str(p))
    if scaling is not None:          # nibabel writes no NaN slope beside a real intercept: patch the header
        data = bytearray(gzip.decompress(p.read_bytes()) if name.endswith(".gz") else p.read_bytes())
        data[112:120] = np.array(scaling, "<f4").tobytes()          # scl_slope, scl_inter
        p.write_bytes(gzip.compress(bytes(data)) if name.endswith(".gz") else bytes(data))
    return p


def _ct_like(shape=(20, 20, 20), seed=0):
    """HU values as a CT has them: air, fat, soft tissue, bone (thousands of distinct values)."""
    return np.random.default_rng(seed).uniform(-1000, 1500, shape).astype(np.float32)


def test_2d_image(tmp_path):
    refused(tmp_path, _nifti(tmp_path, np.zeros((64, 64), np.int16)), "2-D image")


def test_single_slice(tmp_path):
    refused(tmp_path, _nifti(tmp_path, np.zeros((64, 64, 1), np.int16)), "2-D image")


def test_4d_series(tmp_path):
    refused(tmp_path, _nifti(tmp_path, np.zeros((32, 32, 32, 3), np.int16)), "4-D series")


def test_too_few_slices(tmp_path):
    refused(tmp_path, _nifti(tmp_path, np.zeros((64, 64, 8), np.int16)), "at least 16")


def test_complex_voxels_are_refused(tmp_path):
    a = (_ct_like() + 1j * _ct_like(seed=1)).astype(np.complex64)
    msg = refused(tmp_path, _nifti(tmp_path, a), "complex numbers")
    assert "truncated" not in msg and "corrupt" not in msg
    with pytest.raises(VolumeError, match="complex"):
        volume_from_array(a)


def test_rgb_nifti_is_called_a_colour_image(tmp_path):
    rgb = np.zeros((20, 20, 20), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    msg = refused(tmp_path, _nifti(tmp_path, rgb, name="photo.nii"), "colour \\(RGB\\) image")
    assert "truncated" not in msg and "corrupt" not in msg


def test_a_picture_is_called_a_picture(tmp_path):
    p = tmp_path / "screenshot.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 200)
    refused(tmp_path, p, "'screenshot.png' is a PNG picture")


def test_a_file_named_otherwise_is_read_by_what_it_holds(tmp_path):
    ct = _ct_like()
    gz, plain = _nifti(tmp_path, ct, "a.nii.gz"), _nifti(tmp_path, ct, "b.nii")
    nib.Nifti2Image(ct, np.eye(4)).to_filename(str(tmp_path / "c.nii"))
    misnamed = {"scan.nii": gz, "scan.nii.gz": plain, "scan": gz, "download.bin": plain,
                "v2.nii.gz": tmp_path / "c.nii"}
    for name, src in misnamed.items():
        p = tmp_path / "up" / name
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(src.read_bytes())
        vol = load_volume(p)
        assert np.array_equal(vol.hu, load_volume(src).hu), name
        said = warned(tmp_path, vol, r"^The file holds .* data; it was read as such")
        assert name not in said          # the warnings go into report.json: an upload is never named there
    assert load_volume(gz).warnings == load_volume(plain).warnings == []      # named as they are: no word
    # a name over 200 bytes, as a browser upload cuts it ('….nii.gz' → '….gz'): named right, no word either
    cut = tmp_path / "up" / ("Abdomen_CT_" + "é" * 90 + ".gz")
    assert 190 < len(cut.name.encode()) <= 200
    cut.write_bytes(gz.read_bytes())
    assert load_volume(cut).warnings == [] and np.array_equal(load_volume(cut).hu, load_volume(gz).hu)
    labels = (ct > 500).astype(np.uint8)                                     # a label map, likewise
    lab = tmp_path / "up" / "labels.nii"
    lab.write_bytes(_nifti(tmp_path, labels, "labels.nii.gz").read_bytes())
    assert np.array_equal(load_label_map(lab, like=load_volume(gz))[0], labels)
    bad = tmp_path / "up" / "broken.nii"                                     # the error names the user's file
    bad.write_bytes(gz.read_bytes()[:1000])
    msg = refused(tmp_path, bad, "truncated or corrupt")
    assert "'broken.nii'" in msg and "broken.nii.gz" not in msg


def test_truncated_gzip(tmp_path):
    good = _nifti(tmp_path, np.random.randint(-1000, 1000, (40, 40, 40)).astype(np.int16))
    bad = tmp_path / "trunc.nii.gz"
    bad.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    refused(tmp_path, bad, "truncated|corrupt|not a readable")


def test_gzip_that_is_not_nifti(tmp_path):
    p = tmp_path / "notes.nii.gz"
    p.write_bytes(gzip.compress(b"hello, this is not an image" * 50))
    refused(tmp_path, p, "NIfTI")


def test_garbage_nifti_message_has_no_server_path(tmp_path):
    """nibabel's own message names the full path of the file (the server's upload cache): not shown."""
    p = tmp_path / "scan.nii"
    p.write_bytes(b"\x07garbage that is not a NIfTI header " * 40)
    msg = refused(tmp_path, p, "'scan.nii' is not a readable NIfTI file")
    assert msg.endswith(").")             # nibabel's text: path-free, and whole words when shortened


def test_not_gzip_at_all(tmp_path):
    p = tmp_path / "x.nii.gz"
    p.write_bytes(b"\x00\x01garbage" * 100)
    refused(tmp_path, p, "gzip")


def test_empty_file(tmp_path):
    p = tmp_path / "e.nii"
    p.write_bytes(b"")
    refused(tmp_path, p, "empty")


def test_unknown_format(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_bytes(b"hello, not a scan")
    refused(tmp_path, p, "not a supported CT file")


def test_header_claims_gigabytes(tmp_path):
    """A header announcing 2000³ voxels is refused before any data is read."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((2000, 2000, 2000))
    hdr.set_data_dtype(np.int16)
    p = tmp_path / "huge.nii"
    with open(p, "wb") as f:
        f.write(hdr.binaryblock + b"\x00" * 4 + b"\x00" * 1000)
    refused(tmp_path, p, "GB|limit")


def test_absurd_axis(tmp_path):
    with pytest.raises(VolumeError, match="per axis"):
        volume_from_array(np.zeros((3000, 16, 16), np.float32))


def test_configurable_limits():
    with pytest.raises(VolumeError):
        volume_from_array(np.zeros((64, 64, 64), np.float32), limits=Limits(max_bytes=1000))


def test_zero_size_dimension(tmp_path):
    refused(tmp_path, _nifti(tmp_path, np.zeros((0, 32, 32), np.int16)), "empty dimension")


def test_huge_upload_is_refused_before_reading(tmp_path):
    p = tmp_path / "big.nii"
    with open(p, "wb") as f:
        f.truncate(50_000_000)                      # sparse 50 MB file
    refused(tmp_path, p, "upload limit", limits=Limits(max_file_bytes=10_000_000))


def test_clean_text_drops_paths_and_cuts_at_a_word():
    text = "Cannot work out file type of \"/tmp/gradio/4f1e9a/upload cache/scan.nii\" in C:\\Users\\me\\x.nii"
    out = clean_text(text)
    assert "/tmp" not in out and "gradio" not in out and "Users" not in out and "scan.nii" in out
    assert clean_text("Abdomen/pelvis CT (3 mm)") == "Abdomen/pelvis CT (3 mm)"      # not a path
    cut = clean_text("the quick brown fox jumps over the lazy dog", 20)
    assert cut == "the quick brown fox…" and len(cut) <= 20
    assert clean_text("line\x00one\nline two\x1b[31m") == "line one line two [31m"


# ------------------------------------------------------------------ doubtful inputs: loaded, with a warning

def test_nan_and_inf_voxels_are_replaced_and_counted(tmp_path):
    a = _ct_like()
    a[3, 4, 5], a[1, 1, 1], a[2, 2, 2] = np.nan, np.inf, -np.inf
    vol = load_volume(_nifti(tmp_path, a))
    warned(tmp_path, vol, r"^3 voxels held no number")
    assert np.isfinite(vol.hu).all() and vol.hu[3, 4, 5] == vol.hu[1, 1, 1] == NONFINITE_HU


def test_values_far_outside_hu_are_clipped_with_a_warning(tmp_path):
    a = _ct_like()
    a[0, 0, :4] = [1e9, -1e9, 5e3, -3e3]
    vol = load_volume(_nifti(tmp_path, a))
    w = warned(tmp_path, vol, r"^4 voxels lay outside -2000…4000 HU")
    assert "1.0e+09" in w and "-1.0e+09" in w
    assert vol.hu.min() == HU_RANGE[0] and vol.hu.max() == HU_RANGE[1]


def test_scanner_padding_below_range_is_clipped_silently():
    a = _ct_like()
    a[:3] = -3024.0                                   # one value outside the field of view: padding
    vol = volume_from_array(a)
    assert vol.warnings == [] and vol.hu.min() == HU_RANGE[0]
    a[:3] = -1e9                                      # one value, but no scanner pads with that
    assert any("clipped" in w for w in volume_from_array(a).warnings)


def test_constant_volume(tmp_path):
    vol = load_volume(_nifti(tmp_path, np.full((20, 20, 20), 40, np.int16)))
    warned(tmp_path, vol, r"Every voxel holds the same value \(40 HU\)")


def test_boolean_mask():
    m = np.zeros((20, 20, 20), bool)
    m[5:10, 5:10, 5:10] = True
    vol = volume_from_array(m)
    assert any("boolean" in w and "mask" in w for w in vol.warnings), vol.warnings


def test_binary_and_label_like_files(tmp_path):
    m = np.zeros((20, 20, 20), np.uint8)
    m[5:10, 5:10, 5:10] = 1
    warned(tmp_path, load_volume(_nifti(tmp_path, m, "mask.nii.gz")), r"only two values \(0 and 1\).*mask")
    m[12:15] = 5
    m[0:2] = 117
    labels = load_volume(_nifti(tmp_path, m, "labels.nii.gz"))
    warned(tmp_path, labels, r"only 4 whole-number values from 0 to 117.*label map")


def test_nan_scale_slope_that_drops_an_intercept(tmp_path):
    raw = np.random.default_rng(0).integers(0, 2000, (20, 20, 20)).astype(np.int16)   # stored, not HU
    vol = load_volume(_nifti(tmp_path, raw, scaling=(np.nan, -1024.0)))
    warned(tmp_path, vol, r"scale slope \(scl_slope\) is NaN, so its intercept \(-1024\) was not applied")
    assert vol.hu.min() >= 0                          # as stored: nibabel applied no scaling
    # nibabel's own 'no scaling' (NaN slope and NaN intercept) says nothing of scaling (only that the
    # stored values, 0…2000, hold no air)
    plain = load_volume(_nifti(tmp_path, raw, "plain.nii.gz"))
    assert not any("scl_slope" in w for w in plain.warnings)
    warned(tmp_path, plain, r"^Almost no voxel is air")


def test_a_scan_without_air_is_flagged(tmp_path):
    ct = _ct_like((40, 40, 30))
    assert load_volume(_nifti(tmp_path, ct, "hu.nii.gz")).warnings == []
    raw = ct + 1024                                   # the rescale intercept lost: air reads about 0
    w = warned(tmp_path, load_volume(_nifti(tmp_path, raw, "raw.nii.gz")), r"^Almost no voxel is air")
    assert "rescale intercept" in w and f"lowest value is {raw.min():,.0f}" in w
    raw[:, :5] = -3024                                # scanner padding is not air
    warned(tmp_path, volume_from_array(raw), r"^Almost no voxel is air.*lowest value is 24")
    few = ct.copy()                                   # a crop inside the body with a little bowel gas
    few[few < -300] = 40
    few.reshape(-1)[:: 500] = -900                    # 0.2 % of the voxels: enough air to say nothing
    assert volume_from_array(few).warnings == []
    few.reshape(-1)[:: 500] = 40
    warned(tmp_path, volume_from_array(few), r"^Almost no voxel is air \(0\.00%")


def test_values_far_outside_hu_get_the_clip_warning_alone(tmp_path):
    """A scan stored ×1,000 (not HU): the clip warning says so; the airless warning came too and blamed a
    lost rescale intercept, naming as the lowest value what clipping had left. A few clipped voxels (metal)
    leave the airless check as it was."""
    ct = _ct_like((40, 40, 30))
    vol = volume_from_array(ct * 1000.0)
    warned(tmp_path, vol, r"voxels lay outside -2000…4000 HU .* not Hounsfield units")
    assert not any("Almost no voxel is air" in w for w in vol.warnings), vol.warnings
    raw = ct + 1024
    raw.reshape(-1)[:10] = 30000                      # a few voxels of metal, and the intercept lost
    vol = volume_from_array(raw)
    warned(tmp_path, vol, r"^10 voxels lay outside")
    warned(tmp_path, vol, r"^Almost no voxel is air")


def test_thick_slices(tmp_path):
    vol = load_volume(_nifti(tmp_path, _ct_like(), affine=np.diag([0.8, 0.8, 50.0, 1.0])))
    warned(tmp_path, vol, r"The slices are 50\.0 mm apart")


def test_a_label_map_must_hold_label_ids(tmp_path):
    with pytest.raises(VolumeError, match="fractional or NaN values") as e:
        load_label_map(_nifti(tmp_path, _ct_like() / 7, "ct_as_labels.nii.gz"))
    no_paths(str(e.value), tmp_path)
    with pytest.raises(VolumeError, match="label ids from -1000 to 1200"):
        ct = np.linspace(-1000, 1200, 8000).round().reshape(20, 20, 20).astype(np.int16)
        load_label_map(_nifti(tmp_path, ct, "ct_int.nii.gz"))


def test_the_callers_array_is_not_changed():
    a = _ct_like()
    a[0, 0, 0] = np.nan
    volume_from_array(a)
    assert np.isnan(a[0, 0, 0])


# ------------------------------------------------------------------ DICOM

def _ct_slice(path, image, z, number, slope, intercept, **attrs):
    """One classic CT slice file: the stored ``image`` (rows, cols; int16 or uint16) at height ``z`` mm,
    0.8 mm pixels, axial, with its rescale and any further attributes (``attrs``: Modality, UIDs, …)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Modality, ds.SeriesInstanceUID, ds.SOPInstanceUID = "CT", "1.2.3.4", meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = image.shape
    ds.PixelSpacing, ds.ImageOrientationPatient = [0.8, 0.8], [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient, ds.InstanceNumber = [0, 0, z], number
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = int(image.dtype == np.int16)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    for name, value in attrs.items():
        setattr(ds, name, value)
    ds.PixelData = np.ascontiguousarray(image).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def _dicom_series(folder, n=20, modality="CT", uid="1.2.3.4", z0=0.0, dz=2.0, skip=(), dup=(),
                  name="Doe^Jane", slope=1, dup_hu=40, kernel=None):
    folder.mkdir(parents=True, exist_ok=True)
    zs = [z0 + i * dz for i in range(n) if i not in skip] + [z0 + i * dz for i in dup]
    for k, z in enumerate(zs):
        hu = dup_hu if k >= n - len(skip) else 40                       # the repeated slices come last
        _ct_slice(folder / f"s{k}.dcm", np.full((32, 32), 1024 + hu, np.uint16), z, k + 1, slope, -1024,
                  Modality=modality, SeriesInstanceUID=uid, PatientName=name, PatientID="ID-12345",
                  PatientBirthDate="19700101", **({"ConvolutionKernel": kernel} if kernel else {}))
    return folder


def test_dicom_series_rescale_and_no_identity(tmp_path):
    vol = load_volume(_dicom_series(tmp_path / "ok"))
    assert vol.shape == (32, 32, 20) and np.allclose(vol.hu, 40)       # slope/intercept applied
    assert np.allclose(vol.spacing, (0.8, 0.8, 2.0))
    text = repr(vol.meta) + repr(vol)[:2000] + repr(vol.warnings)
    assert "Doe" not in text and "12345" not in text and "1970" not in text
    assert vol.warnings == [] or all("same value" in w for w in vol.warnings)


def test_dicom_missing_slices(tmp_path):
    refused(tmp_path, _dicom_series(tmp_path / "m", skip=(7, 8)), "missing slices")


def test_dicom_duplicate_copies_are_dropped_with_a_warning(tmp_path):
    vol = load_volume(_dicom_series(tmp_path / "d", dup=(5, 9)))
    assert vol.shape == (32, 32, 20)
    warned(tmp_path, vol, r"^2 duplicate slices \(identical copies")


def test_dicom_repeated_position_with_another_image(tmp_path):
    vol = load_volume(_dicom_series(tmp_path / "r", dup=(3,), dup_hu=300))
    assert vol.shape == (32, 32, 20) and np.allclose(vol.hu, 40)       # the first by instance number is kept
    warned(tmp_path, vol, r"^1 slice repeated a position with a different image and was dropped")


def test_dicom_nan_rescale_slope(tmp_path):
    vol = load_volume(_dicom_series(tmp_path / "s", slope="NaN"))
    warned(tmp_path, vol, r"^20 slices had no usable rescale slope.*slope 1")
    assert np.isfinite(vol.hu).all() and np.allclose(vol.hu, 40)


def test_dicom_two_series_load_the_larger_and_name_the_other(tmp_path):
    _dicom_series(tmp_path / "two" / "a", uid="1.1", n=18)
    _dicom_series(tmp_path / "two" / "b", uid="2.2", z0=100)
    series = list_series(tmp_path / "two")
    assert [s.slices for s in series] == [20, 18] and all(s.loadable for s in series)
    vol = load_volume(tmp_path / "two")
    assert vol.shape == (32, 32, 20)
    warned(tmp_path, vol, r"^This upload holds 2 series.*Not loaded: .*18 axial CT slices")
    assert load_volume(tmp_path / "two", series=series[1].uid).shape == (32, 32, 18)
    refused(tmp_path, tmp_path / "two", "chosen series is not in this upload", series="s000000000000")


def test_dicom_series_apart_when_an_anonymiser_blanked_their_uids(tmp_path):
    _dicom_series(tmp_path / "blank" / "a", uid="", kernel="B30f")
    _dicom_series(tmp_path / "blank" / "b", uid="", kernel="B70f", n=17)
    assert [(s.kernel, s.slices) for s in list_series(tmp_path / "blank")] == [("B30f", 20), ("B70f", 17)]
    vol = load_volume(tmp_path / "blank")
    assert vol.shape == (32, 32, 20) and not any("duplicate" in w or "repeated" in w for w in vol.warnings)


def test_dicom_non_ct(tmp_path):
    refused(tmp_path, _dicom_series(tmp_path / "mr", modality="MR"), "modality 'MR'")


def _zip(path, members):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members:
            z.writestr(name, data)
    return path


def test_dicom_zip_loads(tmp_path):
    folder = _dicom_series(tmp_path / "z")
    members = [(f"series/{f.name}", f.read_bytes()) for f in sorted(folder.iterdir())]
    p = _zip(tmp_path / "series.zip", members)
    assert load_volume(p).shape == (32, 32, 20)
    assert [s.uid for s in list_series(p)] == [s.uid for s in list_series(folder)]   # keys survive unzipping


def test_zip_slip(tmp_path):
    p = _zip(tmp_path / "evil.zip", [("../../etc/evil.dcm", b"x" * 10)])
    refused(tmp_path, p, "escapes its folder")


def test_zip_symlink(tmp_path):
    p = tmp_path / "link.zip"
    with zipfile.ZipFile(p, "w") as z:
        info = zipfile.ZipInfo("series/link")
        info.external_attr = (0o120777 << 16)
        z.writestr(info, "/etc/passwd")
    refused(tmp_path, p, "symbolic link")


def test_zip_bomb(tmp_path):
    p = _zip(tmp_path / "bomb.zip", [("a.bin", b"\0" * 60_000_000)])
    refused(tmp_path, p, "zip bombs|limit")


def test_zip_too_many_files(tmp_path):
    p = _zip(tmp_path / "many.zip", [(f"f{i}", b"x") for i in range(30)])
    refused(tmp_path, p, "limit is 10", limits=Limits(max_zip_files=10))


def test_single_dicom_file(tmp_path):
    f = sorted(_dicom_series(tmp_path / "one").iterdir())[0]
    refused(tmp_path, f, r"single DICOM image \(32×32, one slice\)")


def test_fake_dcm_is_not_called_a_dicom_image(tmp_path):
    p = tmp_path / "scan.dcm"
    p.write_text("this is a text file renamed to .dcm\n" * 10)
    msg = refused(tmp_path, p, "named like a DICOM file but holds no DICOM data")
    assert "single DICOM image" not in msg
    q = tmp_path / "broken.dcm"
    q.write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 64)
    msg = refused(tmp_path, q, "could not be read|without an image")
    assert "single DICOM image" not in msg


# ------------------------------------------------------- a PACS export: localizer, two kernels, duplicates

def _pacs_export(tmp_path):
    """The bundled JPEG2000 series rewritten as a study folder: a soft-tissue series (20 slices, two of
    them exported twice), a lung-kernel series (17 slices) and a coronal localizer, with a patient name
    in every file."""
    import pydicom

    z = lambda f: float(pydicom.dcmread(str(f), stop_before_pixels=True).ImagePositionPatient[2])  # noqa: E731
    src = sorted((SAMPLES / "dicom_ct/series").iterdir(), key=z)        # by slice position, from the bottom
    out = tmp_path / "study"
    out.mkdir()

    def write(f, name, **attrs):
        ds = pydicom.dcmread(str(f))
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Doe^Jane", "ID-12345", "19700101"
        for k, v in attrs.items():
            setattr(ds, k, v)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(str(out / name))

    for n, f in enumerate(src):
        write(f, f"soft_{n:02d}.dcm", SeriesInstanceUID="1.2.826.0.1.1",
              SeriesDescription="Abdomen 2.0 Br38f", ConvolutionKernel="Br38f", InstanceNumber=n + 1)
    for n in (4, 11):
        shutil.copy(out / f"soft_{n:02d}.dcm", out / f"soft_{n:02d}_again.dcm")
    for n, f in enumerate(src[:17]):
        write(f, f"lung_{n:02d}.dcm", SeriesInstanceUID="1.2.826.0.1.2", SeriesDescription="Lung 2.0 Bl57",
              ConvolutionKernel="Bl57", InstanceNumber=n + 1)
    write(src[0], "scout.dcm", SeriesInstanceUID="1.2.826.0.1.3", SeriesDescription="Topogram 0.6 T20s",
          ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"], ImageOrientationPatient=[1, 0, 0, 0, 0, -1],
          ConvolutionKernel="T20s")
    (out / "README.txt").write_text("exported by a PACS")
    return out


def test_pacs_export_lists_its_series_and_loads_the_chosen_one(tmp_path, monkeypatch):
    import pydicom

    study = _pacs_export(tmp_path)
    read = []
    real = pydicom.dcmread
    monkeypatch.setattr(pydicom, "dcmread", lambda *a, **k: read.append(real(*a, **k)) or read[-1])

    series = list_series(study)
    assert [(s.description, s.slices, s.kernel, s.orientation, s.modality, s.loadable) for s in series] == [
        ("Abdomen 2.0 Br38f", 20, "Br38f", "axial", "CT", True),
        ("Lung 2.0 Bl57", 17, "Bl57", "axial", "CT", True),
        ("Topogram 0.6 T20s", 1, "T20s", "coronal", "CT", False)]
    assert "localizer" in series[2].label and "20 axial CT slices" in series[0].label
    assert all(s.uid.startswith("s") and "1.2.826" not in s.uid for s in series)    # no UID leaves

    vol = load_volume(study)                                    # the default: axial CT with most slices
    assert vol.shape == (512, 512, 20) and vol.meta["ConvolutionKernel"] == "Br38f"
    reference = load_volume(SAMPLES / "dicom_ct/series")
    assert np.array_equal(vol.hu, reference.hu) and np.allclose(vol.affine, reference.affine)
    warned(tmp_path, vol, r"^2 duplicate slices \(identical copies")
    others = warned(tmp_path, vol, r"^This upload holds 3 series; loaded: Abdomen 2\.0 Br38f")
    assert "Lung 2.0 Bl57" in others and "Topogram 0.6 T20s" in others

    lung = load_volume(study, series=series[1].uid)             # the one the user picks
    assert lung.shape == (512, 512, 17) and lung.meta["ConvolutionKernel"] == "Bl57"
    assert np.array_equal(lung.hu, reference.hu[:, :, :17])
    assert not any("duplicate" in w for w in lung.warnings)
    refused(tmp_path, study, "single image", series=series[2].uid)

    everything = repr([vol.meta, vol.warnings, lung.meta, lung.warnings, series])
    assert "Doe" not in everything and "12345" not in everything and "1970" not in everything
    assert read and all(t not in ds for ds in read for t in ("PatientName", "PatientID", "PatientBirthDate"))


def test_a_series_sent_twice_gets_two_choices_a_user_can_tell_apart(tmp_path):
    """A study holding one series twice (re-sent under a new series UID, or two phases under one
    description) listed two identical choices and warned 'loaded: X. Not loaded: X': each is told apart by
    its series number, else by its rank among the alike."""
    import pydicom

    study = _pacs_export(tmp_path)
    for f in sorted(study.glob("soft_??.dcm")):
        ds = pydicom.dcmread(str(f))
        ds.SeriesInstanceUID = "1.2.826.0.1.9"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(str(study / f"again_{f.name}"))
    labels = [s.label for s in list_series(study)]
    assert len(labels) == 4 and len(set(labels)) == 4, labels
    assert labels[:2] == ["Abdomen 2.0 Br38f — 20 axial CT slices, kernel Br38f [1 of 2 alike]",
                          "Abdomen 2.0 Br38f — 20 axial CT slices, kernel Br38f [2 of 2 alike]"]
    vol = load_volume(study)
    said = next(w for w in vol.warnings if w.startswith("This upload holds 4 series"))
    assert f"loaded: {labels[0]}. Not loaded: {labels[1]}; Lung" in said
    for f in sorted(study.glob("*.dcm")):                              # with series numbers: those
        ds = pydicom.dcmread(str(f))
        ds.SeriesNumber = {"1.2.826.0.1.1": 3, "1.2.826.0.1.9": 7}.get(ds.SeriesInstanceUID, 5)
        ds.save_as(str(f))
    labels = [s.label for s in list_series(study)]
    assert sorted(labels[:2]) == ["Abdomen 2.0 Br38f — 20 axial CT slices, kernel Br38f [series number 3]",
                                  "Abdomen 2.0 Br38f — 20 axial CT slices, kernel Br38f [series number 7]"]
    assert labels[2] == "Lung 2.0 Bl57 — 17 axial CT slices, kernel Bl57"      # a label of its own stays


# ------------------------------------------------------- enhanced (multi-frame) CT: a series in one file

def _enhanced_ct(path, order=None, positions=True, name="Doe^Jane"):
    """The bundled series rewritten as one Enhanced CT file, as a scanner exports it: a frame per slice
    (in ``order``, default reversed), each frame's position in its per-frame functional groups, the
    orientation, pixel spacing and rescale shared, and one frame stored with its own rescale."""
    import pydicom
    from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    src = [pydicom.dcmread(str(f)) for f in sorted((SAMPLES / "dicom_ct/series").iterdir())]
    order = list(range(len(src)))[::-1] if order is None else order
    first = src[0]

    def item(**attrs):
        ds = Dataset()
        for k, v in attrs.items():
            setattr(ds, k, v)
        return ds

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"                  # Enhanced CT Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesDescription = "CT", generate_uid(), "Abdomen enhanced"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = name, "ID-12345", "19700101"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.Rows, ds.Columns, ds.NumberOfFrames = first.Rows, first.Columns, len(order)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.SharedFunctionalGroupsSequence = Sequence([item(
        PlaneOrientationSequence=Sequence([item(ImageOrientationPatient=first.ImageOrientationPatient)]),
        PixelMeasuresSequence=Sequence([item(PixelSpacing=first.PixelSpacing,
                                             SliceThickness=first.SliceThickness)]),
        PixelValueTransformationSequence=Sequence([item(RescaleSlope=1, RescaleIntercept=-1024,
                                                        RescaleType="HU")]))])
    frames, per_frame = [], []
    for n, k in enumerate(order):
        px = src[k].pixel_array.astype(np.int64) * int(src[k].RescaleSlope) + int(src[k].RescaleIntercept)
        groups = item(FrameContentSequence=Sequence([item(InStackPositionNumber=k + 1)]))
        if positions:
            groups.PlanePositionSequence = Sequence([item(ImagePositionPatient=src[k].ImagePositionPatient)])
        if n == 1:                     # this frame stored from -2048: its rescale overrides the shared one
            groups.PixelValueTransformationSequence = Sequence([item(RescaleSlope=1, RescaleIntercept=-2048,
                                                                     RescaleType="HU")])
            frames.append(px + 2048)
        else:
            frames.append(px + 1024)
        per_frame.append(groups)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.PixelData = np.stack(frames).astype(np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return path


def test_an_enhanced_ct_file_loads_as_its_classic_series(tmp_path):
    reference = load_volume(SAMPLES / "dicom_ct/series")
    f = _enhanced_ct(tmp_path / "enhanced.dcm")
    [info] = list_series(f)
    assert (info.slices, info.orientation, info.modality, info.loadable) == (20, "axial", "CT", True)
    for source in (f, tmp_path, [f]):                                   # the file, its folder, a file list
        vol = load_volume(source)
        assert np.array_equal(vol.hu, reference.hu) and np.allclose(vol.affine, reference.affine)
        assert vol.spacing == pytest.approx(reference.spacing) and vol.warnings == reference.warnings
    text = repr([vol.meta, vol.warnings, info])
    assert "Doe" not in text and "12345" not in text and "1970" not in text


def test_an_enhanced_ct_among_classic_series_is_the_default(tmp_path):
    study = _pacs_export(tmp_path)
    for f in study.glob("soft_*.dcm"):                                  # the soft-tissue series, now enhanced
        f.unlink()
    _enhanced_ct(study / "enhanced.dcm", order=[3, 0, 1, 2] + list(range(4, 20)))
    series = list_series(study)
    assert [(s.description, s.slices, s.loadable) for s in series] == [
        ("Abdomen enhanced", 20, True), ("Lung 2.0 Bl57", 17, True), ("Topogram 0.6 T20s", 1, False)]
    vol = load_volume(study)
    assert np.array_equal(vol.hu, load_volume(SAMPLES / "dicom_ct/series").hu)
    warned(tmp_path, vol, r"^This upload holds 3 series; loaded: Abdomen enhanced")


def test_an_enhanced_file_without_frame_positions_is_refused_in_words(tmp_path):
    refused(tmp_path, _enhanced_ct(tmp_path / "nopos.dcm", positions=False), "no ImagePositionPatient")
    refused(tmp_path, _enhanced_ct(tmp_path / "gap.dcm", order=[n for n in range(20) if n not in (8, 9)]),
            "missing slices")
    import pydicom

    f = _enhanced_ct(tmp_path / "lies.dcm")                  # a header claiming two billion frames
    ds = pydicom.dcmread(str(f))
    ds.NumberOfFrames = 2_000_000_000
    ds.save_as(str(f))
    [info] = list_series(f)
    assert not info.loadable and info.note == "a multi-frame file without a position for each frame"
    refused(tmp_path, f, r"Abdomen enhanced — \d+ axial CT slices \(a multi-frame file without a")


# ------------------------------------------------------- compressed as PACS export it

def _jpeg_lossless(px: np.ndarray, precision: int = 16) -> bytes:
    """One frame as a JPEG Lossless, first-order prediction (process 14, selection value 1) bitstream
    (ITU T.81 annex H), the transfer syntax PACS commonly export CT in and pydicom cannot write: a
    minimal encoder whose one Huffman table gives each difference category a 5-bit code."""
    px = px.astype(np.int64)
    rows, cols = px.shape
    pred = np.empty_like(px)
    pred[0, 0] = 1 << (precision - 1)
    pred[0, 1:] = px[0, :-1]                  # first row: the sample to the left
    pred[1:, 0] = px[:-1, 0]                  # first column: the sample above
    pred[1:, 1:] = px[1:, :-1]                # selection value 1: the sample to the left
    diff = (px - pred) % 65536
    bits = []
    for d in np.where(diff > 32768, diff - 65536, diff).ravel().tolist():
        ssss = 16 if d == 32768 else abs(d).bit_length()
        bits.append(format(ssss, "05b"))      # the canonical code of category ssss
        if 0 < ssss < 16:
            bits.append(format(d if d > 0 else d + (1 << ssss) - 1, f"0{ssss}b"))
    stream = "".join(bits)
    stream += "1" * (-len(stream) % 8)
    data = int(stream, 2).to_bytes(len(stream) // 8, "big").replace(b"\xff", b"\xff\x00")   # byte stuffing
    be = lambda n: int(n).to_bytes(2, "big")  # noqa: E731
    sof = b"\xff\xc3" + be(11) + bytes([precision]) + be(rows) + be(cols) + b"\x01\x01\x11\x00"
    dht = b"\xff\xc4" + be(36) + b"\x00" + bytes(4) + bytes([17]) + bytes(11) + bytes(range(17))
    sos = b"\xff\xda" + be(8) + b"\x01\x01\x00" + b"\x01\x00\x00"
    return b"\xff\xd8" + sof + dht + sos + data + b"\xff\xd9"


def _gdcm_compress(src, dst, syntax: str) -> None:
    """``src`` rewritten by GDCM's encoder in transfer syntax ``syntax`` (a gdcm.TransferSyntax name)."""
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(str(src))
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, syntax)))
    change.SetInput(reader.GetImage())
    assert change.Change()
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(dst))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write()


@pytest.mark.parametrize("syntax", ["JPEGLosslessSV1", "RLELossless", "JPEGLSLossless"])
def test_a_compressed_series_loads_as_its_uncompressed_copy(tmp_path, syntax):
    import pydicom
    from pydicom.encaps import encapsulate

    raw, packed = _dicom_series(tmp_path / "raw"), tmp_path / "packed"
    packed.mkdir()
    rng = np.random.default_rng(0)
    for f in sorted(raw.iterdir()):                     # CT-like values, a different image on every slice
        ds = pydicom.dcmread(str(f))
        px = rng.integers(0, 2500, (ds.Rows, ds.Columns), dtype=np.uint16)
        ds.PixelData = px.tobytes()
        ds.save_as(str(f))
        if syntax == "JPEGLSLossless":
            _gdcm_compress(f, packed / f.name, syntax)
            written = pydicom.dcmread(str(packed / f.name)).file_meta.TransferSyntaxUID
            assert written == getattr(pydicom.uid, syntax)
            continue
        if syntax == "RLELossless":
            ds.compress(pydicom.uid.RLELossless)
        else:
            ds.PixelData = encapsulate([_jpeg_lossless(px)])
            ds["PixelData"].VR = "OB"
            ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEGLosslessSV1
        ds.save_as(str(packed / f.name))
    vol, reference = load_volume(packed), load_volume(raw)
    assert np.array_equal(vol.hu, reference.hu) and np.allclose(vol.affine, reference.affine)


def test_a_series_stored_as_12_bit_lossy_jpeg_loads(tmp_path):
    """12-bit "JPEG Extended", as older PACS store CT: frames written by libjpeg-turbo (fixtures/jpeg12,
    how they were made is beside them) decode through GDCM to their values give or take the loss, the
    zero padding outside the field of view included (no value wraps round to 4095)."""
    import pydicom
    from pydicom.encaps import encapsulate

    fixture = Path(__file__).parent / "fixtures" / "jpeg12"
    original = np.load(fixture / "original.npy", allow_pickle=False)
    jpegs = [(fixture / f"frame_{k}.jpg").read_bytes() for k in range(len(original))]
    series = _dicom_series(tmp_path / "j12")
    truth = np.empty((32, 32, 20), np.float32)
    for f in series.iterdir():
        ds = pydicom.dcmread(str(f))
        k = int(round(float(ds.ImagePositionPatient[2]) / 2.0))
        ds.BitsStored, ds.HighBit = 12, 11
        ds.PixelData = encapsulate([jpegs[k % len(jpegs)]])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEGExtended12Bit
        ds.save_as(str(f))
        truth[:, :, k] = original[k % len(jpegs)].T.astype(np.float32) - 1024
    vol = load_volume(series)
    error = np.abs(vol.hu - truth)
    assert vol.shape == truth.shape and error.max() <= 40 and error.mean() <= 5, (error.max(), error.mean())
    assert vol.hu[truth == -1024].max() <= -1024 + 40                  # the padding stays padding


def test_a_slice_that_cannot_be_decoded_names_its_compression(tmp_path):
    """Damaged compressed slices are refused in words, and none takes the server down: an image whose
    header disagrees with its stream is refused before any decoder sees it, and the decoding itself runs
    in a child process (GDCM aborts its process on some streams: here a Huffman table segment whose code
    counts overrun it)."""
    import pydicom
    from pydicom.encaps import encapsulate

    px = np.random.default_rng(0).integers(0, 2500, (32, 32), dtype=np.uint16)
    good = _jpeg_lossless(px)

    def series_with(name, frame, **header):             # every slice stores ``frame``
        series = _dicom_series(tmp_path / name)
        for f in series.iterdir():
            ds = pydicom.dcmread(str(f))
            ds.PixelData = encapsulate([frame])
            ds["PixelData"].VR = "OB"
            ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEGLosslessSV1
            for key, value in header.items():
                setattr(ds, key, value)
            ds.save_as(str(f))
        return series

    syntax = r"A DICOM (slice|image) stored as JPEG Lossless, Non-Hierarchical, First-Order Prediction"
    refused(tmp_path, series_with("none", b"\xff\xd8 not a JPEG stream \xff\xd9"),
            syntax + r".* holds no frame header of that format; the file is damaged")
    refused(tmp_path, series_with("rows", good, Rows=64),
            syntax + r".* holds 32×32 pixels of 1 component, 16 bits, where its header says 64×32")
    refused(tmp_path, series_with("rgb", good, PhotometricInterpretation="RGB"),
            r"A compressed DICOM image is labelled RGB with 16 bits a pixel; a CT slice is monochrome")
    refused(tmp_path, series_with("cut", good[:300]),
            syntax + r".* could not be decoded \(.*\); the file is damaged")
    overrun = good[:40] + good[20:]                     # the DHT segment's code counts run past its end
    refused(tmp_path, series_with("crash", overrun),
            r"^The decoder of this DICOM series' compressed images crashed \(signal \d+\): the image data is "
            r"damaged. Nothing else was affected")


def test_a_compressed_series_is_decoded_by_the_child_started_ahead(tmp_path):
    """The child started ahead (its imports done) decodes the next series and exits; another is started
    for the series after it. A waiting child that died is replaced, and one whose parent closes its stdin
    exits."""
    from photon_core.io import decode

    px = np.random.default_rng(1).integers(0, 2500, (32, 32), dtype=np.uint16)
    f = tmp_path / "one.dcm"
    _one_jpeg_lossless_file(f, px)
    limits = Limits()
    decode.prestart()
    waiting = decode._spare
    assert waiting is not None and waiting.poll() is None
    (got,) = decode.decode_files([f], limits)
    assert np.array_equal(got, px)
    assert waiting.wait(timeout=5) == 0                 # it served this series and ended
    assert decode._spare is not None and decode._spare.pid != waiting.pid and decode._spare.poll() is None

    decode._spare.kill()
    decode._spare.wait()
    (got,) = decode.decode_files([f], limits)
    assert np.array_equal(got, px)

    child = decode._spare
    decode._stop_spare()
    assert child.returncode == 0 and decode._spare is None


def _jpeg_series(folder, frames, n, dup=()):
    """A JPEG Lossless series of ``n`` slices 2 mm apart (and ``dup``: positions stored twice, as copies),
    slice k storing ``frames[k % len(frames)]`` (stored values, rows × cols)."""
    import pydicom
    from pydicom.encaps import encapsulate

    folder.mkdir(parents=True, exist_ok=True)
    streams = [_jpeg_lossless(px) for px in frames]
    rows, cols = frames[0].shape
    for k, z in enumerate(list(range(n)) + list(dup)):
        f = folder / f"s{k}.dcm"
        _ct_slice(f, np.zeros((rows, cols), np.uint16), 2.0 * z, k + 1, 1, -1024)
        ds = pydicom.dcmread(str(f))
        ds.PixelData = encapsulate([streams[z % len(streams)]])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEGLosslessSV1
        ds.save_as(str(f))
    return folder


def test_a_compressed_series_is_decoded_as_its_slices_are_copied(tmp_path, monkeypatch):
    """The child's arrays are read one file at a time as the copy asks for them (the child writes at most
    about one ahead), not the whole decoded series at once beside the volume; the parent keeps no copy of
    the encoded bytes either. So assembling a compressed series holds the volume and about a file's
    pixels (it held the series decoded besides: ≥ 2× the volume)."""
    import tracemalloc

    from photon_core.io import dicom

    base = np.add.outer(np.arange(256), np.arange(256)).astype(np.uint16) * 4 + 200   # smooth: small streams
    frames = [base + k for k in range(4)]
    series = _jpeg_series(tmp_path / "jpeg", frames, 64)
    load_volume(_jpeg_series(tmp_path / "warm", [f[:32, :32] for f in frames], 16))  # imports done before
    assembled = {}
    real = dicom.make_volume

    def make_volume(hu, *a, **kw):                      # the copy's peak, before the values are checked
        assembled["peak"], assembled["bytes"] = tracemalloc.get_traced_memory()[1], hu.nbytes
        return real(hu, *a, **kw)

    monkeypatch.setattr(dicom, "make_volume", make_volume)
    tracemalloc.start()
    try:
        vol = load_volume(series)
    finally:
        tracemalloc.stop()
    want = np.stack([frames[k % 4].astype(np.int32) - 1024 for k in range(64)]).transpose(2, 1, 0)
    assert np.array_equal(vol.hu, want)
    extra = assembled["peak"] - assembled["bytes"]
    assert extra < 0.5 * assembled["bytes"], f"{extra / assembled['bytes']:.2f}× the volume besides it"


def test_a_compressed_series_with_copies_and_a_damaged_slice_midway(tmp_path, monkeypatch):
    """A position stored twice is compared as before (each copy decoded alone, ahead of the copy) and the
    rest stream in order; a slice that cannot be decoded halfway through the copy refuses the series in
    words and ends its child there and then."""
    import pydicom
    from pydicom.encaps import encapsulate

    from photon_core.io import decode

    frames = [np.full((32, 32), 1024 + 40 + 10 * k, np.uint16) for k in range(20)]
    vol = load_volume(_jpeg_series(tmp_path / "dup", frames, 20, dup=(5, 9)))
    assert np.array_equal(vol.hu[0, 0, :], [40 + 10 * k for k in range(20)])
    warned(tmp_path, vol, r"^2 duplicate slices \(identical copies")

    series = _jpeg_series(tmp_path / "cut", frames, 20)
    f = series / "s12.dcm"
    ds = pydicom.dcmread(str(f))
    ds.PixelData = encapsulate([_jpeg_lossless(frames[12])[:200]])
    ds["PixelData"].VR = "OB"
    ds.save_as(str(f))
    children = []
    real = decode._take
    monkeypatch.setattr(decode, "_take", lambda: children.append(real()) or children[-1])
    refused(tmp_path, series, r"A DICOM slice stored as JPEG Lossless.* could not be decoded")
    assert len(children) == 1 and children[0].poll() is not None        # ended, not left decoding


def test_a_dicom_series_says_how_far_its_reading_is_and_stops_where_told(tmp_path, monkeypatch):
    """``step`` hears the headers' and the slices' reading (a few times a second; here at every file), in
    order; an exception it raises stops the load there — a compressed series' decoding child with it."""
    from photon_core.io import decode, dicom

    series = _dicom_series(tmp_path / "plain")
    heard = []
    t0 = time.monotonic()
    vol = load_volume(series, step=lambda f, desc: heard.append((f, desc)))
    took = time.monotonic() - t0
    descs = [d for _, d in heard]
    assert descs[0] == "Reading the DICOM headers: file 1 of 20"
    assert "Reading the DICOM slices: 1 of 20" in descs
    assert len(heard) <= 2 + took / dicom.STEP_EVERY_S                  # the first of each, then ≤ 4 a second
    monkeypatch.setattr(dicom, "STEP_EVERY_S", 0.0)
    heard.clear()
    again = load_volume(series, step=lambda f, desc: heard.append((f, desc)))
    assert np.array_equal(again.hu, vol.hu)
    descs = [d for _, d in heard]
    assert descs == ([f"Reading the DICOM headers: file {k} of 20" for k in range(1, 21)]
                     + [f"Reading the DICOM slices: {k} of 20" for k in range(1, 21)])
    fractions = [f for f, _ in heard]
    assert fractions == sorted(fractions) and 0 <= fractions[0] and fractions[-1] < 1

    class Told(Exception):
        pass

    def stop_at(desc):
        def step(f, d):
            if d == desc:
                raise Told
        return step

    children = []
    real = decode._take
    monkeypatch.setattr(decode, "_take", lambda: children.append(real()) or children[-1])
    frames = [np.full((32, 32), 1024 + 10 * k, np.uint16) for k in range(20)]
    packed = _jpeg_series(tmp_path / "jpeg", frames, 20)
    with pytest.raises(Told):
        load_volume(packed, step=stop_at("Reading the DICOM slices: 5 of 20"))
    assert len(children) == 1 and children[0].poll() is not None         # its child ended there
    with pytest.raises(Told):
        load_volume(packed, step=stop_at("Reading the DICOM headers: file 3 of 20"))
    assert len(children) == 1                                            # stopped before any decoding


def test_a_decoding_child_past_its_deadline_is_ended_and_the_series_refused(tmp_path, monkeypatch):
    """A child that hangs (a decoder stuck on damaged data) is ended at the series' deadline, counted from
    its start, and the load is refused in words; nothing waits on it after."""
    import subprocess
    import sys

    from photon_core.io import decode

    hung = []

    def take():
        stuck = "import sys, time; sys.stdin.read(); time.sleep(60)"
        hung.append(subprocess.Popen([sys.executable, "-c", stuck], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE))
        return hung[-1]

    monkeypatch.setattr(decode, "_take", take)
    monkeypatch.setattr(decode, "prestart", lambda: None)
    monkeypatch.setattr(decode, "START_S", 1.0)
    monkeypatch.setattr(decode, "PER_FILE_S", 0.0)
    frames = [np.full((32, 32), 1024 + 10 * k, np.uint16) for k in range(20)]
    t0 = time.monotonic()
    refused(tmp_path, _jpeg_series(tmp_path / "jpeg", frames, 20),
            r"^Decoding the compressed images of this DICOM series took over 1 s and was stopped")
    assert time.monotonic() - t0 < 15 and len(hung) == 1 and hung[0].poll() is not None


def _one_jpeg_lossless_file(path, px):
    import pydicom
    from pydicom.encaps import encapsulate

    series = _dicom_series(path.parent / "src", n=1)
    ds = pydicom.dcmread(str(next(series.iterdir())))
    ds.Rows, ds.Columns = px.shape
    ds.PixelData = encapsulate([_jpeg_lossless(px)])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEGLosslessSV1
    ds.save_as(str(path))


def test_a_gantry_tilted_series_is_put_upright_where_it_was_scanned(tmp_path):
    """Slice k of a tilted acquisition steps 2 mm up and 0.8 mm (one pixel) sideways; a rod standing
    still in the scanner (one bright voxel per slice, at x 8 mm, y 12.8 mm) lands in a different pixel of
    each slice. Put upright, the rod stands in one voxel column at its true position."""
    import pydicom

    series = _dicom_series(tmp_path / "tilt")                  # 32×32, 0.8 mm pixels, 2 mm apart
    for f in series.iterdir():
        ds = pydicom.dcmread(str(f))
        k = int(round(float(ds.ImagePositionPatient[2]) / 2.0))
        ds.ImagePositionPatient = [0, (k - 10) * 0.8, 2.0 * k]
        px = np.full((32, 32), 1024 + 40, np.uint16)
        px[26 - k, 10] = 1024 + 1000                           # row j = (12.8 - y_k) / 0.8, column 10
        ds.PixelData = px.tobytes()
        ds.save_as(str(f))
    vol = load_volume(series)
    expected = np.full((32, 32, 20), 40.0, np.float32)
    expected[10, 26, :] = 1000
    assert np.allclose(vol.hu, expected, atol=1e-3)
    rod = vol.affine @ np.array([10, 26, 7, 1.0])
    assert np.allclose(rod[:3], [-8.0, -12.8, 14.0])              # RAS of LPS (8, 12.8, 14)
    assert np.allclose(vol.spacing, (0.8, 0.8, 2.0))
    warned(tmp_path, vol, r"^The series was acquired with a gantry tilt of 21\.8°")


# ------------------------------------------------------- detached headers: two files, one scan

def _uploaded(tmp_path, *files):
    """Each file in a folder of its own, as Gradio stores an upload's files."""
    out = []
    for n, f in enumerate(files):
        (tmp_path / f"upload{n}").mkdir(parents=True)
        out.append(Path(shutil.move(str(f), str(tmp_path / f"upload{n}" / Path(f).name))))
    return out


def test_a_detached_header_loads_with_its_data_uploaded_beside_it(tmp_path):
    import nrrd

    ct = _ct_like((24, 20, 18)).round().astype(np.int16)
    affine = np.diag([0.8, 0.7, 2.0, 1.0])
    reference = load_volume(_nifti(tmp_path, ct, "one.nii.gz", affine=affine))
    src = tmp_path / "written"
    src.mkdir()
    nrrd.write(str(src / "scan.nhdr"), ct, {"space": "right-anterior-superior",
                                             "space directions": affine[:3, :3], "space origin": [0, 0, 0]},
               detached_header=True)
    nib.save(nib.Nifti1Pair(ct, affine), str(src / "pair.img"))
    detached = _uploaded(tmp_path / "n", *sorted(src.glob("scan.*")))
    pair = _uploaded(tmp_path / "p", src / "pair.img", src / "pair.hdr")
    for upload in (detached, detached[::-1], pair):
        vol = load_volume(upload)
        assert np.array_equal(vol.hu, reference.hu) and np.allclose(vol.affine, reference.affine)
        assert list_series(upload) == [] and vol.warnings == reference.warnings


def test_a_detached_header_reads_no_file_but_its_own_data_beside_it(tmp_path):
    """A .nhdr names its data file; by a path it could make the server read any file it can read and show
    it as a scan. Only a data file beside the header, by its bare name, is read."""
    secret = tmp_path / "elsewhere" / "secret.txt"
    secret.parent.mkdir()
    secret.write_bytes(b"a private note " * 1200)                              # 18,000 bytes
    up = tmp_path / "upload"
    up.mkdir()
    header = ("NRRD0004\ntype: uint8\ndimension: 3\nsizes: 20 30 30\nspace: left-posterior-superior\n"
              "space directions: (1,0,0) (0,1,0) (0,0,1)\nspace origin: (0,0,0)\nencoding: raw\n")
    for name, named, match in [("abs.nhdr", secret, "names its data file by a path"),
                               ("rel.nhdr", "../elsewhere/secret.txt", "names its data file by a path"),
                               ("parts.nhdr", "secret%d.txt 1 2 1", "spreads its data over several files"),
                               ("alone.nhdr", "alone.raw", "its data file 'alone.raw' was not uploaded")]:
        (up / name).write_text(header + f"data file: {named}\n")
        msg = refused(tmp_path, up / name, match)
        assert "private" not in msg
    for half, other in (("scan.hdr", "scan.img"), ("scan.img", "scan.hdr")):
        (tmp_path / half).write_bytes(b"\0" * 400)
        refused(tmp_path, tmp_path / half, rf"one half of a \.hdr/\.img pair.*upload '{re.escape(other)}'")
        (tmp_path / half).unlink()
    nib.save(nib.AnalyzeImage(_ct_like().astype(np.int16), np.eye(4)), str(tmp_path / "old.img"))
    refused(tmp_path, tmp_path / "old.hdr", "Analyze 7.5 image, which records no orientation")


def test_a_scan_file_among_other_files_is_refused(tmp_path):
    """A NIfTI beside DICOM slices (or a .zip beside anything): which is the scan cannot be told; before
    the loader checked this, the app did, and also refused a detached NRRD header with its .raw.gz data."""
    a = _nifti(tmp_path, _ct_like(), "a.nii.gz")
    slices = sorted(_dicom_series(tmp_path / "d").iterdir())
    refused(tmp_path, [a, *slices], r"^21 files were uploaded, including 'a\.nii\.gz'; upload one NIfTI/NRRD")
    zipped = tmp_path / "s.zip"
    with zipfile.ZipFile(zipped, "w") as z:
        z.write(a, "a.nii.gz")
    refused(tmp_path, [zipped, slices[0]], r"^2 files were uploaded, including 's\.zip'")


def test_two_scans_in_one_upload_are_told_apart_from_a_dicom_series(tmp_path):
    a = _nifti(tmp_path, _ct_like(), "a.nii.gz")
    b = _nifti(tmp_path, _ct_like(seed=1), "b.nrrd.nii.gz")
    refused(tmp_path, [a, b], r"holds 2 scan volumes \('a\.nii\.gz', 'b\.nrrd\.nii\.gz'\) and no DICOM "
                              r"image; load one scan at a time")
    zipped = tmp_path / "one_scan.zip"                          # a .zip of one scan is that scan
    with zipfile.ZipFile(zipped, "w") as z:
        z.write(a, "export/a.nii.gz")
        z.writestr("export/README.txt", "exported")
    assert np.array_equal(load_volume(zipped).hu, load_volume(a).hu) and list_series(zipped) == []


def test_a_compressed_nrrd_unpacks_no_further_than_its_header_says(tmp_path):
    """pynrrd unpacks a whole gzip/bzip2 stream before checking its size: 1 GB of upload could unpack to
    a terabyte. The loader stops one byte past the header's size."""
    import bz2
    import tracemalloc

    ct = _ct_like((24, 20, 18)).round().astype(np.int16)
    head = (b"NRRD0004\ntype: int16\nendian: little\ndimension: 3\nsizes: 24 20 18\nspace: "
            b"left-posterior-superior\nspace directions: (1,0,0) (0,1,0) (0,0,1)\nspace origin: (0,0,0)\n")
    for encoding, pack in ((b"gzip", gzip.compress), (b"bzip2", bz2.compress)):
        good = tmp_path / f"good_{encoding.decode()}.nrrd"
        packed = pack(ct.tobytes(order="F")) + b"\0"                   # a padding byte past the stream's end
        good.write_bytes(head + b"encoding: " + encoding + b"\n\n" + packed)
        assert np.array_equal(load_volume(good).hu, ct)
        bomb = tmp_path / f"bomb_{encoding.decode()}.nrrd"
        bomb.write_bytes(head + b"encoding: " + encoding + b"\n\n" + pack(bytes(50_000_000)))
        tracemalloc.start()
        refused(tmp_path, bomb, r"unpacks to more data than its header's size \(24×20×18\)")
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 5_000_000, peak                                 # 50 MB were never unpacked


def test_a_deflated_dicom_is_inflated_no_further_than_the_upload_limit(tmp_path):
    """pydicom inflates a deflated DICOM file whole before reading one tag: a few MB could ask for more
    memory than the server has. The loader inflates it first, keeping nothing, up to the upload limit."""
    import tracemalloc

    import pydicom

    series = _dicom_series(tmp_path / "deflated")
    for f in series.iterdir():
        ds = pydicom.dcmread(str(f))
        ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
        ds.save_as(str(f))
    assert np.allclose(load_volume(series).hu, 40)                          # deflated CT loads
    bomb = sorted(series.iterdir())[0]
    ds = pydicom.dcmread(str(bomb))
    ds.Rows = ds.Columns = 4096
    ds.PixelData = bytes(2 * 4096 * 4096)                                   # 33.6 MB inflated, 33 kB stored
    ds.save_as(str(bomb))
    limits = Limits(max_file_bytes=20_000_000)
    for source in (series, bomb, [bomb]):
        tracemalloc.start()
        refused(tmp_path, source, r"'s0\.dcm' is a deflated DICOM file that inflates to over 20 MB",
                limits=limits)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 10_000_000, peak
    assert [s.slices for s in list_series(series)] == [19, 1]      # within the default limit it is read


def test_a_dicom_header_that_lies_about_its_image_size_is_refused(tmp_path):
    """An enhanced file whose Rows say half of what its frames hold: pydicom would read the first half of
    the data as 20 half-height frames, a scrambled scan."""
    import pydicom

    f = _enhanced_ct(tmp_path / "enhanced.dcm")
    ds = pydicom.dcmread(str(f))
    ds.Rows = ds.Rows // 2
    ds.save_as(str(f))
    held, frames = len(ds.PixelData), int(ds.NumberOfFrames)
    refused(tmp_path, f, rf"holds {held:,} bytes of image data where its header \({ds.Rows}×{ds.Columns}, "
                         rf"{frames} frames\) needs {held // 2:,}; the file is damaged")


def test_an_irregularly_spaced_series_is_resampled_onto_its_median_spacing(tmp_path):
    """Slices 2 mm apart give or take 0.4 mm (no gap a missing slice would leave): a ramp of 10 HU per mm
    along the body stays that ramp on a regular 2 mm grid, by linear interpolation."""
    import pydicom

    series = _dicom_series(tmp_path / "jitter")
    jitter = np.random.default_rng(0).uniform(-0.4, 0.4, 20)
    jitter[0] = jitter[-1] = 0
    for f in series.iterdir():
        ds = pydicom.dcmread(str(f))
        k = int(round(float(ds.ImagePositionPatient[2]) / 2.0))
        z = 2.0 * k + jitter[k]
        ds.ImagePositionPatient = [0, 0, z]
        ds.PixelData = np.full((32, 32), round(1024 + 10 * z), np.uint16).tobytes()
        ds.save_as(str(f))
    vol = load_volume(series)
    z = 2.0 * np.arange(20) + jitter
    dz = float(np.median(np.diff(z)))                                       # the grid: the median spacing
    n = int(np.floor(z[-1] / dz + 1e-3)) + 1
    assert vol.shape == (32, 32, n) and np.allclose(vol.spacing, (0.8, 0.8, dz))
    truth = np.interp(dz * np.arange(n), z, np.round(10 * z))              # what the slices store, in HU
    assert np.allclose(vol.hu[5, 5, :], truth, atol=1e-3)
    warned(tmp_path, vol, rf"^The slice spacing varies \(\d\.\d\d–\d\.\d\d mm\): the 20 slices were "
                          rf"resampled onto a regular {dz:.2f} mm grid \({n} slices, linear interpolation\)")
    refused(tmp_path, _dicom_series(tmp_path / "gap", skip=(7, 8)), "missing slices")   # a gap is not jitter


def _respaced(folder, zs):
    """A series of len(zs) slices at positions ``zs`` (mm) holding a ramp of 10 HU per mm along the body."""
    import pydicom

    series = _dicom_series(folder, n=len(zs))
    for f in series.iterdir():
        ds = pydicom.dcmread(str(f))
        z = zs[int(round(float(ds.ImagePositionPatient[2]) / 2.0))]
        ds.ImagePositionPatient = [0, 0, z]
        ds.PixelData = np.full((32, 32), round(1024 + 10 * z), np.uint16).tobytes()
        ds.save_as(str(f))
    return series


def test_a_series_with_sections_of_two_spacings_is_resampled_onto_the_finer(tmp_path):
    """A head CT's sections: 2.5 mm through the posterior fossa, 5 mm above. The ramp of 10 HU per mm stays
    that ramp on a regular 2.5 mm grid; a slice missing from either section is still refused."""
    thin, thick = 2.5 * np.arange(13), 35.0 + 5.0 * np.arange(14)          # 0–30 mm, then 35–100 mm
    zs = np.concatenate([thin, thick])
    vol = load_volume(_respaced(tmp_path / "head", zs))
    n = int(round(zs[-1] / 2.5)) + 1
    assert vol.shape == (32, 32, n) and np.allclose(vol.spacing, (0.8, 0.8, 2.5))
    assert np.allclose(vol.hu[5, 5, :], 10 * 2.5 * np.arange(n), atol=1e-3)
    warned(tmp_path, vol, rf"^The slice spacing varies \(2\.50–5\.00 mm\): the {len(zs)} slices were "
                          rf"resampled onto a regular 2\.50 mm grid \({n} slices, linear interpolation\)")
    vol = load_volume(_respaced(tmp_path / "head-flipped", zs[-1] - zs[::-1]))   # thick sections first
    assert vol.shape == (32, 32, n) and np.allclose(vol.spacing, (0.8, 0.8, 2.5))
    refused(tmp_path, _respaced(tmp_path / "thick-gap", np.delete(zs, 20)),
            r"missing slices \(a gap of 10\.00 mm where the slices around it are 5\.00 mm apart")
    vol = load_volume(_respaced(tmp_path / "old-head", np.concatenate([thin, 38.0 + 8.0 * np.arange(9)])))
    warned(tmp_path, vol, r"^The slices are 8\.0 mm thick \(every 2\.5 mm\), over 5 mm")     # older 8 mm
    thin, thick = 2.5 * np.arange(20), 52.5 + 5.0 * np.arange(6)          # the thin sections the majority
    refused(tmp_path, _respaced(tmp_path / "thin-gap", np.delete(np.concatenate([thin, thick]), 8)),
            r"missing slices \(a gap of 5\.00 mm where the slices around it are 2\.50 mm apart")


def test_a_damaged_nifti_gz_is_refused_not_loaded(tmp_path):
    """nibabel reads a .nii.gz no further than its header's size, so the gzip checksum at the end is never
    checked: a flipped bit in the stream loaded as a scan with changed voxels. The loader reads to the end."""
    p = _nifti(tmp_path, _ct_like().round().astype(np.int16), "x.nii.gz")
    good = load_volume(p).hu
    blob = bytearray(p.read_bytes())
    blob[-8] ^= 0x01                                   # the CRC-32 of the unpacked data, in the trailer
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(bytes(blob))
    refused(tmp_path, bad, r"^'bad.nii.gz' is damaged: its gzip stream fails its checksum or is cut short")
    blob = bytearray(p.read_bytes())
    bad.write_bytes(bytes(blob + gzip.compress(bytes(2_000_000))))   # a second member: 2 MB past the voxels
    refused(tmp_path, bad, r"unpacks to more data than its header's size")
    bad.write_bytes(bytes(blob + gzip.compress(b"")))                # an empty member, as some tools write
    assert np.array_equal(load_volume(bad).hu, good)


def test_nrrd_skips_larger_than_the_file_are_refused_at_once(tmp_path):
    """A line skip of 10¹² read lines for ever; a byte skip of 10¹² let a compressed stream unpack without
    bound (the cap was the voxels' size plus the skip)."""
    ct = _ct_like((20, 18, 16)).round().astype(np.int16)
    head = (b"NRRD0004\ntype: int16\nendian: little\ndimension: 3\nsizes: 20 18 16\nspace: "
            b"left-posterior-superior\nspace directions: (1,0,0) (0,1,0) (0,0,1)\n")
    for encoding, data in ((b"raw", ct.tobytes(order="F")), (b"gzip", gzip.compress(ct.tobytes(order="F")))):
        p = tmp_path / f"s_{encoding.decode()}.nrrd"
        p.write_bytes(head + b"encoding: " + encoding + b"\nline skip: 1000000000000\n\n" + data)
        refused(tmp_path, p, r"asks to skip 1,000,000,000,000 lines of a data file of [\d,]+ bytes")
        p.write_bytes(head + b"encoding: " + encoding + b"\nbyte skip: 1000000000000\n\n" + data)
        refused(tmp_path, p, r"asks to skip 1,000,000,000,000 bytes before its voxels, more than its")
        p.write_bytes(head + b"encoding: " + encoding + b"\nbyte skip: 4\n\n" +
                      (b"skip" + ct.tobytes(order="F") if encoding == b"raw" else
                       gzip.compress(b"skip" + ct.tobytes(order="F"))))
        assert np.array_equal(load_volume(p).hu, ct)


def test_a_nrrd_without_directions_uses_its_spacings_and_says_the_side_is_a_guess(tmp_path):
    ct = _ct_like((20, 18, 16)).round().astype(np.int16)
    p = tmp_path / "bare.nrrd"
    head = b"NRRD0004\ntype: int16\nendian: little\ndimension: 3\nsizes: 20 18 16\nencoding: raw\n"
    p.write_bytes(head + b"spacings: 0.7 0.8 2.5\n\n" + ct.tobytes(order="F"))
    vol = load_volume(p)
    assert np.allclose(vol.spacing, (0.7, 0.8, 2.5))
    warned(tmp_path, vol, r"records no orientation \(no space directions\).*left and right may be mirrored")
    p.write_bytes(head + b"space: right-anterior-superior\nspace directions: (0.07,0,0) (0,0.08,0) "
                  b"(0,0,0.25)\nspace units: \"cm\" \"cm\" \"cm\"\n\n" + ct.tobytes(order="F"))
    assert np.allclose(load_volume(p).spacing, (0.7, 0.8, 2.5))              # in mm


def test_zip_members_that_cannot_be_unpacked_are_refused_in_words(tmp_path):
    import struct

    scan = _nifti(tmp_path, _ct_like(), "scan.nii.gz")

    def stored(name):
        z = tmp_path / name
        with zipfile.ZipFile(z, "w", zipfile.ZIP_STORED) as zf:
            zf.write(scan, "study/scan.nii.gz")
        return z, bytearray(z.read_bytes())

    z, b = stored("damaged.zip")
    b[200] ^= 0xFF                                                      # inside the stored member
    z.write_bytes(bytes(b))
    refused(tmp_path, z, r"^'damaged.zip' is damaged: 'study/scan.nii.gz' could not be unpacked")
    z, b = stored("locked.zip")
    b[6] |= 1                                               # the encrypted flag, local and central
    b[b.rfind(b"PK\x01\x02") + 8] |= 1
    z.write_bytes(bytes(b))
    refused(tmp_path, z, r"^'locked.zip' is password-protected")
    z, b = stored("deflate64.zip")
    b[8:10] = struct.pack("<H", 9)
    central = b.rfind(b"PK\x01\x02")
    b[central + 10:central + 12] = struct.pack("<H", 9)
    z.write_bytes(bytes(b))
    refused(tmp_path, z, r"with a compression this server cannot unpack \(Deflate64, method 9\)")


def test_a_zip_made_by_macos_loads_without_its_metadata_files(tmp_path):
    scan = _nifti(tmp_path, _ct_like(), "scan.nii.gz")
    z = tmp_path / "study.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.write(scan, "study/scan.nii.gz")
        zf.writestr("__MACOSX/study/._scan.nii.gz", b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X" + bytes(500))
        zf.writestr("study/._notes.txt", b"\x00\x05\x16\x07")
    assert np.array_equal(load_volume(z).hu, load_volume(scan).hu)


def test_nifti_placement_that_is_guessed_or_ambiguous_is_warned_about(tmp_path):
    ct = _ct_like().round().astype(np.int16)
    img = nib.Nifti1Image(ct, None)
    img.header.set_zooms((0.7, 0.8, 2.5))
    nib.save(img, str(tmp_path / "no_codes.nii.gz"))                    # qform and sform codes 0
    warned(tmp_path, load_volume(tmp_path / "no_codes.nii.gz"),
           r"records no orientation \(its qform and sform codes are 0\).*left and right may be mirrored")

    img = nib.Nifti1Image(ct, None)
    img.header.set_qform(np.diag([0.7, 0.8, 2.5, 1]), code=1)
    pixdim = img.header["pixdim"].copy()
    pixdim[1] = 0
    img.header["pixdim"] = pixdim
    nib.save(img, str(tmp_path / "pixdim0.nii.gz"))
    warned(tmp_path, load_volume(tmp_path / "pixdim0.nii.gz"), r"no voxel size along axis i \(pixdim 0\)")

    qform, sform = nifti_with_two_placements(tmp_path / "two.nii.gz", ct)
    vol = load_volume(tmp_path / "two.nii.gz")
    assert np.allclose(vol.affine, sform)
    warned(tmp_path, vol, r"two placements of the scan \(qform and sform\) differ by up to 20 mm")
    x = vol.meta["nifti_xforms"]
    assert (x["qform_code"], x["sform_code"]) == (1, 2) and np.allclose(x["qform"], qform)
    plain = load_volume(_nifti(tmp_path, ct)).warnings
    assert not [w for w in plain if "placement" in w or "orientation" in w]


def test_nrrd_in_las_space_loads_and_hex_encoding_is_named(tmp_path):
    ct = _ct_like((20, 18, 16)).round().astype(np.int16)
    head = (b"NRRD0004\ntype: int16\nendian: little\ndimension: 3\nsizes: 20 18 16\n"
            b"space directions: (0.7,0,0) (0,0.8,0) (0,0,2.5)\nspace origin: (10,20,30)\n")
    p = tmp_path / "las.nrrd"
    p.write_bytes(head + b"space: left-anterior-superior\nencoding: raw\n\n" + ct.tobytes(order="F"))
    vol = load_volume(p)
    want = np.diag([-0.7, 0.8, 2.5, 1.0])
    want[:3, 3] = (-10, 20, 30)
    assert np.allclose(vol.affine, want) and np.array_equal(vol.hu, ct)
    p.write_bytes(head + b"space: left-anterior-superior\nencoding: hex\n\n" + ct.tobytes().hex().encode())
    refused(tmp_path, p, r"stores its voxels with the encoding 'hex', which is not read here")


@pytest.mark.parametrize("order", ["C", "F"])
def test_a_scan_of_whole_hu_is_kept_as_int16_with_the_same_values_and_preparation(order):
    """An open scan held float32 HU (4 bytes a voxel) though a CT's are whole numbers: it is int16 when that
    holds every value (half the memory), float32 when one is not whole; the official preparation of either
    is the same, value for value."""
    import torch

    from photon_core.io.preprocess import prepare
    from photon_core.io.volume import Volume

    rng = np.random.default_rng(0)
    whole = np.asarray(rng.integers(-1024, 3000, (40, 36, 30)), np.float32, order=order)
    vol = volume_from_array(whole, np.diag([2.0, 2.0, 3.0, 1.0]))
    assert vol.hu.dtype == np.int16 and np.array_equal(vol.hu, whole)
    frac = whole.copy(order=order)
    frac[7, 8, 9] += 0.5                                                      # one voxel not whole
    kept = volume_from_array(frac, np.diag([2.0, 2.0, 3.0, 1.0]))
    assert kept.hu.dtype == np.float32 and np.array_equal(kept.hu, frac)
    as_float = Volume(hu=whole.copy(order=order), affine=vol.affine, source_format="array")
    a, b = prepare(vol, "cpu"), prepare(as_float, "cpu")
    assert torch.equal(a.frames, b.frames) and torch.equal(a.pixel_values, b.pixel_values)
    assert np.array_equal(a.geometry.model_to_orig, b.geometry.model_to_orig)


@pytest.mark.parametrize("stored, slope, inter, lo, hi", [
    (np.int16, 1, -1024, -1000, 3000), (np.uint16, 1, -1024, 0, 5000), (np.int16, 2, -1000, -1000, 3000),
    (np.uint8, 1, -1000, 0, 255), (np.int16, 0.5, 0, -1000, 3000), (np.int16, 1, 0.5, -1000, 3000),
    (np.uint16, 1, -32768, 30768, 36768), (np.int16, 3, 0, 10000, 12000), (np.int32, 1, 0, -1000, 3000),
    (np.float32, 1, 0, -1000, 3000)])
def test_a_nifti_is_read_as_its_scaled_values_whatever_its_storage(tmp_path, stored, slope, inter, lo, hi):
    """Stored integers scaled by a whole slope and intercept are read straight into int16 (no float32
    copy); any other storage or scaling as before: each gives the values nibabel's float scaling gives,
    clipped to the HU range, those that overflow int16 on the way (×3, or uint16 past 32,767) included."""
    a = np.random.default_rng(1).integers(lo, hi, (40, 30, 20)).astype(stored)
    img = nib.Nifti1Image(a, np.diag([1.5, 1.5, 3.0, 1.0]))
    img.header.set_slope_inter(slope, inter)
    nib.save(img, str(tmp_path / "scan.nii.gz"))
    vol = load_volume(tmp_path / "scan.nii.gz")
    want = np.clip(a.astype(np.float64) * slope + inter, *HU_RANGE)
    assert np.array_equal(vol.hu, want.astype(np.float32))
    assert vol.hu.dtype == (np.float32 if (slope, inter) in ((0.5, 0), (1, 0.5)) else np.int16)


def _traced_load(source):
    """``load_volume(source)`` and the peak of the memory it traced (numpy's arrays and Python's objects)."""
    import tracemalloc

    tracemalloc.start()
    try:
        vol = load_volume(source)
        return vol, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_an_int16_nifti_loads_without_a_float32_copy(tmp_path):
    """A CT stored as int16 was scaled into float32 (4 bytes a voxel) and then compacted (2 more): its
    load now peaks at about twice the int16 volume (what nibabel reads, and the scan), not four times."""

    a = np.random.default_rng(2).integers(-1024, 2000, (256, 256, 160)).astype(np.int16)   # the checks
    # judge ≤ 2 M voxels: a volume well over that, as a CT is
    img = nib.Nifti1Image(a, np.diag([0.8, 0.8, 2.5, 1.0]))
    img.header.set_slope_inter(1, -1024)
    nib.save(img, str(tmp_path / "ct.nii.gz"))
    vol, peak = _traced_load(tmp_path / "ct.nii.gz")
    assert vol.hu.dtype == np.int16
    assert np.array_equal(vol.hu, np.clip(a.astype(np.int32) - 1024, -2000, 4000))
    assert peak < 2.6 * a.nbytes, f"peak {peak / a.nbytes:.2f}× the int16 volume"


def test_a_dicom_series_load_holds_one_files_pixel_data_at_a_time(tmp_path):
    """Each file's pixel data is read when its slice is copied into the volume, not all of them first: a
    load's memory beyond the scan itself grows with the number of slices only by their headers (it grew
    by the series' whole pixel data: 512 × 512 × 300, 326 → 176 MB traced for a 157 MB scan)."""

    extra, n, shape = [], 150, (256, 256)     # both loads well over the ≤ 2 M voxels the value checks sample
    for count in (n, 2 * n):
        px = np.random.default_rng(count).integers(0, 3000, (count, *shape)).astype(np.uint16)
        folder = _dicom_slices(tmp_path / f"ct{count}", px, [1] * count, -1024)
        vol, peak = _traced_load(folder)
        assert np.array_equal(vol.hu, (px.astype(np.int32) - 1024).transpose(2, 1, 0))
        extra.append(peak - vol.hu.nbytes)
    pixel_bytes = n * shape[0] * shape[1] * 2          # what n more slices' pixel data would add
    assert extra[1] - extra[0] < 0.3 * pixel_bytes, [f"{e / 1e6:.1f} MB" for e in extra]


def _dicom_slices(folder, px, slopes, intercept):
    """A CT series of the stored slices ``px`` (n, rows, cols; int16 or uint16), 2 mm apart, each with its
    rescale slope (``slopes[k]``) and ``intercept``."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, (image, slope) in enumerate(zip(px, slopes)):
        _ct_slice(folder / f"s{k}.dcm", image, 2.0 * k, k + 1, slope, intercept)
    return folder


@pytest.mark.parametrize("stored, slopes, inter, lo, hi, dtype", [
    (np.uint16, [1], -1024, 0, 4000, np.int16), (np.int16, [1], 0, -1000, 3000, np.int16),
    (np.int16, [2], -1000, -500, 2000, np.int16), (np.int16, [1, 1, 0.5], 0, -1000, 3000, np.float32),
    (np.uint16, [1], 0, 30000, 40000, np.int16), (np.int16, [3], 0, 10000, 12000, np.int16),
    (np.int16, [1], -32768, -1000, 3000, np.int16)])
def test_a_dicom_series_is_assembled_as_its_rescaled_values(tmp_path, stored, slopes, inter, lo, hi, dtype):
    """A series whose every slice has a whole slope and intercept is assembled straight into int16 (no
    float32 volume); one fractional slope, or values that leave int16 on the way (uint16 past 32,767, ×3,
    an intercept of −32,768), take float32 as before: each gives stored × slope + intercept, clipped to the
    HU range, and keeps int16 only where every value is whole."""
    n = 16
    px = np.random.default_rng(3).integers(lo, hi, (n, 24, 20)).astype(stored)
    slopes = (slopes * n)[:n]
    vol = load_volume(_dicom_slices(tmp_path / "s", px, slopes, inter))
    want = np.clip(px.astype(np.float64) * np.asarray(slopes)[:, None, None] + inter, *HU_RANGE)
    assert vol.hu.dtype == dtype
    assert np.array_equal(vol.hu, want.transpose(2, 1, 0).astype(np.float32))     # (col, row, slice)


def test_a_dicom_series_loads_without_a_float32_volume(tmp_path):
    """A CT series was assembled in float32 (4 bytes a voxel) beside every slice's read and decoded pixels,
    then compacted to int16: its load now peaks at about twice the int16 volume, not six times (5.9×,
    5.2× for 512 × 512 × 64) as before: 2.3× when every file's pixel data was read first, 2.0× since each is
    read as it is copied (at this size the value checks' sample of ≤ 2 M voxels is most of the rest)."""

    px = np.random.default_rng(4).integers(0, 3000, (96, 256, 256)).astype(np.uint16)   # a volume well over
    folder = _dicom_slices(tmp_path / "ct", px, [1] * len(px), -1024)                   # what checks sample
    vol, peak = _traced_load(folder)
    assert vol.hu.dtype == np.int16
    assert np.array_equal(vol.hu, (px.astype(np.int32) - 1024).transpose(2, 1, 0))
    assert peak < 3.0 * px.nbytes, f"peak {peak / px.nbytes:.2f}× the int16 volume"
