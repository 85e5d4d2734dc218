"""`teco-ssm run`: the whole chain on a generated benchmark (MazeLab, or Memory Maze) under one workdir.

`run(...)` calls the stage functions of `teco_ssm.stages` (and, per backbone, the library's train, sample and
evaluate functions with the config it builds) and records each finished stage in `<workdir>/stages/<stage>.json`
(written last, atomically), so an interrupted run skips what is complete and redoes what is not.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import ml_collections

from teco_ssm import backbones, lock, stages as stage_fns
from teco_ssm import checkpoint as ckpt


# ------------------------------------------------------------------------------------------------ sizes of `run`
# The default run trains the tokenizer of `configs/vqgan_mazelab.py` for fewer steps than that config's own budget
# (which buys 24 dB in 10 minutes). Of 300, 600 and 1,200 steps, 600 gave the best rollouts: the sharper codes of
# 1,200 steps are harder for the prior (docs/training.md, "The tokenizer's share of the budget").
TOKENIZER_STEPS = 600


@dataclasses.dataclass(frozen=True)
class RunSize:
    """What `run` builds. `default` finishes in under 20 minutes on 2 CPU cores, `quick` in under 3.

    The world model is `configs/mazelab.py:<backbone>` (its batch, clip length, steps and protocols) with
    `model_overrides` applied, and then the run's own `--steps`. `num_valid` MazeLab trajectories form a validation
    split (generated and encoded, never scored by the run) for choosing settings without the test split.
    """

    num_train: int
    num_test: int
    length: int
    tokenizer_variant: str
    tokenizer_steps: int
    model_overrides: tuple[str, ...] = ()
    num_valid: int = 0


SIZES = {
    "default": RunSize(num_train=200, num_test=32, length=96, tokenizer_variant="", tokenizer_steps=TOKENIZER_STEPS,
                       num_valid=32),
    "quick": RunSize(num_train=24, num_test=4, length=48, tokenizer_variant="quick", tokenizer_steps=30, num_valid=4,
                     model_overrides=(
                         "steps=30", "seq_len=16", *(f"optim.{name}.warmup_steps=5" for name in backbones.NAMES),
                         "checkpoint_every=30",
                         "visualise_every=1000000", "sampling.num_videos=4", "sampling.batch_size=4",
                         "sampling.action_conditioned.context=8", "sampling.action_conditioned.horizon=8",
                         "sampling.unconditioned.context=4", "sampling.unconditioned.horizon=12",
                         "sampling.draft_steps=2", "sampling.revise_steps=2")),
}


@dataclasses.dataclass(frozen=True)
class RunDataset:
    """A benchmark `run` generates (`teco-ssm data --source <source>`) and trains on with `configs/<name>.py` and
    `configs/vqgan_<name>.py`; its default workdir is `runs/<name>` (`runs/<name>_quick` with --quick)."""

    title: str
    name: str
    source: str
    maze_size: int | None = None


DATASETS = {"mazelab": RunDataset("MazeLab", "mazelab", "mazelab"),
            "memory-maze": RunDataset("Memory Maze 9x9", "memory_maze", "memory-maze", maze_size=9)}


def world_model_config(name: str, size: RunSize, steps: int | None = None, overrides: Sequence[str] = (),
                       dataset: str = "mazelab") -> ml_collections.ConfigDict:
    """The config `run` trains backbone `name` with: `configs/<dataset>.py:<name>` (`DATASETS`), the size's
    overrides, `steps` (when given), then `overrides` (paths, the tokenizer's code book)."""
    from teco_ssm.config_io import load_config

    return load_config(f"configs/{DATASETS[dataset].name}.py:{name}",
                       [*size.model_overrides, *([f"steps={steps}"] if steps else []), *overrides])


# ------------------------------------------------------------------------------------------------ the chain
class Stages:
    """Runs named stages once: a stage whose record `<workdir>/stages/<name>.json` exists is skipped."""

    def __init__(self, workdir: Path):
        self.dir = workdir / "stages"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.records: dict[str, dict[str, Any]] = {}

    def __call__(self, name: str, fn: Callable[[], dict[str, Any] | None]) -> dict[str, Any]:
        record_path = self.dir / f"{name}.json"
        if record_path.exists():
            record = json.loads(record_path.read_text())
            print(f"[{name}] already complete ({record['seconds']:.0f} s when it ran): skipped", flush=True)
        else:
            print(f"[{name}] ...", flush=True)
            start = time.perf_counter()
            result = fn() or {}
            record = {"seconds": time.perf_counter() - start, "result": result}
            tmp = record_path.with_suffix(".tmp")
            from teco_ssm import report as report_lib  # matplotlib: imported when a stage finishes, not at start-up

            tmp.write_text(json.dumps(report_lib.json_safe(record), indent=2, default=str))
            os.replace(tmp, record_path)
            print(f"[{name}] done in {record['seconds']:.0f} s", flush=True)
        self.records[name] = record
        return record["result"]


@stage_fns.checked
def run(*, dataset: str = "mazelab", backbone: str = "convt3", quick: bool = False, steps: int | None = None,
        workdir: str | None = None) -> dict[str, Any]:
    """The whole chain: data, tokenizer, encode, then per backbone train, sample (trained, unconditioned, untrained)
    and evaluate (with the repeat-last-frame baseline), and `<workdir>/report/report.md`.

    dataset: a key of `DATASETS`; backbone: a registered backbone or 'all' (every backbone, equal budgets); quick:
    the smoke-test size (`SIZES`); steps: TECO training steps (default the size's budget); workdir: default
    `runs/<dataset>[_quick]`. Returns the summary written to `report/summary.json`.
    Raises ValueError for an unknown backbone or a workdir holding another run, StageError for a missing extra, and
    lock.Busy when another process runs in the workdir, all before any work.
    """
    size_name = "quick" if quick else "default"
    size = SIZES[size_name]
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; valid: {', '.join(DATASETS)}")
    bench = DATASETS[dataset]
    names = list(backbones.NAMES) if backbone == "all" else [backbone]
    for name in names:
        backbones.default_config(name)  # an unknown name fails here, listing the valid ones
    stage_fns.require_source(bench.source)
    root = Path(workdir or f"runs/{bench.name}{'_quick' if quick else ''}")
    ckpt.check_path(root)
    reference = world_model_config(names[0], size, steps, dataset=dataset)
    with lock.hold(root):
        _claim_workdir(root, {"dataset": dataset, "size": size_name, "train_steps": reference.steps})
        stages = Stages(root)
        data, tokenizer, encoded = root / "data", root / "tokenizer", root / "encoded"
        num_valid = size.num_valid if bench.source == "mazelab" else 0

        stages("data", lambda: stage_fns.make_dataset(
            str(data), source=bench.source, maze_size=bench.maze_size, num_train=size.num_train,
            num_test=size.num_test, length=size.length, seed=0, workers=os.cpu_count() or 1, num_valid=num_valid))
        variant = f":{size.tokenizer_variant}" if size.tokenizer_variant else ""
        tok = stages("tokenizer", lambda: stage_fns.train_tokenizer(
            str(data), str(tokenizer), config=f"configs/vqgan_{bench.name}.py{variant}",
            overrides=[f"num_steps={size.tokenizer_steps}", f"loss.disc_start={size.tokenizer_steps}"]))
        stages("encode", lambda: stage_fns.encode(str(tokenizer), str(data), str(encoded), name=bench.name,
                                                  splits=("train", "test", "valid")[:3 if num_valid else 2]))

        # Every stage samples and scores the same test videos: they are decoded once and I3D embeds them once.
        real_videos: dict[Any, Any] = {}
        real_features: dict[Any, Any] = {}
        # Held-out losses during training read the validation split where the run made one; the samples and
        # the report always score the test split.
        eval_split = "valid" if num_valid else "test"
        results = {name: _run_backbone(stages, root, name, size, steps, encoded / bench.name, tokenizer,
                                       real_videos, real_features, dataset, eval_split) for name in names}
        protocols = {p: (reference.sampling[p].context, reference.sampling[p].horizon)
                     for p in ("action_conditioned", "unconditioned")}
        summary = {"dataset": bench.title, "size": size_name, "train_steps": reference.steps, "protocols": protocols,
                   "stage_seconds": {k: v["seconds"] for k, v in stages.records.items()},
                   "tokenizer": tok, "backbones": results}
        path = write_run_report(root / "report", summary)
        print_summary(summary)
        print(f"\nreport: {path}")
        return summary


def _claim_workdir(workdir: Path, settings: dict[str, Any]) -> None:
    """Records the run's size and training steps in `<workdir>/run.json`, or raises ValueError before any work
    when the workdir holds a run made with others (its finished stages would be reused as they are)."""
    record = workdir / "run.json"
    if record.exists():
        held = {"dataset": "mazelab", **json.loads(record.read_text())}  # run.json predating --dataset: MazeLab
        if held != settings:
            differ = ", ".join(f"{k} {held.get(k)!r} there, {v!r} asked" for k, v in settings.items()
                               if held.get(k) != v)
            raise ValueError(f"{record}: this workdir holds a run made with other settings ({differ}); its finished "
                             f"stages would be reused as they are. Pass another --workdir, or delete {workdir} to "
                             "start over.")
        return
    workdir.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(settings, indent=2))


