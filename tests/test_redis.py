"""Real input: patch Debian's stripped PIE ``redis-server`` while ``redis-benchmark`` runs against it.

The test starts its own redis-server on 127.0.0.1 (a free port, no persistence), then, with
``redis-benchmark`` (bounded by ``-n`` and a timeout) and a background key writer running, builds and
applies a patch replacing ``pingCommand`` with one that answers ``+PATCHED`` through redis's own exported
``addReplyStatus`` (the only names in the binary are its ``.dynsym`` exports). It checks that PING answers
``PATCHED``, that revert brings ``PONG`` back, that redis-benchmark reported no error, that every key
written before and during the patch reads back, that every PING reply seen meanwhile was one of the two,
and that the server is alive and untraced at the end. All traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import Procs, assert_running, run_cli
from hotpatch.elf.image import open_elf

HOST = "127.0.0.1"
PATCH_SOURCE = """\
/* Replacement for redis 7's `void pingCommand(client *c)`: answer +PATCHED. */
void addReplyStatus(void *c, const char *status);

void pingCommand(void *c)
{
    addReplyStatus(c, "PATCHED");
}
"""
PRE_KEYS = 2000  # keys written before the load starts
WRITER_MAX_KEYS = 200_000  # bound on the background writer's keys
WRITER_MAX_S = 60.0  # and on its running time
BENCH_TIMEOUT_S = 120.0
BENCH_CLIENTS = 20
BENCH_ARGS = ("-t", "ping,set,get", "-n", "200000", "-c", str(BENCH_CLIENTS), "-P", "4", "-q")


def _tools() -> dict[str, str]:
    """Paths of redis-server, redis-cli and redis-benchmark; skip the test when one is missing."""
    found = {name: shutil.which(name) for name in ("redis-server", "redis-cli", "redis-benchmark")}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (apt-get install redis-server redis-tools; CI does)")
    return {name: str(path) for name, path in found.items()}


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class Resp:
    """A minimal RESP2 client over one TCP connection to 127.0.0.1 (enough for PING/SET/GET/MGET)."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.buf = b""

    def close(self) -> None:
        """Close the connection."""
        self.sock.close()

    def send(self, *args: str | bytes) -> None:
        """Send one command as a RESP array of bulk strings (replies are read with :meth:`reply`)."""
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            b = a.encode() if isinstance(a, str) else a
            out.append(b"$%d\r\n%s\r\n" % (len(b), b))
        self.sock.sendall(b"".join(out))

    def _line(self) -> bytes:
        """One CRLF-terminated line of the reply stream, without the CRLF."""
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exact(self, n: int) -> bytes:
        """``n`` bytes of bulk data and the CRLF after them (dropped)."""
        while len(self.buf) < n + 2:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n + 2 :]
        return data

    def reply(self) -> object:
        """Read one reply: str for +status, bytes/None for bulk, int, list; an -error raises RuntimeError."""
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RuntimeError(f"redis error: {rest.decode(errors='replace')}")
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self._exact(n)
        if kind == b"*":
            return [self.reply() for _ in range(int(rest))]
        raise RuntimeError(f"unexpected RESP line {line!r}")

    def call(self, *args: str | bytes) -> object:
        """Send one command and return its reply."""
        self.send(*args)
        return self.reply()


