""".npy / .npz reading without trusting the file (moesim.traces.npyfile): headers in every format version,
hostile headers refused before any allocation, damaged ZIP members named, and memory-mapping of stored members.

tests/test_hostile_inputs.py runs such files through the command line in a subprocess; these call the readers
directly and check the exact messages."""

from __future__ import annotations

import io
import re
import struct
import zipfile

import numpy as np
import pytest

from moesim import budget
from moesim.errors import InputError
from moesim.traces.npyfile import Header, npz_names, read_header, read_npy, read_npz


def npy_bytes(shape: tuple, descr: str = "<i2", data: bytes = b"", version: int = 1) -> bytes:
    """A ``.npy`` file as the format documents it: magic, version, header length, a dict literal padded to 64."""
    header = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode("latin1")
    header += b" " * (64 - (10 + len(header) + 1) % 64) + b"\n"
    size = struct.pack("<H", len(header)) if version == 1 else struct.pack("<I", len(header))
    return b"\x93NUMPY" + bytes([version, 0]) + size + header + data


def _src(path) -> str:
    return re.escape(str(path))


@pytest.mark.parametrize("version", [(1, 0), (2, 0), (3, 0)])
def test_every_format_version_reads_back(tmp_path, version):
    arr = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, version=version)
    (tmp_path / "a.npy").write_bytes(buf.getvalue())
    buf.seek(0)
    assert read_header(buf) == Header((2, 3, 4), np.dtype(np.int16), False, buf.tell())
    assert buf.tell() % 64 == 0  # the data starts aligned, right after the header
    got = read_npy(tmp_path / "a.npy", "a.npy")
    assert got.dtype == np.int16
    np.testing.assert_array_equal(got, arr)


def test_header_nbytes_is_shape_times_itemsize_in_python_ints():
    assert Header((3, 5), np.dtype("<f8"), False, 128).nbytes == 120
    assert Header((), np.dtype("<i2"), False, 128).nbytes == 2  # a 0-d array holds one item
    assert Header((2**40, 2**40), np.dtype("<i8"), False, 128).nbytes == 2**83  # no int64 overflow


@pytest.mark.parametrize(("raw", "expected"), [
    (npy_bytes((3,), version=4), r"unsupported \.npy format version \(4, 0\)"),
    (npy_bytes((3,), "|O", b"\x80\x04N."), r"holds Python objects \(a pickle\), not numbers"),
    (npy_bytes((2,), "|S0"), r"dtype \|S0 has items of zero bytes"),
    (npy_bytes((2,), "|V0"), r"dtype \|V0 has items of zero bytes"),
    (npy_bytes((-1, 2), data=b"\0" * 8), r"header has an invalid shape \(-1, 2\)"),
    (b"hello, world\n" * 10, r"the magic string is not correct"),
])
def test_hostile_headers_are_refused_in_one_line(tmp_path, raw, expected):
    path = tmp_path / "a.npy"
    path.write_bytes(raw)
    with pytest.raises(ValueError, match=expected):
        read_header(io.BytesIO(raw))
    with pytest.raises(InputError, match=rf"^{_src(path)}: not a readable \.npy file \(ValueError: .*{expected}"):
        read_npy(path, str(path))


def test_a_header_claiming_more_than_the_file_holds_is_truncation(tmp_path):
    path = tmp_path / "a.npy"
    path.write_bytes(npy_bytes((10**12, 4, 2), data=b"\0" * 100))
    with pytest.raises(InputError) as err:
        read_npy(path, "a.npy")
    assert str(err.value) == ("a.npy: the header claims shape (1000000000000, 4, 2) of int16 (1.6e+04 GB), but the "
                              "file holds 100 bytes of data: truncated or damaged")


def test_a_large_array_is_checked_against_the_memory_limit_before_reading(tmp_path, monkeypatch):
    """A sparse file of 400 MB, as large as its header claims: refused under a 0.2 GB limit, without a read."""
    path = tmp_path / "big.npy"
    head = npy_bytes((50_000_000,), "<i8")
    with open(path, "wb") as fh:
        fh.write(head)
        fh.truncate(len(head) + 400_000_000)
    monkeypatch.setenv(budget.MEMORY_ENV, "0.2")
    monkeypatch.setattr(np, "load", lambda *a, **k: pytest.fail("read the array before checking its size"))
    with pytest.raises(InputError) as err:
        read_npy(path, "big.npy")
    assert str(err.value) == ("big.npy: an array of shape (50000000,) (int64) needs about 0.4 GB of memory, over the "
                              "0.2 GB limit (MOESIM_MAX_MEMORY_GB; set MOESIM_MAX_MEMORY_GB to change it)")


