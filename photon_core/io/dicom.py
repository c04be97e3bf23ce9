"""DICOM uploads as a PACS exports them: several series, one of which is the CT volume to load.

    list_series(files)             # [SeriesInfo], the default first
    load_series(files, limits)     # the default series as a Volume (warnings name the others)
    load_series(files, limits, series=info.uid)

A study folder typically holds a localizer (scout), one or more axial reconstructions (a soft-tissue
and a lung kernel, thin and thick slices) and perhaps coronal/sagittal reformats. The default is the
axial CT series with the most slices; any loadable CT series can be chosen instead.

Privacy: every file is read with pydicom's ``specific_tags``: only the attributes named in
``HEADER_TAGS`` (and, for the series being loaded, ``PIXEL_TAGS``) are read; pydicom seeks past every
other element, so no patient name, id, birth date or free-text comment is ever read into memory.
A series is keyed by a digest of its SeriesInstanceUID, so the UID itself leaves this module neither.

Duplicate slices (one position twice: copies in the export, or a re-sent image) are dropped with a
warning; the first by instance number is kept. A series acquired with a gantry tilt (its slices step
sideways too) is shifted slice by slice onto an upright grid, with a warning, so positions are true.

Enhanced (multi-frame) CT, as recent scanners and PACS export it, holds a whole series in one file: each
frame's position, orientation, pixel spacing and rescale live in its functional groups (per frame, else
shared). Its frames are read as the slices of a classic series, through the same sorting, duplicate and
spacing checks, so one file and its classic export load to the same volume.

Memory: a series whose every rescale is whole (a CT's are) is assembled straight into int16 HU; each file's
pixel data is read from it only when its slices are copied (`DEFER_BYTES`) and let go after (its bytes and
pydicom's decoded copy): a load holds the volume and one file's pixels, not the series' pixel data besides
(512 × 512 × 300, a 157 MB scan: 764 → 312 → 176 MB traced). Compressed files are read whole to check their
frames (encapsulated data has no length to defer by), their bytes let go after, and decoded in a child process
that hands them over one at a time as their slices are copied (`decode.decode_stream`). A fractional rescale,
a gantry tilt or uneven slice gaps (both interpolated) take float32, compacted to int16 afterwards where every
value is whole (`make_volume`).
"""
from __future__ import annotations

import hashlib
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from photon_core.io.jpeg12 import frame_header
from photon_core.io.jpeg12 import register as _register_jpeg12
from photon_core.io.volume import (
    SAFE_DICOM_FIELDS,
    Limits,
    SeriesInfo,
    Volume,
    VolumeError,
    _check_shape,
    _reason,
    _unpack_bounded,
    clean_text,
    make_volume,
    rescaled_int16,
)

_register_jpeg12()

HEADER_TAGS = ("SeriesInstanceUID", "SeriesDescription", "Modality", "ImageType", "ConvolutionKernel",
               "ImageOrientationPatient", "ImagePositionPatient", "Rows", "Columns", "PixelSpacing",
               "SliceThickness", "NumberOfFrames", "SamplesPerPixel", "InstanceNumber", "SeriesNumber",
               "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence") + SAFE_DICOM_FIELDS
PIXEL_TAGS = HEADER_TAGS + ("BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
                            "PhotometricInterpretation", "PlanarConfiguration", "RescaleSlope",
                            "RescaleIntercept", "PixelData")
DEFLATED_SYNTAX = b"1.2.840.10008.1.2.1.99"   # Deflated Explicit VR Little Endian, in the file meta
RLE_SYNTAX = "1.2.840.10008.1.2.5"
POSITION_TOLERANCE_MM = 1e-3      # two slices closer than this along the normal share a position
TILT_TOLERANCE_VOXELS = 0.1       # a sideways drift of the slices below this is rounding, not tilt
AXIAL_COSINE = 0.9                # |slice normal · axis| above this names the orientation (≈ 26°)


class NoImages(VolumeError):
    """An upload without a single DICOM image."""


@dataclass
class _Image:
    path: Path
    ds: object                    # the pydicom Dataset of HEADER_TAGS only


@dataclass
class _Frame:
    """One slice: a classic single-frame image, or one frame of an enhanced (multi-frame) image."""
    ds: object                    # the Dataset it comes from
    index: int | None             # its frame in ``ds``; None for a classic image
    position: np.ndarray | None   # ImagePositionPatient (mm, LPS)
    orientation: np.ndarray | None  # ImageOrientationPatient (row and column direction cosines)
    spacing: list[float] | None   # PixelSpacing (between rows, between columns)
    thickness: float
    slope: float
    intercept: float

    def pixels(self) -> np.ndarray:
        """The stored values, (rows, columns); a damaged encoding is refused in words."""
        px = getattr(self.ds, "_decoded", None)         # decoded in a child process (``decode``)
        if px is None and getattr(self.ds, "_coded", None) is not None:
            from photon_core.io.decode import decode_files  # asked for before the copy (a duplicate's
                                                            # comparison): this file alone
            path, limits = self.ds._coded
            (px,) = decode_files([path], limits)
            if isinstance(px, str):
                raise _undecodable(self.ds, px)
            self.ds._decoded = px
        if px is None:
            try:
                px = self.ds.pixel_array                    # pydicom caches the decoded array
            except Exception as e:
                raise _undecodable(self.ds, _reason(e)) from None
        if self.index is None:
            return px
        held = px.shape[0] if px.ndim == 3 else 1
        if self.index >= held:
            raise VolumeError(f"A multi-frame DICOM file holds {held} frame{'s' * (held != 1)} of image data "
                              f"where its header says {_frame_count(self.ds)}; the file is damaged.")
        return px[self.index] if px.ndim == 3 else px


