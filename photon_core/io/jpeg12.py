"""A pydicom decoder plugin for 12-bit lossy JPEG ("JPEG Extended", 1.2.840.10008.1.2.4.51) through GDCM.

Older PACS and some archives compress CT lossily as 12-bit JPEG. pydicom's own GDCM plugin refuses that
precision (some GDCM builds lacked it), and its other plugins are 8-bit only, so such a series would not
load although GDCM (python-gdcm, a requirement) decodes it. This plugin hands each frame to GDCM's 12-bit
JPEG codec; pydicom's runner does the rest (shape, sign, rescale stays ours). Registered by
``photon_core.io.dicom`` on import, after pydicom's own plugins, so it only serves what they refuse.

``frame_header`` reads the size, components and precision a JPEG, JPEG-LS or JPEG 2000 stream declares:
the plugin gives GDCM the stream's precision, and the DICOM loader refuses an image whose header
disagrees with its stream before any decoder sees it.
"""
from __future__ import annotations

from pydicom import uid

try:
    import gdcm

    HAVE_GDCM = tuple(int(x) for x in gdcm.Version.GetVersion().split(".")[:2]) >= (3, 0)
except ImportError:                                     # pragma: no cover - gdcm is a requirement
    HAVE_GDCM = False

DECODER_DEPENDENCIES = {uid.JPEGExtended12Bit: ("python-gdcm>=3.0.10",)}
LABEL = "photon-gdcm-12bit"


def is_available(syntax: str) -> bool:
    return HAVE_GDCM and syntax in DECODER_DEPENDENCIES


def frame_header(frame: bytes) -> tuple[int, int, int, int] | None:
    """(rows, columns, components, precision) from the frame header of a JPEG, JPEG-LS or JPEG 2000
    stream (a raw codestream or a JP2 file), or None where no header is found."""
    if frame[:2] == b"\xff\xd8":                          # JPEG and JPEG-LS: markers from SOI to the SOF
        i = 2
        while i + 10 <= len(frame) and frame[i] == 0xFF:
            marker = frame[i + 1]
            if marker == 0xFF:                          # fill byte
                i += 1
                continue
            if (0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)) or marker == 0xF7:
                return (int.from_bytes(frame[i + 5:i + 7], "big"), int.from_bytes(frame[i + 7:i + 9], "big"),
                        frame[i + 9], frame[i + 4])
            i += 2 + int.from_bytes(frame[i + 2:i + 4], "big")
        return None
    start = frame.find(b"\xff\x4f\xff\x51", 0, 4096)      # JPEG 2000: SOC then SIZ (a JP2 box holds it)
    if start < 0 or start + 43 > len(frame):
        return None
    siz = frame[start + 4:]
    x, y, x0, y0 = (int.from_bytes(siz[k:k + 4], "big") for k in (4, 8, 12, 16))
    return y - y0, x - x0, int.from_bytes(siz[36:38], "big"), (siz[38] & 0x7F) + 1


def decode_frame(src: bytes, runner) -> bytes:
    """One encoded frame of an unsigned greyscale image as its decoded bytes (16 bits a sample).

    GDCM picks its 8-, 12- or 16-bit codec from the pixel format it is given and tries the others, with a
    message on stderr, when the stream's precision differs: so the stream's own precision is given. 12 is
    the standard's; 16 is what GDCM itself writes for 12 bits stored in 16 (not standard, still read)."""
    bits = runner.bits_stored
    if runner.samples_per_pixel != 1 or runner.pixel_representation != 0 or runner.bits_allocated != 16:
        raise NotImplementedError("only unsigned greyscale 12-bit JPEG, 16 bits allocated, is decoded here")
    header = frame_header(src)
    if header is None:
        raise ValueError("the JPEG stream has no frame header")
    precision = header[3]
    if precision not in (12, 16) or not 8 < bits <= precision:
        raise NotImplementedError(f"a {precision}-bit JPEG stream of {bits}-bit samples is not decoded here")
    fragment = gdcm.Fragment()
    fragment.SetByteStringValue(src)
    fragments = gdcm.SequenceOfFragments.New()
    fragments.AddFragment(fragment)
    pixel_data = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
    pixel_data.SetValue(fragments.__ref__())
    image = gdcm.Image()
    image.SetNumberOfDimensions(2)
    image.SetDimensions((runner.columns, runner.rows, 1))
    image.SetDataElement(pixel_data)
    image.SetPhotometricInterpretation(gdcm.PhotometricInterpretation(
        gdcm.PhotometricInterpretation.GetPIType(runner.photometric_interpretation)))
    image.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGExtendedProcess2_4))
    if precision == 12:
        image.SetPixelFormat(gdcm.PixelFormat(1, 12, 12, 11, 0))
    else:
        image.SetPixelFormat(gdcm.PixelFormat(1, 16, bits, bits - 1, 0))
    out = image.GetBuffer()                             # GDCM hands char* back as str: its bytes, re-encoded
    out = out.encode("utf-8", "surrogateescape") if isinstance(out, str) else b""
    expected = runner.rows * runner.columns * 2
    if len(out) != expected:
        raise ValueError(f"GDCM decoded {len(out)} bytes of the 12-bit JPEG frame where it needs {expected}")
    return out


def register() -> None:
    """Add the plugin to pydicom's JPEG Extended decoder, once."""
    from pydicom.pixels.decoders import JPEGExtended12BitDecoder

    if LABEL not in JPEGExtended12BitDecoder.available_plugins and HAVE_GDCM:
        JPEGExtended12BitDecoder.add_plugin(LABEL, (__name__, "decode_frame"))
