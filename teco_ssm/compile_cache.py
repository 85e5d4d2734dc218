"""A persistent XLA compilation cache for the `teco-ssm` front end: a process that compiles a program an earlier
process already compiled (a resumed or restarted run, `teco-ssm sample` after `train`, the same stage in another
workdir) loads the executable from disk instead of compiling it again.

The paper-size steps are where this matters: the DMLab ConvS5 train step compiled for 7 minutes on an H100 and takes
about 20 s on a 2-core CPU, and a resumed run compiles exactly the same programs (docs/training.md, "Compile and
initialisation time").

The cache is JAX's own (`jax_compilation_cache_dir`); its key covers the program, the compiler flags, the devices and
the JAX version, so a cached executable is the one the compiler would produce. A CPU executable is machine code for
the CPU that compiled it, so the directory is scoped to this host: a subdirectory named by the jax and jaxlib
versions, the architecture and a digest of the CPU's model and feature flags (`host_tag`). A home directory shared by
different machines then never serves one machine's code to another. The root is, first found:
`TECO_SSM_COMPILATION_CACHE`, then `$XDG_CACHE_HOME/teco_ssm/xla` (`~/.cache/teco_ssm/xla`);
`TECO_SSM_COMPILATION_CACHE=off` (or 0, false, no, none) turns the cache off. `JAX_COMPILATION_CACHE_DIR`, JAX's
own variable, wins over both and is used as it is.
Programs that compiled in under `MIN_COMPILE_SECONDS` are not stored, and the directory is kept under `MAX_BYTES`
by evicting the least recently used entries (which also makes concurrent processes lock the directory, so one never
reads another's half-written entry).

Entries are found by the program and the options it was compiled with, which include the cache's own path: a cache
directory moved or copied elsewhere is not found there.

JAX (0.10) never replaces an entry it cannot read, and an entry whose write was cut off (a full disk, a killed
process) leaves a `<key>-cache` file without its `<key>-atime` record, after which every eviction, and so every new
entry, fails. This module repairs both: `repair` removes entries whose write did not finish when the cache is
configured, and a damaged entry found while reading (JAX's warning "Error reading persistent compilation cache
entry for '<name>'") has the entries of that program name removed at once (`_remove_damaged`), so the program
compiled again is stored again; one line on stderr names the folder each time.
"""
from __future__ import annotations

import hashlib
import os
import platform
import re
import sys
import tempfile
import warnings
from pathlib import Path

import jax
import jaxlib

ENV = "TECO_SSM_COMPILATION_CACHE"
OFF = ("off", "0", "false", "no", "none")  # values of ENV that turn the cache off (any case)
MAX_BYTES = 4 * 2 ** 30
MIN_COMPILE_SECONDS = 1.0


def host_tag(cpuinfo: str = "/proc/cpuinfo") -> str:
    """'jax<version>-jaxlib<version>-<arch>-<digest>': the digest covers the first CPU's 'model name' and 'flags'
    (or 'Features') lines of `cpuinfo` when it can be read (Linux), else the processor's name and the host's name, so
    that machines whose CPU cannot be described never share a directory."""
    described: dict[str, str] = {}  # the first CPU's lines; later CPUs repeat them
    try:
        with open(cpuinfo) as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("model name", "flags", "Features", "CPU part"):
                    described.setdefault(key, line.strip())
    except OSError:
        pass
    text = "\n".join(described.values()) or f"{platform.processor()}\n{platform.node()}"
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    return f"jax{jax.__version__}-jaxlib{jaxlib.__version__}-{platform.machine()}-{digest}"