def _undecodable(ds, reason: str) -> VolumeError:
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    stored = f" stored as {syntax.name}" if syntax is not None and syntax.is_compressed else ""
    return VolumeError(f"A DICOM slice{stored} could not be decoded ({reason}); the file is damaged or its "
                       f"compression unsupported: export the series uncompressed.")


def _needs_codec(ds) -> bool:
    """Compressed image data that a native decoder (GDCM, OpenJPEG, libjpeg) decodes: all but RLE."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return syntax is not None and syntax.is_encapsulated and syntax != RLE_SYNTAX and "PixelData" in ds


def _check_native_size(ds) -> None:
    """Uncompressed image data longer than its header's size by a whole frame or more: the header lies
    (pydicom would read the first bytes as the image and ignore the rest, a scrambled picture)."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None or syntax.is_compressed or "PixelData" not in ds:
        return
    frame = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1) * \
        max(1, int(ds.get("BitsAllocated", 16) or 16) // 8)
    held, needed = _value_length(ds, "PixelData"), frame * _frame_count(ds)
    if held >= needed + frame:
        raise VolumeError(f"A DICOM image holds {held:,} bytes of image data where its header "
                          f"({int(ds.Rows)}×{int(ds.Columns)}, {_frame_count(ds)} frame"
                          f"{'s' * (_frame_count(ds) != 1)}) needs {needed:,}; the file is damaged.")


def _check_encoded(ds) -> None:
    """A compressed image whose header disagrees with its encoded frames is refused before it is decoded:
    GDCM, pydicom's decoder for JPEG Lossless, JPEG-LS and JPEG 2000, does not report such a file, it
    aborts the whole server process (seen with a JPEG-LS file whose Rows was changed, a JPEG Lossless one
    with 32 bits allocated, a JPEG 2000 one labelled RGB)."""
    if not _needs_codec(ds):
        return
    from pydicom.encaps import generate_fragmented_frames

    syntax = ds.file_meta.TransferSyntaxUID
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    bits = int(ds.get("BitsAllocated", 16) or 0)
    if photometric not in ("MONOCHROME1", "MONOCHROME2") or bits not in (8, 16):
        raise VolumeError(f"A compressed DICOM image is labelled {photometric[:16]} with {bits} bits a "
                          f"pixel; a CT slice is monochrome, 8 or 16 bits. The file is damaged or not a CT "
                          f"slice.")
    rows, cols = int(ds.Rows), int(ds.Columns)
    try:
        frames = generate_fragmented_frames(ds.PixelData, number_of_frames=_frame_count(ds))
        for fragments in frames:
            head = frame_header(b"".join(fragments)[:65536])
            if head is None:
                raise VolumeError(f"A DICOM image stored as {syntax.name} holds no frame header of that "
                                  f"format; the file is damaged.")
            if head[:3] != (rows, cols, 1) or head[3] > bits:
                raise VolumeError(f"A DICOM image stored as {syntax.name} holds {head[0]}×{head[1]} pixels "
                                  f"of {head[2]} component{'s' * (head[2] != 1)}, {head[3]} bits, where its "
                                  f"header says {rows}×{cols}, one component, {bits} bits; the file is "
                                  f"damaged.")
    except VolumeError:
        raise
    except Exception as e:
        raise VolumeError(f"The compressed image data of a DICOM slice is damaged ({_reason(e)}).") from None


def _frame_count(ds) -> int:
    """NumberOfFrames as a count (1 when absent, zero, negative or not a number)."""
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def _frame_problem(ds) -> str | None:
    """Why the frames of a multi-frame image cannot be placed as slices, or None."""
    declared, per_frame = _frame_count(ds), ds.get("PerFrameFunctionalGroupsSequence")
    if declared == 1:
        return None
    if per_frame is None:
        return "gives no position for each of its frames (no per-frame functional groups)"
    if len(per_frame) != declared:
        return f"describes {len(per_frame)} of its {declared} frames"
    return None


def _group(ds, k: int, name: str):
    """Functional-group macro ``name`` of frame ``k``: the per-frame item, else the shared one, else None."""
    for seq, n in (("PerFrameFunctionalGroupsSequence", k), ("SharedFunctionalGroupsSequence", 0)):
        items = ds.get(seq)
        if items is not None and n < len(items) and name in items[n] and len(items[n][name].value):
            return items[n][name].value[0]
    return None


def _frames(ds, first_only: bool = False) -> list[_Frame]:
    """The slices of one image: itself when classic, else one per frame from its functional groups (a
    value absent from them falls back to the top-level attribute, as legacy-converted files keep it); only
    the first with ``first_only``."""
    def get(item, name):
        value = item.get(name) if item is not None else None
        return ds.get(name) if value is None else value

    def array(value, size):
        try:
            a = np.asarray(value, dtype=np.float64) if value is not None else None
        except (TypeError, ValueError):                     # a malformed decimal string
            return None
        return a if a is not None and a.shape == (size,) and np.isfinite(a).all() else None

    frames, per_frame = _frame_count(ds), ds.get("PerFrameFunctionalGroupsSequence")
    enhanced = frames > 1 or per_frame is not None or "SharedFunctionalGroupsSequence" in ds
    if frames > 1:              # frames without their own groups share one geometry: one stands for all
        frames = max(1, min(frames, len(per_frame))) if per_frame is not None else 1
    frames = 1 if first_only else frames
    out = []
    for k in range(frames):
        place, turn, measures, rescale = ((_group(ds, k, g) if enhanced else None) for g in (
            "PlanePositionSequence", "PlaneOrientationSequence", "PixelMeasuresSequence",
            "PixelValueTransformationSequence"))
        spacing = array(get(measures, "PixelSpacing"), 2)
        out.append(_Frame(ds, k if enhanced else None, array(get(place, "ImagePositionPatient"), 3),
                          array(get(turn, "ImageOrientationPatient"), 6),
                          None if spacing is None else spacing.tolist(),
                          _number(measures if measures is not None and "SliceThickness" in measures else ds,
                                  "SliceThickness", 0.0),
                          _number(rescale if rescale is not None and "RescaleSlope" in rescale else ds,
                                  "RescaleSlope", 1.0),
                          _number(rescale if rescale is not None and "RescaleIntercept" in rescale else ds,
                                  "RescaleIntercept", 0.0)))
    return out


# An element of the series being loaded longer than this (a slice's uncompressed pixel data: 512 KiB at
# 512 × 512) is read from its file only when used, so a load holds one file's pixel bytes at a time.
DEFER_BYTES = 4096


def _read(path: Path, tags: Sequence[str], pixels: bool, limits: Limits):
    import pydicom

    with open(path, "rb") as f:
        head = f.read(4096)
    if DEFLATED_SYNTAX in head:
        _check_inflated(path, head, limits)
    return pydicom.dcmread(str(path), stop_before_pixels=not pixels, force=False, specific_tags=list(tags),
                           defer_size=DEFER_BYTES if pixels else None)


def _value_length(ds, name: str) -> int:
    """Bytes of element ``name``'s value, without reading a deferred value from its file."""
    elem = ds.get_item(name, keep_deferred=True)
    value = elem.value
    return len(value) if value is not None else int(elem.length)


def _check_inflated(path: Path, head: bytes, limits: Limits) -> None:
    """A deflated DICOM file is inflated whole by pydicom before a single tag is read: a few MB could
    inflate to more than the server's memory. Inflate it here first, keeping nothing, up to the upload
    limit."""
    if head[132:136] != b"\x02\x00\x00\x00" or head[136:138] != b"UL":
        raise VolumeError(f"'{path.name}' is a deflated DICOM file without the length of its file meta "
                          f"information; it cannot be read safely.")
    start = 144 + int.from_bytes(head[140:144], "little")
    with open(path, "rb") as f:
        f.seek(start)
        _, total = _unpack_bounded(f, zlib.decompressobj(-zlib.MAX_WBITS), limits.max_file_bytes, keep=False)
    if total > limits.max_file_bytes:
        raise VolumeError(f"'{path.name}' is a deflated DICOM file that inflates to over "
                          f"{limits.max_file_bytes / 1e6:.0f} MB; it is refused (a decompression bomb, or no "
                          f"CT series).")


Step = Callable[[float, str], None]                 # (fraction of the reading done, what it reads)
STEP_EVERY_S = 0.25      # a load's ``step`` (progress, and where it can be stopped) at most this often


class _Steps:
    """``step(fraction, desc)`` at most every `STEP_EVERY_S` (the first at once); none without a step."""

    def __init__(self, step: Step | None):
        self.step, self.last = step, None

    def __call__(self, fraction: float, desc: str) -> None:
        now = time.monotonic()
        if self.step is not None and (self.last is None or now - self.last >= STEP_EVERY_S):
            self.last = now
            self.step(fraction, desc)


def _scan(files: Sequence[Path], limits: Limits, step: Step | None = None) -> dict[str, list[_Image]]:
    """Header of every DICOM image among ``files``, grouped by series (non-DICOM files and DICOM objects
    without an image, such as DICOMDIR or reports, are skipped). A series is its SeriesInstanceUID and,
    in case an anonymiser blanked the UIDs, its description, kernel, orientation and image size."""
    groups: dict[str, list[_Image]] = {}
    steps = _Steps(step)
    for k, f in enumerate(files):
        steps(0.3 * k / len(files), f"Reading the DICOM headers: file {k + 1} of {len(files)}")
        try:
            ds = _read(f, HEADER_TAGS, pixels=False, limits=limits)
        except VolumeError:
            raise                                           # a file refused in words refuses the upload
        except Exception:
            continue
        if "Rows" not in ds or "Columns" not in ds:
            continue
        key = "|".join([str(ds.get("SeriesInstanceUID", "")), _text(ds.get("SeriesDescription")),
                        _text(ds.get("ConvolutionKernel")), _orientation(_normal(ds)),
                        f"{int(ds.Rows)}x{int(ds.Columns)}"])
        groups.setdefault(key, []).append(_Image(Path(f), ds))
    return groups


def _key(group: str) -> str:
    return "s" + hashlib.sha256(group.encode()).hexdigest()[:12]


def _text(value, limit: int = 64) -> str:
    if value is None:
        return ""
    if not isinstance(value, str) and hasattr(value, "__iter__"):
        value = " ".join(str(v) for v in value)
    return clean_text(value, limit)


def _normal(ds) -> np.ndarray | None:
    v = _frames(ds, first_only=True)[0].orientation
    if v is None:
        return None
    n = np.cross(v[:3], v[3:])
    norm = np.linalg.norm(n)
    return n / norm if norm > 1e-6 else None


def _orientation(normal: np.ndarray | None) -> str:
    if normal is None:
        return "unknown"
    axis = int(np.argmax(np.abs(normal)))
    if abs(normal[axis]) < AXIAL_COSINE:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]       # the normal along x, y (patient LPS) or z


