"""VQGAN for 64x64 Memory Maze frames with 16x16 codes: `configs/vqgan_mazelab.py`'s model, losses and budget.

  teco-ssm tokenizer --config configs/vqgan_memory_maze.py --data /data/memory_maze --workdir /tmp/vqgan_mm
  teco-ssm tokenizer --config configs/vqgan_memory_maze.py:quick --data /data/memory_maze --workdir /tmp/vqgan_mm_quick

Variants: '' (the MazeLab default) and 'quick' (a smoke test), as in `configs/vqgan_mazelab.py`.
"""
import ml_collections

from configs import vqgan_mazelab


def get_config(variant: str = '') -> ml_collections.ConfigDict:
    if variant not in ('', 'quick'):
        raise ValueError(f"configs/vqgan_memory_maze.py: unknown variant {variant!r} (use '' or 'quick')")
    return vqgan_mazelab.get_config(variant)
