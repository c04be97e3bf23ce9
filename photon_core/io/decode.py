"""Compressed DICOM pixel data decoded in a child process, so that a decoder crash costs one upload, not
the server.

pydicom hands JPEG Lossless, JPEG-LS and JPEG 2000 frames to GDCM (C++). On some damaged streams (a
Huffman table whose code counts overrun its segment, seen by fuzzing) GDCM throws an exception its
Python binding does not catch, and the C++ runtime aborts the whole process: every user's session with
it. ``_check_encoded`` in ``dicom`` refuses the inconsistent headers that do this; what a header cannot
show is caught here. The files of a compressed series are decoded by ``python -m photon_core.io.decode``:
their paths go in on stdin (JSON), each file's array comes back on stdout as a JSON header and its raw
bytes (never a pickle), read by the loader one file at a time as it copies their slices (`decode_stream`:
the pipe holds the child back, so the series is never held decoded whole). A crash, a hang past the
deadline or an error is a ``VolumeError`` in words.
Uncompressed and RLE series (pydicom's own numpy decoders) do not start a process.

Starting the child and importing pydicom and its decoders costs about half a second, so one child is
started ahead (``prestart``: the app calls it when it starts, each decode after it finishes): it imports
its libraries and waits on stdin. A series takes that child, which serves it and exits, so every series
is still decoded by a process of its own; two series at once, the second starts its own.
"""
from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
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
    return list(decode_stream(paths, limits))


def decode_stream(paths: list[Path], limits: Limits) -> Iterator[np.ndarray | str]:
    """`decode_files` one file at a time, in the order of ``paths``: each array is read from the child as
    it is asked for, and the child writes at most about one file ahead (the pipe holds the rest back), so a
    series is never held decoded whole beside the volume it is copied into. The deadline counts from the
    start (a timer ends the child there, which ends the read); closing the iterator early ends the child."""
    request = json.dumps({"paths": [str(p) for p in paths], "limits": asdict(limits)}).encode()
    budget = START_S + PER_FILE_S * len(paths)
    child = _take()
    late = threading.Event()

    def past_deadline() -> None:
        late.set()
        child.kill()

    timer = threading.Timer(budget, past_deadline)
    timer.daemon = True
    done = False
    try:
        try:
            child.stdin.write(request)
            child.stdin.close()
        except OSError:                                 # the child is gone: the read below says how
            pass
        timer.start()
        for _ in paths:
            try:
                item = _read_one(child.stdout)
            except (OSError, ValueError):               # output cut off mid-file (the child ended)
                item = None
            if item is None and late.is_set():
                raise VolumeError(f"Decoding the compressed images of this DICOM series took over "
                                  f"{budget:.0f} s and was stopped; the data is damaged, or export the "
                                  f"series uncompressed.")
            if item is None:
                try:
                    code = child.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    child.kill()
                    code = child.wait()
                died = f"signal {-code}" if code < 0 else f"exit status {code}"
                raise VolumeError(f"The decoder of this DICOM series' compressed images crashed ({died}): "
                                  f"the image data is damaged. Nothing else was affected; export the series "
                                  f"again, or uncompressed.")
            yield item
        done = True
    finally:
        timer.cancel()
        if not done:                                    # stopped early, failed or past its deadline
            child.kill()
        try:
            child.wait(timeout=2)                       # done: it ends by itself
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        child.stdout.close()
        prestart()                                      # the next series' child imports while this one ends


def _read_one(stream) -> np.ndarray | str | None:
    """One file's answer from the child: its array, the reason it was not decoded, or None at the end."""
    size = stream.read(_HEADER)
    if len(size) < _HEADER:
        return None
    blob = stream.read(int.from_bytes(size, "little"))
    head = json.loads(blob)
    if "error" in head:
        return str(head["error"])
    count = int(np.prod(head["shape"])) * np.dtype(head["dtype"]).itemsize
    data = stream.read(count)
    if len(data) < count:
        return None
    return np.frombuffer(data, dtype=head["dtype"]).reshape(head["shape"])


_spare: subprocess.Popen | None = None                 # a started child waiting for its series
_spare_lock = threading.Lock()


def prestart() -> None:
    """Start a decoding child now, unless one waits already: it imports its libraries and waits for a
    series, so that the next compressed series does not wait for them."""
    global _spare
    with _spare_lock:
        if _spare is None or _spare.poll() is not None:
            _spare = _start()


def _take() -> subprocess.Popen:
    """The waiting child if there is one (and it is alive), else a new one."""
    global _spare
    with _spare_lock:
        child, _spare = _spare, None
    if child is not None and child.poll() is None:
        return child
    return _start()


def _start() -> subprocess.Popen:
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    return subprocess.Popen([sys.executable, "-m", "photon_core.io.decode"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)


@atexit.register
def _stop_spare() -> None:
    """The waiting child reads the end of its stdin and exits."""
    global _spare
    with _spare_lock:
        child, _spare = _spare, None
    if child is not None:
        child.stdin.close()
        try:
            child.wait(timeout=2)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        child.stdout.close()


def _serve() -> None:
    import pydicom.pixels.decoders.gdcm  # noqa: F401  (the decoders' imports run before the request comes)

    from photon_core.io.dicom import PIXEL_TAGS, _read

    data = sys.stdin.buffer.read()
    if not data:                                        # a waiting child whose parent ended
        return
    request = json.loads(data)
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
