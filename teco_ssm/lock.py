"""One process per output folder: `hold(folder)` takes an exclusive `flock` on `<folder>/.lock` for the duration of
a `with` block, and refuses at once when another process holds it, naming that process.

The operating system releases a `flock` when its holder exits, however it exits (kill -9 included), so a crashed
holder never leaves a folder locked; the pid, host, command and start time written into the file only name the
holder in the refusal. On NFS, Linux maps `flock` onto the server's byte-range locks, so two hosts sharing a folder
exclude each other too. Holding the same folder again inside the same process nests (training inside `teco-ssm run`).

    with lock.hold(workdir):
        ...                                   # a second `teco-ssm train --workdir same` raises Busy now
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
from typing import Iterator

LOCK_FILE = '.lock'

_held: dict[str, int] = {}  # real path of the lock file -> nesting depth, in this process
_guard = threading.Lock()


class Busy(RuntimeError):
    """Another live process holds the folder; the message names it (pid, host, command, start time)."""


def _holder(path: str) -> str:
    try:
        with open(path) as f:
            info = json.load(f)
        return (f"pid {info['pid']} on {info['host']} (running {info['command']!r} since "
                f"{info['since']})")
    except (OSError, ValueError, KeyError):
        return 'another process (it has not written its name yet)'


@contextlib.contextmanager
def hold(folder: str | os.PathLike, command: str | None = None) -> Iterator[None]:
    """Holds `folder` (created if needed) for this process until the block ends.

    command: what to name this process by in another's refusal (default: the command line).
    Raises Busy naming the holder when another process holds the folder.
    """
    os.makedirs(folder, exist_ok=True)
    path = os.path.realpath(os.path.join(folder, LOCK_FILE))
    with _guard:
        if path in _held:
            _held[path] += 1
            nested = True
        else:
            nested = False
    if nested:
        try:
            yield
        finally:
            with _guard:
                _held[path] -= 1
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        os.close(fd)
        if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise
        raise Busy(f'{os.path.dirname(path)}: in use by {_holder(path)}; one process at a time may write a '
                   'folder: wait for it to end or stop it, then run again') from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({'pid': os.getpid(), 'host': socket.gethostname(),
                                 'command': command or ' '.join(sys.argv),
                                 'since': time.strftime('%Y-%m-%d %H:%M:%S')}).encode())
        with _guard:
            _held[path] = 1
        yield
    finally:
        with _guard:
            _held.pop(path, None)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
