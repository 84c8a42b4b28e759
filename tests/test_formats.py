"""cleaning/formats: the insightface .bin reader against real and hostile pickles, and the RecordIO
writer read back by our reader record for record.

Hostile pickles are assembled here opcode by opcode and only ever given to `loads_pairs`: some
of them crash or exhaust a process that hands them to `pickle.loads`.
"""

import pickle
import random
import struct
import time
import tracemalloc

import numpy as np
import pytest

from cleaning.formats.insightface_bin import BinFormatError, UnsafePickleError, dumps_pairs, loads_pairs
from cleaning.formats.recordio import pack_record, write_rec, write_record
from cleaning.readers import IR_HEADER, REC_MAGIC, plan, read_partition, read_record, unpack_record

MAGIC = struct.pack("<I", REC_MAGIC)


# -- a tiny pickle assembler -----------------------------------------------------------------

def proto(n):
    return pickle.PROTO + bytes([n])


def uni(s: str) -> bytes:  # SHORT_BINUNICODE
    b = s.encode()
    return pickle.SHORT_BINUNICODE + bytes([len(b)]) + b


def sbytes(b: bytes) -> bytes:  # SHORT_BINBYTES (protocol 3+)
    return pickle.SHORT_BINBYTES + bytes([len(b)]) + b


def py2str(b: bytes) -> bytes:  # a Python 2 str: SHORT_BINSTRING, or BINSTRING from 256 bytes
    if len(b) < 256:
        return pickle.SHORT_BINSTRING + bytes([len(b)]) + b
    return pickle.BINSTRING + struct.pack("<i", len(b)) + b


def glob(module: str, name: str) -> bytes:  # GLOBAL (protocols 2-3, Python 2)
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def sglob(module: str, name: str) -> bytes:  # STACK_GLOBAL (protocol 4+)
    return uni(module) + uni(name) + pickle.STACK_GLOBAL


def int1(n):
    return pickle.BININT1 + bytes([n])


def int4(n):
    return pickle.BININT + struct.pack("<i", n)


def long1(n):
    b = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return pickle.LONG1 + bytes([len(b)]) + b


def pairs_of(bins_ops: list, issame_ops: bytes = pickle.NEWTRUE, n_issame: int = 1) -> bytes:
    """(bins, issame) around opcode snippets: each bins entry pushes one image."""
    return (pickle.EMPTY_LIST + pickle.MARK + b"".join(bins_ops) + pickle.APPENDS
            + pickle.EMPTY_LIST + pickle.MARK + issame_ops * n_issame + pickle.APPENDS + pickle.TUPLE2 + pickle.STOP)


def u1_dtype_p4(state=(int1(3), uni("|"), pickle.NONE * 3, int4(-1), int4(-1), int1(0)), code="u1") -> bytes:
    return (sglob("numpy", "dtype") + uni(code) + pickle.NEWFALSE + pickle.NEWTRUE + pickle.TUPLE3 + pickle.REDUCE
            + (pickle.MARK + b"".join(state) + pickle.TUPLE + pickle.BUILD if state is not None else b""))


def frombuffer_p5(data: bytes, dtype_ops: bytes, shape=None) -> bytes:
    shape = (len(data),) if shape is None else shape
    shape_ops = b"".join(long1(d) for d in shape) + (pickle.TUPLE1 if len(shape) == 1 else b"")
    return (sglob("numpy._core.numeric", "_frombuffer") + pickle.MARK + pickle.BYTEARRAY8
            + struct.pack("<Q", len(data)) + data + dtype_ops + shape_ops + uni("C") + pickle.TUPLE + pickle.REDUCE)


# -- round trips -----------------------------------------------------------------------------

