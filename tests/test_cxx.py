"""C++ targets (issue 4, seed 004's scenarios): member functions, virtual functions through their vtable slots,
demangled names, patch versions, on g++ -O2 builds with and without -fcf-protection and for i386."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import TARGETS, Procs, assert_running, compile_program, run_cli, wait_for_line
from hotpatch.elf.cxxnames import find_symbol, pretty
from hotpatch.elf.image import open_elf
from hotpatch.elf.vtables import vtable_slots
from hotpatch.errors import SymbolError
from test_statics import split_debug

GREET = "_ZN7Greeter5greetEl"
ORIGINAL = ["Hello, from C++ member function! 42", "Hello, from C function! 42", "greet 42 42"]


def patched(v: int) -> list[str]:
    """What the target prints under version ``v`` of the patch."""
    return [
        f"Completely patched! v{v} from C++ member function! 42",
        f"Completely patched! v{v} from C function! 42",
        f"greet {41 + 1000 * v} {41 + 1000 * v}",
    ]


def ask(proc: subprocess.Popen[bytes]) -> list[str]:
    """One round of the target's greetings (three lines)."""
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(b"go\n")
    proc.stdin.flush()
    lines = [proc.stdout.readline().decode().strip() for _ in range(3)]
    assert not any(ln.startswith("BAD") for ln in lines), lines
    return lines


def build_version(tmp_path: Path, exe: Path, v: int, *extra: str) -> Path:
    """Patch ``greeting`` version ``v`` of cxx_demo_patch.cc for ``exe``."""
    src = tmp_path / f"greeting_v{v}.cc"
    src.write_text((TARGETS / "cxx_demo_patch.cc").read_text().replace("@VERSION@", str(v)))
    (tmp_path / "cxx_demo.h").write_text((TARGETS / "cxx_demo.h").read_text())
    out = tmp_path / f"greeting_v{v}.hp"
    res = run_cli("build", src, "--target", exe, "-o", out, "--name", "greeting", "--version", v, *extra)
    assert res.returncode == 0, res.stderr
    return out


def slot_words(pid: int, word: int) -> list[tuple[int, int, int]]:
    """(slot address, word there now, the function's entry) of every vtable-slot site ``status`` lists."""
    st = json.loads(run_cli("status", "--pid", pid, "--json").stdout)
    out = []
    with open(f"/proc/{pid}/mem", "rb") as mem:
        for p in st["patches"]:
            for s in p["sites"]:
                if s["klass"] == "vtable-slot":
                    mem.seek(s["site"])
                    out.append((s["site"], int.from_bytes(mem.read(word), "little"), s["entry"]))
    return out


@pytest.mark.parametrize(
    "flags", [(), ("-fcf-protection",), ("-m32", "-fno-pie", "-no-pie")], ids=["O2", "cf-protection", "i386"]
)
def test_seed004_scenarios(tmp_path: Path, procs: Procs, flags: tuple[str, ...]) -> None:
    """The C function, the member function and the virtual function (through a base pointer, devirtualised,
    and from two threads in tight loops) switch together; v1 then v2 (v2 wins), v1 again (already up to date),
    v3 over v2, and a revert from each state; the vtable slot holds the replacement while applied and the
    function's entry after revert. (i386 is built without PIE: a PIC function there starts by calling
    __x86.get_pc_thunk, and a call in the first 5 bytes is refused.)"""
    exe = compile_program(TARGETS / "cxx_demo.cc", tmp_path / "cxx_demo", "-I", str(TARGETS), *flags)
    word = 4 if "-m32" in flags else 8
    named = ("--function", "DemoClass::say_hello(int, std::string_view)", "--function", "say_hello_fun")
    v1 = build_version(tmp_path, exe, 1, *named, "--function", "Greeter::greet(long)")
    v2, v3 = build_version(tmp_path, exe, 2), build_version(tmp_path, exe, 3)
    proc = procs.start(exe, stdin=subprocess.PIPE)
    wait_for_line(proc, lambda s: s.startswith("ready"))
    assert ask(proc) == ORIGINAL

    def apply(patch: Path, *extra: str) -> subprocess.CompletedProcess[str]:
        return run_cli("apply", "--pid", proc.pid, patch, *extra)

    def revert() -> None:
        res = run_cli("revert", "--pid", proc.pid, "greeting")
        assert res.returncode == 0, res.stderr
        assert ask(proc) == ORIGINAL
        with open(f"/proc/{proc.pid}/mem", "rb") as mem:
            for addr, entry in slots:
                mem.seek(addr)
                assert int.from_bytes(mem.read(word), "little") == entry

    res = apply(v1)
    assert res.returncode == 0, res.stderr
    assert "Greeter::greet(long) at" in res.stdout and "and 1 vtable slot" in res.stdout, res.stdout
    assert ask(proc) == patched(1)
    live = slot_words(proc.pid, word)
    assert len(live) == 1 and live[0][1] != live[0][2], live  # the slot no longer holds the entry
    slots = [(addr, entry) for addr, _, entry in live]
    revert()

    assert apply(v1, "--protocol", "stop-the-world").returncode == 0  # protocol B writes the slot too
    assert ask(proc) == patched(1)
    res = apply(v2)
    assert res.returncode == 0 and "upgraded from version 1" in res.stdout, res.stdout + res.stderr
    assert ask(proc) == patched(2)
    res = apply(v1)
    assert res.returncode == 1 and "already up to date" in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert ask(proc) == patched(2)
    revert()

    assert apply(v2).returncode == 0
    assert apply(v3).returncode == 0
    assert ask(proc) == patched(3)
    revert()
    assert_running(proc.pid)


