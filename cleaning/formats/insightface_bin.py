"""insightface verification pair sets (`lfw.bin`, `cfp_fp.bin`, `agedb_30.bin`, ...).

A file is `pickle.dump((bins, issame_list))`: `bins` holds 2 encoded images per pair (JPEG/PNG
bytes, aligned 112x112; some files hold them as numpy uint8 arrays), `issame_list` one bool per
pair (a list, or a numpy bool array).

Pickle's own machinery never sees these bytes. Even a restricted `pickle.Unpickler` lets a file
call the callables it admits with arguments of the file's choosing: `bytearray(4e9)` or
numpy's `_reconstruct` with a huge shape allocate gigabytes from a few dozen bytes, and a numpy
dtype given a crafted state turns `_frombuffer` into an object array over the file's bytes
(pointers the process dereferences). So `loads_pairs` walks the opcode stream
(`pickletools.genops`) and builds the objects itself, with a small stack machine that knows only
what Python 2 and 3 `pickle.dump` (protocols 2 to 5) and numpy's array pickling write for this
structure:

* containers: MARK, tuples (TUPLE, TUPLE1-3, EMPTY_TUPLE), lists (EMPTY_LIST, APPEND(S), LIST),
  the memo (BINPUT, LONG_BINPUT, MEMOIZE, BINGET, LONG_BINGET), PROTO, FRAME, STOP;
* scalars: NONE, NEWTRUE/NEWFALSE, BININT/BININT1/BININT2/LONG1, bytes (SHORT_BINBYTES, BINBYTES,
  BINBYTES8, BYTEARRAY8), Python 2 strings (SHORT_BINSTRING, BINSTRING: read as bytes, as
  insightface's `pickle.load(f, encoding='bytes')` does) and unicode strings;
* GLOBAL/STACK_GLOBAL for exactly these names, each interpreted here, never imported or called:
  `_codecs.encode(str, 'latin1')` and `bytes()` (Python 3 bytes at protocol 2), `bytearray()` /
  `bytearray(bytes)` / `bytearray(str, 'latin-1')`, numpy's `_reconstruct(ndarray, (0,), b'b')` +
  BUILD `(1, shape, dtype, fortran, data)`, `dtype('u1' | 'b1', False, True)` + BUILD of the one
  state numpy writes for those, `_frombuffer(data, dtype, shape, order)` (protocol 5) and
  `scalar(dtype, data)` (a numpy bool in the list).

Every length in the file is checked against the bytes that remain before anything is read, an
array's shape must account for exactly the bytes it carries, and nothing is allocated from a
count the file merely claims.

Errors are one line naming the file:
* `UnsafePickleError`: the file asks for something a pair file never needs: a global outside the
  list, an object-building opcode (INST, OBJ, NEWOBJ, EXT*, PERSID), an admitted callable called
  with arguments numpy/pickle never write (`bytearray(n)`, `_reconstruct` with a real shape), a
  dtype other than plain uint8/bool (object dtypes above all), or a state update that would
  change a dtype or an array once made.
* `BinFormatError`: anything else that is not a well-formed pair file: not a pickle, a protocol
  other than 2-5, truncated data, a length past the end of the file, an opcode such files do not
  use, containers nested deeper than the format has, arrays whose shape does not match their
  data, or the wrong structure (not a `(list of images, list of bools)` with 2 images per pair).
"""

from __future__ import annotations

import io
import pickle
import pickletools
import struct

import numpy as np


class UnsafePickleError(pickle.UnpicklingError):
    pass


class BinFormatError(ValueError):
    pass


# -- what the reader admits ------------------------------------------------------------------

class _Callable:
    """A global the file may name: a tag interpreted by `_Reader._reduce`, never a Python callable."""

    __slots__ = ("tag",)

    def __init__(self, tag: str):
        self.tag = tag

    def __repr__(self):
        return f"<{self.tag}>"


_ENCODE, _BYTES, _BYTEARRAY = _Callable("_codecs.encode"), _Callable("bytes"), _Callable("bytearray")
_RECONSTRUCT, _NDARRAY, _DTYPE = _Callable("_reconstruct"), _Callable("ndarray"), _Callable("dtype")
_FROMBUFFER, _SCALAR = _Callable("_frombuffer"), _Callable("scalar")

