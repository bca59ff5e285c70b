"""``hotpatch.self`` (issue 4): a Python process patches a library it loaded with ctypes while 4 native threads
call the function in tight loops: applied and reverted 200 times, every result old or new; a raw data change
through the same Transaction API; a change no single store can make is refused, and nothing changes. Each
scenario runs in a Python subprocess, so the test process itself is never patched."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TARGETS, compile_program, run_cli

SCRIPT = r"""
import ctypes, os, sys
import hotpatch.self as hs
from hotpatch.errors import SiteError
from hotpatch.transaction import SiteChange

lib = ctypes.CDLL(sys.argv[1])
lib.compute.restype = lib.negate.restype = lib.twice.restype = lib.bad_count.restype = ctypes.c_long
lib.compute.argtypes = lib.twice.argtypes = [ctypes.c_long]
lib.start_spinners(4)
me = hs.attach()
out = [lib.compute(5)]
for _ in range(200):
    rep = me.apply(sys.argv[2])
    out.append(lib.compute(5))
    me.revert(rep.name)
    out.append(lib.compute(5))
print("values", sorted(set(out)), len(out))

# the Transaction API on data: point `op` at negate with one aligned word store, and back
op = ctypes.c_void_p.in_dll(lib, "op")
addr = ctypes.addressof(op)
old, new = op.value.to_bytes(8, "little"), ctypes.cast(lib.negate, ctypes.c_void_p).value.to_bytes(8, "little")
call = ctypes.CFUNCTYPE(ctypes.c_long, ctypes.c_long)
t = hs.Transaction()
t.add(SiteChange(addr, old, new, "op", word=True))
t.commit()
print("op", call(ctypes.c_void_p.in_dll(lib, "op").value)(7))
t = hs.Transaction()
t.add(SiteChange(addr, new, old, "op", word=True))
t.commit()
print("op", call(ctypes.c_void_p.in_dll(lib, "op").value)(7))

# twice() starts with several short instructions: refused, nothing written
before = ctypes.string_at(ctypes.cast(lib.twice, ctypes.c_void_p).value, 16)
try:
    me.apply(sys.argv[3])
    print("twice applied")
except SiteError as e:
    print("refused", str(e).splitlines()[0][:200])
print("unchanged", ctypes.string_at(ctypes.cast(lib.twice, ctypes.c_void_p).value, 16) == before, lib.twice(3))
print("status", [p.name for p in me.status().patches])
print("bad", lib.bad_count())
sys.stdout.flush()
os._exit(0)
"""


@pytest.mark.parametrize("flags", [("-fpatchable-function-entry=16,14",), ()], ids=["cflags", "plain"])
def test_in_process(tmp_path: Path, flags: tuple[str, ...]) -> None:
    """With `hotpatch cflags` compute() is a short-jump site (one 2-byte store); without, its first
    instruction is the whole 5 bytes the jump takes (one 8-byte store of its aligned chunk)."""
    lib = compile_program(TARGETS / "inproc_lib.c", tmp_path / "libinproc.so", *flags, shared=True)
    patch, twice = tmp_path / "compute.hp", tmp_path / "twice.hp"
    assert run_cli("build", TARGETS / "inproc_patch.c", "--target", lib, "-o", patch).returncode == 0
    assert run_cli("build", TARGETS / "inproc_twice_patch.c", "--target", lib, "-o", twice).returncode == 0
    res = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(lib), str(patch), str(twice)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    lines = dict(line.split(" ", 1) for line in res.stdout.splitlines())
    assert lines["values"] == "[11, 520] 401", res.stdout
    assert res.stdout.count("op ") == 2 and "op -7\nop 15\n" in res.stdout, res.stdout
    if flags:  # a short-jump site there too: twice is patched like compute
        assert lines["twice"] == "applied", res.stdout
    else:
        assert lines["refused"].startswith("twice: the jump overwrites several instructions"), res.stdout
        assert lines["unchanged"].startswith("True"), res.stdout
        assert lines["status"] == "[]", res.stdout
    assert lines["bad"] == "0", res.stdout
