"""An evaluation report folder a user can look at: curves, side-by-side GIFs, every number, and a `report.md`.

Layout written by `write_report(report_dir, ...)`:

    report_dir/
      metrics.json          every number (non-finite values, e.g. PSNR of identical frames, written as null)
      curves/<metric>.png   per-frame mean over videos, against the frame index in the full video
      curves/all.png        the same curves side by side (embedded in report.md)
      videos/video_<i>.gif  real (left) and generated (right) side by side
      report.md             embeds the above with relative paths, so it renders on GitHub
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the non-interactive backend)
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

_SEPARATOR = 4  # white pixels between the real and the generated frame


@dataclasses.dataclass(frozen=True)
class Table:
    """A markdown table: one mapping per row; `columns` orders them (default: keys of the first row)."""

    rows: Sequence[Mapping[str, Any]]
    columns: Sequence[str] | None = None


@dataclasses.dataclass(frozen=True)
class Figure:
    """An image or GIF embedded in the report; `path` absolute or relative to the report folder."""

    path: Union[str, os.PathLike]
    caption: str = ""


Block = Union[str, Table, Figure]


def _save(fig: Any, path: str | os.PathLike) -> Path:
    """Writes `fig` (tight layout) to `path`, creating its folder, and closes it."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def json_safe(value: Any) -> Any:
    """Converts NumPy scalars/arrays and tuples to JSON types; NaN and infinities become None (null)."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(numbers: Mapping[str, Any], path: Union[str, os.PathLike]) -> Path:
    """Writes `numbers` as strict JSON (see `json_safe`); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(numbers), indent=2, allow_nan=False) + "\n")
    return path


def plot_curve(values: np.ndarray, path: Union[str, os.PathLike], *, name: str, first_frame: int = 0,
               spread: np.ndarray | None = None) -> Path:
    """Plots a per-frame metric curve to PNG.

    Args:
      values: `(T,)` the metric at each generated frame (mean over videos).
      name: the metric's name, for the axis and title.
      first_frame: index of the first generated frame in the full video (the number of context frames).
      spread: optional `(T,)` standard deviation over videos, drawn as a band.
    """
    values = np.asarray(values, np.float64)
    frames = first_frame + np.arange(values.shape[0])
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(frames, values, lw=1.5)
    if spread is not None:
        spread = np.asarray(spread, np.float64)
        ax.fill_between(frames, values - spread, values + spread, alpha=0.2, lw=0)
    ax.set_xlabel("frame")
    ax.set_ylabel(name.upper())
    ax.set_title(f"{name.upper()} per generated frame, mean" + (" ± std over videos" if spread is not None else ""))
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_curves(curves: Mapping[str, np.ndarray], path: Union[str, os.PathLike], *, first_frame: int = 0,
                spread: Mapping[str, np.ndarray] | None = None) -> Path:
    """Plots several per-frame metric curves side by side, one panel each, to one PNG.

    Args:
      curves: metric name -> `(T,)` per-frame mean over videos (e.g. PSNR, SSIM, LPIPS), panels in this order.
      first_frame: index of the first generated frame in the full video.
      spread: optional metric name -> `(T,)` standard deviation over videos, drawn as a band.
    """
    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3.2), dpi=100, squeeze=False)
    for ax, (name, values) in zip(axes[0], curves.items()):
        values = np.asarray(values, np.float64)
        frames = first_frame + np.arange(values.shape[0])
        ax.plot(frames, values, lw=1.5)
        if spread is not None and name in spread:
            band = np.asarray(spread[name], np.float64)
            ax.fill_between(frames, values - band, values + band, alpha=0.2, lw=0)
        ax.set_xlabel("frame")
        ax.set_title(name.upper())
        ax.grid(alpha=0.3)
    fig.suptitle("Per generated frame, mean" + (" ± std over videos" if spread is not None else ""))
    return _save(fig, path)


def side_by_side(real: np.ndarray, fake: np.ndarray) -> np.ndarray:
    """Real and generated frames next to each other.

    Args:
      real, fake: `(T, H, W, 3)` uint8.

    Returns:
      `(T, H, 2 W + 4, 3)` uint8: real on the left, a white band, generated on the right.
    """
    real, fake = np.asarray(real), np.asarray(fake)
    if real.shape != fake.shape or real.ndim != 4 or real.dtype != np.uint8 or fake.dtype != np.uint8:
        raise ValueError(f"expected two uint8 videos (T, H, W, 3) of one shape, got {real.shape} {real.dtype} and "
                         f"{fake.shape} {fake.dtype}")
    band = np.full((*real.shape[:2], _SEPARATOR, real.shape[3]), 255, np.uint8)
    return np.concatenate([real, band, fake], axis=2)


