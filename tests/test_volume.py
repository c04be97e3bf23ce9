"""Loading every sample, and a clear error for every kind of bad input."""
import gzip
import json
import zipfile

import nibabel as nib
import numpy as np
import pytest

from conftest import SAMPLES
from photon_core.io.volume import Limits, VolumeError, load_label_map, load_volume, volume_from_array

CASES = json.loads((SAMPLES / "cases.json").read_text())["cases"]


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_every_sample_loads(case):
    vol = load_volume(SAMPLES / case["file"])
    assert vol.hu.dtype == np.float32 and vol.hu.ndim == 3
    assert np.allclose(vol.spacing, case["spacing_mm"], atol=0.01)
    assert -1300 < vol.hu.min() < -900 and 1000 < vol.hu.max() < 4000      # HU, rescale applied
    labels, aff = load_label_map(SAMPLES / case["label_map"])
    assert labels.shape == vol.shape
    for lid in case["labels"]:
        assert (labels == int(lid)).any()


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


# ------------------------------------------------------------------ bad inputs

def _nifti(tmp_path, arr, name="x.nii.gz", affine=None):
    p = tmp_path / name
    nib.save(nib.Nifti1Image(arr, np.eye(4) if affine is None else affine), str(p))
    return p


def test_2d_image(tmp_path):
    with pytest.raises(VolumeError, match="2-D image"):
        load_volume(_nifti(tmp_path, np.zeros((64, 64), np.int16)))


def test_single_slice(tmp_path):
    with pytest.raises(VolumeError, match="2-D image"):
        load_volume(_nifti(tmp_path, np.zeros((64, 64, 1), np.int16)))


def test_4d_series(tmp_path):
    with pytest.raises(VolumeError, match="4-D series"):
        load_volume(_nifti(tmp_path, np.zeros((32, 32, 32, 3), np.int16)))


def test_too_few_slices(tmp_path):
    with pytest.raises(VolumeError, match="at least 16"):
        load_volume(_nifti(tmp_path, np.zeros((64, 64, 8), np.int16)))


def test_nan_voxels(tmp_path):
    a = np.zeros((20, 20, 20), np.float32)
    a[3, 4, 5] = np.nan
    a[1, 1, 1] = np.inf
    with pytest.raises(VolumeError, match="2 NaN/Inf"):
        load_volume(_nifti(tmp_path, a))


def test_truncated_gzip(tmp_path):
    good = _nifti(tmp_path, np.random.randint(-1000, 1000, (40, 40, 40)).astype(np.int16))
    bad = tmp_path / "trunc.nii.gz"
    bad.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(VolumeError, match="truncated|corrupt|not a readable"):
        load_volume(bad)


def test_gzip_that_is_not_nifti(tmp_path):
    p = tmp_path / "notes.nii.gz"
    p.write_bytes(gzip.compress(b"hello, this is not an image" * 50))
    with pytest.raises(VolumeError):
        load_volume(p)


def test_not_gzip_at_all(tmp_path):
    p = tmp_path / "x.nii.gz"
    p.write_bytes(b"\x00\x01garbage" * 100)
    with pytest.raises(VolumeError, match="gzip"):
        load_volume(p)


def test_empty_file(tmp_path):
    p = tmp_path / "e.nii"
    p.write_bytes(b"")
    with pytest.raises(VolumeError, match="empty"):
        load_volume(p)


def test_unknown_format(tmp_path):
    p = tmp_path / "x.png"
    p.write_bytes(b"\x89PNG....")
    with pytest.raises(VolumeError, match="not a supported CT file"):
        load_volume(p)


