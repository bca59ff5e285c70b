"""Real input: patch Debian's stripped PIE ``redis-server`` while ``redis-benchmark`` runs against it.

Each test starts its own redis-server on 127.0.0.1 (a free port, no persistence), writes keys, then, with
``redis-benchmark`` (bounded by ``-n`` and a timeout) and a background key writer and PING client running,
applies and reverts a patch replacing ``pingCommand`` with one that answers ``+PATCHED`` through redis's own
exported ``addReplyStatus`` (the only names in the binary are its ``.dynsym`` exports):

* ``test_patch_redis_ping_under_load``: once, through the command line (``apply``, ``status``, ``revert``);
* ``test_patch_redis_ping_100_cycles_under_load``: 100 times in a row through ``hotpatch.attach(pid)``, with
  redis-benchmark run again and again (each run bounded) until the cycles end; after every apply a PING on a
  connection of its own must answer ``PATCHED``, after every revert ``PONG``.

Both check that redis-benchmark reported no error in any run, that every key written before and during the
cycles reads back with its value (and no other key of the writer's appeared), that every PING reply the
background client saw was ``PONG`` or ``PATCHED`` (both seen), and that the server is alive and untraced at the
end with no patch recorded. All traffic goes to 127.0.0.1 only.
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
from typing import NamedTuple

import pytest

import hotpatch
from conftest import Procs, assert_running, assert_runs_stripped, free_port, run_cli

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
WRITER_MAX_S = 60.0  # and on its running time (by default)
BENCH_TIMEOUT_S = 120.0
BENCH_CLIENTS = 20
BENCH_TESTS = ("PING_INLINE", "PING_MBULK", "SET", "GET")  # what ``-t ping,set,get`` runs, in its output
CYCLES = 100  # apply/revert cycles of the long test
CYCLES_MAX_S = 75.0  # bound on their time (and on the clients' and the benchmark loop's)
LOOP_REQUESTS = 20_000  # -n of each redis-benchmark run of the long test
LOOP_MAX_RUNS = 100


def _tools() -> dict[str, str]:
    """Paths of redis-server, redis-cli and redis-benchmark; skip the test when one is missing."""
    found = {name: shutil.which(name) for name in ("redis-server", "redis-cli", "redis-benchmark")}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (apt-get install redis-server redis-tools; CI does)")
    return {name: str(path) for name, path in found.items()}


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
        port = free_port(HOST)
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
    WRITER_MAX_KEYS calls and ``max_s`` seconds; any error is kept for the test to report."""

    def __init__(self, port: int, max_s: float = WRITER_MAX_S) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.max_s = max_s
        self.stop_event = threading.Event()
        self.error: BaseException | None = None

    def step(self, c: Resp, i: int) -> None:
        """One request."""
        raise NotImplementedError

    def run(self) -> None:
        """Call :meth:`step` until stopped or a bound is reached."""
        deadline = time.monotonic() + self.max_s
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

    def __init__(self, port: int, max_s: float = WRITER_MAX_S) -> None:
        super().__init__(port, max_s)
        self.written: list[int] = []

    def step(self, c: Resp, i: int) -> None:
        """SET one key; it must be acknowledged."""
        reply = c.call("SET", f"during:{i}", f"v{i}")
        assert reply == "OK", f"SET during:{i} answered {reply!r}"
        self.written.append(i)


class Pinger(Client):
    """PING in a loop, counting the distinct replies; every reply must be PONG or PATCHED (invariant 4)."""

    def __init__(self, port: int, max_s: float = WRITER_MAX_S) -> None:
        super().__init__(port, max_s)
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


class Server(NamedTuple):
    """A redis-server started for one test, with the patch built for it."""

    tools: dict[str, str]
    proc: subprocess.Popen[bytes]
    port: int
    patch: Path


def _start_server_and_build(procs: Procs, tmp_path: Path) -> Server:
    """Start a redis-server, check it runs Debian's stripped file, build the patch against that file (its
    ``.dynsym`` names only) and write PRE_KEYS keys ``before:N`` = ``bN``."""
    tools = _tools()
    server_file = os.path.realpath(tools["redis-server"])  # Debian: a symlink to redis-check-rdb
    proc, port = _start_redis(procs, tools["redis-server"], tmp_path)
    assert_runs_stripped(proc.pid, server_file)

    src = tmp_path / "ping_patched.c"
    src.write_text(PATCH_SOURCE)
    patch = tmp_path / "redis-ping.hp"
    res = run_cli("build", src, "--target", server_file, "-o", patch, "--name", "redis-ping", "--version", "1")
    assert res.returncode == 0, res.stderr
    assert "pingCommand" in res.stdout

    c = Resp(port)
    try:
        for i in range(PRE_KEYS):
            c.send("SET", f"before:{i}", f"b{i}")
        assert all(c.reply() == "OK" for _ in range(PRE_KEYS))
    finally:
        c.close()
    return Server(tools, proc, port, patch)


