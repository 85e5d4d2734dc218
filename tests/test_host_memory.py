"""teco_ssm.host_memory: freed large buffers keep their pages, so touching them again costs no page faults."""
import os
import subprocess
import sys

import pytest

# Allocates, touches and frees a 64 MiB block twice from a second thread (as XLA's worker threads do) and prints
# the minor page faults of the second round.
_PROBE = """
import ctypes, resource, sys, threading
from teco_ssm import host_memory
print(host_memory.configure())
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
size = 64 << 20
faults = []
def rounds():
    for _ in range(2):
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        libc.free(block)
        faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
thread = threading.Thread(target=rounds)
thread.start(); thread.join()
print(faults[1])
"""


def _probe(**env) -> tuple[str, int]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "TECO_SSM_MALLOC"}
    out = subprocess.run([sys.executable, "-c", _PROBE], env=dict(environ, **env), capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_freed_blocks_are_reused_without_page_faults():
    pages = (64 << 20) // os.sysconf("SC_PAGE_SIZE")
    configured, faults = _probe()
    assert configured == "True"
    assert faults < pages // 100  # the freed block's pages are still mapped
    left_alone, faults = _probe(TECO_SSM_MALLOC="system")
    assert left_alone == "False"
    assert faults > pages // 2  # glibc's default: the block came back from mmap and every page faults again


def test_glibc_tunables_in_the_environment_win():
    configured, _ = _probe(MALLOC_ARENA_MAX="4")
    assert configured == "False"
