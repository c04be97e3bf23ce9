"""Binary glTF (GLB) from PyVista meshes, ready for `gr.Model3D` / Babylon / three.js.

VTK's own glTF exporter writes JSON with base64 buffers and opaque materials; browsers need the
binary container, ``alphaMode: BLEND`` on translucent materials and texture coordinates when a
texture is used. We write the GLB directly from triangulated meshes.

Two steps, so that a scene rebuilt per answer only encodes what changed:

* `encode` — a mesh → `MeshPart` (packed POSITION, NORMAL, optional TEXCOORD_0, indices), done once
  per mesh (the anatomy of a scan);
* `glb` — parts with their names and colours → GLB bytes (concatenation, milliseconds).

Coordinates are world mm (RAS) in; glTF's Y-up frame out (RAS (x, y, z) → (x, z, −y): the patient
stands upright, anterior towards glTF −Z).
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import numpy as np

ARRAY_BUFFER, ELEMENT_ARRAY_BUFFER = 34962, 34963
FLOAT, UINT32 = 5126, 5125
RAS_TO_GLTF = np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], dtype=np.float32)


@dataclass(frozen=True)
class MeshPart:
    """One encoded triangle mesh (glTF frame)."""

    positions: np.ndarray            # (n, 3) float32
    normals: np.ndarray              # (n, 3) float32
    indices: np.ndarray              # (3·triangles,) uint32
    uv: np.ndarray | None = None     # (n, 2) float32

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.positions, self.normals, self.indices, self.uv) if a is not None)


def encode(mesh, uv: np.ndarray | None = None) -> MeshPart | None:
    """A PyVista mesh (any cell type, RAS mm) → a `MeshPart`; None when it has no triangles."""
    mesh = mesh.extract_surface(algorithm="dataset_surface").triangulate()
    if mesh.n_points == 0 or mesh.n_cells == 0:
        return None
    mesh = mesh.compute_normals(cell_normals=False, point_normals=True, auto_orient_normals=False)
    pts = np.asarray(mesh.points, dtype=np.float32) @ RAS_TO_GLTF.T
    nrm = np.asarray(mesh.point_data["Normals"], dtype=np.float32) @ RAS_TO_GLTF.T
    faces = np.asarray(mesh.faces).reshape(-1, 4)[:, 1:].astype(np.uint32).ravel()
    return MeshPart(np.ascontiguousarray(pts, np.float32), np.ascontiguousarray(nrm, np.float32), faces,
                    None if uv is None else np.ascontiguousarray(uv, np.float32))


def _pad4(b: bytes, fill: bytes = b"\0") -> bytes:
    return b + fill * ((4 - len(b) % 4) % 4)


def glb(items: list[tuple[str, MeshPart, tuple]]) -> bytes:
    """items: (name, part, rgba in [0, 1]) → GLB bytes; one node, mesh and material per item."""
    gltf = {"asset": {"version": "2.0", "generator": "photon-ct"}, "scene": 0, "scenes": [{"nodes": []}],
            "nodes": [], "meshes": [], "materials": [], "accessors": [], "bufferViews": [], "buffers": []}
    chunks, offset = [], 0

    def add(arr: np.ndarray, target: int, comp: int, typ: str, minmax: bool = False) -> int:
        nonlocal offset
        data = _pad4(arr.tobytes())
        gltf["bufferViews"].append({"buffer": 0, "byteOffset": offset, "byteLength": arr.nbytes,
                                    "target": target})
        chunks.append(data)
        offset += len(data)
        acc = {"bufferView": len(gltf["bufferViews"]) - 1, "componentType": comp, "count": int(arr.shape[0]),
               "type": typ}
        if minmax:
            acc["min"] = arr.min(0).tolist()
            acc["max"] = arr.max(0).tolist()
        gltf["accessors"].append(acc)
        return len(gltf["accessors"]) - 1

    for name, part, rgba in items:
        if part is None:
            continue
        attrs = {"POSITION": add(part.positions, ARRAY_BUFFER, FLOAT, "VEC3", True),
                 "NORMAL": add(part.normals, ARRAY_BUFFER, FLOAT, "VEC3")}
        if part.uv is not None:
            attrs["TEXCOORD_0"] = add(part.uv, ARRAY_BUFFER, FLOAT, "VEC2")
        idx = add(part.indices, ELEMENT_ARRAY_BUFFER, UINT32, "SCALAR")
        rgba = [float(c) for c in rgba]
        pbr = {"baseColorFactor": rgba, "metallicFactor": 0.0, "roughnessFactor": 0.8}
        mat = {"name": name, "doubleSided": True, "pbrMetallicRoughness": pbr}
        if rgba[3] < 1.0:
            mat["alphaMode"] = "BLEND"
        gltf["materials"].append(mat)
        gltf["meshes"].append({"name": name, "primitives": [
            {"attributes": attrs, "indices": idx, "material": len(gltf["materials"]) - 1, "mode": 4}]})
        gltf["nodes"].append({"mesh": len(gltf["meshes"]) - 1, "name": name})
        gltf["scenes"][0]["nodes"].append(len(gltf["nodes"]) - 1)
    gltf["buffers"].append({"byteLength": offset})
    js = _pad4(json.dumps(gltf, separators=(",", ":")).encode(), b" ")
    total = 12 + 8 + len(js) + 8 + offset
    return b"".join([struct.pack("<4sII", b"glTF", 2, total), struct.pack("<I4s", len(js), b"JSON"), js,
                     struct.pack("<I4s", offset, b"BIN\0"), *chunks])


def meshes_to_glb(items: list[dict]) -> bytes:
    """items: dicts with ``mesh`` (pyvista mesh), ``rgba``, optional ``uv`` and ``name`` → GLB bytes."""
    grey = (0.8, 0.8, 0.8, 1.0)
    return glb([(i.get("name", "surface"), encode(i["mesh"], i.get("uv")), i.get("rgba", grey))
                for i in items])


def read_glb(data: bytes) -> tuple[dict, bytes]:
    """Parse a GLB container (for tests): returns the JSON dict and the binary chunk."""
    magic, version, total = struct.unpack("<4sII", data[:12])
    if magic != b"glTF" or version != 2 or total != len(data):
        raise ValueError("not a GLB 2.0 file")
    jlen, jtype = struct.unpack("<I4s", data[12:20])
    if jtype != b"JSON":
        raise ValueError("first chunk is not JSON")
    js = json.loads(data[20:20 + jlen])
    off = 20 + jlen
    blen, btype = struct.unpack("<I4s", data[off:off + 8])
    if btype != b"BIN\0":
        raise ValueError("second chunk is not BIN")
    return js, data[off + 8:off + 8 + blen]


def accessor(js: dict, binary: bytes, index: int) -> np.ndarray:
    """The array an accessor points to (for tests): VEC3/VEC2 float32 or SCALAR uint32."""
    acc = js["accessors"][index]
    view = js["bufferViews"][acc["bufferView"]]
    width = {"VEC3": 3, "VEC2": 2, "SCALAR": 1}[acc["type"]]
    dtype = np.float32 if acc["componentType"] == FLOAT else np.uint32
    arr = np.frombuffer(binary, dtype, acc["count"] * width, view["byteOffset"])
    return arr.reshape(-1, width) if width > 1 else arr
