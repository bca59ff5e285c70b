"""Fuzzing (issue 6, hypothesis): the patch-file reader, the manifest, the ELF reader and the CLI's arguments,
fed mutated and random input, either work or fail with hotpatch's one-line errors (HotpatchError; exit 1 or
2 and one ``hotpatch: error:`` line for the CLI), never another exception or a traceback; a mutated patch that
cannot be applied writes nothing into the running target."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hotpatch
from conftest import TARGETS, Procs, assert_running, compile_program, run_cli, wait_for_line
from hotpatch.elf.image import ElfImage
from hotpatch.elf.ranges import function_ranges
from hotpatch.elf.vtables import vtable_slots
from hotpatch.errors import HotpatchError
from hotpatch.patch.bundle import PatchFile
from hotpatch.patch.manifest import Manifest

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes, bytes]:
    """(the calc executable, its bytes, a patch file's bytes for it)."""
    top = tmp_path_factory.mktemp("fuzz")
    exe = compile_program(TARGETS / "calc.c", top / "calc")
    src = top / "fix.c"
    src.write_text("long compute(long x) { return x + 10; }\n")
    patch = top / "fix.hp"
    assert run_cli("build", src, "--target", exe, "-o", patch).returncode == 0
    return exe, exe.read_bytes(), patch.read_bytes()


def mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    """``data`` with ``(position, xor)`` edits (positions wrapped to its length) and cut to ``cut`` bytes."""
    out = bytearray(data)
    for pos, x in edits:
        out[pos % len(out)] ^= x or 1
    return bytes(out[:cut] if cut is not None else out)


EDITS = st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1, max_size=6)
CUT = st.one_of(st.none(), st.integers(0, 1 << 16))


@FUZZ
@given(edits=EDITS, cut=CUT, header=st.booleans())
def test_elf_reader(
    built: tuple[Path, bytes, bytes], edits: list[tuple[int, int]], cut: int | None, header: bool
) -> None:
    """Everything build and apply ask of an ELF file, on a mutated executable (edits in the headers when
    ``header``)."""
    _, exe, _ = built
    if header:
        edits = [(p % 1024, x) for p, x in edits]
    try:
        img = ElfImage(mutate(exe, edits, cut), "fuzzed")
        funcs = img.function_symbols()
        img.build_id, img.sections, img.loads, img.dynamic_relocations(), img.ambiguous_locals()
        function_ranges(img)
        vtable_slots(img, {s.value for s in funcs.values()})
    except HotpatchError as e:
        assert "\n" not in str(e)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
FIELDS = ["name", "version", "arch", "build_id", "file", "functions", "content_sha256", "format"]


@FUZZ
@given(doc=JSON, key=st.sampled_from(FIELDS))
def test_manifest(built: tuple[Path, bytes, bytes], doc: object, key: str) -> None:
    """A manifest with one field replaced by random JSON, and random JSON as a whole manifest."""
    _, _, patch = built
    good = json.loads(PatchFileBytes.manifest(patch))
    for raw in (json.dumps({**good, key: doc}).encode(), json.dumps(doc).encode()):
        try:
            Manifest.from_json(raw, "fuzzed")
        except HotpatchError as e:
            assert "\n" not in str(e)


class PatchFileBytes:
    """Helpers over a patch file's bytes."""

    @staticmethod
    def manifest(data: bytes) -> bytes:
        from hotpatch.patch.bundle import PatchBinary
        from hotpatch.patch.manifest import SECTION

        raw = PatchBinary(data, "patch").section(SECTION)
        assert raw is not None
        return raw


@pytest.fixture(scope="module")
def target(built: tuple[Path, bytes, bytes]) -> subprocess.Popen[bytes]:
    exe, _, _ = built
    procs = Procs()
    proc = procs.start(exe, stdin=subprocess.PIPE)
    wait_for_line(proc, lambda s: s.startswith("ready"))
    yield proc
    procs.reap()


def code_of(pid: int, exe: Path) -> bytes:
    """The bytes of every executable mapping of ``exe`` in ``pid``."""
    from test_consistency import code_bytes

    return code_bytes(pid, exe)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=EDITS, cut=CUT)
def test_mutated_patch_file(
    built: tuple[Path, bytes, bytes], target: subprocess.Popen[bytes], tmp_path: Path,
    edits: list[tuple[int, int]], cut: int | None,
) -> None:  # fmt: skip
    """A mutated patch file read and applied to a running calc: a clear error and the target's code as it was,
    or (an edit in bytes nothing checks) a working patch, then reverted."""
    exe, _, patch = built
    path = tmp_path / "fuzzed.hp"
    path.write_bytes(mutate(patch, edits, cut))
    before = code_of(target.pid, exe)
    try:
        with hotpatch.attach(target.pid) as t:
            t.apply(PatchFile(str(path)))
            t.revert(None)
    except HotpatchError as e:
        assert "\n" not in str(e)
    assert code_of(target.pid, exe) == before
    assert_running(target.pid)


# (no word that selects processes by file or build-id, creates a repository, or names a PID but the target's)
WORDS = ["build", "apply", "revert", "status", "scan", "cflags", "list", "--pid", "--json", "--all", "--protocol",
         "rolling", "--via", "got", "--function", "--timeout", "-1", "0", "nan", "--consistency", "stack",
         "--from-repo", "--target", "-o", "--version", "/nonexistent", "/dev/null", "/proc/self/maps", "", "--",
         "-h", "\u00e9", "PID"]  # fmt: skip


# what argv can hold: any bytes but NUL, decoded as Python decodes argv (os.fsdecode: surrogateescape)
ARG = st.binary(max_size=8).map(lambda b: os.fsdecode(b.replace(b"\0", b"")))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(words=st.lists(st.sampled_from(WORDS) | ARG, max_size=6), use_pid=st.booleans())
def test_cli_arguments(built: tuple[Path, bytes, bytes], target: subprocess.Popen[bytes], words: list[str],
                       use_pid: bool) -> None:  # fmt: skip
    """Random command lines (with the running target's PID now and then; any other number is a PID that does
    not exist): exit 0, 1 or 2, and a failure is exactly one ``hotpatch: error:`` line; the target's code is
    untouched (no valid patch file is ever named)."""
    from click.testing import CliRunner

    from hotpatch.cli import main

    exe, _, _ = built
    pid = str(target.pid) if use_pid else "99999999"
    args = [pid if w == "PID" or w.strip().isdigit() else w for w in words]
    before = code_of(target.pid, exe)
    res = CliRunner().invoke(main, args, catch_exceptions=True)
    assert res.exit_code in (0, 1, 2), (args, res.exit_code, res.output, res.exception)
    assert "Traceback" not in res.output
    if res.exit_code == 1:
        assert res.output.count("hotpatch: error:") == 1, (args, res.output)
    assert code_of(target.pid, exe) == before
