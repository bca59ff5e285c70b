"""Bad input of every kind gives one clear line, a non-zero exit, and changes nothing (DESIGN.md §6, inv. 6).

Each case goes through the command line (``python -m hotpatch``) against a real process built from
``targets/bad_target.c`` at test time. For every refusal the test checks that stderr is exactly one line
``hotpatch: error: ...`` naming the problem, with no traceback and no "internal error", that the exit status is
non-zero, that stdout is empty, and — when a target is involved — that the target is unchanged: the bytes of
each of its functions in ``/proc/PID/mem`` are identical before and after, no ``/memfd:hotpatch-state``
mapping appeared, no new anonymous executable mapping appeared, and it still runs, untraced.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

import hotpatch
from conftest import TARGETS, Procs, assert_running, compile_program, run_cli, wait_for_line

MANIFEST = ".hotpatch.manifest"
FUNCTIONS = ("compute", "never_called", "short_fn", "branchy_fn", "call_fn")

# Replacement sources, one patch each (built with `hotpatch build` at test time).
SOURCES = {
    "good": "int compute(int x) { return 3 * x + 2; }\n",
    "nosym": "int no_such_function_xyz(int);\nint compute(int x) { return no_such_function_xyz(x) + 1; }\n",
    "never": "int never_called(int x) { return x; }\n",
    "short": "int short_fn(void) { return 2; }\n",
    "branchy": "int branchy_fn(int x) { return x < 100 ? 100 : x + 1; }\n",
    "call": "int call_fn(int x) { return x; }\n",
}

TRACER_SOURCE = r"""
/* Seizes (PTRACE_SEIZE, no stop) the PID in argv[1], says "traced", waits for stdin to close. */
#include <stdio.h>
#include <stdlib.h>
#include <sys/ptrace.h>
#include <unistd.h>
int main(int argc, char **argv) {
    if (argc < 2 || ptrace(PTRACE_SEIZE, atoi(argv[1]), 0, 0) != 0) { perror("seize"); return 1; }
    printf("traced\n");
    fflush(stdout);
    char buf[16];
    while (read(0, buf, sizeof buf) > 0) {}
    return 0;
}
"""

I386_SOURCE = r"""
#include <stdio.h>
#include <unistd.h>
int compute(int x) { return 3 * x + 1; }
int main(void) {
    printf("ready %d\n", compute(1));
    fflush(stdout);
    char buf[16];
    while (read(0, buf, sizeof buf) > 0) {}
    return 0;
}
"""


# -- helpers -------------------------------------------------------------------------------------------


def assert_one_line_error(res: subprocess.CompletedProcess[str], *needles: str, code: int | None = None) -> str:
    """``res`` failed with exactly one stderr line ``hotpatch: error: ...`` containing every needle
    (case-insensitive), no traceback, no internal error, nothing on stdout. Returns the message."""
    lines = res.stderr.splitlines()
    assert res.returncode != 0, f"exit 0; stdout: {res.stdout!r}"
    if code is not None:
        assert res.returncode == code, f"exit {res.returncode}, expected {code}; stderr: {res.stderr!r}"
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{res.stderr}"
    line = lines[0]
    assert line.startswith("hotpatch: error: "), line
    assert "Traceback" not in res.stderr and "internal error" not in line, line
    assert res.stdout == "", f"unexpected stdout {res.stdout!r}"
    for needle in needles:
        assert needle.lower() in line.lower(), f"{needle!r} not in {line!r}"
    return line


def elf_function(path: Path, name: str) -> tuple[int, bytes]:
    """Link-time address and bytes of function ``name`` in the ELF file ``path`` (from its .symtab)."""
    with open(path, "rb") as f:
        elf = ELFFile(f)
        symtab = elf.get_section_by_name(".symtab")
        assert symtab is not None, f"{path} has no .symtab"
        syms = symtab.get_symbol_by_name(name)
        assert syms, f"{name} not in {path}"
        value, size = int(syms[0]["st_value"]), int(syms[0]["st_size"])
        for sec in elf.iter_sections():
            start = int(sec["sh_addr"])
            if sec["sh_type"] == "SHT_PROGBITS" and start <= value < start + int(sec["sh_size"]):
                f.seek(int(sec["sh_offset"]) + value - start)
                return value, f.read(size)
    raise AssertionError(f"no section holds {name} in {path}")


def elf_build_id(path: Path) -> str:
    """The GNU build-id of ``path`` as hex."""
    with open(path, "rb") as f:
        for sec in ELFFile(f).iter_sections():
            if sec["sh_type"] == "SHT_NOTE":
                for note in sec.iter_notes():
                    if note["n_type"] == "NT_GNU_BUILD_ID":
                        return str(note["n_desc"])
    raise AssertionError(f"{path} has no build-id")


def section_file_range(path: Path, name: str) -> tuple[int, int]:
    """File offset and size of section ``name`` in ``path``."""
    with open(path, "rb") as f:
        sec = ELFFile(f).get_section_by_name(name)
        assert sec is not None, f"{path} has no section {name}"
        return int(sec["sh_offset"]), int(sec["sh_size"])


def section_header_offset(path: Path, name: str) -> int:
    """File offset of the section header of ``name`` in ``path``."""
    with open(path, "rb") as f:
        elf = ELFFile(f)
        for i, sec in enumerate(elf.iter_sections()):
            if sec.name == name:
                return int(elf["e_shoff"]) + i * int(elf["e_shentsize"])
    raise AssertionError(f"{path} has no section {name}")


def read_manifest(patch: Path, tmp: Path) -> dict[str, object]:
    """The manifest JSON of ``patch`` (dumped with objcopy)."""
    out = tmp / f"{patch.name}.manifest.json"
    subprocess.run(["objcopy", "--dump-section", f"{MANIFEST}={out}", str(patch)], check=True)
    doc = json.loads(out.read_bytes())
    assert isinstance(doc, dict)
    return doc


def with_manifest(patch: Path, content: bytes, out: Path) -> Path:
    """Copy of ``patch`` at ``out`` whose manifest section holds ``content`` (nothing else recomputed)."""
    raw = out.with_suffix(".section")
    raw.write_bytes(content)
    subprocess.run(["objcopy", "--update-section", f"{MANIFEST}={raw}", str(patch), str(out)], check=True)
    return out


def flipped(patch: Path, offset: int, out: Path) -> Path:
    """Copy of ``patch`` at ``out`` with the byte at ``offset`` inverted."""
    data = bytearray(patch.read_bytes())
    data[offset] ^= 0xFF
    out.write_bytes(bytes(data))
    return out


@dataclass
class Built:
    """The programs and patches every test uses, built once per module."""

    dir: Path
    target: Path
    variant: Path
    patches: dict[str, Path]


def hotpatch_build(src_text: str, name: str, target: Path, out_dir: Path) -> Path:
    """Write ``src_text`` to NAME.c and build NAME.hp for ``target`` with the CLI; fail on error."""
    src = out_dir / f"{name}.c"
    src.write_text(src_text)
    out = out_dir / f"{name}.hp"
    res = run_cli("build", src, "--target", target, "-o", out, "--name", name)
    assert res.returncode == 0, res.stderr
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """bad_target, its -DVARIANT build (same file name, another build-id), and the patches."""
    d = tmp_path_factory.mktemp("bad_input")
    # no alignment padding: every function is an ordinary site, whose refusals these tests check
    target = compile_program(TARGETS / "bad_target.c", d / "bad_target", "-falign-functions=1")
    (d / "variant").mkdir()
    variant = compile_program(
        TARGETS / "bad_target.c", d / "variant" / "bad_target", "-DVARIANT", "-falign-functions=1"
    )
    assert elf_build_id(target) != elf_build_id(variant)
    patches = {name: hotpatch_build(SOURCES[name], name, target, d) for name in ("good", "nosym", "never")}
    patches["other_build"] = hotpatch_build(SOURCES["good"], "other_build", variant, d)
    for name in ("short", "branchy"):
        patches[f"variant_{name}"] = hotpatch_build(SOURCES[name], f"variant_{name}", variant, d)
    # a program that is not the target at all: the variant under another file name
    (d / "other").mkdir()
    other = d / "other" / "other_program"
    shutil.copyfile(variant, other)
    patches["other_program"] = hotpatch_build(SOURCES["good"], "other_program", other, d)
    return Built(d, target, variant, patches)


@dataclass
class Running:
    """A started bad_target: its process and the runtime address and size of each function."""

    proc: subprocess.Popen[bytes]
    addrs: dict[str, int]
    sizes: dict[str, int]

    @property
    def pid(self) -> int:
        """The target's PID."""
        return self.proc.pid


