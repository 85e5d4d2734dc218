"""TECO on Memory Maze (9x9 mazes, generated locally with the memory-maze extra), at MazeLab's CPU size.

  teco-ssm data --source memory-maze --out /data/memory_maze --num_train 200 --num_test 32 --length 96
  teco-ssm tokenizer --config configs/vqgan_memory_maze.py --data /data/memory_maze --workdir /tmp/vqgan_mm
  teco-ssm encode --tokenizer /tmp/vqgan_mm --data /data/memory_maze --out /data/mm_codes --name memory_maze
  teco-ssm train --config configs/memory_maze.py:convt3 --data /data/mm_codes/memory_maze \
      --tokenizer /tmp/vqgan_mm --workdir /tmp/teco_mm

or all of it with `teco-ssm run --dataset memory-maze`. Variants: transformer, s5, convs5 (default), convt3.

Everything is `configs/mazelab.py` (the same widths, batch, clip length, steps and protocols, chosen on MazeLab)
except the dataset name and the action set: Memory Maze has 6 actions (noop, forward, left, right, forward+left,
forward+right; `teco_ssm.memory_maze`). Its frames are 64x64 like MazeLab's, so the tokenizer is the MazeLab one
(`configs/vqgan_memory_maze.py`).
"""
import ml_collections

from configs import mazelab

NUM_ACTIONS = 6


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = mazelab.get_config(arg)
    config.dataset.name = "memory_maze"
    config.model.num_actions = NUM_ACTIONS
    return config