def _positions(images: list[_Image], normal: np.ndarray | None) -> np.ndarray | None:
    frames = [f for im in images for f in _frames(im.ds)]
    if normal is None or any(f.position is None for f in frames):
        return None
    return np.array([float(np.dot(f.position, normal)) for f in frames])


def _distinct(pos: np.ndarray) -> int:
    s = np.sort(pos)
    return int(1 + np.sum(np.diff(s) >= POSITION_TOLERANCE_MM)) if s.size else 0


def _describe(group: str, images: list[_Image], limits: Limits) -> SeriesInfo:
    ds = images[0].ds
    modality = _text(ds.get("Modality"), 16) or "?"
    description, kernel = _text(ds.get("SeriesDescription")), _text(ds.get("ConvolutionKernel"), 32)
    normal = _normal(ds)
    orientation = _orientation(normal)
    pos = _positions(images, normal)
    slices = _distinct(pos) if pos is not None else sum(_frame_count(im.ds) for im in images)
    image_type = [str(t).upper() for t in (ds.get("ImageType") or [])]
    note = ""
    if "LOCALIZER" in image_type:
        note = "a localizer/scout image"
    elif modality != "CT":
        note = f"modality {modality}, not CT"
    elif any(_frame_problem(im.ds) for im in images):
        note = "a multi-frame file without a position for each frame"
    elif int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        note = "a colour image (a screen capture)"
    elif slices < limits.min_slices:
        note = f"only {slices} slice{'s' * (slices != 1)}; a volume needs {limits.min_slices}"
    name = description or "Series without description"
    label = f"{name} — {slices} {orientation} {modality} slice{'s' * (slices != 1)}"
    label += f", kernel {kernel}" if kernel else ""
    label += f" ({note})" if note else ""
    return SeriesInfo(uid=_key(group), description=description, slices=slices, kernel=kernel,
                      orientation=orientation, modality=modality, label=label, loadable=not note, note=note)