def _run_backbone(stages: Stages, workdir: Path, name: str, size: RunSize, steps: int | None, data: Path,
                  tokenizer: Path, real_videos: dict[Any, Any], real_features: dict[Any, Any],
                  dataset: str = "mazelab", eval_split: str = "test") -> dict[str, Any]:
    import vqgan
    from teco_ssm import evaluate, sample_files, train

    model_dir = workdir / "models" / name
    samples, reports = workdir / "samples" / name, workdir / "report" / name
    tok = vqgan.load(tokenizer)
    config = world_model_config(name, size, steps, [
        f"dataset.path={data}", f"tokenizer.path={tokenizer}", f"model.vqgan_codes={tok.n_codes}",
        f"model.vqgan_embedding_dim={tok.embedding_dim}", f"model.code_shape={tuple(tok.latent_shape)}",
        f"dataset.eval_split={eval_split}"], dataset)
    out = {"train": stages(f"train-{name}", lambda: train.train_and_evaluate(config, str(model_dir)))}
    for label, (protocol, variables) in sampling_runs(config, model_dir, tok).items():
        sampled = stages(f"sample-{name}-{label}", lambda: sample_files.sample_dataset(
            config, variables(), tok, data, samples / label, protocol=protocol, split="test",
            real_cache=real_videos))
        if label == "trained":  # from what the files record, so a rerun that only finds them reports it too
            speed = sample_files.sampling_speed(samples / label) or {}
            out["sampling"] = {"frames_per_second": speed.get("frames_per_second"),
                               "num_files": len(sampled["files"])}
        out[label] = stages(f"eval-{name}-{label}", lambda: evaluate.evaluate_samples(
            str(samples / label), str(reports / label), title=f"TECO-{name}: {label.replace('_', ' ')}",
            feature_cache=real_features))
    out["repeat_last"] = stages(f"eval-{name}-repeat_last", lambda: evaluate.evaluate_samples(
        evaluate.write_repeat_last_frame_samples(samples / "trained", samples / "repeat_last"),
        str(reports / "repeat_last"), title="Baseline: repeat the last context frame", feature_cache=real_features))
    return out


