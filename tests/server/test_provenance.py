"""The synthetic-media mark in PNG and JPEG files, read back by walking their structure, by Pillow, OpenCV and exiftool."""

from __future__ import annotations

import io
import json
import shutil
import struct
import subprocess
import xml.etree.ElementTree as ET
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from facetwin.server import imaging
from facetwin.server.provenance import DIGITAL_SOURCE_TYPE, mark_synthetic

IPTC_EXT = "{http://iptc.org/std/Iptc4xmpExt/2008-02-29/}"
SHA = "ab" * 32


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, body) of every chunk; asserts each CRC."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, at = [], 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at:at + 4])
        kind, body = data[at + 4:at + 8], data[at + 8:at + 8 + length]
        (crc,) = struct.unpack(">I", data[at + 8 + length:at + 12 + length])
        assert crc == zlib.crc32(kind + body), f"bad CRC on {kind!r}"
        chunks.append((kind, body))
        at += 12 + length
    assert chunks[-1][0] == b"IEND" and at == len(data)
    return chunks


def jpeg_segments(data: bytes) -> list[tuple[int, bytes]]:
    """(marker, body) of every segment before the entropy-coded data (SOS)."""
    assert data[:2] == b"\xff\xd8"
    segments, at = [], 2
    while True:
        marker = data[at + 1]
        (length,) = struct.unpack(">H", data[at + 2:at + 4])
        segments.append((marker, data[at + 4:at + 2 + length]))
        if marker == 0xDA:
            return segments
        at += 2 + length


def xmp_of(data: bytes) -> bytes:
    """The XMP packet, found the way the format specifies it."""
    if data.startswith(b"\x89PNG"):
        packets = [body for kind, body in png_chunks(data) if kind == b"iTXt" and body.startswith(b"XML:com.adobe.xmp\0")]
        assert len(packets) == 1
        keyword, rest = packets[0].split(b"\0", 1)
        assert rest[:2] == b"\0\0"  # uncompressed
        _language, _translated, text = rest[2:].split(b"\0", 2)
        return text
    packets = [body for marker, body in jpeg_segments(data) if marker == 0xE1
               and body.startswith(b"http://ns.adobe.com/xap/1.0/\0")]
    assert len(packets) == 1
    return packets[0][len(b"http://ns.adobe.com/xap/1.0/\0"):]


def source_type(packet: bytes) -> tuple[str, str]:
    """(DigitalSourceType, AISystemVersionUsed) of an XMP packet, read with an XML parser."""
    description = ET.fromstring(packet).find(".//{http://www.w3.org/1999/02/22-rdf-syntax-ns#}Description")
    return description.get(IPTC_EXT + "DigitalSourceType"), description.get(IPTC_EXT + "AISystemVersionUsed")


@pytest.fixture(scope="module")
def picture() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (48, 40, 3), dtype=np.uint8)


def test_png_mark_is_a_valid_chunk_before_the_pixels(picture):
    plain = imaging.encode(picture, "png")
    marked = mark_synthetic(plain, "png", SHA)
    kinds = [kind for kind, _ in png_chunks(marked)]
    assert kinds[:2] == [b"IHDR", b"iTXt"] and kinds.index(b"iTXt") < kinds.index(b"IDAT")
    assert source_type(xmp_of(marked)) == (DIGITAL_SOURCE_TYPE, f"bundle manifest sha256 {SHA}")
    decoded = cv2.cvtColor(cv2.imdecode(np.frombuffer(marked, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(decoded, picture)  # lossless, untouched pixels
    with Image.open(io.BytesIO(marked)) as image:
        image.load()  # Pillow checks every CRC it reads
        assert DIGITAL_SOURCE_TYPE in image.info["XML:com.adobe.xmp"]
        np.testing.assert_array_equal(np.asarray(image), picture)


def test_jpeg_mark_is_an_app1_segment_after_jfif(picture):
    plain = imaging.encode(picture, "jpeg", jpeg_quality=85)
    marked = mark_synthetic(plain, "jpeg", SHA)
    markers = [marker for marker, _ in jpeg_segments(marked)]
    assert markers[:2] == [0xE0, 0xE1]  # JFIF APP0 stays first
    assert source_type(xmp_of(marked)) == (DIGITAL_SOURCE_TYPE, f"bundle manifest sha256 {SHA}")
    before = cv2.imdecode(np.frombuffer(plain, np.uint8), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(cv2.imdecode(np.frombuffer(marked, np.uint8), cv2.IMREAD_COLOR), before)
    with Image.open(io.BytesIO(marked)) as image:
        assert DIGITAL_SOURCE_TYPE.encode() in image.info["xmp"]
    without_jfif = plain[:2] + plain[4 + struct.unpack(">H", plain[4:6])[0]:]
    assert [m for m, _ in jpeg_segments(mark_synthetic(without_jfif, "jpeg", SHA))][0] == 0xE1  # right after SOI


@pytest.mark.skipif(shutil.which("exiftool") is None, reason="exiftool is not installed (Debian: "
                    "libimage-exiftool-perl); the structure and Pillow checks above still run")
def test_exiftool_reads_the_mark_and_finds_nothing_wrong(picture, tmp_path):
    for encoding, suffix in (("png", ".png"), ("jpeg", ".jpg")):
        path = tmp_path / f"swap{suffix}"
        path.write_bytes(mark_synthetic(imaging.encode(picture, encoding), encoding, SHA))
        found = json.loads(subprocess.run(["exiftool", "-json", "-validate", "-warning", "-XMP-iptcExt:all", str(path)],
                                          capture_output=True, text=True, check=True).stdout)[0]
        assert found["Validate"] == "OK" and "Warning" not in found
        assert found["DigitalSourceType"] == DIGITAL_SOURCE_TYPE and found["AISystemUsed"] == "facetwin"
        assert found["AISystemVersionUsed"] == f"bundle manifest sha256 {SHA}"


def test_raw_pixels_are_left_alone_and_foreign_bytes_refused(picture):
    raw = imaging.encode(picture, "raw")
    assert mark_synthetic(raw, "raw", SHA) is raw
    with pytest.raises(ValueError, match="not a PNG"):
        mark_synthetic(b"GIF89a" + bytes(40), "png", SHA)
    with pytest.raises(ValueError, match="not a JPEG"):
        mark_synthetic(b"\x89PNG" + bytes(40), "jpeg", SHA)