def _bench_argv(server: Server, requests: int) -> list[str]:
    """redis-benchmark's command line: PING (inline and bulk), SET and GET, ``requests`` each, pipelined."""
    return [
        server.tools["redis-benchmark"],
        "-h",
        HOST,
        "-p",
        str(server.port),
        "-t",
        "ping,set,get",
        "-n",
        str(requests),
        "-c",
        str(BENCH_CLIENTS),
        "-P",
        "4",
        "-q",
    ]


def _bench_output(bench: subprocess.Popen[bytes]) -> tuple[int | None, str]:
    """Wait (BENCH_TIMEOUT_S at most) for a redis-benchmark run: (exit status, stdout and stderr). A run that
    does not end in time is killed (by PID) and its status is None."""
    try:
        out, err = bench.communicate(timeout=BENCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.kill(bench.pid, 9)
        out, err = bench.communicate(timeout=30)
        return None, (out + err).decode(errors="replace")
    return bench.returncode, (out + err).decode(errors="replace")


def _check_bench(returncode: int | None, text: str) -> None:
    """A redis-benchmark run ended in time, with status 0, reported every test and no error."""
    assert returncode is not None, f"redis-benchmark did not finish within {BENCH_TIMEOUT_S} s:\n{text[-2000:]}"
    assert returncode == 0, f"redis-benchmark exited {returncode}:\n{text[-2000:]}"
    segments = text.replace("\r", "\n").splitlines()
    final_lines = [seg.strip() for seg in segments if "requests per second" in seg]
    for test_name in BENCH_TESTS:
        assert any(line.startswith(f"{test_name}:") for line in final_lines), f"{test_name} missing:\n{text[-2000:]}"
    assert "error" not in text.lower(), text[-2000:]


class BenchLoop(threading.Thread):
    """redis-benchmark run again and again (LOOP_REQUESTS requests per test each time) until stopped, at most
    LOOP_MAX_RUNS runs and ``max_s`` seconds; keeps every run's (exit status, output) for :func:`_check_bench`.
    ``bounded`` tells whether it ended on a bound instead of being stopped."""

    def __init__(self, procs: Procs, server: Server, max_s: float) -> None:
        super().__init__(daemon=True)
        self.procs, self.argv, self.max_s = procs, _bench_argv(server, LOOP_REQUESTS), max_s
        self.stop_event = threading.Event()
        self.runs: list[tuple[int | None, str]] = []
        self.bounded = False
        self.error: BaseException | None = None

    def run(self) -> None:
        """Run redis-benchmark until stopped or a bound is reached (the run under way is always finished)."""
        deadline = time.monotonic() + self.max_s
        try:
            while not self.stop_event.is_set():
                if len(self.runs) >= LOOP_MAX_RUNS or time.monotonic() > deadline:
                    self.bounded = True
                    return
                self.runs.append(_bench_output(self.procs.start(*self.argv)))
        except BaseException as e:
            self.error = e


def _stop_clients(*clients: Client | BenchLoop) -> None:
    """Stop the background clients and wait for them (bounded: a benchmark run under way ends within
    BENCH_TIMEOUT_S, a client's request times out sooner)."""
    for c in clients:
        c.stop_event.set()
    for c in clients:
        c.join(timeout=BENCH_TIMEOUT_S + 40)


def _check_clients(writer: Writer, pinger: Pinger, written_at_revert: int) -> None:
    """The writer and the pinger met no error, the writer kept writing after the (last) revert, and every
    PING reply was PONG or PATCHED, with PATCHED seen."""
    assert not writer.is_alive() and not pinger.is_alive(), "a background client did not stop"
    assert writer.error is None, f"writer: {writer.error!r}"
    assert pinger.error is None, f"pinger: {pinger.error!r}"
    assert written_at_revert > 0 and len(writer.written) > written_at_revert
    assert set(pinger.replies) <= {"PONG", "PATCHED"}, pinger.replies
    assert pinger.replies.get("PATCHED", 0) > 0, pinger.replies


def _check_data_and_server(server: Server, writer: Writer) -> None:
    """Every key written before and during the load reads back with its value, the writer's keys are exactly
    those it had acknowledged, PING answers PONG, no patch is recorded and the server runs untraced."""
    c = Resp(server.port)
    try:
        batch = 1000
        for prefix, value, ids in (("before", "b", list(range(PRE_KEYS))), ("during", "v", writer.written)):
            for lo in range(0, len(ids), batch):
                chunk = ids[lo : lo + batch]
                got = c.call("MGET", *(f"{prefix}:{i}" for i in chunk))
                want = [f"{value}{i}".encode() for i in chunk]
                assert got == want, f"{prefix} keys {chunk[0]}..{chunk[-1]} do not read back"
        during = c.call("KEYS", "during:*")
        assert isinstance(during, list) and len(during) == len(writer.written), "the writer's keys changed"
        assert c.call("PING") == "PONG"
    finally:
        c.close()

    pid = server.proc.pid
    res = run_cli("status", "--pid", str(pid), "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["patches"] == []
    assert_running(pid)
    assert server.proc.poll() is None


def test_patch_redis_ping_under_load(procs: Procs, tmp_path: Path) -> None:
    """pingCommand of a running redis-server is replaced and reverted under redis-benchmark load."""
    server = _start_server_and_build(procs, tmp_path)
    pid, port, patch = server.proc.pid, server.port, server.patch

    bench = procs.start(*_bench_argv(server, 200_000))
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
        assert _cli(server.tools["redis-cli"], port, "PING") == "PATCHED"

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
        assert _cli(server.tools["redis-cli"], port, "PING") == "PONG"
        assert_running(pid)
    finally:
        _stop_clients(writer, pinger)

    _check_bench(*_bench_output(bench))
    _check_clients(writer, pinger, written_at_revert)
    _check_data_and_server(server, writer)


def test_patch_redis_ping_100_cycles_under_load(procs: Procs, tmp_path: Path) -> None:
    """100 apply/revert cycles of pingCommand's patch through the API while redis-benchmark runs again and
    again and a writer and a pinger run: every cycle switches PING's answer, no client sees an error or a
    third answer, no data is lost, and the server ends alive, untraced and unpatched."""
    server = _start_server_and_build(procs, tmp_path)
    pid, port = server.proc.pid, server.port

    bench = BenchLoop(procs, server, CYCLES_MAX_S + 15)
    writer, pinger = Writer(port, CYCLES_MAX_S + 15), Pinger(port, CYCLES_MAX_S + 15)
    check: Resp | None = None
    cycle, step = 0, "before the cycles"
    try:
        bench.start()
        writer.start()
        pinger.start()
        _wait_load_started(port, BENCH_CLIENTS, writer, pinger)
        check = Resp(port)  # PING after every apply and revert
        deadline = time.monotonic() + CYCLES_MAX_S
        with hotpatch.attach(pid) as target:
            for cycle in range(CYCLES):
                assert time.monotonic() < deadline, f"only {cycle} cycles within {CYCLES_MAX_S} s"
                step = "apply"
                target.apply(str(server.patch))
                assert check.call("PING") == "PATCHED", f"cycle {cycle}: PING after apply"
                step = "revert"
                target.revert("redis-ping")
                assert check.call("PING") == "PONG", f"cycle {cycle}: PING after revert"
        step = "after the cycles"
        written_at_revert = len(writer.written)
        assert bench.is_alive() and writer.is_alive() and pinger.is_alive(), "the load ended before the cycles"
        time.sleep(0.2)  # the writer goes on after the last revert
        assert_running(pid)
    except Exception as e:
        if server.proc.poll() is None:
            raise
        raise AssertionError(f"redis-server ended (status {server.proc.returncode}) in cycle {cycle}, {step}") from e
    finally:
        if check is not None:
            check.close()
        _stop_clients(bench, writer, pinger)

    assert not bench.is_alive(), "the benchmark loop did not stop"
    assert bench.error is None, f"benchmark loop: {bench.error!r}"
    assert not bench.bounded, "the benchmark loop reached its bound before the cycles ended"
    assert bench.runs, "no redis-benchmark run"
    for returncode, text in bench.runs:
        _check_bench(returncode, text)
    _check_clients(writer, pinger, written_at_revert)
    _check_data_and_server(server, writer)
