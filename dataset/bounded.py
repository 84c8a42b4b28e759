"""Bounded reads: the project's one set of rules for every image and tensor file it reads,
whatever the entry point (stage 1's Decode step, `arcface evaluate` on `.bin` / Parquet /
IJB sets, `--init-backbone`, checkpoints loaded for export, serving or evaluation).

* A file is read only when it is a regular file (not a FIFO, which would hang, nor a device
  such as /dev/zero, which never ends) of at most a byte cap, checked on its size before
  any byte is read (on S3: the object's size from its listing).
* A file named by a list (an IJB meta file's image names) must lie inside its folder: a
  relative name with no `..` component and no absolute path, whose resolved path (symlinks
  followed) is still inside the folder.
* An image is decoded only when its header names one of ACCEPTED_FORMATS and a size within
  a pixel cap: the header is read without decoding a pixel, so a PNG of a few hundred KB
  that would decode to gigabytes costs nothing.
* A `.pth` file is loaded only when it is a torch.save zip (within a byte cap) whose members,
  as its central directory declares them, add up to no more than the file holds (torch.save
  stores them uncompressed); PyTorch's reader allocates what a member declares, so a deflate
  bomb is refused before any of it is inflated.

What breaks a rule raises `RefusedInput` (a ValueError) with one line naming the file and
the rule; stage 1 turns the same findings into counted rejects instead (`image_problem`).
"""

from __future__ import annotations

import io
import os
import stat
import zipfile

import numpy as np
import pyarrow.fs as pafs

from dataset import storage

# The image formats a face dataset is made of. OpenCV decodes more (Radiance HDR, PFM, PAM,
# OpenEXR, JPEG 2000, ...), and some of those it decodes at full size before any cap can be
# checked: everything else is refused on its header, before OpenCV sees it. (PIL calls some
# camera JPEGs MPO.)
ACCEPTED_FORMATS = ("JPEG", "MPO", "PNG", "BMP", "WEBP", "TIFF", "PPM")

# Caps where no setting gives one. 40 MP is clean.max_pixels' default (a 40 MP RGB image
# decodes to 120 MB); the byte caps are far above any real face photo, pair set or backbone.
MAX_PIXELS = 40_000_000
MAX_IMAGE_BYTES = 64 << 20
MAX_EVAL_SET_BYTES = 2 << 30
MAX_TORCH_FILE_BYTES = 4 << 30  # a backbone given by the user (ViT-L is 1.2 GB)
MAX_CHECKPOINT_FILE_BYTES = 16 << 30  # a training checkpoint's files (optimizer state, classifier shards)


class RefusedInput(ValueError):
    """An input file that breaks one of the rules above; the message is one line."""


# -- files ----------------------------------------------------------------------------------

def read_bounded(uri: str, max_bytes: int, what: str = "file") -> bytes:
    """The bytes of a regular file (local or s3://) of at most `max_bytes`, refused on its
    kind and size before it is read."""
    if storage.is_s3(uri):
        fs, path = storage.resolve(uri)
        info = fs.get_file_info(path)
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(f"{uri}: no such {what}")
        size = info.size
    else:
        path = storage.resolve(uri)[1]
        try:
            st = os.stat(path)  # follows links: what would be read
        except FileNotFoundError:
            raise FileNotFoundError(f"{uri}: no such {what}") from None
        if not stat.S_ISREG(st.st_mode):
            raise RefusedInput(f"{uri}: not a regular file (a folder, FIFO, socket or device); "
                               f"a {what} must be a regular file")
        size = st.st_size
    if size > max_bytes:
        raise RefusedInput(f"{uri}: {size} bytes, over the {max_bytes}-byte cap for a {what}")
    if storage.is_s3(uri):
        data = storage.read_bytes(uri)
    else:
        with open(path, "rb") as fh:
            data = fh.read(size + 1)  # what was checked, and one byte to notice a file that grew since
    if len(data) > size:
        raise RefusedInput(f"{uri}: changed while read (more than the {size} bytes its size said)")
    return data


def name_problem(name: str) -> str | None:
    """Why a file name from a list may not be joined to its folder; None when it may."""
    if not name or "\x00" in name:
        return "an empty name or one with a NUL byte"
    if name.startswith(("/", "\\")) or os.path.isabs(name) or (len(name) > 1 and name[1] == ":"):
        return "an absolute path; names are relative to their folder"
    if ".." in name.replace("\\", "/").split("/"):
        return "a '..' component; names must stay inside their folder"
    return None


def path_inside(folder: str, name: str) -> str:
    """`folder`/`name`, refused unless it lies inside `folder` (local: its resolved path,
    symlinks followed, is still inside the resolved folder)."""
    problem = name_problem(name)
    if problem:
        raise RefusedInput(f"{storage.join(folder, name)}: {problem}")
    uri = storage.join(folder, name)
    if not storage.is_s3(folder):  # object stores have no links
        base = os.path.realpath(folder)
        if os.path.commonpath([base, os.path.realpath(uri)]) != base:
            raise RefusedInput(f"{uri}: a link to {os.path.realpath(uri)}, outside {folder}")
    return uri