@dataclass(frozen=True)
class Snapshot:
    """What must not change in a target: function bytes, the state mapping, anonymous executable mappings."""

    code: dict[str, bytes]
    state_mapped: bool
    anon_exec: frozenset[str]


def start_target(procs: Procs, built: Built) -> Running:
    """Start bad_target and read the address of each function from its output."""
    proc = procs.start(built.target, stdin=subprocess.PIPE)
    addrs: dict[str, int] = {}

    def seen(line: str) -> bool:
        if line.startswith("addr "):
            _, name, addr = line.split()
            addrs[name] = int(addr, 16)
        return line.strip() == "ready"

    wait_for_line(proc, seen)
    sizes = {name: len(elf_function(built.target, name)[1]) for name in FUNCTIONS}
    return Running(proc, addrs, sizes)


def snapshot(t: Running) -> Snapshot:
    """Read the target's function bytes and the mappings that a change would add."""
    with open(f"/proc/{t.pid}/mem", "rb") as mem:
        code = {}
        for name in FUNCTIONS:
            mem.seek(t.addrs[name])
            code[name] = mem.read(t.sizes[name])
    with open(f"/proc/{t.pid}/maps") as f:
        lines = f.read().splitlines()
    state = any("/memfd:hotpatch-state" in line for line in lines)
    anon_exec = frozenset(
        line.split()[0]
        for line in lines
        if line.split()[1][2] == "x" and (len(line.split()) < 6 or not line.split()[5].startswith(("/", "[v")))
    )
    return Snapshot(code, state, anon_exec)


