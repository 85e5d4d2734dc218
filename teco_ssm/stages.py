"""The stages of teco_ssm, each a function with typed arguments: what `teco-ssm <stage>` runs, what `teco-ssm run`
chains (`teco_ssm.run`), and what the tests call.

    make_dataset(out, source="mazelab", ...)          MazeLab or Memory Maze trajectories (npz) and a contact sheet
    train_tokenizer(data, workdir, config=..., ...)   a VQGAN (orbax checkpoints, config.json) in workdir
    encode(tokenizer, data, out, name=...)            a dataset's videos as VQGAN codes (a TFDS folder out/name)
    train(workdir, config=..., data=..., ...)         a TECO world model (checkpoints, config.json) in workdir
    sample(workdir, out, protocol=..., ...)           rollouts of a trained model: out/batch_*.npz
    evaluate(samples, report=None, ...)               PSNR, SSIM, LPIPS, FVD and report.md of a samples folder
    convert_taming(ckpt, out, resolution)             a taming-transformers VQGAN as a folder `vqgan.load` reads
    convert_teco(ckpt, tokenizer, out, config=None)   a released TECO / TECO-ConvS5 / TECO-S5 model as a workdir

Each returns a JSON-friendly dict of what it made. Heavy libraries are imported inside the functions, so
`teco-ssm --help` answers at once.
"""
from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Any, Callable, Sequence

from teco_ssm import metrics

SOURCES = ("mazelab", "memory-maze")

# The valid range (lowest, highest or None) of every numeric argument of the stages and of `teco_ssm.run.run`, by
# parameter name: the functions check their arguments against it before any work (`checked`), and the `teco-ssm`
# options take their argument checks from it (`teco_ssm.cli`).
RANGES = {
    "num_train": (1, None), "num_test": (1, None), "num_valid": (0, None), "length": (2, None),
    "seed": (0, 2 ** 31 - 1),
    "workers": (1, None), "files_per_shard": (1, None), "sheet_rows": (0, None), "chunk_size": (1, None),
    "examples_per_shard": (1, None), "num_videos": (1, None), "batch_size": (1, None), "step": (0, None),
    "context": (0, None), "group_size": (1, None), "num_gifs": (0, None), "resolution": (1, None),
    "steps": (1, None),
}


def range_text(name: str) -> str:
    low, high = RANGES[name]
    return f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"


