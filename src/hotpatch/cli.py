"""The ``hotpatch`` command line (click). It only parses, calls :mod:`hotpatch.api`, and prints.

Every error is one line on stderr, ``hotpatch: error: <what>``, with exit status 1 (2 for bad usage, as
click does); no traceback unless ``HOTPATCH_DEBUG=1``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from .errors import HotpatchError

F = TypeVar("F", bound=Callable[..., Any])


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"hotpatch: error: {message}", err=True)
    sys.exit(code)


def guarded(fn: F) -> F:
    """Turn HotpatchError (and anything unexpected) into one line and a non-zero exit."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except HotpatchError as e:
            if os.environ.get("HOTPATCH_DEBUG"):
                raise
            _fail(str(e), e.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except BrokenPipeError:  # e.g. `hotpatch status --pid P | head -1`: stop quietly, like a SIGPIPE
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(141)
        except Exception as e:
            if os.environ.get("HOTPATCH_DEBUG"):
                raise
            _fail(f"internal error: {type(e).__name__}: {e}", 3)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper  # type: ignore[return-value]


class _Group(click.Group):
    """The command group: click's usage errors become one ``hotpatch: error:`` line too (exit 2)."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        try:
            rv = super().main(*args, **{**kwargs, "standalone_mode": False})
        except click.ClickException as e:
            if isinstance(e, getattr(click.exceptions, "NoArgsIsHelpError", ())):  # bare `hotpatch`: the help
                e.show()
                sys.exit(e.exit_code)
            ctx = getattr(e, "ctx", None)
            _fail(e.format_message() + (f" (see '{ctx.command_path} --help')" if ctx else ""), e.exit_code)
        except click.Abort:
            _fail("aborted", 1)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hotpatch")
def main() -> None:
    """Live-patch functions of running Linux x86-64 processes."""


@main.command()
@click.argument("sources", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option(
    "--target",
    "target",
    required=True,
    type=click.Path(dir_okay=False),
    help="The program or library file whose functions the sources replace.",
)
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False), help="Patch file to write.")
@click.option("--name", help="Patch name (default: the output file's name).")
@click.option(
    "--version",
    "version",
    type=click.IntRange(min=0),
    default=1,
    show_default=True,
    help="Integer version; a newer version replaces an older one.",
)
@click.option(
    "--ordinary-sites",
    is_flag=True,
    help="Redirect every function with a 5-byte jump at its entry (protocols R, B), never a short jump.",
)
@click.option(
    "--function",
    "functions",
    multiple=True,
    help="A function the patch replaces, mangled or as g++ prints it ('DemoClass::say_hello(int, std::string_view)'; "
    "without the parameters when it has no overload); repeat for several. Default: every function of TARGET the "
    "SOURCES define.",
)
@click.option(
    "--allow-clones",
    is_flag=True,
    help="Build even when a replaced function has compiler clones (.part.N, .constprop.N, .isra.N…) the SOURCES do "
    "not replace: the callers of those clones keep the old code.",
)
@guarded
def build(
    sources: tuple[str, ...],
    target: str,
    out: str,
    name: str | None,
    version: int,
    ordinary_sites: bool,
    functions: tuple[str, ...],
    allow_clones: bool,
) -> None:
    """Compile SOURCES into one patch file for TARGET."""
    from .elf.cxxnames import pretty
    from .patch.build import build as do_build

    wanted = list(functions) or None
    res = do_build(
        list(sources),
        target,
        out,
        name=name,
        version=version,
        ordinary_sites=ordinary_sites,
        functions=wanted,
        allow_clones=allow_clones,
    )
    m = res.manifest

    def shown(f: Any) -> str:
        n = len(f.slots)
        return pretty(f.symbol) + (f" (and {n} vtable slot{'s' if n > 1 else ''})" if n else "")

    click.echo(
        f"built {out}: patch {m.name} version {m.version} for {m.file} (build-id {m.build_id[:12]}…), "
        f"replaces {', '.join(shown(f) for f in m.functions)}"
    )
    for note in res.notes:
        click.echo(f"note: {note}")


def _choice(name: str, choices: list[str], help: str) -> Callable[[F], F]:
    """A ``--name`` option taking one of ``choices``, the first being the default."""
    return click.option(name, type=click.Choice(choices), default=choices[0], show_default=True, help=help)


_PROTOCOL_OPTION = _choice(
    "--protocol",
    ["auto", "no-stop", "rolling", "stop-the-world"],
    "How sites are written (DESIGN.md §4): no-stop (A, no thread stopped), rolling (R, every thread seen out "
    "of the overwritten bytes; through perf samples, else stopped one at a time), stop-the-world (B); auto picks "
    "the best each site allows.",
)


def _pause(protocol: str, threads: int, pause_us: float) -> str:
    """How long threads were stopped, in the words of the protocol used."""
    if protocol == "B":
        return f"protocol B: {threads} threads stopped for {pause_us:.0f} µs"
    return f"protocol {protocol}: {threads} threads traced, none stopped together, longest stop {pause_us:.0f} µs"


def _targets(f: F) -> F:
    """The options choosing the target processes: one --pid, or every process mapping a file or a build."""
    f = click.option("--json", "as_json", is_flag=True, help="With --exe/--build-id: one JSON document.")(f)
    f = click.option("--build-id", "build_id", help="Every running process that maps a module with this GNU build-id.")(
        f
    )
    f = click.option(
        "--exe", "exe", type=click.Path(dir_okay=False), help="Every running process that maps this file."
    )(f)
    return click.option("--pid", type=int, help="Target process.")(f)


def _chosen_pids(pid: int | None, exe: str | None, build_id: str | None) -> list[int] | None:
    """None for a single --pid, else the PIDs --exe or --build-id selects; exits 2 unless exactly one of the
    three is given, 1 when they select no process."""
    from .every import processes_mapping_build, processes_mapping_file

    if sum(x is not None for x in (pid, exe, build_id)) != 1:
        _fail("give exactly one of --pid, --exe and --build-id", 2)
    if pid is not None:
        return None
    pids = processes_mapping_file(exe) if exe is not None else processes_mapping_build(str(build_id).lower())
    if not pids:
        _fail(f"no running process maps {exe if exe is not None else 'build-id ' + str(build_id)}")
    return pids


def _report_all(results: list[Any], as_json: bool) -> None:
    """One line per process and a summary (or one JSON document); exit 1 when any process failed."""
    from .every import summary

    if as_json:
        click.echo(json.dumps({"results": [r._asdict() for r in results], "summary": summary(results)}, indent=2))
    else:
        for r in results:
            click.echo(f"PID {r.pid} (parent {r.ppid}, wave {r.wave}): {r.outcome}: {r.message}")
        counts = summary(results)
        click.echo(f"{counts.pop('processes')} processes: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    if not all(r.ok for r in results):
        sys.exit(1)


@main.command()
@_targets
@click.argument("patch", type=click.Path(dir_okay=False), required=False)
@_PROTOCOL_OPTION
@_choice(
    "--consistency",
    ["none", "stack"],
    "stack: switch only when no thread has a replaced function on its stack (the kernel livepatch model, per "
    "function), waiting up to --timeout; the switch then stops every thread for the check and the writes.",
)
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    help="Seconds --consistency stack waits before giving up (nothing written).",
)
@_choice(
    "--via",
    ["code", "got"],
    "code: redirect each function at its entry. got: change no code; point the GOT slots of the modules "
    "importing each function at the replacement (one aligned store each).",
)
@click.option(
    "--importer",
    "importers",
    multiple=True,
    help="With --via got: only the slots of this module (file name, e.g. libfoo.so.1); repeat for several.",
)
@click.option(
    "--from-repo",
    "from_repo",
    is_flag=True,
    help="Apply the newest verified patches of the repository "
    "(read by the last 'hotpatch update') that match the process's modules, each only when newer.",
)
@click.option("--all", "all_", is_flag=True, help="With --from-repo: every process that maps a patched module.")
@guarded
def apply(
    pid: int | None,
    exe: str | None,
    build_id: str | None,
    as_json: bool,
    from_repo: bool,
    all_: bool,
    patch: str | None,
    protocol: str,
    consistency: str,
    timeout_s: float,
    via: str,
    importers: tuple[str, ...],
) -> None:
    """Apply the patch file PATCH to process PID, or to every process of a program (--exe, --build-id: in
    parallel, parents before their children)."""
    from functools import partial

    from .api import ApplyOptions, attach
    from .elf.cxxnames import pretty
    from .every import apply_one, run_all
    from .patch.bundle import PatchFile

    options = ApplyOptions(protocol, consistency, timeout_s, via, importers)
    if from_repo or all_:
        _apply_from_repo(patch, pid, exe, build_id, all_, options, as_json)
        return
    if patch is None:
        _fail("give a PATCH file, or --from-repo", 2)
    assert patch is not None
    pf = PatchFile(patch)
    pids = _chosen_pids(pid, exe, build_id)
    if pids is not None:
        if build_id is not None and build_id.lower() != pf.manifest.build_id:
            _fail(f"{patch} is a patch for build-id {pf.manifest.build_id}, not {build_id}")
        _report_all(run_all(pids, partial(apply_one, patch, options)), as_json)
        return
    assert pid is not None
    with attach(pid) as target:
        rep = target.apply(pf, *options)
    what = f"upgraded from version {rep.replaced_version}" if rep.replaced_version is not None else "applied"

    def site(sym: str, addr: int) -> str:
        n = sum(1 for s, _ in rep.slots if s == sym)
        impl = f" (IFUNC: this process uses {rep.implementations[sym]})" if sym in rep.implementations else ""
        return f"{pretty(sym)}{impl} at {addr:#x}" + (f" and {n} vtable slot{'s' if n > 1 else ''}" if n else "")

    parts = [site(sym, addr) for sym, addr in rep.sites]
    importers_of: dict[str, list[str]] = {}
    for sym, _, importer in rep.got:
        importers_of.setdefault(sym, []).append(os.path.basename(importer))
    for sym, mods in importers_of.items():
        n = len(mods)
        parts.append(f"{pretty(sym)} in {n} GOT slot{'s' if n > 1 else ''} of {', '.join(sorted(set(mods)))}")
    click.echo(
        f"{what}: patch {rep.name} version {rep.version} to PID {pid}: "
        + ", ".join(parts)
        + f" ({_pause(rep.protocol, rep.threads, rep.pause_us)})"
    )


def _apply_from_repo(
    patch: str | None, pid: int | None, exe: str | None, build_id: str | None, all_: bool, options: Any, as_json: bool
) -> None:
    """``apply --from-repo (--pid PID | --all)``: the newest verified patches for the modules mapped."""
    from functools import partial

    from .every import apply_repo_one, processes_mapping_build, run_all
    from .registry.client import cached, newest_for, repository_id

    if patch is not None or exe is not None or build_id is not None or (pid is None) == (not all_):
        _fail("--from-repo takes --pid PID or --all, and no PATCH file", 2)
    published = cached()
    chosen = newest_for({p.build_id for p in published}, published)
    pids = (
        [pid]
        if pid is not None
        else sorted({q for b in {p.build_id for p in chosen} for q in processes_mapping_build(b)})
    )
    if not pids:
        _fail("no running process maps a module the repository has patches for")
    pairs = [(p.build_id, p.path) for p in chosen]
    _report_all(run_all(pids, partial(apply_repo_one, pairs, options._replace(origin=repository_id()))), as_json)


@main.command()
@_targets
@click.argument("name", required=False)
@click.option("--all", "all_", is_flag=True, help="Revert every applied patch.")
@_PROTOCOL_OPTION
@guarded
def revert(
    pid: int | None, exe: str | None, build_id: str | None, as_json: bool, name: str | None, all_: bool, protocol: str
) -> None:
    """Revert the patch NAME (or --all) in process PID, or in every process of a program (--exe, --build-id)."""
    from functools import partial

    from .api import attach
    from .every import revert_one, run_all

    if bool(name) == all_:
        _fail("give either a patch NAME or --all", 2)
    pids = _chosen_pids(pid, exe, build_id)
    if pids is not None:
        _report_all(run_all(pids, partial(revert_one, None if all_ else name, protocol)), as_json)
        return
    assert pid is not None
    with attach(pid) as target:
        reps = target.revert(None if all_ else name, protocol)
    if not reps:
        click.echo(f"no patch is applied to PID {pid}")
    for rep in reps:
        kept = f"; its memory is kept while threads may run in it ({len(rep.retained)} region)" if rep.retained else ""
        click.echo(
            f"reverted: patch {rep.name} version {rep.version} in PID {pid} "
            f"({_pause(rep.protocol, rep.threads, rep.pause_us)}){kept}"
        )


@main.command()
@click.option("--pid", required=True, type=int, help="Target process.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@guarded
def status(pid: int, as_json: bool) -> None:
    """Show the patches applied to process PID, read from the process itself."""
    from .api import attach
    from .elf.cxxnames import pretty

    with attach(pid) as target:
        st = target.status()
    if as_json:
        click.echo(json.dumps(st.as_dict(), indent=2))
        return
    if not st.patches:
        click.echo(f"PID {pid}: no patch applied")
    for p in st.patches:
        click.echo(f"{p.name} version {p.version}: {p.state}, applied {p.applied_at} to {p.module}")
        for s in p.sites:
            impl = f" (IFUNC: {s.implementation})" if s.implementation else ""
            click.echo(f"  {pretty(s.symbol)}{impl} at {s.site:#x}  class={s.klass} protocol={s.protocol}")
    for addr, size in st.retained:
        click.echo(f"kept mapped: {size} bytes at {addr:#x} (a thread may still run in a reverted patch)")


@main.command()
@click.option("--seconds", type=float, default=1.5, show_default=True, help="How long to watch each phase.")
@guarded
def demo(seconds: float) -> None:
    """Build a small multithreaded C/C++ program, patch it live, revert, and stop it."""
    from .demo import run

    run(seconds, click.echo)


CFLAGS = "-fpatchable-function-entry=16,14"
"""gcc flags that make every function hotpatch-ready: 14 NOPs before the entry and a 2-byte NOP at it (after
``endbr64`` with -fcf-protection): libpulp's layout (DESIGN.md §4). No post-link step is needed: the short
jump's displacement byte (F9 at the entry, F5 after endbr64) is harmless for a thread between the NOPs."""


@main.command()
@guarded
def cflags() -> None:
    """Print the gcc/g++ flags that make C/C++ code hotpatch-ready (patched with no stop, protocol A)."""
    click.echo(CFLAGS)


@main.command()
@click.argument("files", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON document: every file, function and total.")
@click.option("--functions", "functions", is_flag=True, help="One line per function, before the totals.")
@guarded
def scan(files: tuple[str, ...], as_json: bool, functions: bool) -> None:
    """Classify every function of the ELF or PE FILEs: patchable with no pause, with a blip, or not."""
    from .scan import scan_files

    results = scan_files(files)
    if as_json:
        click.echo(json.dumps({"files": [r.as_dict() for r in results]}, indent=2))
        return
    for r in results:
        click.echo("\n".join(r.report(functions)))


@main.group()
def repo() -> None:
    """Manage a signed patch repository (The Update Framework): init, add, remove, keys, refresh."""


@repo.command("init")
@click.argument("directory", type=click.Path(file_okay=False))
@guarded
def repo_init(directory: str) -> None:
    """Create a repository in DIRECTORY (its keys in DIRECTORY/keys, what to publish in DIRECTORY/public)."""
    from .registry.repo import init

    root = init(directory)
    click.echo(f"created repository {directory}; publish {directory}/public; clients trust {root} (update --root)")


@repo.command("add")
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("patch", type=click.Path(dir_okay=False))
@click.option("--about", default="", help="What the patch fixes, shown by 'hotpatch list'.")
@guarded
def repo_add(directory: str, patch: str, about: str) -> None:
    """Sign PATCH with the repository's targets key and publish it."""
    from .registry.repo import add

    path, custom = add(directory, patch, about)
    click.echo(
        f"published {path}: patch {custom['name']} version {custom['version']} for build-id {custom['build_id']}"
    )


@repo.command("remove")
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("name")
@guarded
def repo_remove(directory: str, name: str) -> None:
    """Withdraw every version of patch NAME."""
    from .registry.repo import remove

    click.echo(f"withdrew {', '.join(remove(directory, name))}")


@repo.command("keys")
@click.argument("directory", type=click.Path(file_okay=False))
@guarded
def repo_keys(directory: str) -> None:
    """Show the key ids each role of the repository trusts."""
    from .registry.repo import keys

    for role, ids in keys(directory).items():
        click.echo(f"{role}: {', '.join(ids)}")


@repo.command("refresh")
@click.argument("directory", type=click.Path(file_okay=False))
@guarded
def repo_refresh(directory: str) -> None:
    """Re-sign the snapshot and timestamp (a timestamp expires after one day)."""
    from .registry.repo import refresh

    refresh(directory)
    click.echo(f"re-signed the snapshot and timestamp of {directory}")


@main.command()
@click.option("--repo", "repo_url", help="Repository: an http(s) URL or a directory (default: the last one).")
@click.option("--root", type=click.Path(dir_okay=False), help="Root metadata to trust (the first time).")
@guarded
def update(repo_url: str | None, root: str | None) -> None:
    """Read the repository through TUF and fetch its patches, verified."""
    from .registry.client import update as do_update

    patches = do_update(repo_url, root)
    click.echo(f"{len(patches)} patches verified" + "".join(f"\n  {p.name} version {p.version}" for p in patches))


@main.command()
@click.option("--repo", "repo_url", help="Repository: an http(s) URL or a directory (default: the last one).")
@click.option("--interval", type=click.FloatRange(min=0.1), default=30.0, show_default=True, help="Seconds per round.")
@click.option("--audit", type=click.Path(dir_okay=False), help="Append the JSON audit lines here (default: stderr).")
@click.option("--metrics", help="Serve Prometheus metrics on this loopback HOST:PORT (e.g. 127.0.0.1:9464).")
@guarded
def agent(repo_url: str | None, interval: float, audit: str | None, metrics: str | None) -> None:
    """Keep every process of this host in line with the repository: apply, upgrade, revert; until SIGTERM."""
    from .registry.agent import main as run_agent

    run_agent(repo_url, interval, audit, metrics)


@main.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@guarded
def list_(as_json: bool) -> None:
    """Show every patch of the last verified repository read: name, version, build-id, functions, about."""
    from .elf.cxxnames import pretty
    from .registry.client import cached

    patches = cached()
    if as_json:
        click.echo(json.dumps([p._asdict() for p in patches], indent=2))
        return
    for p in patches:
        click.echo(f"{p.name} version {p.version} for {p.file} (build-id {p.build_id}): {p.about}")
        click.echo("  replaces " + ", ".join(pretty(f) for f in p.functions))


if __name__ == "__main__":
    main()
