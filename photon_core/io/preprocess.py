"""The official Photon CT preparation, done on the fly in torch, with the geometry it implies.

Official pipeline (two stages in the reference; both reproduced here):

1. Offline prep (the dataset scripts): reorient to **RAI**, resample to 1×1×1 mm (linear), centre
   crop/pad to 364³ (pad value −1000 HU), clip HU to [−1000, 1000].
2. Load step (`PhotonTemplate.load_volume`): read the SimpleITK array, trilinear resize to
   (D, H, W) = (140, 280, 280) with ``align_corners=False``, global min-max to [0, 1], flip the
   **last** axis (W), permute to frames-first ``(140, 1, 280, 280)``.

Axis conventions (written down because every step depends on them)
-------------------------------------------------------------------
* SimpleITK's ``GetArrayFromImage`` returns ``(z, y, x)``: the array is the nibabel array
  transposed ``(2, 1, 0)``. The load step works on that order: D = z, H = y, W = x.
* "RAI" is SimpleITK ``DICOMOrient`` notation: the letter says where each ITK axis *points to*
  (identity direction = "LPS"). RAI therefore means +x → patient Right, +y → Anterior,
  +z → Inferior. As a (z, y, x) array: D runs head→feet, H back→front, W patient-left→right.
  After the load step's flip of W, W runs patient right→left (radiological display order).
* Model voxel ``(d, h, w)`` of the (140, 280, 280) grid; the vision tower cuts it into 14×14×14
  patches (grid t, h, w = 10, 20, 20) and the 2×2 merger makes the 10×10×10 **token grid**:
  token ``(a, b, c)`` (sequence index ``a·100 + b·10 + c``) covers d ∈ [14a, 14a+14),
  h ∈ [28b, 28b+28), w ∈ [28c, 28c+28) — a ≈36.4 mm cube of the 364 mm field of view.

`Geometry` composes every step (reorientation, resampling, crop/pad, resize, flip) into one affine
from model voxel to ORIGINAL voxel index, so kept token blocks can be drawn on (and exported onto)
the scan the user loaded.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from photon_core import vml
from photon_core.io.orientation import reorient
from photon_core.io.volume import Volume

vml.warm_up()   # before any parallel CPU math (a oneMKL first-call race, see photon_core.vml)

PREP_SIZE = 364                   # mm, = voxels after 1 mm resampling and crop/pad
MODEL_SHAPE = (140, 280, 280)     # (D, H, W) of the model input
HU_MIN, HU_MAX = -1000.0, 1000.0
PATCH = 14                        # spatial and temporal patch size
MERGE = 2                         # spatial merge (2×2)
TOKEN_GRID = (MODEL_SHAPE[0] // PATCH, MODEL_SHAPE[1] // PATCH // MERGE, MODEL_SHAPE[2] // PATCH // MERGE)
TOKEN_VOXELS = (PATCH, PATCH * MERGE, PATCH * MERGE)   # model voxels per token block (d, h, w)
RAI_AXCODES = ("I", "A", "R")     # nibabel codes of the (z, y, x) array axes after RAI reorientation


_STRIDES = (TOKEN_GRID[1] * TOKEN_GRID[2], TOKEN_GRID[2], 1)     # of model axes d, h, w in a flat token


class TokenMap:
    """For every original voxel of a scan, the flat token (a·100+b·10+c) it falls in, or -1 outside the
    model volume — held as three 1-D lookups added together (``parts``, one an original axis; a voxel
    outside along an axis reads `OUT` there) where the geometry allows, else as the whole int16 array.
    Indexing with ints and slices reads only that part (a plane of the slices view); `whole` gives the
    volume. An open scan's map was 2 bytes a voxel (157 MB for 512 × 512 × 300); its lookups are
    kilobytes."""

    OUT = -10_000          # any sum with one OUT is < 0 (3 × OUT + 999 still fits int16)

    def __init__(self, parts: tuple[np.ndarray, ...] | None = None, strides: tuple[int, ...] = (),
                 array: np.ndarray | None = None):
        if (parts is None) == (array is None):
            raise ValueError("a TokenMap holds either its parts or its array")
        self.parts = None if parts is None else tuple(np.asarray(p, np.int16) for p in parts)
        self.strides = tuple(int(x) for x in strides)     # per part: its model axis's stride in the index
        self.array = array
        self.shape = tuple(int(n) for n in (array.shape if array is not None else (len(p) for p in parts)))
        self.ndim = 3

    @staticmethod
    def _sum(terms) -> np.ndarray:
        total = terms[0]
        for t in terms[1:]:
            total = total + t
        return np.maximum(total, np.int16(-1))

    def whole(self) -> np.ndarray:
        """The (I, J, K) int16 volume (a new array, or the one held)."""
        if self.array is not None:
            return self.array
        p0, p1, p2 = self.parts
        return self._sum([p0[:, None, None], p1[None, :, None], p2[None, None, :]])

    def __getitem__(self, index):
        if self.array is not None:
            return self.array[index]
        index = index if isinstance(index, tuple) else (index,)
        if len(index) > 3 or not all(isinstance(i, (int, np.integer, slice)) for i in index):
            return self.whole()[index]
        index = index + (slice(None),) * (3 - len(index))
        kept = [a for a, i in enumerate(index) if isinstance(i, slice)]
        terms = []
        for a, (p, i) in enumerate(zip(self.parts, index)):
            sub = p[i]
            if a in kept:
                shape = [1] * len(kept)
                shape[kept.index(a)] = sub.size
                sub = sub.reshape(shape)
            terms.append(sub)
        return self._sum(terms)

    def voxels_of(self, token: int) -> np.ndarray:
        """(N, 3) indices of the voxels of one token of the grid (``np.argwhere(whole() == token)``, from the
        lookups); none for a token off the grid."""
        if self.array is not None:
            return np.argwhere(self.array == token)
        if not 0 <= token < int(np.prod(TOKEN_GRID)):
            return np.empty((0, 3), np.int64)
        cell = dict(zip(_STRIDES, np.unravel_index(int(token), TOKEN_GRID)))
        hits = [np.flatnonzero(p == cell[st] * st) for p, st in zip(self.parts, self.strides)]
        if any(h.size == 0 for h in hits):
            return np.empty((0, 3), np.int64)
        grid = np.meshgrid(*hits, indexing="ij")
        return np.stack([g.ravel() for g in grid], axis=1)

    def covered(self, n: int) -> np.ndarray:
        """(n,) bool: the tokens that cover some voxel (`covered_tokens`)."""
        out = np.zeros(n + 1, bool)
        if self.array is not None:
            out[self.array] = True                   # index −1 (outside) lands on the extra slot
            return out[:-1]
        values = [np.unique(p[p >= 0]).astype(np.int64) for p in self.parts]
        out[(values[0][:, None, None] + values[1][None, :, None] + values[2][None, None, :]).ravel()] = True
        return out[:-1]

    def reoriented(self, affine: np.ndarray, target) -> tuple[TokenMap, np.ndarray]:
        """As `orientation.reorient` (axis permutation and flips only): the map on the reoriented grid and
        the map from its indices to this one's."""
        from nibabel import orientations as ornt

        from .orientation import reorient, transform

        if self.array is not None:
            arr, to_source = reorient(self.array, affine, target)
            return TokenMap(array=arr), to_source
        t = transform(affine, target)
        flipped = [p[::-1] if f == -1 else p for p, f in zip(self.parts, t[:, 1])]
        order = np.argsort(t[:, 0])
        return (TokenMap(parts=[flipped[a] for a in order], strides=[self.strides[a] for a in order]),
                ornt.inv_ornt_aff(t, self.shape))