def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    # small and large (BINBYTES / BINSTRING from 256 bytes), and one empty image
    return [rng.integers(0, 256, int(rng.integers(1, 600)), np.uint8).tobytes() for _ in range(n - 1)] + [b""]


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_round_trip_bytes(protocol):
    images = _images(12)
    issame = [True, False, True, True, False, False]
    data = pickle.dumps((images, issame), protocol=protocol)
    assert loads_pairs(data) == (images, issame)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_round_trip_numpy(protocol):
    images = _images(8, seed=1)
    arrays = list(images)
    arrays[0] = np.frombuffer(images[0], np.uint8)  # read-only: protocol 5 writes bytes
    arrays[1] = np.array(np.frombuffer(images[1], np.uint8))  # writable: protocol 5 writes a bytearray
    arrays[2] = np.frombuffer(images[2], np.uint8).reshape(-1, 1)  # cv2.imencode's (n, 1)
    arrays[3] = np.frombuffer(images[3] + images[3][:1], np.uint8)[::2]  # not contiguous: _reconstruct
    images[3] = (images[3] + images[3][:1])[::2]
    arrays[4] = bytearray(images[4])
    fortran = np.asfortranarray(np.arange(24, dtype=np.uint8).reshape(4, 6))
    arrays[5], images[5] = fortran, fortran.tobytes()
    issame = np.array([True, False, False, True])
    data = pickle.dumps((arrays, issame), protocol=protocol)
    assert loads_pairs(data) == (images, [True, False, False, True])
    # issame as a list of numpy bools, and the same dtype/array objects shared through the memo
    shared = np.frombuffer(images[0], np.uint8)
    data = pickle.dumps(([shared, shared, images[1], images[1]], [np.bool_(True), np.bool_(False)]),
                        protocol=protocol)
    assert loads_pairs(data) == ([images[0]] * 2 + [images[1]] * 2, [True, False])


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_round_trip_many_pairs(protocol):
    # > 1000 items: several MARK..APPENDS batches; > 256 memo entries: LONG_BINPUT
    images = [bytes([i % 251]) * (1 + i % 300) for i in range(2400)]
    issame = [i % 3 == 0 for i in range(1200)]
    assert loads_pairs(pickle.dumps((images, issame), protocol=protocol)) == (images, issame)
    assert loads_pairs(pickle.dumps((images, np.array(issame)), protocol=protocol)) == (images, issame)


def test_dumps_pairs_round_trip():
    images, issame = _images(6), [True, False, True]
    assert loads_pairs(dumps_pairs(images, issame)) == (images, issame)


def test_python2_pickle():
    """What Python 2's cPickle.dump(..., protocol=2) writes: str as SHORT_BINSTRING/BINSTRING, numpy
    (1.x) globals by GLOBAL lines, dtype('u1', 0, 1) with ints, str dtype codes and byte order."""
    images = _images(6, seed=3) + [bytes(range(256)) * 3]
    arr = b"\x89PNG\r\n\x1a\n fake"
    py2_array = (glob("numpy.core.multiarray", "_reconstruct") + pickle.BINPUT + b"\x01"
                 + glob("numpy", "ndarray") + pickle.BINPUT + b"\x02" + int1(0) + pickle.TUPLE1 + py2str(b"b")
                 + pickle.TUPLE3 + pickle.REDUCE + pickle.BINPUT + b"\x03"
                 + pickle.MARK + int1(1) + int1(len(arr)) + pickle.TUPLE1
                 + glob("numpy", "dtype") + pickle.BINPUT + b"\x04" + py2str(b"u1") + int1(0) + int1(1)
                 + pickle.TUPLE3 + pickle.REDUCE + pickle.BINPUT + b"\x05"
                 + pickle.MARK + int1(3) + py2str(b"|") + pickle.NONE * 3 + int4(-1) + int4(-1) + int1(0)
                 + pickle.TUPLE + pickle.BUILD + pickle.NEWFALSE + py2str(arr) + pickle.TUPLE + pickle.BUILD)
    bins = [py2str(b) + pickle.BINPUT + bytes([10 + i]) for i, b in enumerate(images)] + [py2_array]
    data = (proto(2) + pickle.EMPTY_LIST + pickle.BINPUT + b"\x00" + pickle.MARK + b"".join(bins) + pickle.APPENDS
            + pickle.EMPTY_LIST + pickle.BINPUT + b"\x30" + pickle.MARK
            + (pickle.NEWTRUE + pickle.NEWFALSE) * 2 + pickle.APPENDS + pickle.TUPLE2 + pickle.BINPUT + b"\x31"
            + pickle.STOP)
    expected = (images + [arr], [True, False, True, False])
    assert loads_pairs(data) == expected
    # Our hand assembly is what insightface's own loader reads.
    raw_bins, raw_issame = pickle.loads(data, encoding="bytes")
    assert [bytes(b) for b in raw_bins] == expected[0] and raw_issame == expected[1]