def _ordered(groups: dict[str, list[_Image]], limits: Limits) -> list[tuple[SeriesInfo, list[_Image]]]:
    """Series described, the default first: loadable, axial, most slices, then by description."""
    out = [(_describe(group, images, limits), images) for group, images in groups.items()]
    out = sorted(out, key=lambda x: (not x[0].loadable, x[0].orientation != "axial", -x[0].slices,
                                     x[0].description, x[0].uid))
    return _told_apart(out)


def _told_apart(ordered: list[tuple[SeriesInfo, list[_Image]]]) -> list[tuple[SeriesInfo, list[_Image]]]:
    """Series whose labels are the same (a series sent twice, two phases under one description) would be
    two identical choices, and 'loaded: X. Not loaded: X': each gets its series number, else its rank."""
    alike: dict[str, list[int]] = {}
    for n, (info, _) in enumerate(ordered):
        alike.setdefault(info.label, []).append(n)
    out = list(ordered)
    for label, members in alike.items():
        if len(members) < 2:
            continue
        numbers = [_text(ordered[n][1][0].ds.get("SeriesNumber"), 12) for n in members]
        by_number = all(numbers) and len(set(numbers)) == len(numbers)
        for rank, (n, number) in enumerate(zip(members, numbers), 1):
            info, images = ordered[n]
            tag = f"series number {number}" if by_number else f"{rank} of {len(members)} alike"
            out[n] = (replace(info, label=f"{label} [{tag}]"), images)
    return out