def test_not_a_zip_file(tmp_path):
    path = tmp_path / "t.npz"
    path.write_text("experts,layer\n1,2\n")
    for read in (npz_names, read_npz):
        with pytest.raises(InputError) as err:
            read(path, "t.npz")
        assert str(err.value) == "t.npz: not a readable .npz file (BadZipFile: File is not a zip file)"


def test_npz_names_lists_the_arrays_only(tmp_path):
    path = tmp_path / "t.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("experts.npy", npy_bytes((2,), data=b"\0" * 4))
        zf.writestr("README.txt", "not an array")
        zf.writestr("weights.npy", npy_bytes((2,), "<f4", b"\0" * 8))
    assert npz_names(path, "t.npz") == ["experts", "weights"]
    got = read_npz(path, "t.npz", names=["weights"])
    assert list(got) == ["weights"] and got["weights"].dtype == np.float32


def test_a_damaged_member_header_names_the_member(tmp_path):
    path = tmp_path / "t.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("home.npy", npy_bytes((2,), data=b"\0" * 4))
        zf.writestr("experts.npy", b"\x93NUMPY\x01\x00\xff\xff{'descr': ")
    with pytest.raises(InputError, match=r"^t\.npz: experts: damaged member or \.npy header \(ValueError: "):
        read_npz(path, "t.npz")
    assert read_npz(path, "t.npz", names=["home"])["home"].tolist() == [0, 0]  # only the members asked for are read


def test_a_member_shorter_than_its_header_claims(tmp_path):
    path = tmp_path / "t.npz"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("experts.npy", npy_bytes((10**9, 2), data=b"\0" * 40))
    with pytest.raises(InputError) as err:
        read_npz(path, "t.npz")
    assert str(err.value) == ("t.npz: experts: the header claims shape (1000000000, 2) of int16 (4 GB), but the member "
                              "holds 40 bytes of data: truncated or damaged")


def test_damaged_compressed_data_after_a_good_header_names_the_member(tmp_path):
    path = tmp_path / "t.npz"
    np.savez_compressed(path, experts=np.random.default_rng(0).integers(0, 256, (4000, 4, 2)).astype(np.int16))
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("experts.npy")
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
    middle = info.header_offset + 30 + name_len + extra_len + info.compress_size // 2
    raw[middle:middle + 64] = bytes(b ^ 0xFF for b in raw[middle:middle + 64])
    path.write_bytes(bytes(raw))
    assert npz_names(path, "t.npz") == ["experts"]
    with pytest.raises(InputError, match=r"^t\.npz: experts: damaged member \((error|BadZipFile): "):
        read_npz(path, "t.npz")


def test_stored_members_are_memory_mapped_when_asked(tmp_path):
    path = tmp_path / "t.npz"
    experts = np.arange(48, dtype=np.int16).reshape(6, 4, 2)
    np.savez(path, experts=experts, empty=np.zeros((0, 4, 2), np.int16), scalar=np.array(7),
             fortran=np.asfortranarray(np.arange(6.0).reshape(2, 3)))
    got = read_npz(path, "t.npz", mmap=["experts", "empty", "scalar", "fortran"])
    assert isinstance(got["experts"], np.memmap) and not got["experts"].flags.writeable
    np.testing.assert_array_equal(got["experts"], experts)
    assert got["empty"].shape == (0, 4, 2) and got["empty"].dtype == np.int16  # nothing to map
    assert not isinstance(got["scalar"], np.memmap) and int(got["scalar"]) == 7  # 0-d: read
    assert not isinstance(got["fortran"], np.memmap) and got["fortran"].flags.f_contiguous  # Fortran order: read
    np.testing.assert_array_equal(got["fortran"], np.arange(6.0).reshape(2, 3))
    packed = tmp_path / "c.npz"
    np.savez_compressed(packed, experts=experts)
    assert not isinstance(read_npz(packed, "c.npz", mmap=["experts"])["experts"], np.memmap)  # compressed: read
