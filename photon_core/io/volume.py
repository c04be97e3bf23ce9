"""Loading a CT scan into one `Volume` value.

Supported inputs: NIfTI (.nii, .nii.gz), NRRD (.nrrd), a DICOM upload (a folder, a list of files,
one enhanced multi-frame file, or a .zip of them; compressed series, JPEG 2000, JPEG Lossless, JPEG-LS,
RLE, decode through pylibjpeg and GDCM). A DICOM upload may hold several series, as a PACS export does
(a localizer, two reconstruction kernels, ...): `list_series` lists them and
``load_volume(..., series=key)`` loads one (by default the axial CT series with the most slices); the
DICOM specifics live in `photon_core.io.dicom`.

Conventions
-----------
* ``Volume.hu`` is an array indexed ``[i, j, k]`` in the file's own voxel order (nibabel
  convention: i is the fastest-varying index on disk). It holds Hounsfield units: DICOM rescale
  slope/intercept and NIfTI scl_slope/scl_inter are applied. A loaded scan's is int16 when every
  value is a whole number (most CTs: half the memory of float32, the same values), else float32;
  arithmetic on it casts first (``np.asarray(vol.hu, np.float32)``).
* ``Volume.affine`` maps voxel indices ``(i, j, k, 1)`` to world millimetres in **RAS+** (the
  NIfTI / nibabel / 3D Slicer convention: +x = Right, +y = Anterior, +z = Superior).
  DICOM and NRRD-LPS geometry (+x = Left, +y = Posterior) is converted by negating x and y.
* Patient-identifying DICOM attributes are never read: DICOM files are read with pydicom's
  ``specific_tags`` (only the attributes the loader needs; see `photon_core.io.dicom`), and only the
  fields listed in ``SAFE_DICOM_FIELDS`` reach ``Volume.meta``.

What the loader does with doubtful data
---------------------------------------
A file is read as what its bytes hold (NIfTI, gzip-compressed or not, or NRRD) when its name says
otherwise or nothing (a download that lost its suffix, a .nii that is gzip-compressed), with a warning.
It refuses what cannot be a CT (complex or colour data, 2-D images, absurd sizes) with a `VolumeError`
(a `ValueError`) whose message says what was wrong and what is expected, in words a clinician can act
on. It loads, and says so in ``Volume.warnings``, what can be read but deserves a second look:
mask- or label-like data, values outside [−2000, 4000] HU (clipped), a constant volume, a volume with
almost no air (a lost rescale intercept, another modality, a crop inside the body), NaN/Inf
voxels (replaced by −1000 HU, counted), slices thicker than 5 mm, a NIfTI scale slope that kept its
intercept from being applied, duplicate DICOM slices (dropped) and other series in the upload.
No message names a server path: only file names as the user uploaded them (`clean_text`).
"""
from __future__ import annotations

import gzip
import io
import os
import re
import shutil
import stat
import tempfile
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class VolumeError(ValueError):
    """A file that cannot be used as a CT volume; the message is meant for the user."""


@dataclass(frozen=True)
class Limits:
    """Input limits; every value can be overridden (see README, "Limits")."""

    min_slices: int = 16                 # a CT volume needs at least this many voxels on every axis
    max_axis: int = 2048                 # voxels per axis
    max_bytes: int = 1_500_000_000       # float32 bytes of the decoded volume
    max_zip_bytes: int = 2_000_000_000   # sum of uncompressed member sizes in a .zip
    max_zip_files: int = 4000            # members in a .zip
    max_zip_ratio: float = 200.0         # uncompressed/compressed ratio that marks a zip bomb
    max_file_bytes: int = 1_000_000_000  # a single uploaded file


DEFAULT_LIMITS = Limits()
HU_RANGE = (-2000.0, 4000.0)    # values outside are clipped (with a warning): no CT tissue lies outside
NONFINITE_HU = -1000.0          # what a NaN/Inf voxel becomes: air, as outside the field of view
THICK_SLICE_MM = 5.0            # thicker slices get a warning: small findings fall between them
AIR_HU = (-1200.0, -300.0)      # air and lung: a CT in HU holds some (outside the body, lungs, bowel)
MIN_AIR_FRACTION = 1e-3         # fewer voxels of air than this gets a warning
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".hdr", ".img", ".img.gz")   # one scan, not DICOM


@dataclass
class Volume:
    """A CT volume in Hounsfield units with its voxel→world (RAS, mm) affine."""

    hu: np.ndarray                   # (I, J, K) HU: int16 when whole numbers (a loaded scan's), else float32
    affine: np.ndarray               # (4, 4) float64, voxel index -> RAS mm
    source_format: str               # "nifti" | "dicom" | "nrrd" | "array"
    meta: dict = field(default_factory=dict)  # non-identifying metadata only
    warnings: list[str] = field(default_factory=list)   # readable load warnings, for the UI and the API

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.hu.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along i, j, k (column norms of the affine)."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore

    @property
    def orientation(self) -> str:
        """Axis codes, nibabel style: the RAS direction each voxel axis increases toward, e.g. 'LPS'."""
        import nibabel as nib

        return "".join(nib.aff2axcodes(self.affine))

    def summary(self) -> str:
        sx, sy, sz = self.spacing
        i, j, k = self.shape
        return (f"{i}×{j}×{k} voxels, {sx:.2f}×{sy:.2f}×{sz:.2f} mm, orientation {self.orientation}, "
                f"HU [{float(self.hu.min()):.0f}, {float(self.hu.max()):.0f}]")


@dataclass(frozen=True)
class SeriesInfo:
    """One series of a DICOM upload, for a chooser. Holds no patient identifier: ``uid`` is a digest
    of the SeriesInstanceUID (a UID is an identifier under DICOM PS3.15), not the UID itself."""

    uid: str               # key to pass to ``load_volume(..., series=uid)``
    description: str       # SeriesDescription (free text written by the scanner), '' if none
    slices: int            # distinct slice positions (a repeated slice counts once); frames if multi-frame
    kernel: str            # ConvolutionKernel, '' if none
    orientation: str       # 'axial' | 'coronal' | 'sagittal' | 'oblique' ('unknown' without geometry)
    modality: str          # 'CT', 'MR', ...
    label: str             # one line for a dropdown
    loadable: bool = True  # False: a localizer, not CT, too few slices, ... (``note`` says which)
    note: str = ""


# DICOM attributes kept in Volume.meta (none identifies a patient).
SAFE_DICOM_FIELDS = ("Modality", "Manufacturer", "SliceThickness", "KVP", "ConvolutionKernel",
                     "BodyPartExamined", "ContrastBolusAgent")


# --------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------

_QUOTED_PATH = re.compile(r"""(["'])((?:[A-Za-z]:[\\/]|\\\\|~/|/)[^"'\n]*)\1""")
_ABS_PATH = re.compile(r"(?<![\w.])(?:[A-Za-z]:[\\/]|\\\\|~/|/(?=[^\s/'\"()<>|]+/))[^\s'\"()<>|]*")


