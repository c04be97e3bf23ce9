"""Compressed DICOM pixel data decoded in a child process, so that a decoder crash costs one upload, not
the server.

pydicom hands JPEG Lossless, JPEG-LS and JPEG 2000 frames to GDCM (C++). On some damaged streams (a
Huffman table whose code counts overrun its segment, seen by fuzzing) GDCM throws an exception its
Python binding does not catch, and the C++ runtime aborts the whole process: every user's session with
it. ``_check_encoded`` in ``dicom`` refuses the inconsistent headers that do this; what a header cannot
show is caught here. The files of a compressed series are decoded by ``python -m photon_core.io.decode``:
their paths go in on stdin (JSON), each file's array comes back on stdout as a JSON header and its raw
bytes (never a pickle). A crash, a hang past the deadline or an error is a ``VolumeError`` in words.
Uncompressed and RLE series (pydicom's own numpy decoders) do not start a process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

from photon_core.io.volume import Limits, VolumeError, _reason

START_S = 30.0             # the deadline of one series: this, plus
PER_FILE_S = 0.5           # this for each file (a 512×512 JPEG Lossless slice takes ~10 ms here)
_HEADER = 4                # bytes of the length of each JSON header on stdout


def decode_files(paths: list[Path], limits: Limits) -> list[np.ndarray | str]:
    """Each file's ``pixel_array`` decoded in a child process, or the reason it could not be decoded.
    Raises VolumeError when the decoder crashes or runs past its deadline."""
    request = json.dumps({"paths": [str(p) for p in paths], "limits": asdict(limits)}).encode()
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    deadline = START_S + PER_FILE_S * len(paths)
    try:
        done = subprocess.run([sys.executable, "-m", "photon_core.io.decode"], input=request,
                              capture_output=True, timeout=deadline, env=env, check=False)
    except subprocess.TimeoutExpired:
        raise VolumeError(f"Decoding the compressed images of this DICOM series took over {deadline:.0f} "
                          f"s and was stopped; the data is damaged, or export the series "
                          f"uncompressed.") from None
    if done.returncode != 0:
        died = f"signal {-done.returncode}" if done.returncode < 0 else f"exit status {done.returncode}"
        raise VolumeError(f"The decoder of this DICOM series' compressed images crashed ({died}): the image "
                          f"data is damaged. Nothing else was affected; export the series again, or "
                          f"uncompressed.")
    return _parse(done.stdout, len(paths))


def _parse(out: bytes, n: int) -> list[np.ndarray | str]:
    view, at, results = memoryview(out), 0, []
    for _ in range(n):
        size = int.from_bytes(view[at:at + _HEADER], "little")
        head = json.loads(bytes(view[at + _HEADER:at + _HEADER + size]))
        at += _HEADER + size
        if "error" in head:
            results.append(str(head["error"]))
            continue
        count = int(np.prod(head["shape"])) * np.dtype(head["dtype"]).itemsize
        results.append(np.frombuffer(view[at:at + count], dtype=head["dtype"]).reshape(head["shape"]))
        at += count
    return results


def _serve() -> None:
    from photon_core.io.dicom import PIXEL_TAGS, _read

    request = json.loads(sys.stdin.buffer.read())
    limits = Limits(**request["limits"])
    out = sys.stdout.buffer
    for path in request["paths"]:
        try:
            px = np.ascontiguousarray(_read(Path(path), PIXEL_TAGS, pixels=True, limits=limits).pixel_array)
            head = {"shape": list(px.shape), "dtype": px.dtype.str}
        except Exception as e:                          # reported per file, in words
            px, head = None, {"error": _reason(e)}
        blob = json.dumps(head).encode()
        out.write(len(blob).to_bytes(_HEADER, "little") + blob)
        if px is not None:
            out.write(px.tobytes())
    out.flush()


if __name__ == "__main__":
    _serve()
