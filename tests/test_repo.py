"""The signed patch repository (issue 5): publish through TUF, update, list, apply --from-repo; refusals of a
tampered file, an unknown key, a rollback and expired metadata, with nothing applied; a patch file copied by
hand is checked by its own signature."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from conftest import TARGETS, Procs, assert_running, compile_program, run_cli, wait_for_line
from hotpatch.registry import repo as repomod
from test_versions import ask


class Host:
    """A hotpatch home of its own (trust and cache), a repository directory, and the calc target."""

    def __init__(self, tmp: Path, procs: Procs) -> None:
        self.tmp = tmp
        self.env = {**os.environ, "HOTPATCH_HOME": str(tmp / "home")}
        self.repo = tmp / "repo"
        # a build-id of its own: --all and the agent look at every process of the machine
        self.exe = compile_program(TARGETS / "calc.c", tmp / "calc", f"-Wl,--build-id=0x{uuid.uuid4().hex}")
        self.procs = procs
        ok = self.cli("repo", "init", self.repo)
        assert "clients trust" in ok

    def cli(self, *args: str | Path, fail: bool = False) -> str:
        res = run_cli(*args, env=self.env)
        if fail:
            assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stdout + res.stderr
            return res.stderr
        assert res.returncode == 0, res.stdout + res.stderr
        return res.stdout

    def patch(self, add: int, version: int) -> Path:
        src = self.tmp / f"fix{version}.c"
        src.write_text(f"long compute(long x) {{ return x + {add}; }}\n")
        out = self.tmp / f"fix{version}.hp"
        self.cli("build", src, "--target", self.exe, "-o", out, "--name", "fix", "--version", version)
        return out

    def update(self, first: bool = False) -> str:
        extra = ["--root", self.repo / "public" / "metadata" / "1.root.json"] if first else []
        return self.cli("update", "--repo", self.repo, *extra)

    def start(self) -> subprocess.Popen[bytes]:
        proc = self.procs.start(self.exe, stdin=subprocess.PIPE)
        wait_for_line(proc, lambda s: s.startswith("ready"))
        return proc


@pytest.fixture
def host(tmp_path: Path, procs: Procs) -> Host:
    return Host(tmp_path, procs)


def test_publish_update_list_apply(host: Host) -> None:
    host.cli("repo", "add", host.repo, host.patch(100, 1), "--about", "adds 100")
    assert "1 patches verified" in host.update(first=True)
    listed = json.loads(host.cli("list", "--json"))
    rows = [(p["name"], p["version"], p["about"], p["functions"]) for p in listed]
    assert rows == [("fix", 1, "adds 100", ["compute"])]
    proc = host.start()
    assert ask(proc, 5) == 6
    out = host.cli("apply", "--from-repo", "--pid", proc.pid)
    assert "applied: patch fix version 1" in out, out
    assert ask(proc, 5) == 105
    assert "up-to-date" in host.cli("apply", "--from-repo", "--pid", proc.pid)

    host.cli("repo", "add", host.repo, host.patch(200, 2))
    host.update()  # the repository is read again: seed 004's cache never was
    second = host.start()
    out = host.cli("apply", "--from-repo", "--all")  # every process mapping the patched build: these two
    assert f"PID {proc.pid} " in out and f"PID {second.pid} " in out, out
    assert out.splitlines()[-1] == "2 processes: 1 applied, 1 upgraded", out
    assert ask(proc, 5) == 205 and ask(second, 5) == 205

    # a patch file that did not come from the repository, or was changed: refused by its signature
    err = host.cli("apply", "--pid", proc.pid, host.patch(300, 3), fail=True)
    assert "is not signed, and this host accepts only signed patches" in err, err
    signed = host.tmp / "home" / "targets" / "fix-2.hp"
    data = bytearray(signed.read_bytes())
    data[len(data) // 2] ^= 0x01  # one byte, in the middle of the file
    changed = host.tmp / "changed.hp"
    changed.write_bytes(bytes(data))
    err = host.cli("apply", "--pid", proc.pid, changed, fail=True)
    assert "changed.hp" in err, err
    assert ask(proc, 5) == 205

    host.cli("repo", "remove", host.repo, "fix")
    assert "0 patches verified" in host.update()
    assert json.loads(host.cli("list", "--json")) == []
    assert_running(proc.pid)


def test_refusals(host: Host) -> None:
    """Each refused by update with one line; the verified cache, and so what can be applied, is unchanged."""
    host.cli("repo", "add", host.repo, host.patch(100, 1))
    host.update(first=True)
    public = host.repo / "public"
    saved = host.tmp / "saved"
    shutil.copytree(public, saved)

    # a published file changed by one byte
    host.cli("repo", "add", host.repo, host.patch(200, 2))
    target = public / "targets" / "fix-2.hp"
    good = target.read_bytes()
    target.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    err = host.cli("update", "--repo", host.repo, fail=True)
    assert "did not verify" in err and "fix-2.hp" in err, err
    target.write_bytes(good)

    # a new timestamp signed with a key the root does not name (the client reads the timestamp every time)
    stamp = public / "metadata" / "timestamp.json"
    keep = stamp.read_bytes()
    from securesystemslib.signer import CryptoSigner
    from tuf.api.metadata import Metadata

    forged = Metadata.from_bytes(keep)
    forged.signed.version += 1
    forged.signatures.clear()
    forged.sign(CryptoSigner.generate_ed25519())
    stamp.write_bytes(forged.to_bytes())
    err = host.cli("update", "--repo", host.repo, fail=True)
    assert "did not verify" in err and "timestamp was signed by 0/1 keys" in err, err
    stamp.write_bytes(keep)
    assert "2 patches verified" in host.update()

    # the repository rolled back to the state before version 2
    current = host.tmp / "current"
    shutil.copytree(public, current)
    shutil.rmtree(public)
    shutil.copytree(saved, public)
    err = host.cli("update", "--repo", host.repo, fail=True)
    assert "did not verify" in err and "BadVersionNumberError" in err, err
    shutil.rmtree(public)
    shutil.copytree(current, public)

    # expired metadata
    repomod.refresh(str(host.repo), timestamp_days=-1)
    err = host.cli("update", "--repo", host.repo, fail=True)
    assert "expired" in err.lower(), err
    assert [p["version"] for p in json.loads(host.cli("list", "--json"))] == [1, 2]
