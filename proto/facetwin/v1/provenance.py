"""The synthetic-media mark facetwin writes into every swapped PNG and JPEG file it encodes: the IPTC digital source
type trainedAlgorithmicMedia, as XMP. It is part of the contract, beside the messages: the server marks the files it
encodes, and the SDK marks those it encodes itself (a photo larger than the server takes, finished at full size).

The XMP packet is the one IPTC and Adobe specify for both formats: in PNG an iTXt chunk with the keyword
`XML:com.adobe.xmp` (uncompressed, placed after IHDR so it precedes the pixels), in JPEG an APP1 segment that starts
with the namespace `http://ns.adobe.com/xap/1.0/` and a NUL (placed after SOI and a JFIF APP0). Both are a few
hundred bytes spliced into the encoder's output, so the pixels are never re-encoded.

The packet names the system and the exact weights (the bundle's manifest sha256), not the model or target names:
the file travels beyond the operator, and a target identity may be a person's name. The operator traces a hash to
its bundle with ListModels.
"""

from __future__ import annotations

import functools
import struct
import zlib

DIGITAL_SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
SYSTEM = "facetwin"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_XMP_KEYWORD = b"XML:com.adobe.xmp"
JPEG_XMP_NAMESPACE = b"http://ns.adobe.com/xap/1.0/\x00"
_JPEG_MAX_SEGMENT = 0xFFFF  # the length field is 16 bits and counts itself


@functools.lru_cache(maxsize=256)  # one packet per bundle: the same bytes for every image it makes
def xmp_packet(manifest_sha256: str) -> bytes:
    """The XMP packet (UTF-8) declaring trainedAlgorithmicMedia, made by this system with these weights."""
    version = f"bundle manifest sha256 {manifest_sha256}" if manifest_sha256 else "bundle manifest unknown"
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">\n'
        ' <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n'
        '  <rdf:Description rdf:about=""\n'
        '    xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/"\n'
        f'    Iptc4xmpExt:DigitalSourceType="{DIGITAL_SOURCE_TYPE}"\n'
        f'    Iptc4xmpExt:AISystemUsed="{SYSTEM}"\n'
        f'    Iptc4xmpExt:AISystemVersionUsed="{version}"/>\n'
        ' </rdf:RDF>\n'
        '</x:xmpmeta>\n'
        '<?xpacket end="r"?>'
    ).encode("utf-8")


def mark_synthetic(data: bytes, encoding: str, manifest_sha256: str) -> bytes:
    """PNG/JPEG file bytes with the XMP packet added; raw pixels have no metadata and come back unchanged."""
    if encoding == "png":
        return _png_with_xmp(data, xmp_packet(manifest_sha256))
    if encoding == "jpeg":
        return _jpeg_with_xmp(data, xmp_packet(manifest_sha256))
    return data


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC-32 of type + data."""
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_with_xmp(data: bytes, packet: bytes) -> bytes:
    if not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        raise ValueError("not a PNG file from the encoder: no signature and IHDR chunk")
    ihdr_end = 8 + 12 + struct.unpack(">I", data[8:12])[0]  # signature, then length + type + data + CRC
    # iTXt: keyword NUL, compression flag 0, method 0, empty language tag NUL, empty translated keyword NUL, text.
    chunk = _png_chunk(b"iTXt", PNG_XMP_KEYWORD + b"\x00\x00\x00\x00\x00" + packet)
    return data[:ihdr_end] + chunk + data[ihdr_end:]


def _jpeg_with_xmp(data: bytes, packet: bytes) -> bytes:
    if data[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG file from the encoder: no SOI marker")
    body = JPEG_XMP_NAMESPACE + packet
    if len(body) + 2 > _JPEG_MAX_SEGMENT:
        raise ValueError(f"XMP packet of {len(packet)} bytes does not fit one JPEG APP1 segment")
    at = 2
    if data[2:4] == b"\xff\xe0":  # JFIF APP0 must stay first
        at = 4 + struct.unpack(">H", data[4:6])[0]
    segment = b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body
    return data[:at] + segment + data[at:]
