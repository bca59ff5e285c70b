"""``hotpatch demo``, the README's first command: the output changes live and changes back."""

from __future__ import annotations

from conftest import run_cli


def test_demo_patches_and_restores_the_program() -> None:
    """The demo exits 0, the program printed seed 004's lines before, the patched ones after apply, and
    the original ones again after revert (the demo itself fails otherwise)."""
    res = run_cli("demo", "--seconds", "0.6", timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    for line in (
        "Hello, from C function! 42",
        "Hello, from C++ member function! 42",
        "Completely patched! from C function! 42",
        "Completely patched! from C++ member function! 42",
    ):
        assert f"program | {line}" in out
    before, after = out.split("hotpatch revert", 1)
    assert "Completely patched!" in before and "program | Hello, from C function! 42" in after
    assert "done: the program was patched and restored" in out
