"""`teco-ssm`: the one command line of teco_ssm, one subcommand per stage, and `run` for the whole chain on a
generated benchmark.

    teco-ssm run                          # MazeLab -> VQGAN -> codes -> TECO-ConvT3 -> rollouts -> report
    teco-ssm run --quick                  # the same chain at smoke-test size
    teco-ssm run --backbone all           # the four backbones with equal budgets, one comparison table
    teco-ssm run --dataset memory-maze    # the same chain on Memory Maze (pip install -e '.[memory-maze]')
    teco-ssm convert-teco --ckpt RUN --tokenizer VQGAN --out WORKDIR   # a released TECO / TECO-ConvS5 model
    teco-ssm data | tokenizer | encode | train | sample | eval | convert-taming | convert-teco --help

Each subcommand parses its options into the keyword arguments of one function of `teco_ssm.stages` (or
`teco_ssm.run.run`) and prints what it returns; nothing else parses a command line. `run` keeps everything under one
workdir, skips stages whose outputs are complete (an interrupted run continues where it stopped) and prints one line
per stage with its time.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time
import traceback
from typing import Callable, Sequence

from teco_ssm import compile_cache, host_memory, metrics, stages


def _count(name: str) -> Callable[[str], int]:
    """The argparse type of the numeric option `name`: an int in its range (`stages.RANGES`), else argparse's
    error naming the option, the value and the range, before any work."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or stages.range_error(name, value):
            raise argparse.ArgumentTypeError(f"must be {stages.range_text(name)}, got {text!r}")
        return value

    parse.__name__ = name  # argparse names the type in some messages
    return parse


def _add_overrides(parser: argparse.ArgumentParser, example: str) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help=f"override a config field, e.g. {example} (repeatable)")


def _run(**kwargs):
    from teco_ssm import run

    return run.run(**kwargs)