def assert_unchanged(t: Running, before: Snapshot) -> None:
    """The target runs, untraced, with the same function bytes and no new state or code mapping."""
    assert t.proc.poll() is None, f"target exited with {t.proc.returncode}"
    assert_running(t.pid)
    after = snapshot(t)
    for name in FUNCTIONS:
        old, new = before.code[name].hex(), after.code[name].hex()
        assert new == old, f"{name} changed: {old} -> {new}"
    assert after.state_mapped == before.state_mapped, "a /memfd:hotpatch-state mapping appeared"
    added = after.anon_exec - before.anon_exec
    assert not added, f"new anonymous executable mappings {sorted(added)}"


@pytest.fixture
def target(procs: Procs, built: Built) -> Iterator[tuple[Running, Snapshot]]:
    """A running bad_target and its snapshot taken before the test does anything to it."""
    t = start_target(procs, built)
    yield t, snapshot(t)


# -- the target process -------------------------------------------------------------------------------


def test_no_such_pid(procs: Procs, built: Built) -> None:
    """apply, revert and status against a PID that is gone (a reaped child) or PID 0: one line each."""
    gone = procs.start("true")
    gone.wait()
    assert not os.path.exists(f"/proc/{gone.pid}")
    patch = built.patches["good"]
    for pid in (gone.pid, 0):
        for args in (("apply", "--pid", pid, patch), ("revert", "--pid", pid, "--all"), ("status", "--pid", pid)):
            assert_one_line_error(run_cli(*args), f"no process with PID {pid}", code=1)