def test_python3_protocol2_bytes_and_numpy1_names():
    """Python 3 writes bytes at protocol 2 as _codecs.encode(str, 'latin1') and b'' as bytes();
    numpy 1.x names its functions numpy.core.*, numpy 2 numpy._core.*: both are read."""
    images = [b"\x00\xff\x80abc", b"", bytes(range(256)), b"x"]
    arrays = [np.frombuffer(b, np.uint8) for b in images[:2]] + images[2:]
    data = pickle.dumps((arrays, [np.bool_(True), False]), protocol=2)
    assert b"_codecs\nencode" in data and b"numpy._core.multiarray" in data
    assert loads_pairs(data) == (images, [True, False])
    old = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert old != data and loads_pairs(old) == (images, [True, False])
    p5 = pickle.dumps(([np.array([1, 2], np.uint8), b"y"], [True]), protocol=5)
    old5 = p5.replace(uni("numpy._core.numeric"), uni("numpy.core.numeric"))
    assert b"numpy.core.numeric" in old5
    # FRAME lengths no longer match after the edit: drop the frame (framing is optional)
    frame_at = old5.index(pickle.FRAME)
    old5 = old5[:frame_at] + old5[frame_at + 9:]
    assert loads_pairs(old5) == ([b"\x01\x02", b"y"], [True])


# -- hostile and broken files --------------------------------------------------------------------

def test_code_execution_is_refused():
    class Boom:
        def __reduce__(self):
            import os

            return (os.system, ("echo pwned",))

    for protocol in (2, 3, 4, 5):
        with pytest.raises(UnsafePickleError, match=r"^evil\.bin: refusing to load .*system"):
            loads_pairs(pickle.dumps(([Boom(), b"x"], [True]), protocol=protocol), name="evil.bin")
    for data in (proto(2) + glob("builtins", "eval") + uni("1") + pickle.TUPLE1 + pickle.REDUCE + pickle.STOP,
                 proto(4) + sglob("builtins", "getattr") + pickle.STOP,
                 proto(2) + glob("numpy", "load") + pickle.STOP,
                 proto(2) + glob("numpy.core.multiarray", "_reconstruct\x00") + pickle.STOP):
        with pytest.raises(UnsafePickleError, match="refusing to load"):
            loads_pairs(data)
    # object-building opcodes, whatever their arguments
    for data in (proto(2) + pickle.MARK + pickle.INST + b"os\nsystem\n" + pickle.STOP,
                 proto(2) + pickle.EXT1 + b"\x01" + pickle.STOP,
                 proto(2) + uni("x") + pickle.BINPERSID + pickle.STOP,
                 proto(2) + glob("numpy", "ndarray") + pickle.EMPTY_TUPLE + pickle.NEWOBJ + pickle.STOP):
        with pytest.raises(UnsafePickleError, match="refusing opcode"):
            loads_pairs(data)
    # an admitted name called as something it is not
    for data in (proto(2) + glob("numpy", "ndarray") + int1(5) + pickle.TUPLE1 + pickle.REDUCE + pickle.STOP,
                 proto(2) + glob("_codecs", "encode") + uni("x") + uni("rot13") + pickle.TUPLE2 + pickle.REDUCE
                 + pickle.STOP,
                 proto(2) + uni("x") + pickle.EMPTY_TUPLE + pickle.REDUCE + pickle.STOP):
        with pytest.raises(UnsafePickleError):
            loads_pairs(data)