def sampling_runs(config: ml_collections.ConfigDict, model_dir: Path,
                  tokenizer: Any) -> dict[str, tuple[str, Callable[[], str | dict[str, Any]]]]:
    """The sampling stages of one backbone, label -> (protocol, what `sample_files.sample_dataset` samples: the
    training workdir, or the untrained baseline's variables, the parameters training starts from)."""
    from teco_ssm import teco, train

    def untrained_variables() -> dict[str, Any]:
        model = teco.build(config)
        return teco.set_code_embeddings(teco.init_variables(model, train.init_key(config.seed)), tokenizer.codebook)

    return {"trained": ("action_conditioned", lambda: str(model_dir)),
            "unconditioned": ("unconditioned", lambda: str(model_dir)),
            "untrained": ("action_conditioned", untrained_variables)}


def _mean(result: dict[str, Any] | None, metric: str) -> float | None:
    value = (result or {}).get(metric)
    return None if value is None else value["mean"]


def _fvd(result: dict[str, Any] | None) -> str | None:
    """'FVD (N videos)' of an evaluation, or None when absent (its report says why)."""
    value = (result or {}).get("fvd")
    return None if value is None else f"{value['mean']:.1f} ({value['num_videos']} videos)"


EVALUATIONS = {"trained": "trained", "untrained": "baseline: untrained", "repeat_last": "baseline: repeat last frame",
               "unconditioned": "trained, unconditioned protocol"}


