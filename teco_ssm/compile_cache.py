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
directory moved or copied elsewhere is not found there. A damaged entry is reported with a warning and the program
compiled again, each time, until the directory is deleted.
"""
from __future__ import annotations

import hashlib
import os
import platform
import sys
import tempfile
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
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return path
