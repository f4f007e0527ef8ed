"""Test helper shared by the PNG-info tests: EXIF bytes written the way A1111 writes a JPEG/WebP's
infotext (built here from the documented format, no piexif)."""

from __future__ import annotations


def a1111_exif(comment: bytes) -> bytes:
    """EXIF bytes as A1111's ``save_image_with_geninfo`` has piexif write them for a JPEG/WebP (modules/images.py):
    an ``Exif\\0\\0`` header, a big-endian TIFF structure whose IFD0 holds only the Exif IFD pointer (tag 0x8769,
    LONG) and a zero next-IFD offset, and an Exif IFD holding only UserComment (tag 0x9286, UNDEFINED, its bytes
    right after the entry: piexif writes no next-IFD offset after a sub-IFD; checked once against piexif 1.1.3's
    ``dump``, byte for byte)."""

    def entry(tag: int, kind: int, count: int, value: int) -> bytes:
        return tag.to_bytes(2, "big") + kind.to_bytes(2, "big") + count.to_bytes(4, "big") + value.to_bytes(4, "big")

    exif_ifd_at = 8 + 2 + 12 + 4  # TIFF header; IFD0: entry count, one entry, next-IFD offset
    data_at = exif_ifd_at + 2 + 12  # the Exif IFD: entry count, one entry
    ifd0 = (1).to_bytes(2, "big") + entry(0x8769, 4, 1, exif_ifd_at) + bytes(4)
    exif_ifd = (1).to_bytes(2, "big") + entry(0x9286, 7, len(comment), data_at)
    return b"Exif\0\0" + b"MM\0\x2a" + (8).to_bytes(4, "big") + ifd0 + exif_ifd + comment