def _start_redis(procs: Procs, server: str, workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    """Start redis-server on a free 127.0.0.1 port (retried if the port is taken meanwhile); wait for PONG."""
    for _attempt in range(5):
        port = _free_port()
        proc = procs.start(
            server,
            "--port",
            str(port),
            "--bind",
            HOST,
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
            "--dir",
            str(workdir),
            "--logfile",
            str(workdir / f"redis-{port}.log"),
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                c = Resp(port, timeout=2)
            except OSError:
                time.sleep(0.02)
                continue
            try:
                if c.call("PING") == "PONG":
                    return proc, port
            except (OSError, RuntimeError):
                pass  # still loading
            finally:
                c.close()
            time.sleep(0.02)
        if proc.poll() is None:
            os.kill(proc.pid, 9)
        proc.wait(timeout=10)
    pytest.fail("redis-server did not start on 127.0.0.1 (5 attempts)")


def _cli(cli: str, port: int, *args: str) -> str:
    """Run ``redis-cli -h 127.0.0.1 -p PORT ARGS`` and return its stripped stdout."""
    res = subprocess.run(
        [cli, "-h", HOST, "-p", str(port), *args], capture_output=True, text=True, timeout=30, check=False
    )
    assert res.returncode == 0, f"redis-cli {' '.join(args)}: {res.stderr}"
    return res.stdout.strip()


class Client(threading.Thread):
    """A background client calling :meth:`step` with a running count until stopped, bounded by
    WRITER_MAX_KEYS calls and WRITER_MAX_S seconds; any error is kept for the test to report."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.stop_event = threading.Event()
        self.error: BaseException | None = None

    def step(self, c: Resp, i: int) -> None:
        """One request."""
        raise NotImplementedError

    def run(self) -> None:
        """Call :meth:`step` until stopped or a bound is reached."""
        deadline = time.monotonic() + WRITER_MAX_S
        try:
            c = Resp(self.port)
            try:
                i = 0
                while not self.stop_event.is_set() and i < WRITER_MAX_KEYS and time.monotonic() < deadline:
                    self.step(c, i)
                    i += 1
            finally:
                c.close()
        except BaseException as e:
            self.error = e


class Writer(Client):
    """SET ``during:N`` = ``vN`` one at a time, remembering every acknowledged key."""

    def __init__(self, port: int) -> None:
        super().__init__(port)
        self.written: list[int] = []

    def step(self, c: Resp, i: int) -> None:
        """SET one key; it must be acknowledged."""
        reply = c.call("SET", f"during:{i}", f"v{i}")
        assert reply == "OK", f"SET during:{i} answered {reply!r}"
        self.written.append(i)


class Pinger(Client):
    """PING in a loop, counting the distinct replies; every reply must be PONG or PATCHED (invariant 4)."""

    def __init__(self, port: int) -> None:
        super().__init__(port)
        self.replies: dict[str, int] = {}

    def step(self, c: Resp, i: int) -> None:
        """One PING."""
        reply = str(c.call("PING"))
        self.replies[reply] = self.replies.get(reply, 0) + 1


def _wait_load_started(port: int, bench_clients: int, writer: Writer, pinger: Pinger, timeout: float = 20.0) -> None:
    """Wait until redis-benchmark's connections are open (INFO connected_clients counts them beside the
    writer's, the pinger's and this one) and the writer and the pinger have had replies."""
    c = Resp(port)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = c.call("INFO", "clients")
            assert isinstance(info, bytes)
            lines = info.decode().splitlines()
            fields = dict(line.split(":", 1) for line in lines if ":" in line and not line.startswith("#"))
            if int(fields["connected_clients"]) >= bench_clients + 3 and writer.written and pinger.replies:
                return
            time.sleep(0.005)
    finally:
        c.close()
    pytest.fail(f"the load did not start within {timeout} s (writer: {writer.error!r}, pinger: {pinger.error!r})")


def test_patch_redis_ping_under_load(procs: Procs, tmp_path: Path) -> None:
    """pingCommand of a running redis-server is replaced and reverted under redis-benchmark load."""
    tools = _tools()
    server_file = os.path.realpath(tools["redis-server"])  # Debian: a symlink to redis-check-rdb
    server, port = _start_redis(procs, tools["redis-server"], tmp_path)
    pid = server.pid

    # the file we build against is the one the process maps (same build-id)
    exe, built = open_elf(f"/proc/{pid}/exe", "module"), open_elf(server_file, "target")
    try:
        assert exe.build_id is not None and exe.build_id == built.build_id
        assert not built.has_symtab, "expected Debian's stripped redis-server"
    finally:
        exe.close()
        built.close()

    src = tmp_path / "ping_patched.c"
    src.write_text(PATCH_SOURCE)
    patch = tmp_path / "redis-ping.hp"
    res = run_cli("build", src, "--target", server_file, "-o", patch, "--name", "redis-ping", "--version", "1")
    assert res.returncode == 0, res.stderr
    assert "pingCommand" in res.stdout

    # keys written before the load
    c = Resp(port)
    try:
        for i in range(PRE_KEYS):
            c.send("SET", f"before:{i}", f"b{i}")
        assert all(c.reply() == "OK" for _ in range(PRE_KEYS))
    finally:
        c.close()

    bench = procs.start(tools["redis-benchmark"], "-h", HOST, "-p", str(port), *BENCH_ARGS)
    writer, pinger = Writer(port), Pinger(port)
    try:
        writer.start()
        pinger.start()
        _wait_load_started(port, BENCH_CLIENTS, writer, pinger)

        res = run_cli("apply", "--pid", pid, patch)
        assert res.returncode == 0, res.stderr
        assert "applied: patch redis-ping version 1" in res.stdout
        assert bench.poll() is None, "redis-benchmark finished before the apply ended (raise -n)"
        assert_running(pid)
        assert _cli(tools["redis-cli"], port, "PING") == "PATCHED"

        res = run_cli("status", "--pid", pid, "--json")
        assert res.returncode == 0, res.stderr
        st = json.loads(res.stdout)
        applied = [(p["name"], p["version"], p["state"]) for p in st["patches"]]
        assert applied == [("redis-ping", 1, "applied")]
        assert [s["symbol"] for s in st["patches"][0]["sites"]] == ["pingCommand"]

        time.sleep(0.3)  # let the benchmark and the writer run against the patched server
        written_at_revert = len(writer.written)

        res = run_cli("revert", "--pid", pid, "redis-ping")
        assert res.returncode == 0, res.stderr
        assert "reverted: patch redis-ping version 1" in res.stdout
        assert _cli(tools["redis-cli"], port, "PING") == "PONG"
        assert_running(pid)
    finally:
        writer.stop_event.set()
        pinger.stop_event.set()
        writer.join(timeout=30)
        pinger.join(timeout=30)

    try:
        out, err = bench.communicate(timeout=BENCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"redis-benchmark did not finish within {BENCH_TIMEOUT_S} s")
    text = (out + err).decode(errors="replace")
    assert bench.returncode == 0, f"redis-benchmark exited {bench.returncode}:\n{text[-2000:]}"
    segments = text.replace("\r", "\n").splitlines()
    final_lines = [seg.strip() for seg in segments if "requests per second" in seg]
    for test_name in ("PING_INLINE", "PING_MBULK", "SET", "GET"):
        assert any(line.startswith(f"{test_name}:") for line in final_lines), f"{test_name} missing:\n{text[-2000:]}"
    assert "error" not in text.lower(), text[-2000:]

    assert writer.error is None, f"writer: {writer.error!r}"
    assert pinger.error is None, f"pinger: {pinger.error!r}"
    assert written_at_revert > 0 and len(writer.written) > written_at_revert
    assert set(pinger.replies) <= {"PONG", "PATCHED"}, pinger.replies
    assert pinger.replies.get("PATCHED", 0) > 0, pinger.replies

    # every key written before and during the patch reads back
    c = Resp(port)
    try:
        batch = 1000
        for prefix, value, ids in (("before", "b", list(range(PRE_KEYS))), ("during", "v", writer.written)):
            for lo in range(0, len(ids), batch):
                chunk = ids[lo : lo + batch]
                got = c.call("MGET", *(f"{prefix}:{i}" for i in chunk))
                want = [f"{value}{i}".encode() for i in chunk]
                assert got == want, f"{prefix} keys {chunk[0]}..{chunk[-1]} do not read back"
        assert c.call("PING") == "PONG"
    finally:
        c.close()

    res = run_cli("status", "--pid", pid, "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["patches"] == []
    assert_running(pid)
    assert server.poll() is None