def test_header_claims_gigabytes(tmp_path):
    """A header announcing 2000³ voxels is refused before any data is read."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((2000, 2000, 2000))
    hdr.set_data_dtype(np.int16)
    p = tmp_path / "huge.nii"
    with open(p, "wb") as f:
        f.write(hdr.binaryblock + b"\x00" * 4 + b"\x00" * 1000)
    with pytest.raises(VolumeError, match="GB|limit"):
        load_volume(p)


def test_absurd_axis(tmp_path):
    with pytest.raises(VolumeError, match="per axis"):
        volume_from_array(np.zeros((3000, 16, 16), np.float32))


def test_configurable_limits():
    with pytest.raises(VolumeError):
        volume_from_array(np.zeros((64, 64, 64), np.float32), limits=Limits(max_bytes=1000))


# ------------------------------------------------------------------ DICOM

def _dicom_series(folder, n=20, modality="CT", uid="1.2.3.4", z0=0.0, dz=2.0, skip=(), dup=(), name="Doe^Jane"):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    zs = [z0 + i * dz for i in range(n) if i not in skip] + [z0 + i * dz for i in dup]
    for k, z in enumerate(zs):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"s{k}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.Modality, ds.SeriesInstanceUID, ds.SOPInstanceUID = modality, uid, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = name, "ID-12345", "19700101"
        ds.Rows, ds.Columns = 32, 32
        ds.PixelSpacing = [0.8, 0.8]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0, 0, z]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = (np.full((32, 32), 1024 + 40, np.uint16)).tobytes()
        ds.save_as(str(folder / f"s{k}.dcm"), enforce_file_format=True)
    return folder


def test_dicom_series_rescale_and_no_identity(tmp_path):
    vol = load_volume(_dicom_series(tmp_path / "ok"))
    assert vol.shape == (32, 32, 20) and np.allclose(vol.hu, 40)       # slope/intercept applied
    assert np.allclose(vol.spacing, (0.8, 0.8, 2.0))
    text = repr(vol.meta) + repr(vol)[:2000]
    assert "Doe" not in text and "12345" not in text and "1970" not in text


def test_dicom_missing_slices(tmp_path):
    with pytest.raises(VolumeError, match="missing slices"):
        load_volume(_dicom_series(tmp_path / "m", skip=(7, 8)))


def test_dicom_duplicate_slices(tmp_path):
    with pytest.raises(VolumeError, match="duplicate"):
        load_volume(_dicom_series(tmp_path / "d", dup=(5,)))


def test_dicom_two_series(tmp_path):
    _dicom_series(tmp_path / "two" / "a", uid="1.1")
    _dicom_series(tmp_path / "two" / "b", uid="2.2", z0=100)
    with pytest.raises(VolumeError, match="2 different DICOM series"):
        load_volume(tmp_path / "two")


def test_dicom_non_ct(tmp_path):
    with pytest.raises(VolumeError, match="modality 'MR'"):
        load_volume(_dicom_series(tmp_path / "mr", modality="MR"))


def _zip(path, members):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members:
            z.writestr(name, data)
    return path


def test_dicom_zip_loads(tmp_path):
    folder = _dicom_series(tmp_path / "z")
    p = _zip(tmp_path / "series.zip", [(f"series/{f.name}", f.read_bytes()) for f in sorted(folder.iterdir())])
    assert load_volume(p).shape == (32, 32, 20)


def test_zip_slip(tmp_path):
    p = _zip(tmp_path / "evil.zip", [("../../etc/evil.dcm", b"x" * 10)])
    with pytest.raises(VolumeError, match="escapes its folder"):
        load_volume(p)


def test_zip_symlink(tmp_path):
    p = tmp_path / "link.zip"
    with zipfile.ZipFile(p, "w") as z:
        info = zipfile.ZipInfo("series/link")
        info.external_attr = (0o120777 << 16)
        z.writestr(info, "/etc/passwd")
    with pytest.raises(VolumeError, match="symbolic link"):
        load_volume(p)


def test_zip_bomb(tmp_path):
    p = _zip(tmp_path / "bomb.zip", [("a.bin", b"\0" * 60_000_000)])
    with pytest.raises(VolumeError, match="zip bombs|limit"):
        load_volume(p)


def test_zip_too_many_files(tmp_path):
    p = _zip(tmp_path / "many.zip", [(f"f{i}", b"x") for i in range(30)])
    with pytest.raises(VolumeError, match="limit is 10"):
        load_volume(p, Limits(max_zip_files=10))


def test_single_dicom_file(tmp_path):
    f = sorted(_dicom_series(tmp_path / "one").iterdir())[0]
    with pytest.raises(VolumeError, match="single DICOM image"):
        load_volume(f)


def test_zero_size_dimension(tmp_path):
    with pytest.raises(VolumeError, match="empty dimension"):
        load_volume(_nifti(tmp_path, np.zeros((0, 32, 32), np.int16)))


def test_huge_upload_is_refused_before_reading(tmp_path):
    p = tmp_path / "big.nii"
    with open(p, "wb") as f:
        f.truncate(50_000_000)                      # sparse 50 MB file
    with pytest.raises(VolumeError, match="upload limit"):
        load_volume(p, Limits(max_file_bytes=10_000_000))
