"""Hostile files built on the spot, for the fail-closed tests and benchmarks/fail_closed_cases.py
(issue 31): decompression bombs that cost a few MB to write and GBs to decode if a reader
trusted them. Nothing here is read by a job."""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
import zlib


def png_bytes(width: int, height: int, rows_body: bytes | None = None) -> bytes:
    """A greyscale PNG; `rows_body` None: all-zero rows, deflated in pieces (a bomb: 42000 x
    42000 is ~1.7 MB on disk, 5.3 GB decoded as colour)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    if rows_body is None:
        packer, row, body, done = zlib.compressobj(9), b"\0" * (width + 1), [], 0  # filter byte + pixels
        per_piece = max(1, (1 << 24) // len(row))
        while done < height:
            n = min(per_piece, height - done)
            body.append(packer.compress(row * n))
            done += n
        body.append(packer.flush())
        rows_body = b"".join(body)
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows_body) + chunk(b"IEND", b"")


def header_only_png(side: int) -> bytes:
    """A PNG whose header claims side x side pixels over a few bytes of data (what made cv2
    raise on its own size check: the '100k-pixel header')."""
    return png_bytes(side, side, zlib.compress(b"\0" * 64))


def pth_bomb(declared: int) -> bytes:
    """A zip in torch.save's layout whose one tensor member is deflated: `declared` bytes of
    zeros in a file a thousandth of that size."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({}))
        with archive.open("archive/data/0", "w", force_zip64=True) as member:
            zeros = b"\0" * (1 << 24)
            for _ in range(declared // len(zeros)):
                member.write(zeros)
    return buf.getvalue()