def test_build_names(tmp_path: Path) -> None:
    """``build --function`` takes mangled and demangled names; an unknown, ambiguous or undefined one is one
    clear line and no patch file."""
    exe = compile_program(TARGETS / "cxx_demo.cc", tmp_path / "cxx_demo", "-I", str(TARGETS))
    src = tmp_path / "p.cc"
    src.write_text((TARGETS / "cxx_demo_patch.cc").read_text().replace("@VERSION@", "1"))
    (tmp_path / "cxx_demo.h").write_text((TARGETS / "cxx_demo.h").read_text())
    out = tmp_path / "p.hp"
    res = run_cli("build", src, "--target", exe, "-o", out, "--function", GREET)
    assert res.returncode == 0 and "replaces Greeter::greet(long) (and 1 vtable slot)" in res.stdout, res.stdout
    for name, why in [
        ("Greeter::wave(long)", "no function Greeter::wave(long) in"),
        ("Greeter::~Greeter", "is ambiguous in"),  # the complete and the deleting destructor
        ("main", "the sources do not define main"),
    ]:
        out.unlink(missing_ok=True)
        res = run_cli("build", src, "--target", exe, "-o", out, "--function", name)
        assert res.returncode == 1 and why in res.stderr and res.stderr.count("\n") == 1, res.stderr
        assert not out.exists()


def test_find_symbol_spellings() -> None:
    """A demangled name matches with the standard typedefs spelled either way, with or without spaces, and
    without its parameters when it has no overload."""
    syms = ["_ZN9DemoClass9say_helloEiSt17basic_string_viewIcSt11char_traitsIcEE", GREET, "_ZN7Greeter5greetEi", "f"]
    want = syms[0]
    for written in [
        "DemoClass::say_hello(int, std::string_view)",
        "DemoClass::say_hello(int,std::basic_string_view<char, std::char_traits<char> >)",
        "DemoClass::say_hello",
        want,
    ]:
        assert find_symbol(written, syms, "t") == want
    assert find_symbol("Greeter::greet(long)", syms, "t") == GREET
    assert find_symbol("f", syms, "t") == "f"
    with pytest.raises(SymbolError, match="ambiguous"):
        find_symbol("Greeter::greet", syms, "t")
    with pytest.raises(SymbolError, match="no function g in t"):
        find_symbol("g", syms, "t")
    assert pretty(want) == "DemoClass::say_hello(int, std::string_view)"


@pytest.mark.parametrize("flags", [("-fPIE", "-pie"), ("-no-pie",), ("-m32",)], ids=["pie", "exec", "i386"])
def test_vtable_slots(tmp_path: Path, flags: tuple[str, ...]) -> None:
    """Greeter::greet's one vtable slot is found through relocations (PIE, i386) or the file's words
    (ET_EXEC), and holds exactly the function's address in the file's loaded image."""
    exe = compile_program(TARGETS / "cxx_demo.cc", tmp_path / "cxx_demo", "-I", str(TARGETS), *flags)
    img = open_elf(str(exe))
    try:
        greet = img.function_symbols()[GREET]
        found = vtable_slots(img, {greet.value})
        vtable = next(s for s in img.defined_symbols("_ZTV7Greeter"))
        assert len(found[greet.value]) == 1
        assert vtable.value < found[greet.value][0] < vtable.value + vtable.size
    finally:
        img.close()


def test_stripped_target_with_debug_file(tmp_path: Path) -> None:
    """A stripped C++ executable: its functions and vtables are named by its separate debug file, so the
    virtual function's slot is found as in the unstripped file."""
    exe = compile_program(TARGETS / "cxx_demo.cc", tmp_path / "cxx_demo", "-I", str(TARGETS))
    split_debug(exe, tmp_path / "debug")
    src = tmp_path / "p.cc"
    src.write_text((TARGETS / "cxx_demo_patch.cc").read_text().replace("@VERSION@", "1"))
    (tmp_path / "cxx_demo.h").write_text((TARGETS / "cxx_demo.h").read_text())
    env = {**os.environ, "HOTPATCH_DEBUG_DIR": str(tmp_path / "debug")}
    res = run_cli("build", src, "--target", exe, "-o", tmp_path / "p.hp", "--function", GREET, env=env)
    assert res.returncode == 0 and "replaces Greeter::greet(long) (and 1 vtable slot)" in res.stdout, res.stdout