def summary_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per backbone: action-conditioned PSNR/SSIM/LPIPS/FVD against the baselines' PSNR, unconditioned
    PSNR and FVD, training and sampling speed, parameters. FVD cells carry their number of videos."""
    rows = []
    for name, r in summary["backbones"].items():
        train = r["train"] or {}
        rows.append({
            "backbone": name,
            "PSNR": _mean(r["trained"], "psnr"), "SSIM": _mean(r["trained"], "ssim"),
            "LPIPS": _mean(r["trained"], "lpips"), "FVD": _fvd(r["trained"]),
            "PSNR untrained": _mean(r["untrained"], "psnr"), "PSNR repeat-last": _mean(r["repeat_last"], "psnr"),
            "PSNR unconditioned": _mean(r["unconditioned"], "psnr"), "FVD unconditioned": _fvd(r["unconditioned"]),
            "final loss": train.get("loss"), "train steps/s": train.get("steps_per_second"),
            "params": train.get("num_params"),
            "sampling frames/s": (r.get("sampling") or {}).get("frames_per_second"),
        })
    return rows


def metric_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per backbone and evaluation (the model, both baselines, the unconditioned protocol): PSNR, SSIM,
    LPIPS and FVD with its number of videos."""
    return [{"backbone": name, "evaluation": text, "PSNR": _mean(r.get(label), "psnr"),
             "SSIM": _mean(r.get(label), "ssim"), "LPIPS": _mean(r.get(label), "lpips"), "FVD": _fvd(r.get(label))}
            for name, r in summary["backbones"].items() for label, text in EVALUATIONS.items()]


