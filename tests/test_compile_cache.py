"""The front end's persistent compilation cache (`teco_ssm.compile_cache`): where it lives, that it is scoped to the
host, and that a second process loads what a first one compiled and computes the same values with it."""
import json
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jaxlib

from teco_ssm import compile_cache

ROOT = Path(__file__).resolve().parents[1]

CPU = ("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {first}\n\n"
       "processor\t: 1\nmodel name\t: Some CPU\nflags\t\t: {second}\n")

# A child process: the front end's setup, then one program compiled (or loaded) and run. The compile-time threshold
# is lowered after `configure` so the toy program is stored; the child reports what `configure` set first.
CHILD = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp
    from teco_ssm import compile_cache
    path = compile_cache.configure()
    settings = dict(dir=jax.config.jax_compilation_cache_dir,
                    min_seconds=jax.config.jax_persistent_cache_min_compile_time_secs,
                    max_bytes=jax.config.jax_compilation_cache_max_size)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    hits = []
    jax.monitoring.register_event_listener(
        lambda event, **kw: hits.append(event) if event == "/jax/compilation_cache/cache_hits" else None)

    def f(x):
        for k in range(20):
            x = jnp.sin(x) * 1.5 + jnp.cos(x * k)
        return x

    y = jax.device_get(jax.jit(f)(jnp.linspace(-2.0, 2.0, 64))).tolist()
    print(json.dumps(dict(path=None if path is None else str(path), settings=settings, hits=len(hits), y=y)))