@pytest.fixture(scope="module")
def nobody_runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[list[str], dict[str, str], Path]]:
    """How to run ``python -m hotpatch`` as user nobody: (argv prefix, environment, a directory nobody reads).

    The interpreter's own site-packages may be unreadable to nobody (here under /root), so hotpatch's
    dependencies are copied into a world-readable directory on PYTHONPATH. Skips when setpriv, the user
    nobody or a usable interpreter is missing.
    """
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody")
    shared = Path(tempfile.mkdtemp(prefix="hotpatch-nobody-"))
    try:
        shared.chmod(0o755)
        lib = shared / "pylib"
        lib.mkdir()
        for mod in ("click", "elftools", "iced_x86"):
            spec = importlib.util.find_spec(mod)
            assert spec is not None and spec.origin is not None
            shutil.copytree(Path(spec.origin).parent, lib / mod, ignore=shutil.ignore_patterns("__pycache__"))
        for root, dirs, files in os.walk(shared):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o755)
            for name in files:
                os.chmod(os.path.join(root, name), 0o644)
        src = Path(hotpatch.__file__).resolve().parents[1]
        env = {**os.environ, "PYTHONPATH": f"{src}:{lib}", "PYTHONDONTWRITEBYTECODE": "1"}
        env.pop("HOTPATCH_DEBUG", None)
        setpriv = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
        errors = []
        for python in dict.fromkeys([sys.executable, "/usr/bin/python3"]):
            probe = subprocess.run(
                [*setpriv, python, "-c", "import hotpatch.api, hotpatch.cli"],
                env=env,
                cwd=shared,
                capture_output=True,
                text=True,
                check=False,
            )
            if probe.returncode == 0:
                yield [*setpriv, python, "-m", "hotpatch"], env, shared
                return
            errors.append(f"{python}: {probe.stderr.strip().splitlines()[-1:]}")
        pytest.skip(f"no interpreter can import hotpatch as nobody: {errors}")
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_pid_not_traceable_by_nobody(
    built: Built, target: tuple[Running, Snapshot], nobody_runner: tuple[list[str], dict[str, str], Path]
) -> None:
    """User nobody may not trace a root-owned target: apply, revert and status each say so in one line."""
    t, before = target
    argv, env, shared = nobody_runner
    assert os.stat(f"/proc/{t.pid}").st_uid == 0
    patch = shared / "good.hp"
    shutil.copyfile(built.patches["good"], patch)
    patch.chmod(0o644)
    for args in (("apply", "--pid", t.pid, patch), ("revert", "--pid", t.pid, "--all"), ("status", "--pid", t.pid)):
        res = subprocess.run(
            [*argv, *map(str, args)], env=env, cwd=shared, capture_output=True, text=True, timeout=60, check=False
        )
        assert_one_line_error(res, "not permitted", str(t.pid), code=1)
    assert_unchanged(t, before)


def test_pid_already_traced(tmp_path: Path, procs: Procs, built: Built, target: tuple[Running, Snapshot]) -> None:
    """A target another tracer holds: apply names that tracer and changes nothing."""
    t, before = target
    src = tmp_path / "bad_tracer.c"
    src.write_text(TRACER_SOURCE)
    tracer_exe = compile_program(src, tmp_path / "bad_tracer")
    tracer = procs.start(tracer_exe, t.pid, stdin=subprocess.PIPE)
    wait_for_line(tracer, lambda line: line.strip() == "traced")
    res = run_cli("apply", "--pid", t.pid, built.patches["good"])
    assert_one_line_error(res, f"already traced by PID {tracer.pid}", code=1)
    os.kill(tracer.pid, signal.SIGKILL)
    tracer.wait(timeout=10)
    assert_unchanged(t, before)


def test_32bit_target_process(tmp_path: Path, procs: Procs, built: Built) -> None:
    """A patch for x86-64 offered to an i386 process is refused in one line naming both (i386 processes
    are patched with patches built for them: tests/test_i386_patching.py)."""
    src = tmp_path / "bad_i386.c"
    src.write_text(I386_SOURCE)
    exe = compile_program(src, tmp_path / "bad_i386", "-m32")
    proc = procs.start(exe, stdin=subprocess.PIPE)
    wait_for_line(proc, lambda line: line.startswith("ready"))
    res = run_cli("apply", "--pid", proc.pid, built.patches["good"])
    assert_one_line_error(res, "for x86_64 (64-bit) processes", "is a 32-bit process", code=1)
    assert proc.poll() is None
    assert_running(proc.pid)