def clean_text(text: object, limit: int | None = None) -> str:
    """Text safe to show a user or write to a report: control characters removed, every absolute path
    replaced by its last part (a server's temporary folder never shows), shortened at a word boundary
    with '…' when over ``limit`` characters. Relative text such as 'Abdomen/pelvis CT' is kept."""
    s = "".join(ch if ch.isprintable() else " " for ch in str(text))

    def last_part(m: re.Match) -> str:
        parts = [p for p in re.split(r"[\\/]+", m.group()) if p and not re.fullmatch(r"[A-Za-z]:|~", p)]
        return parts[-1] if parts else ""

    s = _QUOTED_PATH.sub(lambda m: m.group(1) + last_part(re.match(r".*", m.group(2))) + m.group(1), s)
    s = " ".join(_ABS_PATH.sub(last_part, s).split())
    if limit is not None and len(s) > limit:
        cut = s[: max(1, limit - 1)]
        if " " in cut and not s[len(cut)].isspace():
            cut = cut[: cut.rfind(" ")]
        s = cut.rstrip(" ,;:-") + "…"
    return s


def _reason(e: BaseException, limit: int = 100) -> str:
    """An exception as a short parenthesis for a message: its type and (cleaned) text."""
    text = clean_text(e, limit)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# --------------------------------------------------------------------------------------------
# Validation shared by every format
# --------------------------------------------------------------------------------------------

def _check_shape(shape: Sequence[int], limits: Limits, what: str = "This file") -> tuple[int, ...]:
    """Reject non-3-D shapes and absurd sizes *before* any voxel is read. Returns the 3-D shape."""
    shape = tuple(int(s) for s in shape)
    if any(s <= 0 for s in shape):
        raise VolumeError(f"{what} has an empty dimension (shape {shape}); a CT volume needs three "
                          f"non-empty axes.")
    core = list(shape)
    while len(core) > 3 and core[-1] == 1:  # (I, J, K, 1) is a 3-D volume stored as 4-D
        core.pop()
    if len(core) > 3:
        raise VolumeError(f"{what} is a {len(core)}-D series (shape {'×'.join(map(str, shape))}); "
                          f"load a single 3-D CT volume (one time point / one channel).")
    if len(core) < 3 or min(core) == 1:
        dims = "×".join(str(s) for s in core if s != 1)
        raise VolumeError(f"{what} is a 2-D image ({dims}); a CT volume needs at least "
                          f"{limits.min_slices} slices.")
    if min(core) < limits.min_slices:
        raise VolumeError(f"{what} has only {min(core)} slices along one axis (shape "
                          f"{'×'.join(map(str, core))}); a CT volume needs at least "
                          f"{limits.min_slices}.")
    if max(core) > limits.max_axis:
        raise VolumeError(f"{what} has {max(core)} voxels along one axis (shape "
                          f"{'×'.join(map(str, core))}); the limit is {limits.max_axis} per axis.")
    nbytes = 4 * int(np.prod(core, dtype=np.int64))
    if nbytes > limits.max_bytes:
        raise VolumeError(f"{what} would need {nbytes / 1e9:.1f} GB in memory (shape "
                          f"{'×'.join(map(str, core))}); the limit is {limits.max_bytes / 1e9:.1f} GB.")
    return tuple(core)


def _check_dtype(dtype: np.dtype, what: str) -> None:
    """Refuse voxel types that cannot hold Hounsfield units, before any voxel is read."""
    dtype = np.dtype(dtype)
    if dtype.kind == "c":
        raise VolumeError(f"{what} holds complex numbers ({dtype}), as MR raw or phase data does; a CT "
                          f"volume holds one real Hounsfield value per voxel.")
    if dtype.kind == "V" or dtype.names:
        raise VolumeError(f"{what} is a colour (RGB) image; a CT volume holds one grey value (Hounsfield "
                          f"units) per voxel.")
    if dtype.kind not in "biuf":
        raise VolumeError(f"{what} does not hold numbers ({dtype}); a CT volume holds Hounsfield units.")


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if abs(x) < 1e6 else f"{x:.1e}"


