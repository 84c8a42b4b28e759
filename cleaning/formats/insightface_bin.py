"""insightface verification pair sets (`lfw.bin`, `cfp_fp.bin`, `agedb_30.bin`, ...).

A file is `pickle((bins, issame_list))`: `bins` holds 2 encoded images per pair (JPEG/PNG
bytes, aligned 112x112), `issame_list` one bool per pair. Pickle can execute code, so files
are read with an unpickler that admits only the containers, bytes and numpy arrays those
files use; anything else is refused with a clear error.
"""

from __future__ import annotations

import io
import pickle

import numpy as np


class UnsafePickleError(pickle.UnpicklingError):
    pass


class BinFormatError(ValueError):
    pass


# Globals real pair files need: numpy arrays (some bins hold uint8 arrays) and the codec
# helper Python 3 uses for Python 2 byte strings.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    # protocol 5 pickles arrays as _frombuffer(bytes, dtype, shape, order): data, no code
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),
    ("builtins", "bytearray"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"refusing to load {module}.{name}: a verification .bin holds only image bytes, numpy arrays "
            "and a list of bools; this file asks for code to run"
        )


def _as_bytes(item, index: int) -> bytes:
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if isinstance(item, np.ndarray) and item.dtype == np.uint8:
        return item.tobytes()
    raise BinFormatError(f"image {index} is {type(item).__name__}, expected encoded image bytes")


def loads_pairs(data: bytes, name: str = "<bytes>") -> tuple[list[bytes], list[bool]]:
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except UnsafePickleError as exc:
        raise UnsafePickleError(f"{name}: {exc}") from None
    except Exception as exc:  # truncated or not a pickle at all
        raise BinFormatError(f"{name}: not a readable pair file ({type(exc).__name__}: {exc})") from None
    if not (isinstance(obj, tuple) and len(obj) == 2):
        raise BinFormatError(f"{name}: expected a (bins, issame_list) tuple, got {type(obj).__name__}")
    bins, issame = obj
    issame = [bool(x) for x in (issame.tolist() if isinstance(issame, np.ndarray) else issame)]
    if len(bins) != 2 * len(issame):
        raise BinFormatError(f"{name}: {len(bins)} images for {len(issame)} pairs (need exactly 2 per pair)")
    return [_as_bytes(b, i) for i, b in enumerate(bins)], issame


def dumps_pairs(images: list[bytes], issame: list[bool]) -> bytes:
    if len(images) != 2 * len(issame):
        raise ValueError("need exactly 2 images per pair")
    return pickle.dumps((list(images), [bool(x) for x in issame]), protocol=4)
