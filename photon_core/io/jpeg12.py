"""A pydicom decoder plugin for 12-bit lossy JPEG ("JPEG Extended", 1.2.840.10008.1.2.4.51) through GDCM.

Older PACS and some archives compress CT lossily as 12-bit JPEG. pydicom's own GDCM plugin refuses that
precision (some GDCM builds lacked it), and its other plugins are 8-bit only, so such a series would not
load although GDCM (python-gdcm, a requirement) decodes it. This plugin hands each frame to GDCM's 12-bit
JPEG codec; pydicom's runner does the rest (shape, sign, rescale stays ours). Registered by
``photon_core.io.dicom`` on import, after pydicom's own plugins, so it only serves what they refuse.
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


def _precision(src: bytes) -> int:
    """The sample precision of a JPEG stream's frame header (SOFn), in bits."""
    i = 2                                               # past SOI
    while i + 4 < len(src):
        if src[i] != 0xFF:
            break
        marker = src[i + 1]
        if marker == 0xFF:                              # fill byte
            i += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if i + 4 < len(src):
                return src[i + 4]
            break
        i += 2 + int.from_bytes(src[i + 2:i + 4], "big")
    raise ValueError("the JPEG stream has no frame header")


def decode_frame(src: bytes, runner) -> bytes:
    """One encoded frame of an unsigned greyscale image as its decoded bytes (16 bits a sample).

    GDCM picks its 8-, 12- or 16-bit codec from the pixel format it is given and tries the others, with a
    message on stderr, when the stream's precision differs: so the stream's own precision is given. 12 is
    the standard's; 16 is what GDCM itself writes for 12 bits stored in 16 (not standard, still read)."""
    bits = runner.bits_stored
    if runner.samples_per_pixel != 1 or runner.pixel_representation != 0 or runner.bits_allocated != 16:
        raise NotImplementedError("only unsigned greyscale 12-bit JPEG, 16 bits allocated, is decoded here")
    precision = _precision(src)
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