@dataclass
class Geometry:
    """Maps model voxels and token blocks back to the original scan.

    ``model_to_orig`` (4×4): model voxel (d, h, w, 1) → original voxel index (i, j, k, 1).
    ``orig_affine`` (4×4): original voxel index → world RAS mm. Continuous index convention:
    integer indices are voxel centres.
    """

    model_to_orig: np.ndarray
    orig_affine: np.ndarray
    orig_shape: tuple[int, int, int]
    nifti_xforms: dict | None = None    # a NIfTI scan's qform and sform with their codes, for the export

    @property
    def model_to_world(self) -> np.ndarray:
        return self.orig_affine @ self.model_to_orig

    def model_to_original(self, dhw: np.ndarray) -> np.ndarray:
        """(N, 3) model voxel coordinates → (N, 3) original voxel indices (float)."""
        dhw = np.atleast_2d(np.asarray(dhw, dtype=np.float64))
        return dhw @ self.model_to_orig[:3, :3].T + self.model_to_orig[:3, 3]

    def original_to_model(self, ijk: np.ndarray) -> np.ndarray:
        """(N, 3) original voxel indices → (N, 3) model voxel coordinates (float)."""
        inv = np.linalg.inv(self.model_to_orig)
        ijk = np.atleast_2d(np.asarray(ijk, dtype=np.float64))
        return ijk @ inv[:3, :3].T + inv[:3, 3]

    def world_to_model(self, xyz: np.ndarray) -> np.ndarray:
        inv = np.linalg.inv(self.model_to_world)
        xyz = np.atleast_2d(np.asarray(xyz, dtype=np.float64))
        return xyz @ inv[:3, :3].T + inv[:3, 3]

    @staticmethod
    def token_of_model_voxel(dhw: np.ndarray) -> np.ndarray:
        """(N, 3) model voxel coordinates → (N, 3) integer token cell (a, b, c); -1 if outside."""
        dhw = np.atleast_2d(np.asarray(dhw, dtype=np.float64))
        cell = np.floor((dhw + 0.5) / np.asarray(TOKEN_VOXELS)).astype(np.int64)
        inside = np.all((cell >= 0) & (cell < np.asarray(TOKEN_GRID)), axis=1)
        cell[~inside] = -1
        return cell

    def token_of_original_voxel(self, ijk: np.ndarray) -> np.ndarray:
        return self.token_of_model_voxel(self.original_to_model(ijk))

    def token_block_corners(self, a: int, b: int, c: int) -> np.ndarray:
        """(8, 3) world RAS corners of token block (a, b, c) (voxel-edge bounds)."""
        lo = np.array([a, b, c]) * np.asarray(TOKEN_VOXELS) - 0.5
        hi = lo + np.asarray(TOKEN_VOXELS)
        corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1])
                            for z in (lo[2], hi[2])])
        m = self.model_to_world
        return corners @ m[:3, :3].T + m[:3, 3]

    def token_index_volume(self, shape: tuple[int, int, int] | None = None) -> np.ndarray:
        """For every ORIGINAL voxel, the flat token index (a·100+b·10+c) it falls in, or -1."""
        return self.token_map(shape).whole()

    def token_map(self, shape: tuple[int, int, int] | None = None) -> TokenMap:
        """`token_index_volume` as a `TokenMap`: its three 1-D lookups (kilobytes) where each model axis
        follows one original axis, as the official preparation makes it; else the whole array."""
        shape = shape or self.orig_shape
        inv = np.linalg.inv(self.model_to_orig)
        m = inv[:3, :3].T.astype(np.float32)            # rows: original axes; columns: model axes
        if np.count_nonzero(m) == 3 and np.all(np.count_nonzero(m, axis=0) == 1):
            return TokenMap(*self._token_index_parts(shape, m, inv[:3, 3].astype(np.float32)))
        return TokenMap(array=self._token_index_general(shape, m, inv[:3, 3].astype(np.float32)))

    @staticmethod
    def _token_index_general(shape, m: np.ndarray, offset: np.ndarray) -> np.ndarray:
        grids = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
        ijk = np.stack([g.ravel() for g in grids], axis=1)
        dhw = ijk @ m + offset
        cell = Geometry.token_of_model_voxel(dhw)
        flat = cell[:, 0] * TOKEN_GRID[1] * TOKEN_GRID[2] + cell[:, 1] * TOKEN_GRID[2] + cell[:, 2]
        flat[cell[:, 0] < 0] = -1
        return flat.reshape(shape).astype(np.int16)

    @staticmethod
    def _token_index_parts(shape, m: np.ndarray, offset: np.ndarray) -> tuple[tuple, tuple]:
        """The token map when each model axis follows one original axis (always, for the official
        preparation: reorientation, per-axis resampling, crop): the token cell along a model axis is a
        function of one original index, so the volume is three 1-D lookups added together — the same
        float32 arithmetic as the general path, voxel for voxel, without its (N, 3) arrays (a 512 × 512 ×
        300 scan: 45 s → under a second on 2 cores), and without the volume itself until asked for."""
        parts: list = [None, None, None]
        strides: list = [0, 0, 0]
        for col in range(3):                            # model axis d, h, w
            row = int(np.flatnonzero(m[:, col])[0])     # the original axis it follows
            coord = np.arange(shape[row], dtype=np.float32) * m[row, col] + offset[col]
            cell = np.floor((coord.astype(np.float64) + 0.5) / TOKEN_VOXELS[col]).astype(np.int64)
            bad = (cell < 0) | (cell >= TOKEN_GRID[col])
            parts[row] = np.where(bad, TokenMap.OUT, cell * _STRIDES[col]).astype(np.int16)
            strides[row] = _STRIDES[col]
        return tuple(parts), tuple(strides)