CHOOSE_SERIES = "Choose another series to load it instead."     # the app's Series picker (the scan's only)


def list_series(files: Sequence[Path], limits: Limits) -> list[SeriesInfo]:
    """The DICOM series among ``files``, the default first (see `load_series`)."""
    return [info for info, _ in _ordered(_scan(files, limits), limits)]


def load_series(files: Sequence[Path], limits: Limits, series: str | None = None,
                step: Step | None = None) -> Volume:
    """One series of a DICOM upload as a Volume: ``series`` (a `SeriesInfo.uid`), or by default the
    first of `list_series` (the axial CT series with the most slices). The others are named in the
    Volume's warnings. ``step(fraction, desc)``, if given, is told how far the reading is (headers, then
    slices) a few times a second; an exception it raises stops the load there."""
    ordered = _ordered(_scan(files, limits, step), limits)
    if not ordered:
        raise NoImages("No DICOM images were found; expected the files (or a .zip) of a CT series.")
    if series is not None:
        chosen = [x for x in ordered if x[0].uid == series]
        if not chosen:
            raise VolumeError(f"The chosen series is not in this upload; it holds: "
                              f"{'; '.join(f'{i.label} (series {i.uid})' for i, _ in ordered)}.")
        info, images = chosen[0]
    else:
        info, images = ordered[0]
        if not info.loadable:
            ct = [i for i, _ in ordered if i.modality == "CT"]
            if not ct:
                raise VolumeError(f"This DICOM series is modality '{info.modality}'; Photon reads CT only.")
            listing = "; ".join(i.label for i, _ in ordered)
            raise VolumeError(f"No series in this upload is a CT volume: {listing}.")
    if info.modality != "CT":
        raise VolumeError(f"This DICOM series is modality '{info.modality}'; Photon reads CT only.")
    warnings = []
    others = [i.label for i, _ in ordered if i.uid != info.uid]
    if others:
        warnings.append(f"This upload holds {len(ordered)} series; loaded: {info.label}. Not loaded: "
                        f"{'; '.join(others)}. {CHOOSE_SERIES}")
    return _load_images(images, limits, warnings, step)