def _sample(hu: np.ndarray) -> np.ndarray:
    """Every n-th voxel, ≤ 2 M of them: what the value checks judge a volume on."""
    flat = hu.ravel(order="K")      # in memory order: no copy of a Fortran-ordered (NIfTI) array
    return flat[:: max(1, flat.size // 2_000_000)]


def _mask_like(hu: np.ndarray, was_bool: bool) -> str | None:
    """A warning when the values look like a mask or a label map rather than HU (judged on ≤ 2 M voxels)."""
    if was_bool:
        return ("The volume is a yes/no (boolean) mask, not a CT in Hounsfield units; answers about it "
                "mean nothing. Load the CT itself (a label map goes in the label-map field).")
    sample = _sample(hu)
    values = np.unique(sample[np.isfinite(sample)])
    if values.size == 2:
        return (f"The volume holds only two values ({_fmt(values[0])} and {_fmt(values[1])}): it looks like "
                f"a mask, not a CT in Hounsfield units; answers about it mean nothing.")
    if 2 < values.size <= 256 and values[0] >= 0 and np.all(values == np.round(values)):
        return (f"The volume holds only {values.size} whole-number values from {_fmt(values[0])} to "
                f"{_fmt(values[-1])}: it looks like a label map, a mask or an 8-bit picture, not a CT in "
                f"Hounsfield units. Load the CT itself (a label map goes in the label-map field).")
    return None


def _airless(hu: np.ndarray) -> str | None:
    """A warning when (almost) no voxel is air, judged on ≤ 2 M voxels: a scan whose rescale intercept was
    lost (air reads ≈ 0), another modality, or a crop inside the body. Scanner padding (−2000 and below,
    clipped) is not air."""
    sample = _sample(hu)
    air = float(np.count_nonzero((sample > AIR_HU[0]) & (sample < AIR_HU[1]))) / sample.size
    if air >= MIN_AIR_FRACTION:
        return None
    inside = sample[sample > HU_RANGE[0]]
    lo = float(inside.min()) if inside.size else HU_RANGE[0]
    return (f"Almost no voxel is air ({air:.2%} between {AIR_HU[0]:,.0f} and {AIR_HU[1]:,.0f} HU; the "
            f"lowest value is {_fmt(lo)}), yet a CT in Hounsfield units holds air around the body and in the "
            f"lungs and bowel. A scan stored without its rescale intercept (air then reads about 0 and every "
            f"tissue 1,024 too high), a scan of another kind (MR) or a crop inside the body looks like this; "
            f"answers about it may mean little.")


def _check_values(hu: np.ndarray, was_bool: bool = False) -> tuple[np.ndarray, list[str]]:
    """float32 or int16 HU, cleaned in place (the caller owns ``hu``), and the warnings about its values."""
    warnings = []
    mask = _mask_like(hu, was_bool)
    bad = ~np.isfinite(hu) if hu.dtype.kind == "f" else None
    n_bad = int(bad.sum()) if bad is not None else 0
    if n_bad:
        hu[bad] = NONFINITE_HU
        warnings.append(f"{n_bad:,} voxels held no number (NaN or infinite); they were set to "
                        f"{NONFINITE_HU:.0f} HU (air).")
    lo, hi = float(hu.min()), float(hu.max())
    not_hu = False                                  # many values clipped: the warning says they are not HU
    if lo < HU_RANGE[0] or hi > HU_RANGE[1]:
        # counted one mask at a time (each a byte a voxel, none kept)
        n_below, n_above = int(np.count_nonzero(hu < HU_RANGE[0])), int(np.count_nonzero(hu > HU_RANGE[1]))
        # one int16 value below the range and nothing above: the scanner's padding outside its field of view
        padding = (n_above == 0 and lo >= np.iinfo(np.int16).min
                   and int(np.count_nonzero(hu == lo)) == n_below)
        np.clip(hu, *(np.asarray(HU_RANGE).astype(hu.dtype)), out=hu)
        not_hu = not padding and n_below + n_above >= 0.01 * hu.size
        if not padding:
            warnings.append(f"{n_below + n_above:,} voxels lay outside {HU_RANGE[0]:.0f}…{HU_RANGE[1]:.0f} "
                            f"HU (from {_fmt(lo)} to {_fmt(hi)}) and were clipped to that range; values like "
                            f"these mean metal, or a file whose values are not Hounsfield units.")
    if float(hu.max()) - float(hu.min()) < 1e-3:
        warnings.append(f"Every voxel holds the same value ({_fmt(float(hu.flat[0]))} HU): the volume is "
                        f"blank, and answers about it mean nothing.")
    elif mask:
        warnings.append(mask)
    elif not not_hu and (airless := _airless(hu)):   # (clipped values are no air: it would blame a
        warnings.append(airless)                     # lost rescale intercept for what the clip says)
    return hu, warnings


def compact_hu(hu: np.ndarray, chunk: int = 1 << 22) -> np.ndarray:
    """``hu`` (float32, within `HU_RANGE`) as int16 when that holds every value exactly, else ``hu``: a
    scan kept open (the app holds each page's) takes half the memory. In the array's own memory order, a
    chunk at a time (a 512 × 512 × 300 scan: ≈ 0.2 s)."""
    if hu.dtype != np.float32 or hu.size == 0 or not (hu.flags.c_contiguous or hu.flags.f_contiguous):
        return hu
    order = "F" if hu.flags.f_contiguous and not hu.flags.c_contiguous else "C"
    out = np.empty(hu.shape, np.int16, order=order)
    src, dst = hu.ravel(order=order), out.ravel(order=order)             # views, both
    for a in range(0, src.size, chunk):
        part = src[a:a + chunk]
        np.copyto(dst[a:a + chunk], part, casting="unsafe")
        if not np.array_equal(dst[a:a + chunk], part):
            return hu
    return out


def _check_affine(affine: np.ndarray) -> np.ndarray:
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise VolumeError("The file's voxel-to-world transform is missing or not finite.")
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if np.any(spacing < 1e-3) or np.any(spacing > 50) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise VolumeError(f"The voxel spacing {np.round(spacing, 4).tolist()} mm is not plausible for "
                          f"a CT (expected between 0.001 and 50 mm per axis).")
    return affine


def make_volume(hu: np.ndarray, affine: np.ndarray, source_format: str, meta: dict,
                warnings: Sequence[str] = (), was_bool: bool = False,
                slice_thickness: float | None = None) -> Volume:
    """The one place a loader builds its `Volume`: values checked and cleaned in place (``hu``: an array
    the caller owns), affine checked, every warning collected."""
    hu = np.asarray(hu)                                      # int16 (whole HU) or float32
    hu = np.require(hu, np.int16 if hu.dtype == np.int16 else np.float32, ["W"])   # a read-only map is copied
    affine = _check_affine(affine)
    hu, value_warnings = _check_values(hu, was_bool)
    hu = compact_hu(hu)
    warnings = list(warnings) + value_warnings
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    thick = max(float(spacing.max()), float(slice_thickness or 0))
    if thick > THICK_SLICE_MM:
        what = (f"{spacing.max():.1f} mm apart" if spacing.max() >= thick
                else f"{thick:.1f} mm thick (every {spacing.max():.1f} mm)")
        warnings.append(f"The slices are {what}, over {THICK_SLICE_MM:.0f} mm: findings smaller than that "
                        f"can fall between slices, and the model sees an interpolated volume.")
    return Volume(hu=hu, affine=affine, source_format=source_format, meta=meta, warnings=warnings)


# --------------------------------------------------------------------------------------------
# NIfTI and NRRD
# --------------------------------------------------------------------------------------------

def _nifti_scaling_warning(header) -> str | None:
    """nibabel applies no scaling when scl_slope is 0, NaN or infinite, and then drops scl_inter too.
    NaN/NaN is nibabel's own 'no scaling' and says nothing; a NaN, zero or infinite slope beside a real
    intercept means the intercept was lost."""
    slope, inter = float(header["scl_slope"]), float(header["scl_inter"])
    if np.isfinite(slope) and slope != 0:
        return None
    what = "NaN" if np.isnan(slope) else "zero" if slope == 0 else "infinite"
    has_inter = bool(np.isfinite(inter) and inter)
    if np.isinf(slope) or has_inter:
        lost = f", so its intercept ({inter:g}) was not applied either" if has_inter else ""
        return (f"The file's scale slope (scl_slope) is {what}{lost}: the values are used as stored and may "
                f"not be Hounsfield units.")
    return None


def _load_nifti(path: Path, limits: Limits) -> Volume:
    import nibabel as nib

    if path.name.endswith(".gz"):
        try:
            with gzip.open(path, "rb") as f:
                head = f.read(348)
        except (OSError, EOFError, zlib.error) as e:
            raise VolumeError(f"'{path.name}' is not a readable gzip file ({type(e).__name__}); "
                              f"expected a .nii.gz NIfTI volume.") from None
        if len(head) < 348:
            raise VolumeError(f"'{path.name}' is truncated or is not NIfTI (header has {len(head)} of "
                              f"348 bytes).")
    stem = re.sub(r"\.(hdr|img|img\.gz)$", "", path.name, flags=re.IGNORECASE)
    if stem != path.name:                   # one half of a .hdr/.img pair: the other must lie beside it
        for half, suffixes in (("image", (".img", ".img.gz", ".IMG")), ("header", (".hdr", ".HDR"))):
            if not any((path.parent / (stem + e)).is_file() for e in suffixes):
                raise VolumeError(f"'{path.name}' is one half of a .hdr/.img pair, without its {half}: "
                                  f"upload '{stem}{suffixes[0]}' with it (both files together).")
    gz = None
    try:
        if path.name.endswith(".gz") and stem == path.name and _is_nifti_header(head):
            # read through a gzip file of our own, so that the gzip checksum at the end of the stream can be
            # checked after the voxels (nibabel reads no further than the header's size: a damaged .nii.gz
            # would load without a word)
            gz = gzip.open(path, "rb")
            holder = nib.fileholders.FileHolder(filename=str(path), fileobj=gz)
            kind = nib.Nifti2Image if head[4:8] == b"n+2\0" else nib.Nifti1Image
            img = kind.from_file_map({"header": holder, "image": holder})
        else:
            img = nib.load(str(path))
    except Exception as e:  # nibabel raises many types for corrupt headers
        if gz is not None:
            gz.close()
        raise VolumeError(f"'{path.name}' is not a readable NIfTI file ({_reason(e)}).") from None
    with gz or nullcontext():
        return _nifti_volume(path, img, gz, limits)


def rescaled_int16(raw: np.ndarray, slope: float, inter: float, reuse: bool = False) -> np.ndarray | None:
    """``raw × slope + inter`` as int16, exactly, when ``raw`` holds integers, the slope and intercept are
    whole and every value on the way fits int16 (a CT's stored values and rescale do); else None, and the
    caller scales in float32. ``reuse``: ``raw`` may be scaled in place when it is a writable int16 array
    of the caller's own (no copy at all)."""
    slope, inter = float(slope), float(inter)
    if raw.dtype.kind not in "iu" or not (slope and slope.is_integer() and inter.is_integer()):
        return None
    lo, hi = (float(raw.min()), float(raw.max())) if raw.size else (0.0, 0.0)
    steps = (lo, hi, lo * slope, hi * slope, lo * slope + inter, hi * slope + inter)     # each fits int16
    info = np.iinfo(np.int16)
    if not (info.min <= min(steps) and max(steps) <= info.max):
        return None
    own = reuse and raw.dtype == np.int16 and raw.flags.writeable and not isinstance(raw, np.memmap)
    hu = raw if own else np.array(raw, dtype=np.int16, order="K")
    if slope != 1:
        hu *= np.int16(slope)
    if inter:
        hu += np.int16(inter)
    return hu


def _nifti_voxels(img) -> np.ndarray:
    """The voxels in HU as nibabel scales them: int16 straight from the stored integers when the scaling
    (slope, intercept) is whole and every value fits, as most CTs are stored (no float32 copy: 2 bytes a
    voxel where the float path took 4 and then 2 more to compact), else float32."""
    proxy, stored = img.dataobj, img.get_data_dtype()
    slope, inter = float(getattr(proxy, "slope", 1.0)), float(getattr(proxy, "inter", 0.0))
    if stored.kind in "iu" and stored.itemsize <= 2 and slope.is_integer() and inter.is_integer() and slope:
        hu = rescaled_int16(np.asanyarray(proxy.get_unscaled()), slope, inter, reuse=True)   # read for us
        if hu is not None:
            return hu
    return np.asanyarray(proxy, dtype=np.float32)


def _nifti_volume(path: Path, img, gz, limits: Limits) -> Volume:
    import nibabel as nib

    if isinstance(img, nib.AnalyzeImage) and not isinstance(img, (nib.Nifti1Pair, nib.Nifti2Pair)):
        raise VolumeError(f"'{path.name}' is an Analyze 7.5 image, which records no orientation (left and "
                          f"right cannot be told apart); convert it to NIfTI with its orientation.")
    if not isinstance(img, (nib.Nifti1Pair, nib.Nifti2Pair)):       # NIfTI images are pairs in one file
        raise VolumeError(f"'{path.name}' is not a NIfTI volume.")
    _check_dtype(img.get_data_dtype(), f"'{path.name}'")
    _check_shape(img.header.get_data_shape(), limits, f"'{path.name}'")
    try:
        data = _nifti_voxels(img)
    except Exception as e:
        raise VolumeError(f"'{path.name}' is truncated or corrupt: its voxel data could not be read "
                          f"({type(e).__name__}).") from None
    data = data.reshape(_check_shape(data.shape, limits, f"'{path.name}'"))
    if gz is not None:
        _check_gzip_end(path, gz)
    affine = img.affine if img.affine is not None else np.eye(4)
    try:        # the header as stored: nibabel's img.header has the scaling it did not apply removed, and
                # a zero voxel size set to 1
        where = img.file_map.get("header", img.file_map["image"]).filename     # a pair's .hdr, else itself
        with nib.openers.ImageOpener(where or str(path)) as f:
            stored = img.header_class.from_fileobj(f, check=False)
    except Exception:
        stored = None
    scaling = _nifti_scaling_warning(stored) if stored is not None else None
    xforms, placement = _nifti_placement(img.header, stored, affine)
    return make_volume(data, affine, "nifti", {"format": "NIfTI", "nifti_xforms": xforms},
                       [w for w in [scaling, *placement] if w])


def _nifti_placement(header, stored, affine: np.ndarray) -> tuple[dict, list[str]]:
    """The header's two placements (qform, sform) with their codes, as an export must repeat them so that a
    mask lies over the scan in any viewer; and warnings where the placement is a guess or ambiguous: no code
    set (the axes' directions are not recorded: left and right may be mirrored), a zero voxel size in the
    header as stored (``stored``, unchecked: nibabel assumes 1 mm), or a qform and an sform that put the
    scan in different places."""
    q, q_code = header.get_qform(coded=True)
    s, s_code = header.get_sform(coded=True)
    xforms = {"qform": None if q is None else np.asarray(q).tolist(), "qform_code": int(q_code),
              "sform": None if s is None else np.asarray(s).tolist(), "sform_code": int(s_code)}
    warnings = []
    if not q_code and not s_code:
        warnings.append(f"The file records no orientation (its qform and sform codes are 0): its axes were "
                        f"read as {''.join(_axcodes(affine))}, as nibabel reads such files, so left and "
                        f"right may be mirrored; do not trust answers about a side.")
    pixdim = np.asarray((stored if stored is not None else header)["pixdim"][1:4], dtype=np.float64)
    if not s_code and np.any(~(pixdim > 0)):
        axes = ", ".join("ijk"[a] for a in np.flatnonzero(~(pixdim > 0)))
        warnings.append(f"The file gives no voxel size along axis {axes} (pixdim 0): 1 mm was assumed.")
    if q is not None and s is not None:
        corners = np.array([[i, j, k, 1] for i in (0, 1) for j in (0, 1) for k in (0, 1)], float)
        corners[:, :3] *= np.asarray(header.get_data_shape()[:3], float) - 1
        apart = float(np.abs(corners @ (np.asarray(q) - np.asarray(s)).T)[:, :3].max())
        if apart > 1.0:
            warnings.append(f"The file's two placements of the scan (qform and sform) differ by up to "
                            f"{apart:.0f} mm; this app uses the sform, as nibabel does, and a viewer may use "
                            f"the qform. The exported mask carries both, so it lies over the scan wherever "
                            f"the viewer puts it.")
    return xforms, warnings


def _axcodes(affine: np.ndarray) -> tuple[str, ...]:
    import nibabel as nib

    return nib.aff2axcodes(affine)


def _check_gzip_end(path: Path, gz: gzip.GzipFile) -> None:
    """Read a .nii.gz past its voxels to the end of its gzip stream, which checks its checksum and length;
    at most 1 MB more (what could follow the voxels: nothing, in a NIfTI file)."""
    try:
        rest = gz.read(1 << 20)
        more = gz.read(1) if len(rest) == 1 << 20 else b""
    except (OSError, EOFError, zlib.error) as e:
        raise VolumeError(f"'{path.name}' is damaged: its gzip stream fails its checksum or is cut short "
                          f"({_reason(e)}). Export or copy the scan again.") from None
    if more:
        raise VolumeError(f"'{path.name}' unpacks to more data than its header's size; the file is refused "
                          f"(damaged, or a decompression bomb).")


def _load_nrrd(path: Path, limits: Limits) -> Volume:
    import nrrd

    try:
        header = nrrd.read_header(str(path))
    except Exception as e:
        raise VolumeError(f"'{path.name}' is not a readable NRRD file ({type(e).__name__}).") from None
    _check_data_file(path, header)
    kinds = [str(k).lower() for k in header.get("kinds", [])]
    if any(k in ("rgb-color", "rgba-color", "hsv-color", "xyz-color", "3-color", "4-color") for k in kinds):
        raise VolumeError(f"'{path.name}' is a colour (RGB) image; a CT volume holds one grey value "
                          f"(Hounsfield units) per voxel.")
    _check_shape(header.get("sizes", ()), limits, f"'{path.name}'")
    encoding = str(header.get("encoding", "raw")).lower()
    if encoding not in ("raw", "gzip", "gz", "bzip2", "bz2", "ascii", "text", "txt"):
        raise VolumeError(f"'{path.name}' stores its voxels with the encoding '{clean_text(encoding, 20)}', "
                          f"which is not read here; save it with raw or gzip encoding.")
    _check_skips(path, header)
    try:
        if str(header.get("encoding", "raw")).lower() in ("gzip", "gz", "bzip2", "bz2"):
            data = _unpacked_nrrd(path, header)
        else:
            data, header = nrrd.read(str(path))
    except VolumeError:
        raise
    except Exception as e:
        raise VolumeError(f"'{path.name}' is truncated or corrupt ({type(e).__name__}).") from None
    _check_dtype(data.dtype, f"'{path.name}'")
    data = np.asarray(data, dtype=np.float32).reshape(_check_shape(data.shape, limits, f"'{path.name}'"))
    warnings = []
    if "space directions" in header:
        directions = np.asarray(header["space directions"], dtype=np.float64)
    else:                       # no placement recorded: the axes' spacings (if given), and a warning
        spacings = np.asarray(header.get("spacings", np.ones(3)), dtype=np.float64)
        directions = np.diag(np.where(np.isfinite(spacings) & (spacings > 0), spacings, 1.0))
        warnings.append(f"The file records no orientation (no space directions): its axes were read as LPS "
                        f"with {'the spacings it gives' if 'spacings' in header else '1 mm voxels'}, so left "
                        f"and right may be mirrored; do not trust answers about a side.")
    origin = np.asarray(header.get("space origin", np.zeros(3)), dtype=np.float64)
    units = {str(u).strip().lower() for u in header.get("space units", ["mm"])}
    scale = {frozenset({"mm"}): 1.0, frozenset({"millimeter"}): 1.0, frozenset({"cm"}): 10.0,
             frozenset({"m"}): 1000.0}.get(frozenset(units))
    if scale is None:
        shown = clean_text(" ".join(sorted(units)), 40)
        raise VolumeError(f"'{path.name}' gives its space in units '{shown}'; expected mm (or cm, m).")
    affine = np.eye(4)
    affine[:3, :3] = directions.T * scale  # NRRD lists one direction vector per axis
    affine[:3, 3] = origin * scale
    space = str(header.get("space", "left-posterior-superior")).lower()
    to_ras = {"left-posterior-superior": (-1, -1), "lps": (-1, -1), "left-anterior-superior": (-1, 1),
              "las": (-1, 1), "right-anterior-superior": (1, 1), "ras": (1, 1)}.get(space)
    if to_ras is None:
        raise VolumeError(f"'{path.name}' uses the NRRD space '{clean_text(space, 40)}'; expected LPS, LAS "
                          f"or RAS.")
    affine = np.diag([*map(float, to_ras), 1.0, 1.0]) @ affine
    return make_volume(data, affine, "nrrd", {"format": "NRRD"}, warnings)


def _check_skips(path: Path, header: dict) -> None:
    """The header's line skip and byte skip, bounded by what the data file holds: a line skip of 10¹² would
    read lines for ever, a byte skip of 10¹² would unpack a compressed stream without end."""
    size = _data_path(path, header).stat().st_size
    try:
        lines = int(header.get("line skip", header.get("lineskip", 0)))
        skip = int(header.get("byte skip", header.get("byteskip", 0)))
    except (TypeError, ValueError):
        raise VolumeError(f"'{path.name}' has a line skip or byte skip that is not a whole number.") from None
    packed = str(header.get("encoding", "raw")).lower() in ("gzip", "gz", "bzip2", "bz2")
    if not 0 <= lines <= size:
        raise VolumeError(f"'{path.name}' asks to skip {lines:,} lines of a data file of {size:,} bytes; "
                          f"the header is damaged.")
    if skip < -1 or (packed and skip == -1) or skip > (_voxel_bytes(header) if packed else size):
        raise VolumeError(f"'{path.name}' asks to skip {skip:,} bytes before its voxels, more than its "
                          f"{'voxel data holds' if packed else 'data file holds'}; the header is damaged.")


def _data_path(path: Path, header: dict) -> Path:
    """Where an NRRD's voxels are: the data file a detached header names (checked: `_check_data_file`),
    else the file itself, after its header."""
    named = header.get("data file", header.get("datafile"))
    return path.parent / str(named).strip() if named else path


def _voxel_bytes(header: dict) -> int:
    import nrrd

    raw = {k: v for k, v in header.items() if k not in ("data file", "datafile", "line skip", "lineskip",
                                                         "byte skip", "byteskip")}
    one = nrrd.read_data({**raw, "encoding": "raw", "sizes": np.ones(len(header["sizes"]), int)},
                         io.BytesIO(bytes(16)))
    return int(np.prod(header["sizes"], dtype=np.int64)) * one.dtype.itemsize


def _unpacked_nrrd(path: Path, header: dict) -> np.ndarray:
    """A compressed NRRD's voxels, unpacked no further than its header's size says (pynrrd unpacks the
    whole stream: a few MB of zeros could fill the server's memory)."""
    import bz2

    import nrrd

    raw = {k: v for k, v in header.items() if k not in ("data file", "datafile", "line skip", "lineskip",
                                                         "byte skip", "byteskip")}
    raw["encoding"] = "raw"
    expected = _voxel_bytes(header)
    skip = int(header.get("byte skip", header.get("byteskip", 0)))        # 0 ≤ skip ≤ expected (_check_skips)
    cap = expected + skip
    data = _data_path(path, header)
    with open(data, "rb") as fh:
        if data == path:
            nrrd.read_header(fh)                                # the data follows the header
        for _ in range(int(header.get("line skip", header.get("lineskip", 0)))):
            fh.readline()
        gz = str(header["encoding"]).lower() in ("gzip", "gz")
        out, total = _unpack_bounded(fh, zlib.decompressobj(zlib.MAX_WBITS | 16) if gz else
                                     bz2.BZ2Decompressor(), cap)
    if total > cap:
        raise VolumeError(f"'{path.name}' unpacks to more data than its header's size "
                          f"({'×'.join(str(int(n)) for n in header['sizes'])}); the file is refused "
                          f"(damaged, or a decompression bomb).")
    payload = out[skip:skip + expected]
    return nrrd.read_data(raw, io.BytesIO(bytes(payload)))


def _unpack_bounded(fh, unpack, cap: int, keep: bool = True) -> tuple[bytearray, int]:
    """``fh`` streamed through ``unpack`` (a zlib decompressobj or a bz2.BZ2Decompressor) in pieces of at
    most 1 MB, stopping once more than ``cap`` bytes came out: (what came out, if ``keep``; how many
    bytes: over ``cap`` means it stopped there). Bytes past the stream's end are never fed again."""
    out, total = bytearray(), 0
    zlib_like = hasattr(unpack, "unconsumed_tail")
    while (chunk := fh.read(1 << 20)) and not unpack.eof:
        while not unpack.eof and (chunk or (not zlib_like and not unpack.needs_input)):
            piece = unpack.decompress(chunk, min(1 << 20, cap + 1 - total))
            total += len(piece)
            if keep:
                out += piece
            if total > cap:
                return out, total
            chunk = unpack.unconsumed_tail if zlib_like else b""
    return out, total


def _check_data_file(path: Path, header: dict) -> None:
    """A detached NRRD header names its data file: only one file beside it, by its bare name, is read
    (a path could make the server read any file it can, and show it as a scan)."""
    named = header.get("data file", header.get("datafile"))
    if named is None:
        return
    named = str(named).strip()
    shown = clean_text(named, 80)
    if named.upper().startswith("LIST") or "%" in named or len(named.split()) > 1:
        raise VolumeError(f"'{path.name}' spreads its data over several files ('{shown}'); save it as one "
                          f".nrrd file.")
    if named != Path(named).name or "\\" in named or named in (".", ".."):
        raise VolumeError(f"'{path.name}' names its data file by a path ('{shown}'); only a data file beside "
                          f"the header, named by its file name, is read.")
    if not (path.parent / named).is_file():
        raise VolumeError(f"'{path.name}' is a detached NRRD header; its data file '{shown}' was not "
                          f"uploaded with it: upload both files together.")


# --------------------------------------------------------------------------------------------
# Zip uploads
# --------------------------------------------------------------------------------------------

def _safe_extract_zip(path: Path, dest: Path, limits: Limits) -> list[Path]:
    """Extract a zip into ``dest`` refusing path escapes, links, bombs and oversize archives."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise VolumeError(f"'{path.name}' is not a readable .zip archive ({type(e).__name__}).") from None
    with zf:
        members = [m for m in zf.infolist() if not m.is_dir() and not _apple_double(m.filename)]
        if len(members) > limits.max_zip_files:
            raise VolumeError(f"'{path.name}' holds {len(members)} files; the limit is "
                              f"{limits.max_zip_files}.")
        total = sum(m.file_size for m in members)
        packed = max(1, sum(m.compress_size for m in members))
        if total > limits.max_zip_bytes or (total > 50_000_000 and total / packed > limits.max_zip_ratio):
            raise VolumeError(f"'{path.name}' unpacks to {total / 1e6:.0f} MB from {packed / 1e6:.1f} MB; "
                              f"the limit is {limits.max_zip_bytes / 1e6:.0f} MB (and no zip bombs).")
        root = dest.resolve()
        out = []
        for m in members:
            name = m.filename.replace("\\", "/")
            mode = (m.external_attr >> 16) & 0o170000
            if mode == stat.S_IFLNK:
                raise VolumeError(f"'{path.name}' contains a symbolic link ('{name}'); links are not "
                                  f"accepted in uploads.")
            target = (root / name).resolve()
            if name.startswith("/") or ".." in Path(name).parts or root not in target.parents:
                raise VolumeError(f"'{path.name}' contains a path that escapes its folder ('{name}').")
            if m.flag_bits & 0x1:
                raise VolumeError(f"'{path.name}' is password-protected ('{clean_text(name, 60)}' is "
                                  f"encrypted); upload the files, or a .zip made without a password.")
            target.parent.mkdir(parents=True, exist_ok=True)
            written = 0
            try:
                with zf.open(m) as src, open(target, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        written += len(chunk)
                        if written > m.file_size or written > limits.max_zip_bytes:
                            raise VolumeError(f"'{path.name}' member '{name}' unpacks beyond its declared "
                                              f"size; the archive is refused.")
                        dst.write(chunk)
            except NotImplementedError:
                raise VolumeError(f"'{path.name}' stores '{clean_text(name, 60)}' with a compression this "
                                  f"server cannot unpack ({_ZIP_METHODS.get(m.compress_type, 'method ')}"
                                  f"{m.compress_type}); unzip it and zip it again with the usual "
                                  f"(deflate) compression.") from None
            except (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError) as e:
                raise VolumeError(f"'{path.name}' is damaged: '{clean_text(name, 60)}' could not be unpacked "
                                  f"({clean_text(str(e), 100) or 'its data ends early'}). Make the .zip "
                                  f"again.") from None
            out.append(target)
    return out


_ZIP_METHODS = {9: "Deflate64, method ", 14: "LZMA, method ", 93: "Zstandard, method ", 98: "PPMd, method "}


def _apple_double(name: str) -> bool:
    """macOS's metadata beside each file of a zip it makes ('__MACOSX/…/._scan.nii.gz'): not a file."""
    parts = name.replace("\\", "/").split("/")
    return "__MACOSX" in parts or parts[-1].startswith("._")




# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------

def _dicom_files(source, limits: Limits, tmp: str) -> list[Path] | None:
    """The files of a DICOM upload (a folder, a list of files, a .zip extracted into ``tmp``, one
    multi-frame file), or None when ``source`` is a single file of another kind."""
    if isinstance(source, (list, tuple)):
        paths = [Path(p) for p in source]
        if len(paths) != 1:
            for p in paths:
                _check_file(p, limits)
            return paths
        source = paths[0]
    path = Path(source)
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    _check_file(path, limits)
    name = path.name.lower()
    if name.endswith(VOLUME_SUFFIXES + (".gz",)):
        return None
    if name.endswith(".zip") or zipfile.is_zipfile(path):
        return sorted(_safe_extract_zip(path, Path(tmp), limits))
    from photon_core.io import dicom

    return [path] if dicom.holds_frames(path, limits) else None      # an enhanced CT: a series in one file


def list_series(files_or_zip: str | os.PathLike | Sequence[str | os.PathLike],
                limits: Limits = DEFAULT_LIMITS) -> list[SeriesInfo]:
    """The series of a DICOM upload (folder, files or .zip), the default first (the axial CT series with
    the most slices), then the others; [] for a NIfTI/NRRD file. Reads headers only."""
    from photon_core.io import dicom

    with tempfile.TemporaryDirectory(prefix="photon_zip_") as tmp:
        if _pair(files_or_zip, tmp, limits) is not None:
            return []
        files = _dicom_files(files_or_zip, limits, tmp)
        return [] if files is None else dicom.list_series(files, limits)


def load_volume(source: str | os.PathLike | Sequence[str | os.PathLike],
                limits: Limits = DEFAULT_LIMITS, series: str | None = None, step=None) -> Volume:
    """Load a CT volume from a NIfTI/NRRD file (a detached header with its data file, two files), a
    DICOM folder, a DICOM .zip, or a list of DICOM files.

    ``series``: for a DICOM upload holding several series, the ``uid`` of the `SeriesInfo` to load
    (`list_series`); None loads the default (the axial CT series with the most slices) and names the
    others in ``Volume.warnings``. Ignored for NIfTI/NRRD files.
    ``step(fraction, desc)``: told how far a DICOM series' reading is, a few times a second (an exception it
    raises stops the load there: a page's Stop loading).
    Raises `VolumeError` with a user-readable message for anything that is not a usable CT volume.
    """
    from photon_core.io import dicom

    with tempfile.TemporaryDirectory(prefix="photon_zip_") as tmp:
        header = _pair(source, tmp, limits)
        if header is not None:
            return _load_file(header, limits)
        _check_mixed(source)
        files = _dicom_files(source, limits, tmp)
        if files is not None:
            try:
                return dicom.load_series(files, limits, series, step)
            except dicom.NoImages:      # a .zip or folder of one NIfTI/NRRD scan is that scan
                scans = [f for f in files if f.name.lower().endswith(VOLUME_SUFFIXES)
                         and not f.name.lower().endswith((".img", ".img.gz"))]   # a pair: its header
                if len(scans) == 1:
                    return _load_file(scans[0], limits)
                if not scans:
                    raise
                names = ", ".join(repr(clean_text(v.name, 60)) for v in scans[:3]) + ", …" * (len(scans) > 3)
                raise VolumeError(f"This upload holds {len(scans)} scan volumes ({names}) and no DICOM "
                                  f"image; load one scan at a time: one NIfTI/NRRD file (a detached header "
                                  f"with its data file), or the files of a DICOM study. A prior scan has its "
                                  f"own upload.") from None
    return _load_file(Path(source[0] if isinstance(source, (list, tuple)) else source), limits)


def _check_mixed(source) -> None:
    """Several uploaded files that mix a scan file (or a .zip) with others, and are not a detached header
    with its data: which one is the scan cannot be told (a DICOM series beside it would load instead)."""
    if not isinstance(source, (list, tuple)) or len(source) < 2:
        return
    scans = [Path(p).name for p in source if Path(p).name.lower().endswith(VOLUME_SUFFIXES + (".zip",))]
    if scans and len(scans) < len(source):
        raise VolumeError(f"{len(source)} files were uploaded, including '{clean_text(scans[0], 60)}'; "
                          f"upload one NIfTI/NRRD file (a detached header with its data file) or one .zip, "
                          f"or only the files of one DICOM series.")


def _pair(source, tmp: str, limits: Limits) -> Path | None:
    """Two uploaded files that are a detached header and its data (NRRD .nhdr + data file, NIfTI/Analyze
    .hdr + .img), each maybe in its own upload folder: the header, linked beside its data in ``tmp``."""
    if not isinstance(source, (list, tuple)) or len(source) != 2:
        return None
    paths = [Path(p) for p in source]
    headers = [p for p in paths if p.name.lower().endswith((".nhdr", ".hdr"))]
    if len(headers) != 1 or paths[0].name == paths[1].name or not all(p.is_file() for p in paths):
        return None
    for p in paths:
        _check_file(p, limits)
    folder = Path(tmp) / "pair"
    folder.mkdir()
    for p in paths:
        _link(p, folder / p.name)
    return folder / headers[0].name


def _load_file(path: Path, limits: Limits) -> Volume:
    """One file (or a detached header beside its data) by what it is: NIfTI, NRRD, or a refusal."""
    from photon_core.io import dicom

    name = path.name.lower()
    with _by_content(path) as (alias, held):
        if held:                      # named as something else (or nothing): read as what it holds
            try:
                vol = _load_file(alias, limits)
            except VolumeError as e:
                raise VolumeError(str(e).replace(f"'{alias.name}'", f"'{path.name}'")) from None
            what = {".nii.gz": "gzip-compressed NIfTI", ".nii": "NIfTI", ".nrrd": "NRRD"}[held]
            # not named: the warnings go into the export's report.json, which never names an upload
            if not _cut_by_upload(path.name, held):
                vol.warnings.insert(0, f"The file holds {what} data; it was read as such (its name ends "
                                       f"otherwise, so other programs may not open it as it is).")
            return vol
    if name.endswith((".nii", ".nii.gz", ".hdr", ".img", ".img.gz")):
        return _load_nifti(path, limits)
    if name.endswith((".nrrd", ".nhdr")):
        return _load_nrrd(path, limits)
    if name.endswith(".gz"):
        return _load_nifti(path, limits)  # gives the gzip/NIfTI error message
    with open(path, "rb") as f:
        head = f.read(132)
    if head[128:132] == b"DICM" or name.endswith((".dcm", ".dicom", ".ima")):
        raise dicom.single_file_error(path, head, limits)
    picture = _picture_kind(head)
    if picture:
        raise VolumeError(f"'{path.name}' is a {picture} picture (a flat 2-D image, e.g. a screenshot); a CT "
                          f"volume is NIfTI (.nii/.nii.gz), NRRD, or a DICOM series (folder or .zip).")
    raise VolumeError(f"'{path.name}' is not a supported CT file; expected NIfTI (.nii/.nii.gz), NRRD, "
                      f"or a DICOM series (folder or .zip).")


UPLOAD_NAME_BYTES = 200    # a browser upload cuts longer file names to this, keeping the last suffix


def _cut_by_upload(name: str, held: str) -> bool:
    """A '….nii.gz' name the upload cut to '….gz' (its '.nii' gone): the file is named as it should be."""
    return held == ".nii.gz" and name.lower().endswith(".gz") and len(name.encode()) > UPLOAD_NAME_BYTES - 8


def _is_nifti_header(head: bytes) -> bool:
    """The first bytes of a NIfTI-1 (single file, 'n+1') or NIfTI-2 ('n+2') header, either byte order."""
    if len(head) >= 348 and head[344:348] == b"n+1\0":
        return int.from_bytes(head[:4], "little") == 348 or int.from_bytes(head[:4], "big") == 348
    return len(head) >= 8 and head[4:8] == b"n+2\0" and \
        (int.from_bytes(head[:4], "little") == 540 or int.from_bytes(head[:4], "big") == 540)


def _content_kind(path: Path) -> str | None:
    """What a file holds by its bytes, as the suffix that names it (".nii.gz", ".nii", ".nrrd"), or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(348)
        if head[:2] == b"\x1f\x8b":
            with gzip.open(path, "rb") as f:
                return ".nii.gz" if _is_nifti_header(f.read(348)) else None
    except (OSError, EOFError, zlib.error):
        return None
    if _is_nifti_header(head):
        return ".nii"
    return ".nrrd" if head.startswith(b"NRRD000") else None


@contextmanager
def _by_content(path: Path) -> Iterator[tuple[Path, str | None]]:
    """``(path, None)`` for a file named as what it holds; else ``(alias, suffix)``: a link to it, for
    as long as the block runs, whose name ends as its bytes say (nibabel goes by the name)."""
    name = path.name.lower()
    named = ".nii.gz" if name.endswith(".nii.gz") else ".nii" if name.endswith(".nii") else \
        ".nrrd" if name.endswith((".nrrd", ".nhdr")) else None
    held = _content_kind(path)
    if held is None or held == named:
        yield path, None
        return
    with tempfile.TemporaryDirectory(prefix="photon_named_") as tmp:
        stem = re.sub(r"(\.nii\.gz|\.nii|\.gz|\.nrrd)$", "", path.name, flags=re.IGNORECASE)
        alias = Path(tmp) / (stem + held)
        _link(path, alias)
        yield alias, held


def _link(src: Path, dst: Path) -> None:
    """``dst`` names ``src``: a symbolic link, or a copy where links cannot be made."""
    try:
        os.symlink(src.resolve(), dst)
    except OSError:
        shutil.copyfile(src, dst)


def _picture_kind(head: bytes) -> str | None:
    signatures = {b"\x89PNG": "PNG", b"\xff\xd8\xff": "JPEG", b"GIF8": "GIF", b"BM": "BMP",
                  b"II*\x00": "TIFF", b"MM\x00*": "TIFF", b"%PDF": "PDF"}
    return next((kind for sig, kind in signatures.items() if head.startswith(sig)), None)


def _check_file(path: Path, limits: Limits) -> None:
    if not path.exists():
        raise VolumeError(f"'{path.name}' does not exist.")
    size = path.stat().st_size
    if size == 0:
        raise VolumeError(f"'{path.name}' is empty (0 bytes).")
    if size > limits.max_file_bytes:
        raise VolumeError(f"'{path.name}' is {size / 1e9:.1f} GB; the upload limit is "
                          f"{limits.max_file_bytes / 1e9:.1f} GB.")


def load_label_map(path: str | os.PathLike, like: Volume | None = None,
                   limits: Limits = DEFAULT_LIMITS) -> tuple[np.ndarray, np.ndarray]:
    """Load an integer label map (NIfTI): uint8 when its ids fit (a TotalSegmentator map's do), else int16.
    If ``like`` is given its grid must match the scan's."""
    import nibabel as nib

    path = Path(path)
    _check_file(path, limits)
    what = f"'{path.name}'"
    try:
        with _by_content(path) as (alias, _):
            img = nib.load(str(alias))
            _check_dtype(img.get_data_dtype(), what)
            _check_shape(img.header.get_data_shape(), limits, what)
            raw = np.asanyarray(img.dataobj)
    except VolumeError:
        raise
    except Exception as e:
        raise VolumeError(f"{what} is not a readable NIfTI label map ({type(e).__name__}).") from None
    raw = raw.reshape(_check_shape(raw.shape, limits, what))
    if raw.dtype.kind == "f":
        finite = np.isfinite(raw)
        if not finite.all() or np.any(raw != np.round(raw)):
            raise VolumeError(f"{what} holds fractional or NaN values; a label map holds whole-number label "
                              f"ids (0 = background). Is it the CT rather than its label map?")
    lo, hi = (float(raw.min()), float(raw.max())) if raw.size else (0.0, 0.0)
    top = np.iinfo(np.int16).max
    if lo < 0 or hi > top:
        raise VolumeError(f"{what} holds label ids from {lo:g} to {hi:g}; a label map holds ids from 0 "
                          f"(background) to {top}. Is it the CT rather than its label map?")
    labels = raw.astype(np.uint8 if hi <= np.iinfo(np.uint8).max else np.int16)   # held while open
    affine = np.asarray(img.affine, dtype=np.float64)
    if like is not None and not (labels.shape == like.shape and np.allclose(affine, like.affine, atol=1e-2)):
        # Same voxels stored in another axis order (e.g. LAS vs LPS): permute/flip onto the scan grid.
        from photon_core.io.orientation import reorient

        moved, to_source = reorient(labels, affine, like.affine)
        moved_aff = affine @ to_source
        if moved.shape != like.shape or not np.allclose(moved_aff, like.affine, atol=1e-2):
            raise VolumeError(f"The label map grid ({'×'.join(map(str, labels.shape))}) does not match "
                              f"the scan ({'×'.join(map(str, like.shape))}); expected a label map "
                              f"on the same voxel grid.")
        labels, affine = np.ascontiguousarray(moved), moved_aff
    return labels, affine


def volume_from_array(hu: np.ndarray, affine: np.ndarray | None = None,
                      limits: Limits = DEFAULT_LIMITS) -> Volume:
    """Wrap an in-memory HU array (I, J, K) with an affine (identity = 1 mm RAS) as a Volume (the
    array is copied: the caller's array is never changed)."""
    hu = np.asarray(hu)
    _check_dtype(hu.dtype, "This array")
    shape = _check_shape(hu.shape, limits, "This array")
    return make_volume(np.array(hu, dtype=np.float32).reshape(shape), np.eye(4) if affine is None else affine,
                       "array", {"format": "array"}, was_bool=hu.dtype == bool)