def test_dtype_state_object_array_trick_is_refused():
    """numpy.dtype('u1') given a state that makes it an object dtype (elsize 8, object flags), then
    _frombuffer over 8 bytes of the file: an object array of a pointer the file chose."""
    pointer = struct.pack("<Q", 0x4141414141414141)
    evil_state = (int1(3), uni("|"), pickle.NONE * 3, int1(8), int1(8), int1(63))
    attacks = {
        "state on a new dtype": frombuffer_p5(pointer, u1_dtype_p4(evil_state), shape=(1,)),
        "object dtype code": frombuffer_p5(pointer, u1_dtype_p4(None, code="O"), shape=(1,)),
        "object dtype code, py2 str": frombuffer_p5(pointer, sglob("numpy", "dtype") + py2str(b"O8")
                                                    + int1(0) + int1(1) + pickle.TUPLE3 + pickle.REDUCE, (1,)),
        "second state on a used dtype": (
            u1_dtype_p4() + pickle.MEMOIZE + frombuffer_p5(pointer, pickle.BINGET + b"\x00")
            + pickle.BINGET + b"\x00" + pickle.MARK + b"".join(evil_state) + pickle.TUPLE + pickle.BUILD
            + frombuffer_p5(pointer, pickle.BINGET + b"\x00", shape=(1,))),
        "second state on an array": (
            frombuffer_p5(b"ab", u1_dtype_p4()) + pickle.MARK + int1(1) + int1(2) + pickle.TUPLE1
            + u1_dtype_p4() + pickle.NEWFALSE + sbytes(b"cd") + pickle.TUPLE + pickle.BUILD),
        "array state holding objects": (
            sglob("numpy.core.multiarray", "_reconstruct") + sglob("numpy", "ndarray") + int1(0) + pickle.TUPLE1
            + sbytes(b"b") + pickle.TUPLE3 + pickle.REDUCE + pickle.MARK + int1(1) + int1(1) + pickle.TUPLE1
            + u1_dtype_p4() + pickle.NEWFALSE + pickle.EMPTY_LIST + pickle.TUPLE + pickle.BUILD),
    }
    for what, image in attacks.items():
        data = proto(5) + pairs_of([image, sbytes(b"x")])
        with pytest.raises(UnsafePickleError, match=r"^f\.bin: ") as err:
            loads_pairs(data, name="f.bin")
        assert "\n" not in str(err.value), what
    # dtypes that are no objects but not uint8/bool: a format error
    for code in ("f4", "<i8", "V8", "U1"):
        data = proto(5) + pairs_of([frombuffer_p5(b"abcdefgh", u1_dtype_p4(None, code=code), (1,)), sbytes(b"x")])
        with pytest.raises(BinFormatError, match="uint8 and bool"):
            loads_pairs(data)


HUGE = 4 << 30  # 4 GiB