def _load_images(images: list[_Image], limits: Limits, warnings: list[str],
                 step: Step | None = None) -> Volume:
    """One series' images (classic slices, or enhanced files' frames) as a Volume: geometry checked,
    duplicates dropped, rescale applied."""
    ds0 = images[0].ds
    if int(ds0.get("SamplesPerPixel", 1) or 1) != 1:
        raise VolumeError("This DICOM series holds colour (RGB) images, such as screen captures, not CT "
                          "slices; a CT slice holds one grey value (Hounsfield units) per pixel.")
    if len(images) == 1 and _frame_count(ds0) == 1:
        raise VolumeError(f"This DICOM series holds a single image ({int(ds0.Rows)}×{int(ds0.Columns)}); "
                          f"a CT volume needs at least {limits.min_slices} slices: upload the whole series.")
    rows, cols = int(ds0.Rows), int(ds0.Columns)
    if any((int(im.ds.Rows), int(im.ds.Columns)) != (rows, cols) for im in images):
        raise VolumeError("The DICOM slices have different image sizes; expected one series.")
    try:
        datasets = [_read(im.path, PIXEL_TAGS, pixels=True, limits=limits) for im in images]
    except VolumeError:
        raise
    except Exception as e:
        raise VolumeError(f"A DICOM slice of the series could not be read ({_reason(e)}).") from None
    for ds in datasets:
        problem = _frame_problem(ds)
        if problem:
            raise VolumeError(f"A multi-frame DICOM file of this series {problem}; its slices cannot be "
                              f"placed. The file is damaged, or not a CT volume.")
        _check_native_size(ds)
        _check_encoded(ds)
    # compressed files: decoded in a child process (a native decoder's crash must not be the server's) as
    # their slices are copied below; the checked encoded bytes go now (the child reads the files itself)
    for ds, im in zip(datasets, images):
        if _needs_codec(ds):
            ds._coded = (im.path, limits)
            del ds.PixelData
    frames = [f for ds in datasets for f in _frames(ds)]
    if any(f.position is None or f.orientation is None for f in frames):
        raise VolumeError("A DICOM slice has no ImagePositionPatient/ImageOrientationPatient; "
                          "the series geometry cannot be rebuilt.")
    iop = frames[0].orientation
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    if any(not np.allclose(f.orientation, iop, atol=1e-4) for f in frames):
        raise VolumeError("The DICOM slices have different orientations; expected one series.")
    frames = _drop_duplicates(frames, normal, warnings)
    pos = np.array([np.dot(f.position, normal) for f in frames])
    gaps = np.diff(pos)
    dz = float(np.median(gaps)) if len(gaps) else 1.0
    irregular = False
    if len(frames) >= 3 and np.any(np.abs(gaps - dz) > 0.1 * dz + 0.01):
        dz = _grid_spacing(gaps)                    # resampled onto this spacing below
        irregular = True
    _check_shape((cols, rows, len(frames)), limits, "This DICOM series")
    ps = frames[0].spacing or [1.0, 1.0]
    tilt = _tilt(frames, row_dir, col_dir, normal, ps)
    # whole-number rescales onto the grid as acquired: int16 HU straight from the stored integers (a CT's
    # 2 bytes a voxel), else float32 (fractions, a tilt or uneven gaps to interpolate). Fortran order, as
    # NIfTI volumes come: each slice one contiguous block (its pixels transposed), copied in one pass
    hu = np.empty((cols, rows, len(frames)), order="F", dtype=np.float32 if irregular or tilt is not None
                  or not all(_whole(f.slope, f.intercept) for f in frames) else np.int16)
    pending = {id(f.ds): f.ds._coded[0] for f in frames          # compressed, in the order of their
               if getattr(f.ds, "_coded", None) and getattr(f.ds, "_decoded", None) is None}   # first slices
    if pending:
        from photon_core.io.decode import decode_stream

        decoded = decode_stream(list(pending.values()), limits)
        try:
            hu, bad_slope, bad_inter = _copy_frames(frames, hu, rows, cols, pending, decoded, step)
        finally:
            decoded.close()                             # a copy that failed (or was stopped) ends the child
    else:
        hu, bad_slope, bad_inter = _copy_frames(frames, hu, rows, cols, step=step)
    if bad_slope:
        warnings.append(f"{bad_slope} slice{'s' * (bad_slope != 1)} had no usable rescale slope (NaN, zero "
                        f"or infinite); slope 1, the usual CT value, was assumed.")
    if bad_inter:
        warnings.append(f"{bad_inter} slice{'s' * (bad_inter != 1)} had no usable rescale intercept; 0 was "
                        f"assumed, so the values may not be Hounsfield units.")
    if tilt is not None:
        _untilt(hu, tilt, warnings)
    if irregular:
        hu = _regular(hu, pos, dz, warnings)
        _check_shape(hu.shape, limits, "This DICOM series, resampled,")
    lps = np.eye(4)
    lps[:3, 0] = row_dir * ps[1]   # i: along a row (next column)
    lps[:3, 1] = col_dir * ps[0]   # j: down a column (next row)
    lps[:3, 2] = normal * dz
    lps[:3, 3] = frames[0].position
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # LPS -> RAS
    meta = {"format": "DICOM", "n_slices": len(frames)}
    for name in SAFE_DICOM_FIELDS:
        if name in ds0:
            meta[name] = _text(ds0.get(name), 64)
    thick = [f.thickness for f in frames if np.isfinite(f.thickness)]
    thickness = max(thick + ([float(gaps.max())] if irregular else []), default=None)   # the thickest section
    return make_volume(hu, affine, "dicom", meta, warnings, slice_thickness=thickness)


def _copy_frames(frames: list[_Frame], hu: np.ndarray, rows: int, cols: int, pending: dict | None = None,
                 decoded=None, step: Step | None = None) -> tuple[np.ndarray, int, int]:
    """Each frame's pixels, rescaled, into slice n of ``hu`` (int16 until a value needs float32); a file's
    pixel data let go after its last frame. The files in ``pending`` (compressed, by id) take their arrays
    from ``decoded``, in the order of their first frames. Returns ``hu`` and the counts of unusable slopes
    and intercepts."""
    pending = pending or {}
    last = {id(f.ds): n for n, f in enumerate(frames)}          # after its last frame, a file's pixels go
    bad_slope = bad_inter = 0
    steps = _Steps(step)
    for n, f in enumerate(frames):
        steps(0.3 + 0.7 * n / len(frames), f"Reading the DICOM slices: {n + 1} of {len(frames)}")
        if id(f.ds) in pending and getattr(f.ds, "_decoded", None) is None:   # its first slice: the child's
            px = next(decoded)                                                # next file
            if isinstance(px, str):
                raise _undecodable(f.ds, px)
            f.ds._decoded = px
        elif "PixelData" not in f.ds and getattr(f.ds, "_decoded", None) is None:
            raise VolumeError("A DICOM slice of the series holds no image data; the file may be truncated.")
        px = f.pixels()
        if px.shape != (rows, cols):
            raise VolumeError(f"A DICOM image holds {px.shape} pixels where its header says {rows}×{cols}; "
                              f"the file is damaged.")
        slope, intercept = f.slope, f.intercept
        if not np.isfinite(slope) or slope == 0:
            slope, bad_slope = 1.0, bad_slope + 1
        if not np.isfinite(intercept):
            intercept, bad_inter = 0.0, bad_inter + 1
        if hu.dtype == np.int16:
            whole = rescaled_int16(px, slope, intercept)     # px is pydicom's: never scaled in place
            if whole is not None:
                hu[:, :, n] = whole.T
            else:                                   # a value beyond int16 (or stored as floats): float32 on
                hu = hu.astype(np.float32, order="F")
        if hu.dtype == np.float32:
            hu[:, :, n] = (px.astype(np.float32) * slope + intercept).T   # pixels (row, col): i along a row
        if last[id(f.ds)] == n:
            _release_pixels(f.ds)
    return hu, bad_slope, bad_inter