def parser() -> argparse.ArgumentParser:
    """The `teco-ssm` argument parser; each subparser's destinations are its function's parameter names."""
    top = argparse.ArgumentParser(prog="teco-ssm", description=__doc__, allow_abbrev=False,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="command", required=True)

    p = sub.add_parser(allow_abbrev=False, name="run", help="the whole chain on MazeLab or Memory Maze under one workdir",
                       description="Generates the dataset (MazeLab, or Memory Maze), trains the VQGAN, encodes the "
                                   "data, trains TECO, samples both protocols (and the baselines), evaluates and "
                                   "writes WORKDIR/report/report.md. "
                                   "Reads nothing; writes everything under --workdir; finished stages are skipped.")
    p.set_defaults(stage=_run)
    p.add_argument("--workdir", default=None, help="where every stage writes (default: runs/mazelab, or "
                   "runs/mazelab_quick with --quick; runs/memory_maze[_quick] for Memory Maze); a workdir holds "
                   "one dataset, size and step budget")
    p.add_argument("--dataset", default="mazelab", choices=["mazelab", "memory-maze"],
                   help="the benchmark to generate and train on (default: mazelab); memory-maze needs the "
                        "memory-maze extra and uses configs/memory_maze.py and configs/vqgan_memory_maze.py")
    p.add_argument("--backbone", default="convt3", help="transformer | s5 | convs5 | convt3 | all (default: convt3)")
    p.add_argument("--quick", action="store_true", help="smoke-test size (a few minutes on 2 CPU cores)")
    p.add_argument("--steps", type=_count("steps"), default=None, help="TECO training steps (default: the size's budget)")

    p = sub.add_parser(allow_abbrev=False, name="data", help="generate MazeLab or Memory Maze trajectories",
                       description="Writes OUT/{train,test[,valid]}/<shard>/*.npz (video, actions, poses), metadata.json and "
                                   "a contact sheet OUT/contact_sheet.png. Existing files are kept (resumable).")
    p.set_defaults(stage=stages.make_dataset)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--source", default="mazelab", choices=list(stages.SOURCES),
                   help="mazelab (default) or memory-maze (needs pip install -e '.[memory-maze]' and EGL or OSMesa)")
    p.add_argument("--maze_size", type=int, default=None, choices=[9, 11, 13, 15],
                   help="Memory Maze cells per side (default 9)")
    p.add_argument("--num_train", type=_count("num_train"), default=1000)
    p.add_argument("--num_test", type=_count("num_test"), default=100)
    p.add_argument("--num_valid", type=_count("num_valid"), default=0,
                   help="MazeLab: trajectories of a validation split OUT/valid (default none)")
    p.add_argument("--length", type=_count("length"), default=300, help="frames per trajectory")
    p.add_argument("--seed", type=_count("seed"), default=0)
    p.add_argument("--workers", type=_count("workers"), default=os.cpu_count() or 1, help="processes (default: every core)")
    p.add_argument("--files_per_shard", type=_count("files_per_shard"), default=100)
    p.add_argument("--no_compress", dest="compress", action="store_false",
                   help="MazeLab: np.savez instead of np.savez_compressed")
    p.add_argument("--sheet_rows", type=_count("sheet_rows"), default=4, help="training videos on the contact sheet")

    p = sub.add_parser(allow_abbrev=False, name="tokenizer", help="train a VQGAN",
                       description="Reads a video dataset (MazeLab or TECO npz/mp4 folders); writes orbax "
                                   "checkpoints, config.json, reconstruction grids and scalars to --workdir. Resumes.")
    p.set_defaults(stage=stages.train_tokenizer)
    p.add_argument("--config", default="configs/vqgan_mazelab.py", help="config file[:variant]")
    p.add_argument("--data", required=True, help="video dataset folder")
    p.add_argument("--workdir", required=True)
    _add_overrides(p, "--set num_steps=2000 --set batch_size=8")

    p = sub.add_parser(allow_abbrev=False, name="encode", help="turn a video dataset into VQGAN codes",
                       description="Reads a video dataset and a tokenizer (TECO VQGAN folder or a project "
                                   "workdir); writes an encoded TFDS folder OUT/NAME/1.0.0 that `train` reads. "
                                   "Resumes; a complete output is kept unless --overwrite.")
    p.set_defaults(stage=stages.encode)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, help="folder that receives NAME/1.0.0/")
    p.add_argument("--name", default="encoded", help="dataset name (lowercase letters, digits, underscores)")
    p.add_argument("--splits", type=lambda text: tuple(text.split(",")), default=("train", "test"),
                   help="comma-separated splits (default train,test)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--chunk_size", type=_count("chunk_size"), default=64, help="frames per tokenizer call")
    p.add_argument("--examples_per_shard", type=_count("examples_per_shard"), default=64, help="videos per tfrecord shard")

    p = sub.add_parser(allow_abbrev=False, name="train", help="train a TECO world model",
                       description="Reads a dataset (codes, or frames with the tokenizer in the loop) and the "
                                   "tokenizer; writes checkpoints, config.json, TensorBoard scalars and rollout GIFs "
                                   "to --workdir. Resumes from the last complete checkpoint. On several hosts, start "
                                   "the same command on each (jax.distributed reads the launcher's variables).")
    p.set_defaults(stage=stages.train)
    p.add_argument("--config", default=None,
                   help="config file[:backbone], or a workdir's config.json (default: the workdir's config.json when it "
                        f"has one, else {stages.DEFAULT_TRAIN_CONFIG})")
    p.add_argument("--data", help="dataset folder (sets dataset.path)")
    p.add_argument("--tokenizer", help="tokenizer folder (sets tokenizer.path)")
    p.add_argument("--workdir", required=True)
    _add_overrides(p, "--set batch_size=8 --set convt3.n_layers=4")

    p = sub.add_parser(allow_abbrev=False, name="sample", help="roll out a trained model under a benchmark protocol",
                       description="Reads a training workdir (config.json + checkpoints), the test split (or "
                                   "--split) and the "
                                   "tokenizer; writes OUT/batch_*.npz with real and generated uint8 videos. "
                                   "Finished batch files are kept (resumable).")
    p.set_defaults(stage=stages.sample)
    p.add_argument("--workdir", required=True, help="the training workdir")
    p.add_argument("--out", required=True)
    p.add_argument("--protocol", default="action_conditioned",
                   help="action_conditioned | unconditioned | CONTEXT,HORIZON[,actions] (e.g. 32,16,actions)")
    p.add_argument("--data", help="dataset folder (default: the one the model trained on)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the one the model trained with)")
    p.add_argument("--num_videos", type=_count("num_videos"), default=None, help="default: the config's sampling.num_videos")
    p.add_argument("--batch_size", type=_count("batch_size"), default=None, help="videos per file (default: sampling.batch_size)")
    p.add_argument("--seed", type=_count("seed"), default=0)
    p.add_argument("--step", type=_count("step"), default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--split", default="test", help="the dataset split to sample (default test)")
    _add_overrides(p, "--set sampling.temperature=0.5 (the sampler's settings only)")

    p = sub.add_parser(allow_abbrev=False, name="eval", help="metrics and report for a folder of samples",
                       description="Reads SAMPLES/*.npz; writes REPORT/{metrics.json, curves, GIFs, report.md}: PSNR, "
                                   "SSIM, LPIPS and FVD with the networks the packages ship (nothing is downloaded).")
    p.set_defaults(stage=stages.evaluate)
    p.add_argument("samples")
    p.add_argument("--report", default=None, help="report folder (default: SAMPLES/report)")
    p.add_argument("--lpips_network", default="alexnet", choices=["alexnet", "vgg16"],
                   help="LPIPS network (default alexnet, the one TECO and the ConvS5 paper report)")
    p.add_argument("--i3d", default=None, help="an I3D SavedModel directory (the TF Hub module "
                   "deepmind/i3d-kinetics-400) instead of the built-in I3D")
    p.add_argument("--context", type=_count("context"), default=None, help="context frames, for files that do not store it")
    p.add_argument("--group_size", type=_count("group_size"), default=metrics.TECO_GROUP_SIZE,
                   help=f"videos per group for mean and std (default TECO's {metrics.TECO_GROUP_SIZE})")
    p.add_argument("--num_gifs", type=_count("num_gifs"), default=4, help="side-by-side GIFs written (default 4)")
    p.add_argument("--fvd_generated_only", action="store_true", help="FVD over the generated frames only")

    p = sub.add_parser(allow_abbrev=False, name="convert-taming", help="convert a taming-transformers VQGAN checkpoint",
                       description="Reads a taming-transformers .ckpt (needs pip install -e '.[torch]'); writes a "
                                   "TECO-layout folder OUT that `encode`, `train` and `sample` take as --tokenizer.")
    p.set_defaults(stage=stages.convert_taming)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--resolution", type=_count("resolution"), required=True, help="frame size the VQGAN was trained at")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser(allow_abbrev=False, name="convert-teco",
                       help="import a released TECO, TECO-ConvS5 or TECO-S5 world-model checkpoint",
                       description="Reads a released run folder (args + checkpoints/checkpoint_<step>, the highest "
                                   "step) of wilson1yan/teco or NVlabs/ConvSSM and the VQGAN folder it was trained "
                                   "with; writes a new workdir OUT (config.json, an orbax checkpoint at the release's "
                                   "step with a fresh optimiser state, released_from.json) that sample, eval and "
                                   "train use like any other. The source folder is only read.")
    p.set_defaults(stage=stages.convert_teco)
    p.add_argument("--ckpt", required=True, help="the released run folder (args + checkpoints/)")
    p.add_argument("--tokenizer", required=True, help="the VQGAN folder the model was trained with")
    p.add_argument("--out", required=True, help="the new workdir (must not exist, or be empty)")
    p.add_argument("--config", default=None,
                   help="the release's YAML (e.g. NVlabs/ConvSSM configs/3D_ENV_BENCHMARK/habitat/"
                        "habitat_teco_convS5.yaml), read instead of the folder's args")
    return top


