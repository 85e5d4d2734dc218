"""Training-input throughput of `teco_ssm.data.open_dataset` on DMLab-sized npz files (a benchmark, not a test).

    python scripts/bench_data.py --root /tmp/bench_npz                      # this checkout's loader
    PYTHONPATH=/path/to/other/checkout python scripts/bench_data.py ...     # another checkout's, same files

Writes (once) `--videos` npz files of `--frames` frames of 64x64x3 uint8 with actions, like TECO's DMLab, then
times batches of `--batch` x `--frames` frames from the training split for each loader setting the checkout's
`open_dataset`: float32 frames in [-1, 1] and uint8 frames, with 1, 2 or 4 parallel reads. Prints one line per setting: batches/s and frames/s.
"""
from __future__ import annotations

import argparse
import itertools
import os
import time

import numpy as np


def write_dataset(root: str, videos: int, frames: int, size: int, compressed: bool) -> None:
    folder = os.path.join(root, 'train', '000')
    os.makedirs(folder, exist_ok=True)
    save = np.savez_compressed if compressed else np.savez
    rng = np.random.default_rng(0)
    for i in range(videos):
        path = os.path.join(folder, f'{i:04d}.npz')
        if not os.path.exists(path):
            save(path, video=rng.integers(0, 256, (frames, size, size, 3), dtype=np.uint8),
                 actions=rng.integers(0, 6, frames).astype(np.int32))


def measure(root: str, batch: int, frames: int, batches: int, **kwargs) -> float:
    from teco_ssm.data import open_dataset

    ds = open_dataset(root, 'train', seq_len=frames, batch_size=batch, process_index=0, process_count=1, **kwargs)
    iterator = iter(ds)
    next(iterator)                                   # start-up (threads, workers, first reads) not counted
    start = time.perf_counter()
    for _ in itertools.islice(iterator, batches):
        pass
    rate = batches / (time.perf_counter() - start)
    del iterator
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--root', default='/tmp/bench_npz')
    parser.add_argument('--videos', type=int, default=64)
    parser.add_argument('--frames', type=int, default=300)
    parser.add_argument('--size', type=int, default=64)
    parser.add_argument('--batch', type=int, default=16)
    parser.add_argument('--batches', type=int, default=8, help='timed batches per setting')
    parser.add_argument('--compressed', action='store_true', help='np.savez_compressed files (MazeLab writes '
                        'deflated npz); written to <root>_compressed')
    args = parser.parse_args()
    root = args.root + ('_compressed' if args.compressed else '')
    write_dataset(root, args.videos, args.frames, args.size, args.compressed)

    settings = [dict(num_parallel_reads=n) for n in (1, 2, 4)]
    for dtype in ('float32', 'uint8'):
        for setting in settings:
            rate = measure(root, args.batch, args.frames, args.batches, frames_dtype=dtype, **setting)
            print(f'{dtype:8s} {setting}: {rate:.2f} batches/s, {rate * args.batch * args.frames:.0f} frames/s',
                  flush=True)


if __name__ == '__main__':
    main()