def write_gif(frames: np.ndarray, path: Union[str, os.PathLike], *, fps: int = 10) -> Path:
    """Writes `(T, H, W, 3)` uint8 frames as a looping GIF."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(frame) for frame in np.asarray(frames)]
    images[0].save(path, save_all=True, append_images=images[1:], duration=max(1, round(1000 / fps)), loop=0)
    return path


def markdown_table(table: Table) -> str:
    """Renders a `Table` as GitHub markdown; floats with 4 significant decimals, None as an em dash."""
    if not table.rows:
        return ""
    columns = list(table.columns or table.rows[0].keys())

    def cell(value: Any) -> str:
        if value is None:
            return "—"
        if isinstance(value, (float, np.floating)):
            return f"{value:.4f}" if math.isfinite(value) else str(value)
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in table.rows]
    return "\n".join(lines)


def build_markdown(title: str, sections: Mapping[str, Union[Block, Sequence[Block]]],
                   report_dir: Union[str, os.PathLike]) -> str:
    """Builds `report.md` text.

    Args:
      title: the top heading.
      sections: heading -> a block or a list of blocks; a block is markdown text, a `Table` or a `Figure`.
      report_dir: where `report.md` will live; figure paths are written relative to it (POSIX separators).
    """
    report_dir = Path(report_dir).resolve()
    parts = [f"# {title}"]
    for heading, blocks in sections.items():
        parts.append(f"## {heading}")
        if isinstance(blocks, (str, Table, Figure)):
            blocks = [blocks]
        for block in blocks:
            if isinstance(block, Table):
                parts.append(markdown_table(block))
            elif isinstance(block, Figure):
                target = Path(block.path)
                target = target.resolve() if target.is_absolute() else (report_dir / target).resolve()
                relative = Path(os.path.relpath(target, report_dir)).as_posix()
                parts.append(f"![{block.caption or target.stem}]({relative})")
            else:
                parts.append(str(block))
    return "\n\n".join(parts) + "\n"


def write_report(report_dir: Union[str, os.PathLike], *, numbers: Mapping[str, Any],
                 curves: Mapping[str, np.ndarray], videos: Sequence[tuple[np.ndarray, np.ndarray]],
                 sections: Mapping[str, Union[Block, Sequence[Block]]], title: str = "Evaluation",
                 first_frame: int = 0, curve_spread: Mapping[str, np.ndarray] | None = None,
                 fps: int = 10) -> dict[str, Any]:
    """Writes the whole report folder.

    Args:
      report_dir: the folder (created).
      numbers: everything for `metrics.json`.
      curves: metric name -> `(T,)` per-frame mean over videos; one PNG each.
      videos: `(real, fake)` pairs of `(T, H, W, 3)` uint8 videos; one side-by-side GIF each.
      sections: the report's text and tables (see `build_markdown`); the curves and GIFs are appended as
        sections "Curves" and "Samples".
      first_frame: frame index of the first curve point.
      curve_spread: optional metric name -> `(T,)` std over videos, drawn as a band.

    Returns:
      `{"json": Path, "markdown": Path, "curves": {name: Path}, "panel": Path or None, "gifs": [Path]}`; the
      panel (`curves/all.png`, every curve side by side) is what `report.md` embeds.
    """
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    json_path = write_json(numbers, report_dir / "metrics.json")
    curve_paths = {
        name: plot_curve(values, report_dir / "curves" / f"{name}.png", name=name, first_frame=first_frame,
                         spread=None if curve_spread is None else curve_spread.get(name))
        for name, values in curves.items()
    }
    panel = (plot_curves(curves, report_dir / "curves" / "all.png", first_frame=first_frame, spread=curve_spread)
             if curves else None)
    gif_paths = [write_gif(side_by_side(real, fake), report_dir / "videos" / f"video_{i}.gif", fps=fps)
                 for i, (real, fake) in enumerate(videos)]
    all_sections = dict(sections)
    if panel is not None:
        links = ", ".join(f"[{name.upper()}](curves/{p.name})" for name, p in curve_paths.items())
        # Figures relative to the report folder, which may itself be relative to the working directory.
        all_sections["Curves"] = [Figure(panel.relative_to(report_dir),
                                         " | ".join(n.upper() for n in curve_paths) + " per frame"),
                                  f"One curve per file: {links}."]
    if gif_paths:
        all_sections["Samples"] = ["Left: ground truth. Right: generated."] + [
            Figure(p.relative_to(report_dir), f"video {i}") for i, p in enumerate(gif_paths)]
    all_sections["Numbers"] = f"Every number is in [metrics.json]({json_path.name})."
    markdown_path = report_dir / "report.md"
    markdown_path.write_text(build_markdown(title, all_sections, report_dir))
    return {"json": json_path, "markdown": markdown_path, "curves": curve_paths, "panel": panel, "gifs": gif_paths}