# --------------------------------------------------------------------------------------------
# Stage 1: offline prep (reorient, 1 mm, crop/pad 364, clip)
# --------------------------------------------------------------------------------------------

def _resample_axis(x: torch.Tensor, axis: int, src: torch.Tensor, fill: float) -> torch.Tensor:
    """Linear interpolation of ``x`` along ``axis`` at fractional source indices ``src``.

    Written as one matmul with the (n_out, n_in) interpolation matrix (fast on CPU and GPU).
    Samples outside [0, n−1] (the first and last voxel centres) take ``fill``. ITK's resampler counts
    [−0.5, n−0.5) as inside and repeats the edge voxel there, so on thick slices the two differ by up to
    half a slice at each end of an axis (one 1 mm sample for 3 mm slices). Which the official offline
    preparation used is not published (its README names the steps, not the tool); this rule stays until
    a reference figure shows the other.
    """
    n = x.shape[axis]
    src = src.to(torch.float64)
    inside = (src >= -1e-4) & (src <= n - 1 + 1e-4)
    s = src.clamp(0, n - 1)
    lo = s.floor().long().clamp(max=n - 1)
    hi = (lo + 1).clamp(max=n - 1)
    frac = s - lo.to(s.dtype)
    rows = torch.arange(len(src), device=src.device)
    w = torch.zeros(len(src), n, dtype=torch.float64, device=src.device)
    w.index_put_((rows, lo), (1 - frac) * inside, accumulate=True)
    w.index_put_((rows, hi), frac * inside, accumulate=True)
    out = torch.tensordot(w.to(x.dtype), x, dims=([1], [axis]))          # (n_out, ...rest)
    if not bool(inside.all()):
        out.add_(fill * (~inside).to(x.dtype).view(-1, *([1] * (x.ndim - 1))))
    return torch.movedim(out, 0, axis)