def _huge_claims():
    """Each a few dozen bytes claiming gigabytes: (bytes, expected error)."""
    return {
        "BINBYTES8": (proto(4) + pickle.BINBYTES8 + struct.pack("<Q", HUGE) + b"x" * 8 + pickle.STOP, BinFormatError),
        "BYTEARRAY8": (proto(5) + pickle.BYTEARRAY8 + struct.pack("<Q", HUGE) + b"x" * 8 + pickle.STOP, BinFormatError),
        "BINUNICODE8": (proto(4) + pickle.BINUNICODE8 + struct.pack("<Q", HUGE) + pickle.STOP, BinFormatError),
        "BINBYTES": (proto(3) + pickle.BINBYTES + struct.pack("<I", 0xFFFFFFFF) + pickle.STOP, BinFormatError),
        "BINSTRING": (proto(2) + pickle.BINSTRING + struct.pack("<i", 0x7FFFFFFF) + pickle.STOP, BinFormatError),
        "BINUNICODE": (proto(2) + pickle.BINUNICODE + struct.pack("<I", 0xFFFFFFFF) + pickle.STOP, BinFormatError),
        "FRAME": (proto(4) + pickle.FRAME + struct.pack("<Q", HUGE) + pickle.NONE + pickle.STOP, BinFormatError),
        "bytearray(n)": (proto(4) + sglob("builtins", "bytearray") + long1(HUGE) + pickle.TUPLE1 + pickle.REDUCE
                         + pickle.STOP, UnsafePickleError),
        "bytes(n)": (proto(2) + glob("__builtin__", "bytes") + long1(HUGE) + pickle.TUPLE1 + pickle.REDUCE
                     + pickle.STOP, UnsafePickleError),
        "_reconstruct shape": (proto(2) + glob("numpy.core.multiarray", "_reconstruct") + glob("numpy", "ndarray")
                               + long1(HUGE) + pickle.TUPLE1 + py2str(b"b") + pickle.TUPLE3 + pickle.REDUCE
                               + pickle.STOP, UnsafePickleError),
        "array state shape": (proto(5) + pairs_of([frombuffer_p5(b"abc", u1_dtype_p4(), shape=(HUGE,)), sbytes(b"")]),
                              BinFormatError),
        "memo index": (proto(2) + pickle.NONE + pickle.LONG_BINPUT + b"\xff\xff\xff\xff" + pickle.LONG_BINGET
                       + b"\xfe\xff\xff\xff" + pickle.STOP, BinFormatError),
    }


@pytest.mark.parametrize("what", list(_huge_claims()))
def test_huge_claims_fail_fast_without_allocating(what):
    data, error = _huge_claims()[what]
    assert len(data) < 100 or what == "array state shape"
    tracemalloc.start()
    try:
        start = time.perf_counter()
        with pytest.raises(error):
            loads_pairs(data, name="small.bin")
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 << 20, f"{what}: peak {peak} bytes"
    assert elapsed < 1.0


def test_truncated_files_are_format_errors():
    for protocol in (2, 5):
        data = pickle.dumps(([b"ab" * 200, np.array([1, 2, 3], np.uint8)], np.array([True])), protocol=protocol)
        assert loads_pairs(data)[1] == [True]
        for cut in range(len(data)):
            with pytest.raises(BinFormatError):
                loads_pairs(data[:cut], name="cut.bin")
    with pytest.raises(BinFormatError, match="^lfw.bin: .*truncated"):
        loads_pairs(b"", name="lfw.bin")


@pytest.mark.parametrize("obj, match", [
    ({"bins": [b"a", b"b"], "issame": [True]}, "EMPTY_DICT"),
    (([b"a", b"b"],), "tuple of 1"),
    (([b"a", b"b"], [True], None), "tuple of 3"),
    ([[b"a", b"b"], [True]], "list"),
    ((["a", "b"], [True]), "list holding"),
    (([b"a", 1.5], [True]), "BINFLOAT"),
    (([b"a", b"b"], ["yes"]), "list holding"),
    (([b"a", b"b"], [2]), "issame_list"),
    (([b"a", b"b", b"c"], [True]), "2 per pair"),
    (([[b"a"], b"b"], [True]), "list holding"),
    ((b"ab", [True]), "bins is"),
    (([b"a", b"b"], (True,)), "issame_list is"),
    (([b"a", b"b"], np.array([1], np.uint8)), "1-d bool"),
    (([b"a", b"b", b"c", b"d"], np.array([[True], [False]])), "1-d bool"),
    (([np.array([True, False]), b"b"], [True]), "uint8 array"),
    (([np.array([1.0], np.float32), b"b"], [True]), "uint8 and bool"),
])
def test_wrong_structure_is_a_format_error(obj, match):
    for protocol in (2, 4, 5):
        with pytest.raises(BinFormatError, match=match):
            loads_pairs(pickle.dumps(obj, protocol=protocol))