def revisit_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per backbone and evaluation whose samples hold poses: PSNR over the generated frames at places
    seen earlier in the context, at the last context frame's pose, and never seen (`metrics.revisit_groups`),
    with the number of frames in each. Empty when no evaluation has them."""
    rows = []
    for name, r in summary["backbones"].items():
        for label, text in EVALUATIONS.items():
            revisit = (r.get(label) or {}).get("revisit_psnr")
            if revisit is None:
                continue
            # Samples written before the last-pose group leave its cells empty (their `seen` includes it).
            rows.append({"backbone": name, "evaluation": text, "PSNR seen": revisit["seen"],
                         "frames seen": revisit["num_seen"],
                         "PSNR at the last context pose": revisit.get("at_last_context_pose"),
                         "frames at it": revisit.get("num_at_last_context_pose"),
                         "PSNR never seen": revisit["unseen"], "frames never seen": revisit["num_unseen"]})
    return rows


def _protocol_text(summary: dict[str, Any], name: str, actions: str) -> str:
    """' (C context frames, then H generated with/without actions)', or '' for a summary that does not record it."""
    protocol = summary.get("protocols", {}).get(name)
    if protocol is None:
        return ""
    context, horizon = protocol
    return f" ({context} context frames, then {horizon} generated {actions} actions)"


def write_run_report(report_dir: Path, summary: dict[str, Any]) -> Path:
    """`report_dir/report.md` (the summary table, the revisit table when the samples hold poses, stage times,
    links to each evaluation's curves and GIFs) and `report_dir/summary.json`."""
    from teco_ssm import report as report_lib

    report_dir.mkdir(parents=True, exist_ok=True)
    report_lib.write_json(summary, report_dir / "summary.json")
    networks = next((r["trained"] for r in summary["backbones"].values() if r.get("trained")), {}) or {}
    sections: dict[str, Any] = {
        "Setup": (f"{summary.get('dataset', 'MazeLab')}, {summary['size']} size, {summary['train_steps']} training "
                  "steps per backbone. "
                  "PSNR, SSIM and LPIPS are means over the generated frames of the action-conditioned protocol"
                  f"{_protocol_text(summary, 'action_conditioned', 'with')}, FVD is over whole videos (the context "
                  "frames are the real ones, as TECO scores them); the baselines are the same model untrained and "
                  "repeating the last context frame. Unconditioned: the unconditioned protocol"
                  f"{_protocol_text(summary, 'unconditioned', 'without')}. LPIPS: "
                  f"{networks.get('lpips_network', 'see each report')}. FVD: "
                  f"{networks.get('fvd_network', 'see each report')}."),
        "Results": report_lib.Table(summary_rows(summary)),
        "Every evaluation": report_lib.Table(metric_rows(summary)),
    }
    revisits = revisit_rows(summary)
    if revisits:
        sections["Revisits"] = [
            "PSNR of the generated frames by where they are: places the context showed before its last frame, the "
            "last context frame's own pose (repeating that frame needs no memory there), and places the context "
            "never showed.", report_lib.Table(revisits)]
    sections |= {
        "Tokenizer": report_lib.Table([{k: v for k, v in (summary["tokenizer"] or {}).items()
                                        if not isinstance(v, (dict, list))}]),
        "Stage times (s)": report_lib.Table([{"stage": k, "seconds": v} for k, v in summary["stage_seconds"].items()]),
    }
    for name in summary["backbones"]:
        blocks: list[Any] = []
        for label in ("trained", "unconditioned", "untrained", "repeat_last"):
            sub = report_dir / name / label
            blocks.append(f"[{label.replace('_', ' ')}]({name}/{label}/report.md)")
            # Figure paths relative to the report folder: `sub` is relative to the working directory.
            if (sub / "curves" / "all.png").exists():
                blocks.append(report_lib.Figure(Path(name, label, "curves", "all.png"),
                                                f"{name} {label}: PSNR, SSIM and LPIPS per frame"))
            if (sub / "videos" / "video_0.gif").exists() and label in ("trained", "unconditioned"):
                blocks.append(report_lib.Figure(Path(name, label, "videos", "video_0.gif"),
                                                f"{name} {label}: ground truth (left), generated (right)"))
        sections[f"TECO-{name}"] = blocks
    path = report_dir / "report.md"
    path.write_text(report_lib.build_markdown(f"teco_ssm on {summary.get('dataset', 'MazeLab')}", sections,
                                              report_dir))
    return path


def print_summary(summary: dict[str, Any]) -> None:
    """The stage times and the results table on the terminal."""
    print("\nstage                                   seconds")
    for name, seconds in summary["stage_seconds"].items():
        print(f"{name:<40}{seconds:>7.0f}")
    rows = summary_rows(summary)
    if rows:
        columns = list(rows[0])
        print("\n" + " | ".join(columns))
        for row in rows:
            print(" | ".join("-" if row[c] is None else f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c])
                             for c in columns))