# -- the patch does not fit the target -------------------------------------------------------------------


def test_patch_for_another_build(built: Built, target: tuple[Running, Snapshot]) -> None:
    """A patch built for another build of the same program (another build-id) is refused."""
    t, before = target
    res = run_cli("apply", "--pid", t.pid, built.patches["other_build"])
    assert_one_line_error(res, "another build of bad_target", elf_build_id(built.variant), code=1)
    assert_unchanged(t, before)


def test_patch_for_a_program_not_loaded(built: Built, target: tuple[Running, Snapshot]) -> None:
    """A patch for a module the target does not map is refused, naming the module."""
    t, before = target
    res = run_cli("apply", "--pid", t.pid, built.patches["other_program"])
    assert_one_line_error(res, "no module with build-id", "other_program", code=1)
    assert_unchanged(t, before)


@pytest.mark.parametrize("where", ["site", "last_byte"])
def test_site_bytes_differ_from_manifest(built: Built, target: tuple[Running, Snapshot], where: str) -> None:
    """One byte of the never-executed function changed in the running target (at the site, or its last
    byte): apply refuses, naming the function, and writes nothing."""
    t, _ = target
    addr = t.addrs["never_called"] + (0 if where == "site" else t.sizes["never_called"] - 1)
    with open(f"/proc/{t.pid}/mem", "r+b", buffering=0) as mem:
        mem.seek(addr)
        old = mem.read(1)
        mem.seek(addr)
        mem.write(bytes([old[0] ^ 0x40]))
    before = snapshot(t)
    res = run_cli("apply", "--pid", t.pid, built.patches["never"])
    assert_one_line_error(res, "never_called", "differ", code=1)
    assert_unchanged(t, before)


def test_symbol_missing_in_target(built: Built, target: tuple[Running, Snapshot]) -> None:
    """The replacement calls a function no module of the target defines: refused, naming the symbol."""
    t, before = target
    res = run_cli("apply", "--pid", t.pid, built.patches["nosym"])
    assert_one_line_error(res, "no_such_function_xyz", "not defined", code=1)
    assert_unchanged(t, before)


UNSAFE = {
    "short": ("short_fn", "too short"),
    "branchy": ("branchy_fn", "branches to"),
    "call": ("call_fn", "a call"),
}


@pytest.mark.parametrize("kind", sorted(UNSAFE))
def test_build_refuses_unsafe_function(tmp_path: Path, built: Built, kind: str) -> None:
    """`hotpatch build` refuses a function too short for the jump, one with a branch target or a call in
    its first 5 bytes, in one line naming the function; it writes no patch file."""
    symbol, reason = UNSAFE[kind]
    src = tmp_path / f"{kind}.c"
    src.write_text(SOURCES[kind])
    out = tmp_path / f"{kind}.hp"
    # as ordinary sites (a short jump over the first instruction alone avoids these hazards: issue 3)
    res = run_cli("build", src, "--target", built.target, "-o", out, "--ordinary-sites")
    assert_one_line_error(res, symbol, reason, code=1)
    assert not out.exists()


@pytest.mark.parametrize("kind", ["short", "branchy"])
def test_apply_refuses_unsafe_function(
    tmp_path: Path, built: Built, target: tuple[Running, Snapshot], kind: str
) -> None:
    """A patch file whose manifest names a too-short function or one with a branch target in its first
    5 bytes (built against the variant, manifest rewritten to the real build's bytes) is refused by apply."""
    t, before = target
    symbol, reason = UNSAFE[kind]
    doc = read_manifest(built.patches[f"variant_{kind}"], tmp_path)
    value, code = elf_function(built.target, symbol)
    doc["build_id"] = elf_build_id(built.target)
    functions = doc["functions"]
    assert isinstance(functions, list) and len(functions) == 1
    functions[0].update(value=value, size=len(code), sha256=hashlib.sha256(code).hexdigest())
    crafted = with_manifest(built.patches[f"variant_{kind}"], json.dumps(doc).encode(), tmp_path / f"{kind}.hp")
    res = run_cli("apply", "--pid", t.pid, crafted)
    assert_one_line_error(res, symbol, reason, code=1)
    assert_unchanged(t, before)