""")


def start(env):
    """The child process with `env` over this one's environment (JAX's own cache variable removed)."""
    base = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    return subprocess.Popen([sys.executable, "-c", CHILD], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(base, PYTHONPATH=str(ROOT), **env))


def result(proc):
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def child(env):
    return result(start(env))


def child_with_stderr(env):
    proc = start(env)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1]), err


def entries(path, suffix="-cache"):
    return sorted(name for name in os.listdir(path) if name.endswith(suffix))


def test_a_damaged_entry_is_replaced_and_the_next_process_loads_every_entry(tmp_path):
    env = {compile_cache.ENV: str(tmp_path / "cache")}
    first = child(env)
    path = Path(first["path"])
    (entry,) = [path / name for name in entries(path) if name.startswith("jit_f-")]
    entry.write_bytes(entry.read_bytes()[:100])  # damaged: a truncated write
    second, err = child_with_stderr(env)
    assert second["y"] == first["y"] and second["hits"] == len(entries(path)) - 1
    assert f"compilation cache {path}: an entry of jit_f could not be read" in err
    assert "UserWarning" not in err
    assert entry.stat().st_size > 100  # stored again
    third, err = child_with_stderr(env)
    assert third["hits"] == len(entries(path)) and third["y"] == first["y"] and "compilation cache" not in err


def test_an_entry_whose_write_was_cut_off_is_removed_and_new_programs_are_stored_again(tmp_path):
    """An entry without its access-time record (the write stopped between the two files) made every later eviction,
    and so every new entry, fail."""
    env = {compile_cache.ENV: str(tmp_path / "cache")}
    first = child(env)
    path = Path(first["path"])
    (record,) = [path / name for name in entries(path, "-atime") if name.startswith("jit_f-")]
    record.unlink()
    (path / "jit_g-0123-cache").write_bytes(b"")  # an empty entry, begun and never written
    count = len(entries(path))
    second, err = child_with_stderr(env)
    assert f"compilation cache {path}: removed 2 entries whose write did not finish" in err
    assert "Error writing" not in err and "UserWarning" not in err
    keys = lambda suffix: {name[:-len(suffix)] for name in entries(path, suffix)}  # noqa: E731
    assert keys("-cache") == keys("-atime")  # every entry whole
    assert len(entries(path)) == count - 1 and second["hits"] == count - 2  # jit_f compiled and stored again
    third, err = child_with_stderr(env)
    assert third["hits"] == len(entries(path)) and "compilation cache" not in err


def test_a_second_process_loads_the_first_ones_program_and_computes_the_same_values(tmp_path):
    root = tmp_path / "cache"
    first = child({compile_cache.ENV: str(root)})
    assert Path(first["path"]).parent == root and Path(first["path"]).name == compile_cache.host_tag()
    assert first["settings"] == dict(dir=first["path"], min_seconds=compile_cache.MIN_COMPILE_SECONDS,
                                     max_bytes=compile_cache.MAX_BYTES)
    assert first["hits"] == 0
    stored = [name for name in os.listdir(first["path"]) if name.startswith("jit_f-") and name.endswith("-cache")]
    assert len(stored) == 1
    second = child({compile_cache.ENV: str(root)})
    assert second["hits"] == len([name for name in os.listdir(first["path"]) if name.endswith("-cache")])
    assert second["y"] == first["y"]


def test_processes_that_fill_one_cache_at_once_all_finish_and_leave_whole_entries(tmp_path):
    env = {compile_cache.ENV: str(tmp_path / "cache")}
    first, second = [result(proc) for proc in [start(env), start(env)]]  # both running before either finishes
    assert first["y"] == second["y"]
    third = child(env)
    assert third["hits"] == len([name for name in os.listdir(third["path"]) if name.endswith("-cache")]) > 0
    assert third["y"] == first["y"]


def test_off_turns_the_cache_off(tmp_path):
    result = child({compile_cache.ENV: "off", "XDG_CACHE_HOME": str(tmp_path)})
    assert result["path"] is None and result["settings"]["dir"] is None
    assert result["hits"] == 0 and not any(tmp_path.iterdir())


def test_the_directory_by_precedence(tmp_path, monkeypatch):
    for name in ("JAX_COMPILATION_CACHE_DIR", compile_cache.ENV, "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    tag = compile_cache.host_tag()
    assert compile_cache.directory() == tmp_path / "home" / ".cache" / "teco_ssm" / "xla" / tag
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.directory() == tmp_path / "xdg" / "teco_ssm" / "xla" / tag
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "mine"))
    assert compile_cache.directory() == tmp_path / "mine" / tag
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))  # JAX's own variable, as it is
    assert compile_cache.directory() == tmp_path / "jax"
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    for off in ("off", " OFF ", "0", "false", "No", "none"):
        monkeypatch.setenv(compile_cache.ENV, off)
        assert compile_cache.directory() is None, off
    monkeypatch.delenv(compile_cache.ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # not absolute: ignored, as the XDG specification says
    assert compile_cache.directory() == tmp_path / "home" / ".cache" / "teco_ssm" / "xla" / tag


def test_the_host_tag_separates_cpus_with_other_features(tmp_path, monkeypatch):
    files = {}
    for name, first, second in (("plain", "fpu avx2", "fpu avx2"), ("again", "fpu avx2", "fpu avx2"),
                                ("wider", "fpu avx2 avx512f", "fpu avx2 avx512f"),
                                ("second_differs", "fpu avx2", "fpu avx2 avx512f")):
        files[name] = tmp_path / name
        files[name].write_text(CPU.format(first=first, second=second))
    tag = {name: compile_cache.host_tag(str(path)) for name, path in files.items()}
    assert tag["plain"] == tag["again"]
    assert tag["plain"] != tag["wider"]
    assert tag["plain"] == tag["second_differs"]  # the first CPU's lines describe the machine
    assert tag["plain"].startswith(f"jax{jax.__version__}-jaxlib{jaxlib.__version__}-")
    # no description of the CPU: the host's name keeps two such machines apart
    monkeypatch.setattr(platform, "node", lambda: "host-a")
    unknown_a = compile_cache.host_tag(str(tmp_path / "missing"))
    monkeypatch.setattr(platform, "node", lambda: "host-b")
    assert unknown_a.startswith("jax") and unknown_a != compile_cache.host_tag(str(tmp_path / "missing"))


def test_an_uncreatable_directory_leaves_the_cache_off_with_a_warning(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv(compile_cache.ENV, str(blocker / "below"))
    assert compile_cache.configure() is None
    err = capsys.readouterr().err
    assert "compilation cache off" in err and str(blocker) in err and compile_cache.ENV in err


def test_a_directory_it_cannot_write_leaves_the_cache_off_with_one_warning(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "cache"))
    assert compile_cache._can_write(tmp_path)
    monkeypatch.setattr(compile_cache, "_can_write", lambda path: False)  # e.g. read-only, or another user's
    assert compile_cache.configure() is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "compilation cache off" in err and "not writable" in err
