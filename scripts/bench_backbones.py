"""Forward+backward time and peak memory of every backbone and scan mode over sequence length.

    python scripts/bench_backbones.py                       # CPU sizes: 8x8 latent, d_model 128
    python scripts/bench_backbones.py --paper               # the paper's DMLab sizes (for a GPU)
    python scripts/bench_backbones.py --lengths 32,64 --layers 1 --repeats 2   # a quick look

Prints one row per (backbone, scan mode, length) with the time per fwd+bwd step, XLA's peak memory estimate
(arguments + outputs + temporaries of the compiled step) and the ratio of each to ConvS5 (associative) at the same
length.
"""
from __future__ import annotations

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from teco_ssm import backbones, scan

SSM_BACKBONES = ("s5", "convs5", "convt3")


def cpu_config(name: str, layers: int) -> dict:
    common = dict(n_layers=layers, d_model=128)
    if name == "transformer":
        return dict(common, downsample=2, embed_dim=128, mlp_dim=512, num_heads=4, max_len=1024)
    if name == "s5":
        return dict(common, ssm_size=256, blocks=4, downsample=8, out_dim=128)
    return dict(common, ssm_size=128, blocks=2)


def measure(name: str, cfg: dict, batch: int, length: int, latent: int, channels: int, repeats: int):
    model = backbones.build(name, cfg)
    x = jax.random.normal(jax.random.key(0), (batch, length, latent, latent, channels))
    params = jax.jit(model.init)(jax.random.key(1), x)["params"]

    def loss(params, x):
        y, _ = model.apply({"params": params}, x)
        return jnp.mean(y ** 2)

    step = jax.jit(jax.value_and_grad(loss))
    compiled = step.lower(params, x).compile()
    mem = compiled.memory_analysis()
    peak = None if mem is None else (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes)
    jax.block_until_ready(compiled(params, x))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, x))
        times.append(time.perf_counter() - start)
    return float(np.median(times)), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="32,64,128,256,512")
    parser.add_argument("--backbones", default=",".join(backbones.NAMES))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--paper", action="store_true", help="the paper's DMLab sizes (8x8 latent, defaults)")
    args = parser.parse_args()

    latent, channels = 8, 32
    print(f"# {platform.processor() or platform.machine()}, {jax.devices()[0].device_kind}, jax {jax.__version__}; "
          f"batch {args.batch}, latent {latent}x{latent}x{channels}")
    print(f"{'backbone':<12} {'scan':<12} {'T':>5} {'ms/step':>10} {'peak MiB':>10} {'time/ConvS5':>12} {'mem/ConvS5':>11}")
    for length in map(int, args.lengths.split(",")):
        baseline = None
        rows = []
        for name in args.backbones.split(","):
            modes = scan.MODES if name in SSM_BACKBONES else ("-",)
            for mode in modes:
                cfg = {} if args.paper else cpu_config(name, args.layers)
                if name in SSM_BACKBONES:
                    cfg["scan_mode"] = mode
                seconds, peak = measure(name, cfg, args.batch, length, latent, channels, args.repeats)
                rows.append((name, mode, seconds, peak))
                if name == "convs5" and mode == "associative":
                    baseline = (seconds, peak)
        for name, mode, seconds, peak in rows:
            t_ratio = f"{seconds / baseline[0]:.2f}" if baseline else "-"
            m_ratio = f"{peak / baseline[1]:.2f}" if baseline and peak and baseline[1] else "-"
            peak_mib = f"{peak / 2**20:.1f}" if peak else "-"
            print(f"{name:<12} {mode:<12} {length:>5} {1e3 * seconds:>10.1f} {peak_mib:>10} {t_ratio:>12} {m_ratio:>11}",
                  flush=True)


if __name__ == "__main__":
    main()