def range_error(name: str, value: Any) -> str | None:
    """Why `value` is not valid for argument `name` (`RANGES`), or None; None values (defaults) are valid."""
    if value is None or name not in RANGES:
        return None
    low, high = RANGES[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        return f"{name}={value!r} must be {range_text(name)}"
    return None


def checked(function: Callable[..., Any]) -> Callable[..., Any]:
    """`function` with its numeric arguments checked against `RANGES` first: StageError naming the argument, its
    value and the range, before any work."""
    signature = inspect.signature(function)

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        for name, value in bound.arguments.items():
            problem = range_error(name, value)
            if problem:
                raise StageError(problem)
        return function(*args, **kwargs)

    return wrapper


class StageError(Exception):
    """A stage cannot start with the arguments it was given (a missing optional extra, a wrong option); the message
    says what to do. `teco-ssm` prints it without a traceback."""


def require_source(source: str) -> None:
    """Raises StageError when generating `source` needs an optional extra that is not installed."""
    if source not in SOURCES:
        raise StageError(f"unknown data source {source!r}; valid: {', '.join(SOURCES)}")
    if source == "memory-maze":
        from teco_ssm import memory_maze

        try:
            memory_maze.check_available()
        except memory_maze.MemoryMazeUnavailable as error:
            raise StageError(str(error)) from None


@checked
def make_dataset(out: str, *, source: str = "mazelab", num_train: int = 1000, num_test: int = 100,
                 length: int = 300, seed: int = 0, workers: int = 2, maze_size: int | None = None,
                 files_per_shard: int = 100, compress: bool = True, sheet_rows: int = 4,
                 num_valid: int = 0) -> dict[str, Any]:
    """Writes `out/{train,test}/<shard>/*.npz` trajectories (video (T, 64, 64, 3) uint8, actions (T,), poses (T, 3)),
    `out/metadata.json` and `out/contact_sheet.png` (the first `sheet_rows` training videos). Files already there are
    kept, so an interrupted call resumes.

    source: 'mazelab' (`teco_ssm.mazelab`) or 'memory-maze' (`teco_ssm.memory_maze`, the memory-maze extra; maze_size
    9, 11, 13 or 15 cells per side, default 9). compress: np.savez_compressed (MazeLab; Memory Maze always compresses).
    num_valid: MazeLab only, trajectories of a validation split `out/valid` (its own seed stream), for choosing
    settings without looking at the test split.
    Returns the generator's figures (videos, seconds, frames/s). Raises StageError for an unknown source, a missing
    extra, or maze_size given for MazeLab; lock.Busy when another process writes `out`.
    """
    require_source(source)
    if num_valid and source != "mazelab":
        raise StageError("num_valid applies to source mazelab")
    if maze_size is not None and source == "mazelab":
        raise StageError("maze_size applies to source memory-maze (MazeLab mazes are 7x7 cells)")
    from teco_ssm import lock

    with lock.hold(out):
        if source == "memory-maze":
            from teco_ssm import memory_maze

            try:
                figures = memory_maze.write_dataset(out, num_train, num_test, length, seed, maze_size=maze_size or 9,
                                                    workers=max(1, workers), files_per_shard=files_per_shard)
            except memory_maze.MemoryMazeUnavailable as error:
                raise StageError(str(error)) from None
        else:
            from teco_ssm import mazelab

            figures = mazelab.write_dataset(out, num_train, num_test, length, seed, workers=max(1, workers),
                                            files_per_shard=files_per_shard, compress=compress, num_valid=num_valid)
        _contact_sheet(Path(out), sheet_rows)
        return figures


def _contact_sheet(root: Path, rows: int) -> None:
    import numpy as np

    from teco_ssm import mazelab

    videos = []
    for f in sorted((root / "train").rglob("*.npz"))[:rows]:
        with np.load(f) as data:
            videos.append(data["video"])
    if videos:
        mazelab.contact_sheet(videos, root / "contact_sheet.png")


def train_tokenizer(data: str, workdir: str, *, config: str = "configs/vqgan_mazelab.py",
                    overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Trains the VQGAN of `config` (a config file[:variant], `--set` style `overrides` applied) on the videos of
    `data`, resuming from `workdir`. Returns the held-out figures (`vqgan.train.train_and_evaluate`)."""
    from teco_ssm.config_io import load_config
    from vqgan import train as vqgan_train

    return vqgan_train.train_and_evaluate(load_config(config, [f"data.path={data}", *overrides]), workdir)


@checked
def encode(tokenizer: str, data: str, out: str, *, name: str = "encoded", splits: Sequence[str] = ("train", "test"),
           overwrite: bool = False, chunk_size: int = 64, examples_per_shard: int = 64) -> dict[str, Any]:
    """Encodes every video of `splits` of `data` with `tokenizer` (a TECO VQGAN folder or a tokenizer workdir) into the
    TFDS folder `out/name` that `train` reads as codes; an interrupted call resumes, a complete output is kept unless
    `overwrite`. chunk_size: frames per tokenizer call; examples_per_shard: videos per tfrecord shard."""
    from vqgan import encode as vqgan_encode

    return vqgan_encode.encode_dataset(tokenizer, data, out, name, tuple(splits), overwrite,
                                       examples_per_shard=examples_per_shard, chunk_size=chunk_size)


DEFAULT_TRAIN_CONFIG = "configs/mazelab.py:convt3"


def train(workdir: str, *, config: str | None = None, data: str | None = None,
          tokenizer: str | None = None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Trains (or resumes) the TECO model of `config` (a config file[:backbone], or a workdir's config.json) in
    `workdir`; without one, the workdir's own config.json when it has one (a workdir trained before, or converted
    from a release), else `DEFAULT_TRAIN_CONFIG`. data and tokenizer set dataset.path and tokenizer.path;
    `overrides` are `field=value` settings applied after them. On several hosts, `jax.distributed` is initialised
    from the launcher's variables. Returns the last logged metrics (`teco_ssm.train.train_and_evaluate`)."""
    import os

    from teco_ssm import train as train_lib
    from teco_ssm.config_io import load_config

    if config is None:
        held = os.path.join(workdir, "config.json")
        config = held if os.path.isfile(held) else DEFAULT_TRAIN_CONFIG

    paths = ([f"dataset.path={data}"] if data else []) + ([f"tokenizer.path={tokenizer}"] if tokenizer else [])
    return train_lib.train_and_evaluate(load_config(config, [*paths, *overrides]), workdir)


def parse_protocol(text: str) -> str | tuple[int, int, bool]:
    """'action_conditioned', 'unconditioned', or 'CONTEXT,HORIZON[,actions]' (e.g. '32,16,actions') as
    `teco_ssm.sample` takes it. Raises StageError for anything else."""
    if "," not in text:
        return text
    parts = text.split(",")
    try:
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "actions"):
            raise ValueError
        return int(parts[0]), int(parts[1]), len(parts) == 3
    except ValueError:
        raise StageError(f"protocol {text!r}: expected action_conditioned, unconditioned or "
                         "CONTEXT,HORIZON[,actions], e.g. 32,16,actions") from None


@checked
def sample(workdir: str, out: str, *, protocol: str = "action_conditioned", data: str | None = None,
           tokenizer: str | None = None, num_videos: int | None = None, batch_size: int | None = None,
           seed: int = 0, step: int | None = None, overrides: Sequence[str] = (),
           split: str = "test") -> dict[str, Any]:
    """Rolls out the model trained in `workdir` (its config.json, checkpoint `step` or the latest) on `split` of
    its dataset under `protocol` (see `parse_protocol`) and writes `out/batch_*.npz` (real and generated uint8 videos).
    data and tokenizer default to the ones the model trained with; `overrides` change the sampler's settings
    (`sampling.temperature=0.5`, any field of `teco_ssm.sample.SamplerSettings`). Finished batch files are kept, so
    an interrupted call resumes. Returns the protocol, the settings, the number of videos and the files.
    Raises StageError for a bad protocol or an override of another field.
    """
    import dataclasses

    from teco_ssm import sample_files
    from teco_ssm.sample import SamplerSettings

    valid = [f"sampling.{f.name}" for f in dataclasses.fields(SamplerSettings)]
    for item in overrides:
        if item.partition("=")[0].removeprefix("--") not in valid:
            raise StageError(f"--set {item}: sample overrides only the sampler's settings: {', '.join(valid)}")
    return sample_files.sample_workdir(workdir, out, protocol=parse_protocol(protocol), data_path=data,
                                       tokenizer_path=tokenizer, num_videos=num_videos, batch_size=batch_size,
                                       seed=seed, step=step, overrides=overrides, split=split)


@checked
def evaluate(samples: str, report: str | None = None, *, lpips_network: str = "alexnet", i3d: str | None = None,
             context: int | None = None, group_size: int = metrics.TECO_GROUP_SIZE, num_gifs: int = 4,
             fvd_generated_only: bool = False) -> dict[str, Any]:
    """Scores the sample files in `samples` (PSNR, SSIM, LPIPS, FVD; `docs/metrics.md`) and writes
    `report` (default `samples/report`): metrics.json, per-frame curves, GIFs and report.md.

    lpips_network: 'alexnet' (TECO's and the ConvS5 paper's) or 'vgg16'. i3d: a TF Hub I3D SavedModel folder instead
    of the built-in I3D. context: context frames of files that do not record it. group_size: videos per group for the mean and
    std (TECO: 256). num_gifs: side-by-side GIFs of the first videos. fvd_generated_only: FVD over the generated
    frames alone instead of whole videos.
    """
    from teco_ssm import evaluate as evaluate_lib

    report = report if report is not None else str(Path(samples) / "report")
    return evaluate_lib.evaluate_samples(samples, report, lpips=lpips_network, i3d=i3d, context=context,
                                         group_size=group_size, num_gifs=num_gifs,
                                         fvd_generated_only=fvd_generated_only)


@checked
def convert_taming(ckpt: str, out: str, *, resolution: int, overwrite: bool = False) -> dict[str, Any]:
    """Converts a taming-transformers VQGAN checkpoint (`.ckpt`, PyTorch; the torch extra) into a TECO-layout folder
    `out` and checks that `vqgan.load` reads it. Returns {'path': out}."""
    from vqgan import convert

    return {"path": convert.convert_taming(ckpt, out, resolution, overwrite=overwrite)}


def convert_teco(ckpt: str, tokenizer: str, out: str, *, config: str | None = None) -> dict[str, Any]:
    """Converts a released TECO (wilson1yan/teco), TECO-ConvS5 or TECO-S5 (NVlabs/ConvSSM) run folder into a
    workdir `out` that `sample`, `eval` and `train` take like any other (`teco_ssm.released.convert`); config: the
    release's YAML, read instead of the folder's `args`. Returns {path, step, backbone, release, num_params}."""
    from teco_ssm import released

    return released.convert(ckpt, tokenizer, out, config=config)