def _grid_spacing(gaps: np.ndarray, k: int = 3) -> float:
    """The spacing to resample a series of uneven slice gaps (mm, ascending positions) onto, or
    VolumeError where a gap is a missing slice.

    A gap is a missing slice where it is over 1.5 × the series' median spacing and over 1.5 × the spacing
    its neighbours keep (the larger median of the ``k`` gaps before it and of the ``k`` after). So jitter
    (scanner-rounded positions) and sections of different spacing (a head CT's 2.5 mm posterior fossa
    under 5 mm sections) load; a lone gap inside a regular run does not. Jitter goes onto the median
    spacing; sections onto the finest section's, so that no acquired detail is averaged away. A missing
    slice in the thin sections of a series whose thick sections are the majority cannot be told from
    one more thick section, and is interpolated."""
    med = float(np.median(gaps))
    local = np.array([max(float(np.median(side)) for side in (gaps[max(0, i - k):i], gaps[i + 1:i + 1 + k])
                          if side.size) for i in range(len(gaps))])
    missing = (gaps > 1.5 * med) & (gaps > 1.5 * local)
    if missing.any():
        i = int(np.argmax(np.where(missing, gaps / local, 0)))
        raise VolumeError(f"The DICOM series has missing slices (a gap of {gaps[i]:.2f} mm where the "
                          f"slices around it are {local[i]:.2f} mm apart).")
    finest = float(local.min())
    if gaps.max() > 1.5 * med or 1.5 * finest < med:
        return min(med, finest)                     # sections: the finest one's spacing
    return med                                      # one spacing, give or take jitter


def _regular(hu: np.ndarray, pos: np.ndarray, dz: float, warnings: list[str]) -> np.ndarray:
    """Slices at irregular positions ``pos`` (mm along the normal, ascending; no missing slice, see
    ``_grid_spacing``) resampled onto a regular grid of ``dz`` from the first, by linear interpolation
    between neighbours."""
    z = pos - pos[0]
    n = int(np.floor(z[-1] / dz + 1e-3)) + 1
    target = np.minimum(np.arange(n) * dz, z[-1])
    hi = np.clip(np.searchsorted(z, target, side="right"), 1, len(z) - 1)
    lo = hi - 1
    w = ((target - z[lo]) / (z[hi] - z[lo])).astype(np.float32)
    out = np.empty(hu.shape[:2] + (n,), np.float32)
    for a in range(0, n, 32):                       # a few slices at a time: two copies of 32, not the volume
        b = min(a + 32, n)
        out[:, :, a:b] = hu[:, :, lo[a:b]] * (1 - w[a:b]) + hu[:, :, hi[a:b]] * w[a:b]
    gaps = np.diff(pos)
    warnings.append(f"The slice spacing varies ({gaps.min():.2f}–{gaps.max():.2f} mm): the {len(pos)} slices "
                    f"were resampled onto a regular {dz:.2f} mm grid ({n} slices, linear interpolation).")
    return out


@dataclass
class _Tilt:
    """A gantry tilt: each slice's sideways step from the first in voxels (rows, columns), the angle and
    the largest step in mm (for the warning)."""
    shift: np.ndarray
    degrees: float
    most_mm: float


def _tilt(frames: list[_Frame], row_dir: np.ndarray, col_dir: np.ndarray, normal: np.ndarray,
          spacing: list[float]) -> _Tilt | None:
    """Slices acquired with a gantry tilt step sideways as well as along their normal, so their grid is
    sheared; None when no slice drifts sideways by `TILT_TOLERANCE_VOXELS`."""
    offset = np.array([f.position - frames[0].position for f in frames])
    along = offset @ normal
    offset -= np.outer(along, normal)                           # the sideways part of each slice's step
    shift = np.stack([offset @ row_dir / spacing[1], offset @ col_dir / spacing[0]], axis=1)   # in voxels
    if np.abs(shift).max() < TILT_TOLERANCE_VOXELS:
        return None
    return _Tilt(shift, float(np.degrees(np.arctan2(np.linalg.norm(offset[-1]), along[-1]))),
                 float(np.linalg.norm(offset, axis=1).max()))