def test_other_malformed_files():
    good = pickle.dumps(([b"a", b"b"], [True]), protocol=4)
    cases = {
        "protocol 0": pickle.dumps(([b"a", b"b"], [True]), protocol=0),
        "protocol 1": pickle.dumps(([b"a", b"b"], [True]), protocol=1),
        "not a pickle": b"not a pickle",
        "trailing bytes": good + b"\x00",
        "two objects": proto(4) + pickle.NONE + pickle.NONE + pickle.STOP,
        "open MARK": proto(4) + pickle.MARK + pickle.NONE + pickle.STOP,
        "underflow": proto(4) + pickle.TUPLE2 + pickle.STOP,
        "below a MARK": proto(4) + pickle.NONE + pickle.MARK + pickle.TUPLE1 + pickle.STOP,
        "missing memo": proto(4) + pickle.BINGET + b"\x07" + pickle.STOP,
        "unknown opcode": proto(4) + b"\xff" + pickle.STOP,
        "second PROTO": proto(4) + proto(4) + pickle.NONE + pickle.STOP,
        "protocol 9": proto(9) + pickle.NONE + pickle.STOP,
        "out-of-band buffer": pickle.dumps(([np.zeros(4, np.uint8), b"b"], [True]), protocol=5,
                                           buffer_callback=lambda b: False),
        "GLOBAL without newline": proto(2) + pickle.GLOBAL + b"numpy" + b"x" * 1000,
        "bad utf-8": proto(4) + pickle.SHORT_BINUNICODE + b"\x02\xff\xfe" + pickle.STOP,
        "APPEND onto bytes": proto(4) + sbytes(b"a") + pickle.NONE + pickle.APPEND + pickle.STOP,
        "a set": pickle.dumps(([{b"a"}, b"b"], [True]), protocol=4),
    }
    for what, data in cases.items():
        with pytest.raises(BinFormatError) as err:
            loads_pairs(data, name="x.bin")
        msg = str(err.value)
        assert msg.startswith("x.bin: ") and "\n" not in msg, (what, msg)


def test_dtype_without_state_is_plain():
    data = proto(5) + pairs_of([frombuffer_p5(b"a", u1_dtype_p4(None)), sbytes(b"b")])
    assert loads_pairs(data) == ([b"a", b"b"], [True])


def test_deep_nesting_is_refused():
    cases = [
        proto(2) + pickle.MARK * 100_000 + pickle.STOP,
        proto(2) + pickle.NONE + pickle.TUPLE1 * 100_000 + pickle.STOP,
        proto(2) + pickle.EMPTY_LIST * 3 + pickle.APPEND * 2 + pickle.STOP,
        proto(2) + pickle.EMPTY_LIST * 100_000 + pickle.APPEND * 99_999 + pickle.STOP,
        proto(2) + pickle.EMPTY_TUPLE + (pickle.MARK + pickle.EMPTY_LIST + pickle.LIST) * 1000 + pickle.STOP,
        pickle.dumps(([b"a", b"b"], [True], ((((((((1,),),),),),),),)), protocol=4),
    ]
    nested: list = [b"a"]
    for _ in range(100):
        nested = [nested]
    cases.append(pickle.dumps((nested, [True])))
    for data in cases:
        start = time.perf_counter()
        with pytest.raises(BinFormatError, match="nest|list holding"):
            loads_pairs(data)
        # A bound against super-linear parsing (quadratic over 100,000 opcodes takes minutes), not
        # a speed figure: the slowest case takes 0.11 s alone and took 1.02 s once mid-suite.
        assert time.perf_counter() - start < 10.0


def test_mutated_files_raise_only_our_errors():
    rng = random.Random(7)
    seeds = [pickle.dumps(([b"abc" * 30, np.arange(5, dtype=np.uint8), b""], np.array([True, False])[:1]),
                          protocol=p) for p in (2, 3, 4, 5)]
    for _ in range(3000):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            k = rng.randrange(len(data))
            choice = rng.random()
            if choice < 0.6:
                data[k] = rng.randrange(256)
            elif choice < 0.8:
                del data[k]
            else:
                data[k:k] = bytes([rng.randrange(256)])
        try:
            images, issame = loads_pairs(bytes(data))
        except (BinFormatError, UnsafePickleError) as exc:
            assert "\n" not in str(exc)
        else:
            assert all(isinstance(b, bytes) for b in images) and all(isinstance(x, bool) for x in issame)