# -- the patch file itself is bad ------------------------------------------------------------------------


def corrupt_variants(good: Path, tmp: Path) -> dict[str, tuple[Path, tuple[str, ...]]]:
    """Damaged copies of ``good``: name -> (file, words the error must contain)."""
    text_off, text_size = section_file_range(good, ".text")
    doc = read_manifest(good, tmp)
    bad_arch = {**doc, "arch": "aarch64"}
    no_functions = {k: v for k, v in doc.items() if k != "functions"}
    return {
        "code_byte_flipped": (flipped(good, text_off + text_size // 2, tmp / "code.hp"), ("corrupt", "hash")),
        "manifest_garbage": (with_manifest(good, b"{garbage", tmp / "garbage.hp"), ("manifest", "JSON")),
        "manifest_not_utf8": (with_manifest(good, b"\xff\xfe\x00{", tmp / "utf8.hp"), ("manifest", "JSON")),
        "manifest_field_missing": (
            with_manifest(good, json.dumps(no_functions).encode(), tmp / "field.hp"),
            ("manifest", "functions"),
        ),
        "manifest_not_object": (with_manifest(good, b"[1, 2]", tmp / "list.hp"), ("manifest", "not a JSON object")),
        "manifest_other_arch": (with_manifest(good, json.dumps(bad_arch).encode(), tmp / "arch.hp"), ("aarch64",)),
        "no_manifest": (with_manifest(good, b"", tmp / "empty_manifest.hp"), ("manifest",)),
        # the section header table is not covered by the content hash: .dynsym's sh_type flipped
        "dynsym_header_flipped": (
            flipped(good, section_header_offset(good, ".dynsym") + 4, tmp / "shdr.hp"),
            ("corrupt",),
        ),
        # EI_DATA (byte 5) flipped: no longer little-endian
        "elf_data_byte_flipped": (flipped(good, 5, tmp / "ei_data.hp"), ("corrupt",)),
        "elf_class_byte_flipped": (flipped(good, 4, tmp / "ei_class.hp"), ("corrupt",)),
        "not_elf": (flipped(good, 1, tmp / "magic.hp"), ("not a patch file",)),
    }


CORRUPT_CASES = [
    "code_byte_flipped",
    "manifest_garbage",
    "manifest_not_utf8",
    "manifest_field_missing",
    "manifest_not_object",
    "manifest_other_arch",
    "no_manifest",
    "dynsym_header_flipped",
    "elf_data_byte_flipped",
    "elf_class_byte_flipped",
    "not_elf",
]


@pytest.mark.parametrize("case", CORRUPT_CASES)
def test_corrupt_patch_file(tmp_path: Path, built: Built, target: tuple[Running, Snapshot], case: str) -> None:
    """A damaged patch file (code byte flipped, manifest garbage or wrong, ELF header or section header
    damaged) is refused in one line naming the file and the damage."""
    t, before = target
    path, needles = corrupt_variants(built.patches["good"], tmp_path)[case]
    res = run_cli("apply", "--pid", t.pid, path)
    assert_one_line_error(res, path.name, *needles, code=1)
    assert_unchanged(t, before)


def test_truncated_patch_file(tmp_path: Path, built: Built, target: tuple[Running, Snapshot]) -> None:
    """A patch file cut at many lengths (empty, inside the ELF header, the program headers, the code, the
    manifest, the section headers) is refused in one line each."""
    t, before = target
    data = built.patches["good"].read_bytes()
    n = len(data)
    man_off, man_size = section_file_range(built.patches["good"], MANIFEST)
    lengths = sorted({0, 1, 4, 16, 63, 64, 100, n // 4, n // 2, man_off + man_size // 2, n - 200, n - 1})
    for length in lengths:
        path = tmp_path / f"cut{length}.hp"
        path.write_bytes(data[:length])
        line = assert_one_line_error(run_cli("apply", "--pid", t.pid, path), path.name, code=1)
        assert any(w in line for w in ("truncated", "not an ELF", "not a patch file", "corrupt")), line
    assert_unchanged(t, before)


def test_patch_for_another_architecture(tmp_path: Path, built: Built, target: tuple[Running, Snapshot]) -> None:
    """An i386 shared object (gcc -m32 -shared) carrying a manifest section is refused as i386."""
    t, before = target
    src = tmp_path / "bad_i386_patch.c"
    src.write_text(SOURCES["good"])
    so = compile_program(src, tmp_path / "i386.so", "-m32", shared=True)
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps(read_manifest(built.patches["good"], tmp_path)))
    patch = tmp_path / "i386.hp"
    subprocess.run(["objcopy", "--add-section", f"{MANIFEST}={manifest}", str(so), str(patch)], check=True)
    res = run_cli("apply", "--pid", t.pid, patch)
    assert_one_line_error(res, "i386.hp", "i386", "not for x86_64", code=1)
    assert_unchanged(t, before)


def test_missing_patch_file(tmp_path: Path, target: tuple[Running, Snapshot]) -> None:
    """A patch path that does not exist, or is a directory, is refused in one line."""
    t, before = target
    missing = tmp_path / "nope.hp"
    assert_one_line_error(run_cli("apply", "--pid", t.pid, missing), str(missing), "No such file", code=1)
    line = assert_one_line_error(run_cli("apply", "--pid", t.pid, tmp_path))
    assert "directory" in line
    assert_unchanged(t, before)


# -- the command line ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("revert", "--pid", "{pid}"), "NAME or --all"),
        (("revert", "--pid", "{pid}", "good", "--all"), "NAME or --all"),
        (("apply", "{patch}"), "--pid"),
        (("apply", "--pid", "twelve", "{patch}"), "twelve"),
        (("status",), "--pid"),
        (("frobnicate",), "frobnicate"),
        (("apply", "--pid", "{pid}", "--bogus", "{patch}"), "--bogus"),
    ],
)
def test_bad_cli_usage(built: Built, target: tuple[Running, Snapshot], args: tuple[str, ...], needle: str) -> None:
    """Usage errors are one ``hotpatch: error:`` line too, with exit status 2."""
    t, before = target
    argv = [a.format(pid=t.pid, patch=built.patches["good"]) for a in args]
    assert_one_line_error(run_cli(*argv), needle, code=2)
    assert_unchanged(t, before)


def test_revert_of_unknown_patch(target: tuple[Running, Snapshot]) -> None:
    """Reverting a patch name that is not applied is refused in one line naming it; nothing is created."""
    t, before = target
    assert_one_line_error(run_cli("revert", "--pid", t.pid, "no_such_patch"), "no patch named no_such_patch", code=1)
    assert_unchanged(t, before)


def test_good_patch_still_applies(built: Built, target: tuple[Running, Snapshot]) -> None:
    """Control: the same target and the good patch work, so the refusals above are about their input."""
    t, _ = target
    res = run_cli("apply", "--pid", t.pid, built.patches["good"])
    assert res.returncode == 0, res.stderr
    after = snapshot(t)
    assert after.code["compute"][:1] == b"\xe9" and after.state_mapped
    res = run_cli("revert", "--pid", t.pid, "--all")
    assert res.returncode == 0, res.stderr
    assert_running(t.pid)


def test_closed_stdout_is_not_an_error(tmp_path: Path, procs: Procs) -> None:
    """Output into a closed pipe (``hotpatch status --pid P | head -1`` after head exits) ends quietly with
    128+SIGPIPE, not with an "internal error" line."""
    exe = compile_program(TARGETS / "calc.c", tmp_path / "calc")
    target = procs.start(exe, stdin=subprocess.PIPE)
    wait_for_line(target, lambda s: s.startswith("ready"))
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        res = subprocess.run(
            [sys.executable, "-m", "hotpatch", "status", "--pid", str(target.pid)],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)
    assert res.returncode == 141 and res.stderr == "", res.stderr
    assert_running(target.pid)
