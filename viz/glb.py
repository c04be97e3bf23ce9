"""Binary glTF (GLB) from PyVista meshes, ready for `gr.Model3D` / three.js.

VTK's own glTF exporter writes JSON with base64 buffers and opaque materials; browsers need the
binary container, ``alphaMode: BLEND`` on translucent materials and texture coordinates when a
texture is used. We write the GLB directly from the triangulated meshes: POSITION, NORMAL,
optional TEXCOORD_0, one material per mesh (blocks are binned by saliency into a few meshes).
"""
from __future__ import annotations

import json
import struct

import numpy as np

ARRAY_BUFFER, ELEMENT_ARRAY_BUFFER = 34962, 34963
FLOAT, UINT32 = 5126, 5125


def _pad4(b: bytes, fill: bytes = b"\0") -> bytes:
    return b + fill * ((4 - len(b) % 4) % 4)


def meshes_to_glb(items: list[dict]) -> bytes:
    """items: dicts with ``mesh`` (pyvista mesh), ``rgba`` (4 floats in [0, 1]), optional ``uv``
    ((n_points, 2) texture coordinates) and ``name``. Coordinates are world mm (RAS)."""
    gltf = {"asset": {"version": "2.0", "generator": "photon-ct"}, "scene": 0, "scenes": [{"nodes": []}],
            "nodes": [], "meshes": [], "materials": [], "accessors": [], "bufferViews": [], "buffers": []}
    blob = bytearray()

    def add(arr: np.ndarray, target: int, comp: int, typ: str, minmax: bool = False) -> int:
        data = _pad4(arr.tobytes())
        gltf["bufferViews"].append({"buffer": 0, "byteOffset": len(blob), "byteLength": arr.nbytes, "target": target})
        blob.extend(data)
        acc = {"bufferView": len(gltf["bufferViews"]) - 1, "componentType": comp, "count": int(arr.shape[0]),
               "type": typ}
        if minmax:
            acc["min"] = arr.min(0).tolist()
            acc["max"] = arr.max(0).tolist()
        gltf["accessors"].append(acc)
        return len(gltf["accessors"]) - 1

    # glTF is Y-up: RAS (x right, y anterior, z superior) -> (x, z, -y) keeps the patient upright.
    to_gltf = np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], dtype=np.float32)
    for item in items:
        mesh = item["mesh"].extract_surface(algorithm="dataset_surface").triangulate()
        if mesh.n_points == 0 or mesh.n_cells == 0:
            continue
        mesh = mesh.compute_normals(cell_normals=False, point_normals=True, auto_orient_normals=False)
        pts = (np.asarray(mesh.points, dtype=np.float32) @ to_gltf.T).astype(np.float32)
        nrm = (np.asarray(mesh.point_data["Normals"], dtype=np.float32) @ to_gltf.T).astype(np.float32)
        faces = np.asarray(mesh.faces).reshape(-1, 4)[:, 1:].astype(np.uint32).ravel()
        attrs = {"POSITION": add(pts, ARRAY_BUFFER, FLOAT, "VEC3", True), "NORMAL": add(nrm, ARRAY_BUFFER, FLOAT, "VEC3")}
        if item.get("uv") is not None:
            attrs["TEXCOORD_0"] = add(np.asarray(item["uv"], dtype=np.float32), ARRAY_BUFFER, FLOAT, "VEC2")
        idx = add(faces, ELEMENT_ARRAY_BUFFER, UINT32, "SCALAR")
        rgba = [float(c) for c in item.get("rgba", (0.8, 0.8, 0.8, 1.0))]
        mat = {"name": item.get("name", "surface"), "doubleSided": True,
               "pbrMetallicRoughness": {"baseColorFactor": rgba, "metallicFactor": 0.0, "roughnessFactor": 0.8}}
        if rgba[3] < 1.0:
            mat["alphaMode"] = "BLEND"
        gltf["materials"].append(mat)
        gltf["meshes"].append({"name": item.get("name", "surface"), "primitives": [
            {"attributes": attrs, "indices": idx, "material": len(gltf["materials"]) - 1, "mode": 4}]})
        gltf["nodes"].append({"mesh": len(gltf["meshes"]) - 1, "name": item.get("name", "surface")})
        gltf["scenes"][0]["nodes"].append(len(gltf["nodes"]) - 1)
    gltf["buffers"].append({"byteLength": len(blob)})
    js = _pad4(json.dumps(gltf, separators=(",", ":")).encode(), b" ")
    bin_chunk = _pad4(bytes(blob))
    total = 12 + 8 + len(js) + 8 + len(bin_chunk)
    return (struct.pack("<4sII", b"glTF", 2, total) + struct.pack("<I4s", len(js), b"JSON") + js
            + struct.pack("<I4s", len(bin_chunk), b"BIN\0") + bin_chunk)


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