# -- RecordIO ------------------------------------------------------------------------------------

def _read_idx(path):
    out = {}
    for line in path.read_text().splitlines():
        k, off = line.split("\t")
        out[int(k)] = int(off)
    return out


def _dataset():
    rng = np.random.default_rng(5)
    sizes = [3, 1, 4]  # images per class
    items = []
    for cls, n in enumerate(sizes):
        for _ in range(n):
            items.append((cls, rng.integers(0, 256, int(rng.integers(50, 300)), np.uint8).tobytes()))
    # the magic word 4-byte aligned inside a payload (twice: a record of three parts) ...
    label, body = items[2]
    items[2] = (label, body[:16] + MAGIC + body[16:40] + MAGIC + body[40:])
    # ... and unaligned in another (no split there), and a payload that is only the magic word
    label, body = items[4]
    items[4] = (label, body[:5] + MAGIC + body[5:])
    items[5] = (items[5][0], MAGIC)
    return items, sizes


def test_write_rec_insightface_layout_reads_back(tmp_path):
    items, sizes = _dataset()
    folder = tmp_path / "ds"
    folder.mkdir()
    assert write_rec(str(folder), iter(items)) == len(items)
    assert sorted(p.name for p in folder.iterdir()) == ["property", "train.idx", "train.rec"]
    assert (folder / "property").read_text().strip() == f"{len(sizes)},112,112"
    n, c = len(items), len(sizes)
    offsets = _read_idx(folder / "train.idx")
    assert sorted(offsets) == list(range(n + 1 + c))
    assert list(offsets.values()) == sorted(offsets.values())  # written in index order

    with open(folder / "train.rec", "rb") as fh:
        # record 0: the header arcface_torch reads (flag > 0: images are 1 .. label[0] - 1)
        flag, labels, ident, payload = unpack_record(read_record(fh, offsets[0]))
        assert flag == 2 and labels.tolist() == [n + 1, n + 1 + c] and ident == 0 and payload == b""
        # images, as MXFaceDataset reads them
        for i in range(1, int(labels[0])):
            flag, lab, ident, payload = unpack_record(read_record(fh, offsets[i]))
            assert (flag, lab.tolist(), ident, payload) == (0, [items[i - 1][0]], i, items[i - 1][1])
        # one identity record per class: [first image, end image)
        first = 1
        for k, size in enumerate(sizes):
            flag, lab, ident, payload = unpack_record(read_record(fh, offsets[n + 1 + k]))
            assert (flag, lab.tolist(), ident, payload) == (2, [first, first + size], n + 1 + k, b"")
            first += size
        # the aligned magic split record 3 (item 2) into three parts, as dmlc-core writes it
        fh.seek(offsets[3])
        magic, lrec = struct.unpack("<II", fh.read(8))
        assert magic == REC_MAGIC and lrec >> 29 == 1 and lrec & ((1 << 29) - 1) == IR_HEADER.size + 16
        fh.seek(offsets[5])  # item 4: unaligned magic, one part
        assert struct.unpack("<II", fh.read(8))[1] >> 29 == 0

    # and our reader's planner/partitions, record for record
    samples = [s for p in plan("insightface-rec", str(folder), 3) for s in read_partition(p)]
    assert [(s.identity, s.data, s.reject) for s in samples] == [(str(lab), b, None) for lab, b in items]
    assert all(s.aligned for s in samples)