_GLOBALS = {
    ("_codecs", "encode"): _ENCODE,  # Python 3 bytes at protocol 2: _codecs.encode(latin-1 str, 'latin1')
    ("__builtin__", "bytes"): _BYTES,  # ... and b'' as bytes()
    ("builtins", "bytes"): _BYTES,
    ("__builtin__", "bytearray"): _BYTEARRAY,
    ("builtins", "bytearray"): _BYTEARRAY,
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _DTYPE,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy.core.multiarray", "scalar"): _SCALAR,
    ("numpy._core.multiarray", "scalar"): _SCALAR,
}

_DTYPE_CODES = {"u1": "uint8", "b1": "bool"}
# The one state numpy writes for a 1-byte builtin dtype: version 3, no byte order, no
# subarray/names/fields, elsize and alignment -1 (taken from the type), no flags.
_DTYPE_STATE = (3, "|", None, None, None, -1, -1, 0)

_MAX_MARKS = 4  # bins list > array state > dtype state: 3 deep at most in real files
_MAX_DEPTH = 3  # (bins, issame) / (1, shape, dtype, ...) / (ndarray, (0,), b'b'): tuples of depth 2
_MAX_NDIM = 32
_MAX_GLOBAL_LINE = 256

# Length-prefixed opcodes: width and format of the length, checked before genops reads the data.
_LENGTHS = {
    "SHORT_BINBYTES": "<B", "BINBYTES": "<I", "BINBYTES8": "<Q", "BYTEARRAY8": "<Q",
    "SHORT_BINSTRING": "<B", "BINSTRING": "<i", "SHORT_BINUNICODE": "<B", "BINUNICODE": "<I",
    "BINUNICODE8": "<Q", "LONG1": "<B", "FRAME": "<Q",
}
# Opcodes that build objects from classes or outside state: refused as unsafe, not as malformed.
_CODE_OPCODES = {"INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "EXT1", "EXT2", "EXT4", "PERSID", "BINPERSID"}
_ALLOWED = {
    "PROTO", "FRAME", "STOP", "MARK",
    "EMPTY_LIST", "APPEND", "APPENDS", "LIST", "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3",
    "NONE", "NEWTRUE", "NEWFALSE", "BININT", "BININT1", "BININT2", "LONG1",
    "SHORT_BINBYTES", "BINBYTES", "BINBYTES8", "BYTEARRAY8", "SHORT_BINSTRING", "BINSTRING",
    "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8",
    "GLOBAL", "STACK_GLOBAL", "REDUCE", "BUILD",
    "BINPUT", "LONG_BINPUT", "MEMOIZE", "BINGET", "LONG_BINGET",
}
_CODE2OP = {op.code.encode("latin-1")[0]: op for op in pickletools.opcodes}


class _Tuple(tuple):
    """A tuple that knows how deeply it nests (lists count 1; they may hold only leaves)."""

    depth: int


class _Dtype:
    __slots__ = ("code", "built", "used")

    def __init__(self, code: str):
        self.code, self.built, self.used = code, False, False


class _Array:
    """A numpy array as data: kind ('u1'/'b1'), shape and its bytes in C order. Never a numpy object
    until the reader itself makes one from the checked bytes."""

    __slots__ = ("code", "shape", "data")

    def __init__(self):
        self.code, self.shape, self.data = None, None, None


def _describe(x) -> str:
    if isinstance(x, (bytes, str)):
        return f"{type(x).__name__} of length {len(x)}"
    if isinstance(x, (bool, int, type(None))):
        return repr(x) if not isinstance(x, int) or abs(x) < 1 << 64 else "a huge int"
    if isinstance(x, tuple):
        return f"tuple of {len(x)}"
    if isinstance(x, list):
        return f"list of {len(x)}"
    if isinstance(x, _Array):
        return "numpy array" if x.data is not None else "numpy array without data"
    if isinstance(x, _Dtype):
        return f"dtype {x.code}"
    return repr(x)


def _short(x) -> str:
    """A bounded repr for messages, whatever the file put there."""
    if isinstance(x, (bytes, str)):
        return repr(x[:40]) + ("..." if len(x) > 40 else "")
    return _describe(x)


def _text(x) -> str | None:
    """str, or Python 2 str (read as bytes) holding ASCII."""
    if isinstance(x, str):
        return x
    if isinstance(x, bytes) and len(x) < 64:
        try:
            return x.decode("ascii")
        except UnicodeDecodeError:
            return None
    return None


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class _Reader:
    def __init__(self, data: bytes):
        self.data = data
        self.stack: list = []
        self.marks: list[int] = []
        self.memo: dict[int, object] = {}

    # -- stack ------------------------------------------------------------------------------

    def _floor(self) -> int:
        return self.marks[-1] if self.marks else 0

    def pop(self):
        if len(self.stack) <= self._floor():
            raise BinFormatError("stack underflow: an opcode needs a value the pickle never pushed")
        return self.stack.pop()

    def top(self):
        if len(self.stack) <= self._floor():
            raise BinFormatError("stack underflow: an opcode needs a value the pickle never pushed")
        return self.stack[-1]

    def pop_mark(self) -> list:
        if not self.marks:
            raise BinFormatError("a container opcode without its MARK")
        k = self.marks.pop()
        items = self.stack[k:]
        del self.stack[k:]
        return items

    def make_tuple(self, items) -> _Tuple:
        depth = 0
        for x in items:
            if isinstance(x, _Tuple):
                depth = max(depth, x.depth)
            elif isinstance(x, list):
                depth = max(depth, 1)
        t = _Tuple(items)
        t.depth = depth + 1
        if t.depth > _MAX_DEPTH:
            raise BinFormatError(f"tuples nested {t.depth} deep: pair files nest at most {_MAX_DEPTH} deep")
        return t

    @staticmethod
    def extend(target, items):
        if not isinstance(target, list):
            raise BinFormatError(f"APPEND(S) onto a {_describe(target)}, not a list")
        for x in items:
            if not isinstance(x, (bytes, int, _Array)):  # images, bools; never containers
                raise BinFormatError(f"a list holding a {_describe(x)}: pair files' lists hold only images or bools")
        target.extend(items)

    # -- the opcode loop --------------------------------------------------------------------

    def check_next(self, pos: int) -> str:
        """Name of the opcode at `pos`, refused before genops reads any of its argument."""
        data = self.data
        if pos >= len(data):
            raise BinFormatError(f"truncated at byte {pos}: the pickle ends before its STOP opcode")
        op = _CODE2OP.get(data[pos])
        if op is None:
            raise BinFormatError(f"byte {pos}: 0x{data[pos]:02x} is not a pickle opcode")
        name = op.name
        if name in _CODE_OPCODES:
            raise UnsafePickleError(f"refusing opcode {name} at byte {pos}: it builds objects from classes, "
                                    "which a verification .bin never needs")
        if name not in _ALLOWED:
            raise BinFormatError(f"byte {pos}: opcode {name} is not used by insightface pair files")
        if name in _LENGTHS:
            fmt = _LENGTHS[name]
            width = struct.calcsize(fmt)
            if pos + 1 + width > len(data):
                raise BinFormatError(f"truncated at byte {pos}: {name} without its length")
            (n,) = struct.unpack_from(fmt, data, pos + 1)
            left = len(data) - (pos + 1 + width)
            if n < 0 or n > left:
                raise BinFormatError(f"byte {pos}: {name} claims {n} bytes but only {left} remain in the file")
        elif name == "GLOBAL":
            end = data.find(b"\n", pos + 1, pos + 1 + _MAX_GLOBAL_LINE)
            if end < 0 or data.find(b"\n", end + 1, end + 1 + _MAX_GLOBAL_LINE) < 0:
                raise BinFormatError(f"byte {pos}: GLOBAL without a short 'module\\nname\\n' argument")
        return name

    def run(self):
        bio = io.BytesIO(self.data)
        ops = pickletools.genops(bio)
        first = True
        while True:
            pos = bio.tell()
            name = self.check_next(pos)
            if first and name != "PROTO":
                raise BinFormatError("not a protocol 2-5 pickle (no PROTO opcode at its start)")
            try:
                op, arg, _ = next(ops)
            except (ValueError, UnicodeDecodeError, struct.error) as exc:
                raise BinFormatError(f"byte {pos}: unreadable {name} ({exc})") from None
            assert op.name == name
            if name == "PROTO":
                if not first:
                    raise BinFormatError(f"byte {pos}: a second PROTO opcode")
                if not 2 <= arg <= 5:
                    raise BinFormatError(f"pickle protocol {arg}: insightface pair files are protocol 2 to 5")
            first = False
            if name == "STOP":
                if self.marks or len(self.stack) != 1:
                    raise BinFormatError(f"the pickle stops with {len(self.stack)} values and "
                                         f"{len(self.marks)} open MARKs, not one object")
                end = bio.tell()
                if end != len(self.data):
                    raise BinFormatError(f"{len(self.data) - end} bytes after the end of the pickle")
                return self.stack[0]
            self.step(name, arg, pos)

    def step(self, name: str, arg, pos: int):
        st = self.stack
        if name in ("PROTO", "FRAME"):
            return  # checked in run(); framing only groups opcodes, its length checked against the file
        if name == "MARK":
            if len(self.marks) >= _MAX_MARKS:
                raise BinFormatError(f"MARKs nested {len(self.marks) + 1} deep at byte {pos}: "
                                     f"pair files nest at most {_MAX_MARKS - 1}")
            self.marks.append(len(st))
        elif name in ("NONE", "NEWTRUE", "NEWFALSE"):
            st.append({"NONE": None, "NEWTRUE": True, "NEWFALSE": False}[name])
        elif name in ("BININT", "BININT1", "BININT2", "LONG1", "SHORT_BINUNICODE", "BINUNICODE",
                      "BINUNICODE8", "SHORT_BINBYTES", "BINBYTES", "BINBYTES8"):
            st.append(arg)
        elif name == "BYTEARRAY8":
            st.append(bytes(arg))
        elif name in ("SHORT_BINSTRING", "BINSTRING"):
            st.append(arg.encode("latin-1"))  # a Python 2 str: bytes, as encoding='bytes' reads it
        elif name == "EMPTY_LIST":
            st.append([])
        elif name == "EMPTY_TUPLE":
            st.append(self.make_tuple(()))
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            n = int(name[-1])
            items = [self.pop() for _ in range(n)][::-1]
            st.append(self.make_tuple(items))
        elif name == "TUPLE":
            st.append(self.make_tuple(self.pop_mark()))
        elif name == "LIST":
            items = self.pop_mark()
            out: list = []
            self.extend(out, items)
            st.append(out)
        elif name == "APPEND":
            x = self.pop()
            self.extend(self.top(), [x])
        elif name == "APPENDS":
            items = self.pop_mark()
            self.extend(self.top(), items)
        elif name in ("BINPUT", "LONG_BINPUT"):
            self.memo[arg] = self.top()
        elif name == "MEMOIZE":
            self.memo[len(self.memo)] = self.top()
        elif name in ("BINGET", "LONG_BINGET"):
            if arg not in self.memo:
                raise BinFormatError(f"byte {pos}: {name} {arg} of a memo entry never stored")
            st.append(self.memo[arg])
        elif name == "GLOBAL":
            module, _, qual = arg.partition(" ")
            st.append(self._global(module, qual))
        elif name == "STACK_GLOBAL":
            qual, module = self.pop(), self.pop()
            if not (isinstance(module, str) and isinstance(qual, str)):
                raise BinFormatError(f"byte {pos}: STACK_GLOBAL of a {_describe(module)} and a {_describe(qual)}")
            st.append(self._global(module, qual))
        elif name == "REDUCE":
            args = self.pop()
            func = self.pop()
            if not isinstance(func, _Callable):
                raise UnsafePickleError(f"byte {pos}: REDUCE calls a {_describe(func)}")
            if not isinstance(args, tuple):
                raise BinFormatError(f"byte {pos}: REDUCE with a {_describe(args)} for arguments")
            st.append(self._reduce(func, args))
        elif name == "BUILD":
            state = self.pop()
            self._build(self.top(), state)
        else:  # pragma: no cover - _ALLOWED and this dispatch are kept in step
            raise BinFormatError(f"byte {pos}: opcode {name} is not used by insightface pair files")

    # -- globals, calls, states -------------------------------------------------------------

    @staticmethod
    def _global(module: str, name: str) -> _Callable:
        found = _GLOBALS.get((module, name))
        if found is None:
            shown = f"{module}.{name}"
            shown = shown if len(shown) <= 100 else shown[:100] + "..."
            raise UnsafePickleError(
                f"refusing to load {shown}: a verification .bin holds only image bytes, numpy arrays "
                "and a list of bools; this file asks for code to run")
        return found

    def _reduce(self, func: _Callable, args: tuple):
        if func is _ENCODE:
            if len(args) == 2 and isinstance(args[0], str) and args[1] in ("latin1", "latin-1"):
                try:
                    return args[0].encode("latin-1")
                except UnicodeEncodeError:
                    raise BinFormatError("_codecs.encode of a string that is not latin-1") from None
            raise UnsafePickleError(f"_codecs.encode{self._args(args)}: only (str, 'latin1'), as pickle writes bytes")
        if func is _BYTES:
            if args == ():
                return b""
            raise UnsafePickleError(f"bytes{self._args(args)}: only bytes() as pickle writes b''")
        if func is _BYTEARRAY:
            if args == ():
                return b""
            if len(args) == 1 and isinstance(args[0], bytes):
                return args[0]
            if len(args) == 2 and isinstance(args[0], str) and args[1] in ("latin-1", "latin1"):
                try:
                    return args[0].encode("latin-1")
                except UnicodeEncodeError:
                    raise BinFormatError("bytearray of a string that is not latin-1") from None
            raise UnsafePickleError(f"bytearray{self._args(args)}: only bytearray() or bytearray(bytes), "
                                    "as pickle writes a bytearray")
        if func is _RECONSTRUCT:
            if (len(args) == 3 and args[0] is _NDARRAY and args[1] == (0,) and _is_int(args[1][0])
                    and args[2] in (b"b", "b")):
                return _Array()  # empty until its BUILD state brings shape, dtype and data
            raise UnsafePickleError(f"_reconstruct{self._args(args)}: only (ndarray, (0,), b'b'), as numpy writes")
        if func is _DTYPE:
            if len(args) != 3:
                raise UnsafePickleError(f"dtype{self._args(args)}: not the (code, False, True) numpy writes")
            code = _text(args[0])
            if code is None or "O" in code.upper():
                raise UnsafePickleError(f"dtype {_short(args[0])}: only uint8 and bool arrays, never objects")
            if code not in _DTYPE_CODES:
                raise BinFormatError(f"dtype {code!r}: pair files hold only uint8 and bool arrays")
            if args[1] not in (False, 0) or args[2] not in (True, 1) or not all(
                    isinstance(a, int) for a in args[1:]):
                raise UnsafePickleError(f"dtype{self._args(args)}: not the (code, False, True) numpy writes")
            return _Dtype(code)
        if func is _FROMBUFFER:
            if len(args) != 4:
                raise UnsafePickleError(f"_frombuffer{self._args(args)}: not (data, dtype, shape, order)")
            buf, dtype, shape, order = args
            if not isinstance(buf, bytes):
                raise BinFormatError(f"_frombuffer of a {_describe(buf)}, not bytes")
            if _text(order) not in ("C", "F"):
                raise BinFormatError(f"_frombuffer with order {_short(order)}")
            arr = _Array()
            self._fill(arr, self._use(dtype), shape, _text(order) == "F", buf)
            return arr
        if func is _SCALAR:
            if len(args) != 2 or not isinstance(args[1], bytes):
                raise UnsafePickleError(f"scalar{self._args(args)}: not (dtype, bytes) as numpy writes")
            code = self._use(args[0])
            if len(args[1]) != 1:
                raise BinFormatError(f"a numpy {_DTYPE_CODES[code]} scalar of {len(args[1])} bytes")
            value = args[1][0]
            if code == "b1":
                if value > 1:
                    raise BinFormatError(f"a numpy bool scalar holding {value}")
                return bool(value)
            return value
        raise UnsafePickleError(f"REDUCE calls {func!r} directly")  # ndarray itself

    @staticmethod
    def _args(args: tuple) -> str:
        return "(" + ", ".join(_describe(a) for a in args[:5]) + (", ..." if len(args) > 5 else "") + ")"

    @staticmethod
    def _state(state) -> str:
        if isinstance(state, tuple):
            return "(" + ", ".join(_short(x) for x in state[:8]) + (", ..." if len(state) > 8 else "") + ")"
        return _describe(state)

    @staticmethod
    def _use(dtype) -> str:
        if not isinstance(dtype, _Dtype):
            raise BinFormatError(f"a {_describe(dtype)} where numpy writes a dtype")
        dtype.used = True
        return dtype.code

    @staticmethod
    def _fill(arr: _Array, code: str, shape, fortran: bool, raw: bytes):
        if not (isinstance(shape, tuple) and len(shape) <= _MAX_NDIM and all(_is_int(d) and d >= 0 for d in shape)):
            raise BinFormatError(f"array shape {_describe(shape)}: not a tuple of at most {_MAX_NDIM} sizes")
        size = 1
        for d in shape:
            size *= d
            if size > len(raw):
                break
        if size != len(raw):
            raise BinFormatError(f"a numpy array of shape {shape!r:.60} carrying {len(raw)} bytes "
                                 f"(1 byte per element: its shape must account for all of them)")
        if fortran and len(shape) > 1:
            # the checked bytes, as the uint8 array they are, in C order (what tobytes() gives)
            raw = np.frombuffer(raw, np.uint8).reshape(shape, order="F").tobytes(order="C")
        arr.code, arr.shape, arr.data = code, shape, raw

    def _build(self, target, state):
        if isinstance(target, _Dtype):
            if target.built or target.used:
                raise UnsafePickleError("a second state for a dtype already made or used: "
                                        "numpy writes a dtype's state once, when it makes it")
            norm = tuple(_text(x) if isinstance(x, bytes) else x for x in state) if isinstance(state, tuple) else None
            if norm != _DTYPE_STATE or not all(type(a) is type(b) for a, b in zip(norm, _DTYPE_STATE)):
                raise UnsafePickleError(f"dtype state {self._state(state)}: only the plain "
                                        f"{_DTYPE_CODES[target.code]} state numpy writes, {_DTYPE_STATE!r}")
            target.built = True
            return
        if isinstance(target, _Array):
            if target.data is not None:
                raise UnsafePickleError("a second state for a numpy array already made")
            if not isinstance(state, tuple) or len(state) not in (4, 5):
                raise BinFormatError(f"numpy array state {_describe(state)}: "
                                     "not (version, shape, dtype, fortran, data)")
            if len(state) == 5:
                if state[0] != 1 or not _is_int(state[0]):
                    raise BinFormatError(f"numpy array state version {_short(state[0])}")
                state = state[1:]
            shape, dtype, fortran, raw = state
            if fortran not in (False, True, 0, 1) or not isinstance(fortran, int):
                raise BinFormatError(f"numpy array state with fortran flag {_describe(fortran)}")
            if not isinstance(raw, bytes):
                raise UnsafePickleError(f"numpy array state with {_describe(raw)} for data: "
                                        "only raw bytes (object arrays carry lists)")
            self._fill(target, self._use(dtype), shape, bool(fortran), raw)
            return
        raise UnsafePickleError(f"BUILD sets the state of a {_describe(target)}: only numpy dtypes and arrays get one")


def _as_bytes(item, index: int) -> bytes:
    if isinstance(item, bytes):
        return item
    if isinstance(item, _Array) and item.code == "u1":
        return item.data
    raise BinFormatError(f"image {index} is a {_describe(item)}, expected encoded image bytes or a uint8 array")


def _as_bools(issame) -> list[bool]:
    if isinstance(issame, _Array):
        if issame.data is None:
            raise BinFormatError("issame_list is a numpy array that never got its state")
        if issame.code != "b1" or len(issame.shape) != 1:
            raise BinFormatError(f"issame_list is a numpy {_DTYPE_CODES[issame.code]} array of shape "
                                 f"{issame.shape!r:.40}, expected a 1-d bool array")
        if issame.data.translate(None, b"\x00\x01"):
            raise BinFormatError("issame_list holds bytes other than 0 and 1")
        return [b == 1 for b in issame.data]
    if not isinstance(issame, list):
        raise BinFormatError(f"issame_list is a {_describe(issame)}, expected a list of bools")
    out = []
    for i, x in enumerate(issame):
        if not (isinstance(x, int) and x in (0, 1)):
            raise BinFormatError(f"issame_list[{i}] is {_describe(x)}, expected a bool")
        out.append(bool(x))
    return out


def loads_pairs(data: bytes, name: str = "<bytes>") -> tuple[list[bytes], list[bool]]:
    """(images, issame) from a pair file's bytes; `name` (the file) starts every error message."""
    if not isinstance(data, bytes):
        data = bytes(data)
    try:
        obj = _Reader(data).run()
        if not (isinstance(obj, tuple) and len(obj) == 2):
            raise BinFormatError(f"expected a (bins, issame_list) tuple, got a {_describe(obj)}")
        bins, issame = obj
        if not isinstance(bins, list):
            raise BinFormatError(f"bins is a {_describe(bins)}, expected a list of images")
        issame = _as_bools(issame)
        if len(bins) != 2 * len(issame):
            raise BinFormatError(f"{len(bins)} images for {len(issame)} pairs (need exactly 2 per pair)")
        return [_as_bytes(b, i) for i, b in enumerate(bins)], issame
    except UnsafePickleError as exc:
        raise UnsafePickleError(_one_line(f"{name}: {exc}")) from None
    except BinFormatError as exc:
        raise BinFormatError(_one_line(f"{name}: not a readable pair file: {exc}")) from None


def _one_line(message: str) -> str:
    """Names from the file may hold newlines or control characters: escape them."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)


def dumps_pairs(images: list[bytes], issame: list[bool]) -> bytes:
    if len(images) != 2 * len(issame):
        raise ValueError("need exactly 2 images per pair")
    return pickle.dumps((list(images), [bool(x) for x in issame]), protocol=4)