def reorient_rai(vol: Volume) -> tuple[np.ndarray, np.ndarray]:
    """Return the (z, y, x) RAI array and the affine from its indices to ORIGINAL voxel indices."""
    arr, new_to_orig = reorient(vol.hu, vol.affine, RAI_AXCODES)
    return np.ascontiguousarray(arr), new_to_orig


def offline_prep(vol: Volume, device: str | torch.device = "cpu",
                 step=None) -> tuple[torch.Tensor, np.ndarray]:
    """Official offline prep: RAI, 1 mm, centre crop/pad to 364³ (−1000), clip to [−1000, 1000].

    Returns the (364, 364, 364) float32 tensor in (z, y, x) order and the affine from its indices to
    ORIGINAL voxel indices. Oblique scans are handled by the nearest axis permutation (as a DICOM
    reorientation filter does); the residual obliquity is kept in the affine for display.
    ``step(fraction)``: called after each axis is resampled (progress; it may raise to stop the work).
    """
    arr, rai_to_orig = reorient_rai(vol)
    spacing = np.linalg.norm((vol.affine[:3, :3] @ rai_to_orig[:3, :3]), axis=0)  # mm per RAI axis
    x = torch.as_tensor(arr, dtype=torch.float32, device=device)
    prep_to_rai = np.eye(4)
    sizes = [int(round(arr.shape[a] * spacing[a])) for a in range(3)]          # sizes after 1 mm resampling
    order = sorted(range(3), key=lambda a: PREP_SIZE / arr.shape[a])            # shrink first: cheaper
    for n, axis in enumerate(order):
        n_res = sizes[axis]
        if n_res >= PREP_SIZE:
            off = (n_res - PREP_SIZE) // 2                           # crop start
        else:
            off = -((PREP_SIZE - n_res) // 2)                        # pad before (negative start)
        out_idx = torch.arange(PREP_SIZE, dtype=torch.float64, device=device)
        src = (out_idx + off) / spacing[axis]                        # 1 mm index -> RAI index
        x = _resample_axis(x, axis, src, HU_MIN)
        prep_to_rai[axis, axis] = 1.0 / spacing[axis]
        prep_to_rai[axis, 3] = off / spacing[axis]
        if step is not None:
            step((n + 1) / len(order))
    x = x.clamp_(HU_MIN, HU_MAX)
    return x, rai_to_orig @ prep_to_rai


# --------------------------------------------------------------------------------------------
# Stage 2: the official load step
# --------------------------------------------------------------------------------------------

def load_step(array_dhw: torch.Tensor | np.ndarray) -> torch.Tensor:
    """`PhotonTemplate.load_volume` after reading: (D, H, W) → (140, 1, 280, 280) in [0, 1].

    Trilinear resize with align_corners=False (what monai ``Resize`` does without anti-aliasing),
    global min-max, flip of the last axis (W), frames first.
    """
    x = torch.as_tensor(array_dhw).to(torch.float32)
    x = F.interpolate(x[None, None], size=MODEL_SHAPE, mode="trilinear", align_corners=False)[0]
    lo, hi = x.min(), x.max()
    x = (x - lo) / (hi - lo) if float(hi - lo) > 0 else torch.zeros_like(x)
    x = torch.flip(x, dims=[-1])
    return x.permute(1, 0, 2, 3).contiguous()  # (1, D, H, W) -> (D, 1, H, W)


def _load_step_to_prep(prep_shape: tuple[int, int, int]) -> np.ndarray:
    """Affine from model voxel (d, h, w) to the (z, y, x) index of the array fed to `load_step`."""
    m = np.eye(4)
    for axis, (n_in, n_out) in enumerate(zip(prep_shape, MODEL_SHAPE)):
        scale = n_in / n_out
        m[axis, axis] = scale                     # align_corners=False: src = (dst + 0.5)·s − 0.5
        m[axis, 3] = 0.5 * scale - 0.5
    flip = np.eye(4)
    flip[2, 2], flip[2, 3] = -1.0, MODEL_SHAPE[2] - 1   # the W flip happens after the resize
    return m @ flip


# --------------------------------------------------------------------------------------------
# Patches (what Qwen2VLImageProcessor does for a video with do_resize/rescale/normalize off)
# --------------------------------------------------------------------------------------------

def patchify(frames: torch.Tensor, patch: int = PATCH, temporal_patch: int = PATCH,
             merge: int = MERGE) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, C, H, W) frames → (N, C·tp·p·p) patch rows and grid (1, 3) = (t, h, w).

    Row order: t, h//merge, w//merge, h%merge, w%merge; inside a row: channel, temporal, y, x
    — the order of the Qwen2-VL processor, so merged 2×2 groups are consecutive rows.
    """
    T, C, H, W = frames.shape
    gt, gh, gw = T // temporal_patch, H // patch, W // patch
    if (gt * temporal_patch, gh * patch, gw * patch) != (T, H, W) or gh % merge or gw % merge:
        raise ValueError(f"frames {tuple(frames.shape)} do not tile into {temporal_patch}×{patch}×{patch} "
                         f"patches with a {merge}×{merge} merge")
    x = frames.reshape(gt, temporal_patch, C, gh // merge, merge, patch, gw // merge, merge, patch)
    # (gt, tp, C, bh, mh, p, bw, mw, p) -> (gt, bh, bw, mh, mw, C, tp, p, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    rows = x.reshape(gt * gh * gw, C * temporal_patch * patch * patch)
    return rows, torch.tensor([[gt, gh, gw]], dtype=torch.long)


# --------------------------------------------------------------------------------------------
# The whole thing
# --------------------------------------------------------------------------------------------

@dataclass
class Prepared:
    """What the model needs for one scan, and how to map it back."""

    frames: torch.Tensor          # (140, 1, 280, 280) float32 in [0, 1]
    pixel_values: torch.Tensor    # (4000, 2744) patch rows
    grid_thw: torch.Tensor        # (1, 3) = [[10, 20, 20]]
    geometry: Geometry


def prepare(vol: Volume, device: str | torch.device | None = None, step=None) -> Prepared:
    """Volume → official Photon input plus `Geometry`. Runs on CUDA when available. ``step(fraction)``:
    told the share done after each resampled axis (progress; it may raise to stop the work)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with torch.no_grad():
        prep, prep_to_orig = offline_prep(vol, device, step)
        frames = load_step(prep)
    pixel_values, grid = patchify(frames)
    model_to_orig = prep_to_orig @ _load_step_to_prep(tuple(prep.shape))
    geom = Geometry(model_to_orig=model_to_orig, orig_affine=np.asarray(vol.affine, dtype=np.float64),
                    orig_shape=vol.shape, nifti_xforms=vol.meta.get("nifti_xforms"))
    return Prepared(frames=frames, pixel_values=pixel_values, grid_thw=grid, geometry=geom)