def directory() -> Path | None:
    """The cache directory `configure` uses (see the module docstring), or None when the cache is off."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return Path(os.environ["JAX_COMPILATION_CACHE_DIR"]).expanduser()
    chosen = os.environ.get(ENV, "").strip()
    if chosen.lower() in OFF:
        return None
    if chosen:
        return Path(chosen).expanduser() / host_tag()
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):  # unset, empty or relative: the XDG specification's default
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "teco_ssm" / "xla" / host_tag()


def _can_write(path: Path) -> bool:
    """Whether this process can create a file in `path` (JAX's cache needs to, even to read: its lock file)."""
    try:
        with tempfile.TemporaryFile(dir=path):
            return True
    except OSError:
        return False


def configure() -> Path | None:
    """Turns JAX's persistent compilation cache on for this process, before anything compiles. Returns the
    directory, or None when it is off. A directory that cannot be created or written turns the cache off with one
    warning on stderr rather than failing the command (the cache only saves time)."""
    path = directory()
    if path is None:
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
        problem = None if _can_write(path) else "not writable"
    except OSError as error:
        problem = f"cannot create it ({error})"
    if problem:
        print(f"teco-ssm: compilation cache off: {path}: {problem}; set {ENV} to another directory or to 'off'",
              file=sys.stderr)
        if os.environ.get("JAX_COMPILATION_CACHE_DIR"):  # JAX would still try it on its own
            jax.config.update("jax_compilation_cache_dir", None)
        return None
    removed = repair(path)
    if removed:
        print(f"teco-ssm: compilation cache {path}: removed {removed} entries whose write did not finish (an "
              "interrupted run or a full disk); their programs are compiled and stored again", file=sys.stderr)
    _watch_damaged_entries(path)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return path


CACHE_SUFFIX, ATIME_SUFFIX = "-cache", "-atime"  # JAX's LRU cache files: jax/_src/lru_cache.py
_DAMAGED = re.compile(r"Error reading persistent compilation cache entry for '([^']+)'")


def repair(path: Path) -> int:
    """Removes the entries of `path` whose write did not finish: a `<key>-cache` file that is empty or has no
    `<key>-atime` record (JAX writes the record last), and a record without its entry. Returns how many entries
    were removed."""
    removed = 0
    names = set(os.listdir(path))
    for name in names:
        if name.endswith(CACHE_SUFFIX):
            key = name[:-len(CACHE_SUFFIX)]
            complete = key + ATIME_SUFFIX in names and os.path.getsize(path / name) > 0
        elif name.endswith(ATIME_SUFFIX):
            key = name[:-len(ATIME_SUFFIX)]
            complete = key + CACHE_SUFFIX in names
        else:
            continue
        if not complete:
            for suffix in (CACHE_SUFFIX, ATIME_SUFFIX):
                try:
                    os.remove(path / (key + suffix))
                except FileNotFoundError:
                    continue
            removed += name.endswith(CACHE_SUFFIX)
    return removed


def _remove_damaged(path: Path, program: str) -> int:
    """Removes every entry of program name `program` (JAX's keys are '<program name>-<hash>'), which holds the one
    JAX could not read; returns how many."""
    removed = 0
    for entry in path.glob(f"{glob_escape(program)}-*{CACHE_SUFFIX}"):
        key = entry.name[:-len(CACHE_SUFFIX)]
        for suffix in (CACHE_SUFFIX, ATIME_SUFFIX):
            try:
                os.remove(path / (key + suffix))
            except FileNotFoundError:
                continue
        removed += 1
    return removed


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def _watch_damaged_entries(path: Path) -> None:
    """Replaces JAX's warning about an unreadable cache entry by its removal and one line naming the folder."""
    warnings.filterwarnings("always", message="Error reading persistent compilation cache entry")
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        match = _DAMAGED.search(str(message))
        if match is None:
            return shown(message, category, filename, lineno, file, line)
        removed = _remove_damaged(path, match.group(1))
        print(f"teco-ssm: compilation cache {path}: an entry of {match.group(1)} could not be read ("
              f"{str(message).split(': ', 1)[-1]}); removed {removed} entries of that program, which is compiled "
              "and stored again", file=sys.stderr)

    warnings.showwarning = show