def cause(error: BaseException) -> str:
    """One line naming what went wrong: "no space left on device" (and the file, when known) when a full disk is
    anywhere in the exception's chain, else the error's type and message, its lines joined by '; '."""
    seen, chain = set(), []
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        chain.append(error)
        error = error.__cause__ or error.__context__
    for item in chain:
        full = (isinstance(item, OSError) and item.errno == errno.ENOSPC) or "No space left on device" in str(item)
        if full:
            where = getattr(item, "filename", None)
            return f"no space left on device{f' writing {where}' if where else ''} ({type(item).__name__})"
    top = chain[0]
    lines = [" ".join(line.split()) for line in str(top).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    for line in lines[1:]:  # a message listing several problems keeps them apart on its one line
        text += (" " if text.endswith(":") else "; ") + line
    return f"{type(top).__name__}: {text}"


def is_request_error(error: BaseException) -> bool:
    """Errors that name what is wrong with the request or its inputs (a config field, a file, a workdir held by
    another process): the command prints their message alone. Anything else is unexpected and keeps its traceback;
    TECO_SSM_TRACEBACK=1 prints the traceback for every error."""
    from teco_ssm import lock

    if cause(error).startswith("no space left on device"):  # the cause line says all; the traceback on request
        return True
    return isinstance(error, (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError,
                              lock.Busy))


def _keep_interrupts(hook, swallowed: list[BaseException]):
    """`sys.unraisablehook` that keeps a KeyboardInterrupt raised where Python can only report it (JAX's
    garbage-collection callback) instead of printing it, so that the command ends as interrupted."""
    def unraisable(args):
        if isinstance(args.exc_value, KeyboardInterrupt):
            swallowed.append(args.exc_value)
            return
        hook(args)
    return unraisable


def _exit_now(code: int, line: str) -> None:
    """Prints `line` last and ends the process at once: background threads (data readers, orbax writers) are
    neither joined nor given the chance to print after it. Their writes go to /dev/null from before the line is
    written, so a thread's traceback cannot land between the line and its newline, or after it. The line starts
    on a line of its own even when a thread was cut off mid-line."""
    sys.stdout.flush()
    sys.stderr.flush()
    own = os.dup(2)
    quiet = os.open(os.devnull, os.O_WRONLY)
    os.dup2(quiet, 1)
    os.dup2(quiet, 2)
    # sys.stderr writes straight to its file descriptor, unlocked: a thread already inside a write to the old
    # stderr (blocked on a full pipe) finishes it as soon as the reader drains the pipe. The pause lets those
    # writes land before the line; a reader that drains more slowly than that can still get one after it.
    time.sleep(0.2)
    os.write(own, f"\n{line}\n".encode())
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line `argv` (default: the process's own). As the `teco-ssm` command (argv None), an error
    ends the process at once, whatever threads are still alive (exit status 1; 130 on Ctrl-C), with its cause on
    one last line (`cause`): alone for an error in the request or its inputs (`is_request_error`: a bad config
    field, a missing or malformed file, a busy workdir), after the traceback for anything unexpected. A StageError
    (raised before any work) exits with its message alone. Called with argv, errors propagate to the caller."""
    as_command = argv is None
    if as_command:
        host_memory.configure()  # before XLA's threads allocate: buffers keep their pages between steps
        compile_cache.configure()  # a rerun or resumed run loads its compiled programs from disk
    kwargs = vars(parser().parse_args(argv))
    command, stage = kwargs.pop("command"), kwargs.pop("stage")
    swallowed: list[BaseException] = []
    if as_command:
        sys.unraisablehook = _keep_interrupts(sys.unraisablehook, swallowed)
    try:
        result = stage(**kwargs)
        if swallowed:  # Ctrl-C landed where Python cannot raise it (a garbage-collection callback)
            raise KeyboardInterrupt
    except stages.StageError as error:  # raised before any work starts: a plain exit
        raise SystemExit(f"teco-ssm {command}: {error}") from None
    except KeyboardInterrupt:
        if not as_command:
            raise
        _exit_now(130, f"teco-ssm {command}: interrupted")
    except Exception as error:  # noqa: BLE001  (the command's last word on any failure)
        if not as_command:
            raise
        if os.environ.get("TECO_SSM_TRACEBACK") == "1" or not is_request_error(error):
            traceback.print_exc()
        _exit_now(1, f"teco-ssm {command}: error: {cause(error)}")
    if command == "eval":
        _print_evaluation(result, kwargs["report"] or os.path.join(kwargs["samples"], "report"))
    elif command != "run":  # run prints its own stage lines and table
        print(json.dumps(result, indent=2, default=str))
    return 0


def _print_evaluation(numbers: dict, report: str) -> None:
    """The headline numbers of an evaluation (its metrics.json holds every value)."""
    for name in ("psnr", "ssim", "lpips"):
        if numbers.get(name):
            print(f"{name.upper()} {numbers[name]['mean']:.4f} +/- {numbers[name]['std']:.4f} "
                  f"over {numbers[name]['num_videos']} videos")
    # evaluate_samples has printed the FVD line with its number of videos.
    for name, why in numbers["absent"].items():
        print(f"{name.upper()} absent: {why}")
    print(f"report: {os.path.join(report, 'report.md')}")


if __name__ == "__main__":
    sys.exit(main())