def read_inside(folder: str, name: str, max_bytes: int = MAX_IMAGE_BYTES, what: str = "image") -> bytes:
    """A file named by a list, read only when it lies inside `folder` and is a regular file
    within the byte cap."""
    return read_bounded(path_inside(folder, name), max_bytes, what)


# -- images ---------------------------------------------------------------------------------

def sniff_image(data: bytes) -> tuple[str, tuple[int, int]] | None:
    """(format, (width, height)) from the header alone - no pixel decoding, so a
    decompression bomb costs nothing here; None when no known image format is recognised."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():  # our own cap decides (PIL warns above 89 MP)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                return im.format or "", im.size
    except Image.DecompressionBombError:  # PIL refuses it on size alone: over any cap we set
        return "bomb", (1 << 31, 1)
    except Exception:
        return None


def image_problem(data: bytes, max_pixels: int, source: str) -> tuple[str, str] | None:
    """(reason, detail) for encoded bytes that must not be decoded, from the header alone;
    None when they may be. The reasons are stage 1's reject reasons."""
    if not data:
        return "empty_file", f"{source}: 0 bytes"
    sniffed = sniff_image(data)
    if sniffed is None:
        return "undecodable", (f"{source}: not a decodable image (accepted formats: "
                               f"{', '.join(ACCEPTED_FORMATS)}, recognised by their header)")
    kind, size = sniffed
    if kind == "bomb":  # PIL stopped reading the header on the size alone
        from PIL import Image

        return "too_many_pixels", (f"{source}: over {2 * Image.MAX_IMAGE_PIXELS} pixels by its header, beyond "
                                   f"the {max_pixels}-pixel cap")
    if size[0] * size[1] > max_pixels:
        return "too_many_pixels", f"{source}: {size[0]}x{size[1]} exceeds the {max_pixels}-pixel cap"
    if kind not in ACCEPTED_FORMATS:
        return "unsupported_format", f"{source}: a {kind} image; accepted formats: {', '.join(ACCEPTED_FORMATS)}"
    if data[:2] == b"\xff\xd8" and b"\xff\xd9" not in data[-4096:]:
        return "truncated", f"{source}: JPEG without its end marker"
    return None


def decode_bgr(data: bytes) -> np.ndarray | None:
    """OpenCV's decoding to 8-bit, 3-channel BGR (grey, RGBA, 16-bit and CMYK included);
    None when it fails. Only for bytes `image_problem` has passed."""
    import cv2

    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return None if img is None or img.size == 0 else img


def decode_image(data: bytes, source: str, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Encoded bytes -> (H, W, 3) uint8 RGB, refused (RefusedInput, one line) unless the header
    passes `image_problem` and OpenCV decodes it."""
    import cv2

    problem = image_problem(data, max_pixels, source)
    if problem:
        raise RefusedInput(problem[1])
    img = decode_bgr(data)
    if img is None:
        raise RefusedInput(f"{source}: not a decodable image")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


# -- tensor files -----------------------------------------------------------------------------

def torch_zip_problem(data: bytes) -> str | None:
    """Why bytes must not go to torch.load; None when they may. torch.save writes a zip archive
    whose members are stored uncompressed, so together they declare no more bytes than the file
    holds; PyTorch's reader allocates what a member declares. A member that declares more (a
    deflate bomb) is refused from the central directory, before any of it is inflated."""
    if not data:
        return "0 bytes, not a torch.save file"
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        return (f"not a torch.save zip archive ({exc}); files of PyTorch before 1.6 must be "
                "re-saved with a current torch.save")
    declared = sum(m.file_size for m in members)
    if declared > len(data):
        return (f"its {len(members)} zip members declare {declared} bytes uncompressed in a file of {len(data)} "
                "bytes (torch.save stores members uncompressed: a compressed member is refused unread)")
    return None


def read_torch_file(uri: str, max_bytes: int = MAX_TORCH_FILE_BYTES) -> bytes:
    """A `.pth`/`.pt` file's bytes, for torch.load(weights_only=True): a regular file within the
    byte cap whose zip members declare no more than the file holds."""
    data = read_bounded(uri, max_bytes, "tensor file")
    problem = torch_zip_problem(data)
    if problem:
        raise RefusedInput(f"{uri}: {problem}")
    return data


def torch_loads(data: bytes, uri: str, map_location="cpu"):
    """torch.load of bytes `read_torch_file` returned: tensors and plain containers only
    (weights_only=True, never code); what torch cannot read is refused in one line."""
    import pickle

    import torch

    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RefusedInput(f"{uri}: not a loadable torch.save file of tensors "
                           f"(torch.load, weights_only=True: {first})") from None


def load_torch_file(uri: str, map_location="cpu", max_bytes: int = MAX_TORCH_FILE_BYTES):
    """`read_torch_file` then `torch_loads`."""
    return torch_loads(read_torch_file(uri, max_bytes), uri, map_location)
