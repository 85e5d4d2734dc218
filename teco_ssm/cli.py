"""`teco-ssm`: one command for every stage, and `run` for the whole chain on the built-in MazeLab benchmark.

    teco-ssm run                          # MazeLab -> VQGAN -> codes -> TECO-ConvT3 -> rollouts -> report
    teco-ssm run --quick                  # the same chain at smoke-test size
    teco-ssm run --backbone all           # the four backbones with equal budgets, one comparison table
    teco-ssm run --dataset memory-maze    # the same chain on Memory Maze (pip install -e '.[memory-maze]')
    teco-ssm data | tokenizer | encode | train | sample | eval --help

`run` keeps everything under one workdir, skips stages whose outputs are complete (an interrupted run continues
where it stopped) and prints one line per stage with its time.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, Sequence

from teco_ssm import pipeline


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a config field, e.g. --set batch_size=8 --set convt3.n_layers=4 (repeatable)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="teco-ssm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="the whole chain on MazeLab or Memory Maze under one workdir",
                       description="Generates the dataset (MazeLab, or Memory Maze), trains the VQGAN, encodes the "
                                   "data, trains TECO, samples both protocols (and the baselines), evaluates and "
                                   "writes WORKDIR/report/report.md. "
                                   "Reads nothing; writes everything under --workdir; finished stages are skipped.")
    p.add_argument("--workdir", default=None, help="where every stage writes (default: runs/mazelab, or "
                   "runs/mazelab_quick with --quick; runs/memory_maze[_quick] for Memory Maze); a workdir holds "
                   "one dataset, size and step budget")
    p.add_argument("--dataset", default="mazelab", choices=["mazelab", "memory-maze"],
                   help="the benchmark to generate and train on (default: mazelab); memory-maze needs the "
                        "memory-maze extra and uses configs/memory_maze.py and configs/vqgan_memory_maze.py")
    p.add_argument("--backbone", default="convt3", help="transformer | s5 | convs5 | convt3 | all (default: convt3)")
    p.add_argument("--quick", action="store_true", help="smoke-test size (a few minutes on 2 CPU cores)")
    p.add_argument("--steps", type=int, default=None, help="TECO training steps (default: the size's budget)")

    p = sub.add_parser("data", help="generate MazeLab or Memory Maze trajectories",
                       description="Writes OUT/{train,test}/<shard>/*.npz (video, actions, poses) and a contact "
                                   "sheet OUT/contact_sheet.png. Existing files are kept (resumable).")
    p.add_argument("--source", default="mazelab", choices=["mazelab", "memory-maze"],
                   help="mazelab (default) or memory-maze (needs pip install -e '.[memory-maze]' and EGL or OSMesa)")
    p.add_argument("--maze_size", type=int, default=None, choices=[9, 11, 13, 15],
                   help="Memory Maze cells per side (default 9)")
    p.add_argument("--out", required=True)
    p.add_argument("--num_train", type=int, default=1000)
    p.add_argument("--num_test", type=int, default=100)
    p.add_argument("--length", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)

    p = sub.add_parser("tokenizer", help="train a VQGAN",
                       description="Reads a video dataset (MazeLab or TECO npz/mp4 folders); writes orbax "
                                   "checkpoints, config.json, reconstruction grids and scalars to --workdir. Resumes.")
    p.add_argument("--config", default="configs/vqgan_mazelab.py", help="config file[:variant]")
    p.add_argument("--data", required=True, help="video dataset folder")
    p.add_argument("--workdir", required=True)
    _add_overrides(p)

    p = sub.add_parser("encode", help="turn a video dataset into VQGAN codes",
                       description="Reads a video dataset and a tokenizer (TECO VQGAN folder or a project "
                                   "workdir); writes an encoded TFDS folder OUT/NAME/1.0.0 that `train` reads.")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--name", default="encoded")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("train", help="train a TECO world model",
                       description="Reads a dataset (codes, or frames with the tokenizer in the loop) and the "
                                   "tokenizer; writes checkpoints, config.json, TensorBoard scalars and rollout GIFs "
                                   "to --workdir. Resumes from the last complete checkpoint.")
    p.add_argument("--config", default="configs/mazelab.py:convt3", help="config file[:backbone]")
    p.add_argument("--data", help="dataset folder (sets dataset.path)")
    p.add_argument("--tokenizer", help="tokenizer folder (sets tokenizer.path)")
    p.add_argument("--workdir", required=True)
    _add_overrides(p)

    p = sub.add_parser("sample", help="roll out a trained model under a benchmark protocol",
                       description="Reads a training workdir (config.json + checkpoints), the test split and the "
                                   "tokenizer; writes OUT/batch_*.npz with real and generated uint8 videos.")
    p.add_argument("--workdir", required=True, help="the training workdir")
    p.add_argument("--out", required=True)
    p.add_argument("--protocol", default="action_conditioned",
                   help="action_conditioned | unconditioned | CONTEXT,HORIZON[,actions]")
    p.add_argument("--data", help="dataset folder (default: the one the model trained on)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the one the model trained with)")
    p.add_argument("--num_videos", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("eval", help="metrics and report for a folder of samples",
                       description="Reads SAMPLES/*.npz; writes REPORT/{metrics.json, curves, GIFs, report.md}: PSNR, "
                                   "SSIM, LPIPS and FVD with the networks the packages ship (nothing is downloaded).")
    p.add_argument("samples")
    p.add_argument("--report", required=True)
    p.add_argument("--lpips_network", default="alexnet", choices=["alexnet", "vgg16"],
                   help="LPIPS network (default alexnet, the one TECO and the ConvS5 paper report)")
    p.add_argument("--i3d", default=None, help="an I3D SavedModel directory (the TF Hub module "
                   "deepmind/i3d-kinetics-400) instead of the built-in I3D")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command: Callable[[argparse.Namespace], Any] = getattr(pipeline, f"command_{args.command}")
    result = command(args)
    if isinstance(result, dict) and args.command != "run":
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