def frames_to_model_volume(frames: torch.Tensor) -> np.ndarray:
    """(140, 1, 280, 280) → (140, 280, 280) numpy, indexed by model voxel (d, h, w)."""
    return frames[:, 0].detach().float().cpu().numpy()


def blocks(x: torch.Tensor, grid: tuple) -> torch.Tensor:
    """(140, 280, 280) → (a, d, b, h, c, w) view with ``grid`` = (a, b, c) token blocks."""
    (D, H, W), (a, b, c) = x.shape, grid
    return x.reshape(a, D // a, b, H // b, c, W // c)


def block_fractions(mask: torch.Tensor, grid: tuple = TOKEN_GRID) -> torch.Tensor:
    """Model-space mask (140, 280, 280) → (a·b·c,) share of each token block's voxels in it
    (non-zero voxels count). The trainer calls this a dozen times a scan, so it counts along the
    contiguous depth first in a small integer type, then over the in-plane block (~4× faster than
    a float mean over the block view)."""
    mask = mask if mask.dtype == torch.bool else mask != 0
    (D, H, W), (a, b, c) = mask.shape, grid
    depth = mask.reshape(a, D // a, H * W).sum(1, dtype=torch.int16 if D // a < 2**15 else torch.int32)
    counts = depth.reshape(a, b, H // b, c, W // c).sum((2, 4), dtype=torch.int32)
    return (counts.float() / ((D // a) * (H // b) * (W // c))).flatten()