def test_write_rec_framing_matches_dmlc(tmp_path):
    """Byte-level framing: parts split at aligned magic words, padding only after the last part."""
    import io

    record = b"abcd" + MAGIC + b"ef" + b"\0\0" + MAGIC + b"xyz"
    fh = io.BytesIO()
    assert write_record(fh, record) == 0
    expected = (MAGIC + struct.pack("<I", (1 << 29) | 4) + b"abcd"
                + MAGIC + struct.pack("<I", (2 << 29) | 4) + b"ef\0\0"
                + MAGIC + struct.pack("<I", (3 << 29) | 3) + b"xyz\0")
    assert fh.getvalue() == expected
    assert read_record(io.BytesIO(expected), 0) == record
    fh = io.BytesIO()
    write_record(fh, b"abcde")
    assert fh.getvalue() == MAGIC + struct.pack("<I", 5) + b"abcde\0\0\0"


def test_write_rec_array_labels_and_trailing_slash(tmp_path):
    items = [([0, 1], b"a" * 10), ([0, 1], b"b" * 11), ([1, 0], b"c" * 12)]  # face2rec2's [label, aligned]
    dest = str(tmp_path / "new") + "/"
    assert write_rec(dest, items) == 3
    offsets = _read_idx(tmp_path / "new" / "train.idx")
    with open(tmp_path / "new" / "train.rec", "rb") as fh:
        assert unpack_record(read_record(fh, offsets[0]))[1].tolist() == [4, 6]
        flag, labels, _, payload = unpack_record(read_record(fh, offsets[3]))
        assert flag == 2 and labels.tolist() == [1, 0] and payload == b"c" * 12
        assert unpack_record(read_record(fh, offsets[5]))[1].tolist() == [3, 4]
    samples = [s for p in plan("insightface-rec", str(tmp_path / "new"), 10) for s in read_partition(p)]
    assert [s.identity for s in samples] == ["0", "0", "1"]


def test_write_rec_empty_dataset(tmp_path):
    assert write_rec(str(tmp_path), []) == 0
    offsets = _read_idx(tmp_path / "train.idx")
    with open(tmp_path / "train.rec", "rb") as fh:
        assert unpack_record(read_record(fh, offsets[0]))[1].tolist() == [1, 1]
    assert (tmp_path / "property").read_text().strip() == "0,112,112"


@pytest.mark.parametrize("labels", [[1, 1], [0, 2], [0, 1, 0], [0, 0, 1, 1, 0], [0, 0.5], [-1], [True]])
def test_write_rec_rejects_unordered_labels(tmp_path, labels):
    with pytest.raises(ValueError, match="label"):
        write_rec(str(tmp_path), [(lab, b"x") for lab in labels])
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind


def test_write_rec_prefix_keeps_the_plain_layout(tmp_path):
    """A prefix (existing callers: tests/test_readers.py, benchmarks/bench_data_path.py) writes
    image records only, 0 .. N-1, any labels; our reader takes record 0 (flag 0) as an image."""
    items = [(i * 10, bytes([i]) * (5 + i)) for i in range(4)]
    assert write_rec(str(tmp_path / "train"), items) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.idx", "train.rec"]
    offsets = _read_idx(tmp_path / "train.idx")
    assert sorted(offsets) == [0, 1, 2, 3]
    samples = [s for p in plan("insightface-rec", str(tmp_path), 10) for s in read_partition(p)]
    assert [(s.identity, s.data) for s in samples] == [(str(lab), b) for lab, b in items]
    # header=True on a prefix: the insightface layout under PREFIX.rec/.idx (no property file)
    assert write_rec(str(tmp_path / "h"), [(0, b"a"), (1, b"b")], header=True) == 2
    assert sorted(_read_idx(tmp_path / "h.idx")) == [0, 1, 2, 3, 4]


def test_pack_record_matches_mxnet_pack():
    assert pack_record(3, b"jpg", 7) == struct.pack("<IfQQ", 0, 3.0, 7, 0) + b"jpg"
    assert pack_record(np.int64(3), b"") == struct.pack("<IfQQ", 0, 3.0, 0, 0)
    assert pack_record([1, 2.5], b"x") == struct.pack("<IfQQ", 2, 0.0, 0, 0) + struct.pack("<2f", 1, 2.5) + b"x"
    with pytest.raises(ValueError):
        pack_record([], b"x")