def _untilt(hu: np.ndarray, tilt: _Tilt, warnings: list[str]) -> None:
    """Each slice of a sheared grid (float32 ``hu``) shifted in-plane (linear interpolation, in place)
    onto the upright grid through the first slice, as dcm2niix does, so that positions and distances in
    the volume are true."""
    from scipy import ndimage

    air = float(hu.min())
    for start in range(1, hu.shape[2], 32):         # a few slices at a time, each one contiguous (4× faster)
        chunk = np.ascontiguousarray(np.moveaxis(hu[:, :, start:start + 32], 2, 0))
        for n in range(len(chunk)):
            chunk[n] = ndimage.shift(chunk[n], tilt.shift[start + n], order=1, mode="constant", cval=air)
        hu[:, :, start:start + 32] = np.moveaxis(chunk, 0, 2)
    warnings.append(f"The series was acquired with a gantry tilt of {tilt.degrees:.1f}°: each slice was "
                    f"shifted sideways (up to {tilt.most_mm:.1f} mm) onto an upright grid, as dcm2niix does, "
                    f"so positions and distances are true.")


def _whole(slope: float, intercept: float) -> bool:
    """A rescale mapping stored integers to integers (an unusable value counts: it is replaced by 1 or 0)."""
    return all(not np.isfinite(x) or float(x).is_integer() for x in (slope, intercept))


def _release_pixels(ds) -> None:
    """A read file's pixel data (its bytes, pydicom's decoded copy, ours) let go once copied into the volume:
    a series of N slices holds one slice's, not N."""
    for name in ("_decoded", "_pixel_array"):
        if getattr(ds, name, None) is not None:
            setattr(ds, name, None)
    if "PixelData" in ds:
        del ds.PixelData


def _number(ds, name: str, default: float) -> float:
    value = ds.get(name)
    if value is None or value == "":
        return default
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _instance(ds) -> float:
    n = _number(ds, "InstanceNumber", 0.0)
    return n if np.isfinite(n) else 0.0


def _drop_duplicates(frames: list[_Frame], normal: np.ndarray, warnings: list[str]) -> list[_Frame]:
    """Slices sorted along the normal, one per position (the lowest instance number, then frame, is kept)."""
    where = [float(np.dot(f.position, normal)) for f in frames]
    order = sorted(range(len(frames)),
                   key=lambda n: (where[n], _instance(frames[n].ds), frames[n].index or 0, n))
    kept, same, different = [], 0, 0
    last = None
    for n in order:
        f, p = frames[n], where[n]
        if last is not None and abs(p - last) < POSITION_TOLERANCE_MM:
            if np.array_equal(kept[-1].pixels(), f.pixels()):
                same += 1
            else:
                different += 1
            continue
        kept.append(f)
        last = p
    if same:
        warnings.append(f"{same} duplicate slice{'s' * (same != 1)} (identical copies at a position already "
                        f"loaded) {'were' if same != 1 else 'was'} dropped.")
    if different:
        warnings.append(f"{different} slice{'s' * (different != 1)} repeated a position with a different "
                        f"image and {'were' if different != 1 else 'was'} dropped (the first by instance "
                        f"number was kept); check that the series holds one acquisition.")
    return kept


def holds_frames(path: Path, limits: Limits) -> bool:
    """Whether one file is a multi-frame DICOM image, a whole series in itself (enhanced CT)."""
    try:
        with open(path, "rb") as f:
            if f.read(132)[128:132] != b"DICM":
                return False
        ds = _read(path, ("Rows", "NumberOfFrames"), pixels=False, limits=limits)
    except VolumeError:
        raise
    except Exception:
        return False
    return "Rows" in ds and _frame_count(ds) > 1


def single_file_error(path: Path, head: bytes, limits: Limits) -> VolumeError:
    """What to tell a user who uploaded one file that is, or is named like, a DICOM file."""
    name = f"'{path.name}'"
    if head[128:132] != b"DICM":
        return VolumeError(f"{name} is named like a DICOM file but holds no DICOM data (no 'DICM' marker); "
                           f"it may be renamed or damaged. A CT volume is NIfTI, NRRD, or a DICOM series.")
    try:
        ds = _read(path, HEADER_TAGS, pixels=False, limits=limits)
    except VolumeError as e:
        return e
    except Exception:
        return VolumeError(f"{name} starts like a DICOM file but could not be read; it is truncated or "
                           f"damaged.")
    if "Rows" not in ds or "Columns" not in ds:
        return VolumeError(f"{name} is a DICOM file without an image (a directory, report or similar); "
                           f"upload the image files of a CT series.")
    size = f"{int(ds.Rows)}×{int(ds.Columns)}"
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        return VolumeError(f"{name} is a colour DICOM image ({size}), such as a screen capture, not a CT "
                           f"series.")
    return VolumeError(f"{name} is a single DICOM image ({size}, one slice); a CT volume needs at least "
                       f"{limits.min_slices} slices: upload every file of the series (or a .zip of them).")
