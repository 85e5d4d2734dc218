"""Forward+backward time and peak memory of every backbone and scan mode over sequence length.

    python scripts/bench_backbones.py                       # CPU sizes: 8x8 latent, d_model 128
    python scripts/bench_backbones.py --paper               # the paper's DMLab sizes (for a GPU)
    python scripts/bench_backbones.py --lengths 32,64 --layers 1 --repeats 2   # a quick look
    python scripts/bench_backbones.py --core                # the ConvSSM core against the release's algorithm

Prints one row per (backbone, scan mode, length) with the time per fwd+bwd step, XLA's peak memory estimate
(arguments + outputs + temporaries of the compiled step) and the ratio of each to ConvS5 (associative) at the same
length.

`--core` times the ConvS5 core alone (input convolution, scan, output convolution; `convs5.ConvS5SSM`) forward and
backward, per scan mode, against the baseline row: the ConvS5 release's algorithm written plainly below
(`release_core`: a complex B_bar convolution of the input, the associative scan of Listing 1, a complex C_tilde
convolution, 2 Re), on the same parameters and inputs in the same process, and prints the project's time as a ratio
to it. Shapes: batch 2, 8x8, 3x3 kernels, U = P = 128 at T = 32 and 128, U = P = 512 at T = 32 (`--core-shapes`).
"""
from __future__ import annotations

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from teco_ssm import backbones, host_memory, scan
from teco_ssm.backbones import convs5
from teco_ssm.backbones.common import DiagonalSSM

SSM_BACKBONES = ("s5", "convs5", "convt3")


def release_core(u: jax.Array, lam_bar: jax.Array, B_bar: jax.Array, C_tilde: jax.Array, kernel_size: int) -> jax.Array:
    """The ConvS5 release's recurrence (NVlabs/ConvSSM, Listing 1 of the paper) in complex arithmetic throughout.

    u: (B, T, H, W, U) real; lam_bar (P,), B_bar (P, U k k), C_tilde (U k k, P) complex -> (B, T, H, W, U) float32.
    """
    b, t, h, w, U = u.shape
    P, k = lam_bar.shape[0], kernel_size
    conv = lambda x, kernel: jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                                          dimension_numbers=("NHWC", "HWIO", "NHWC"))
    B_kernel = B_bar.reshape(P, k, k, U).transpose(1, 2, 3, 0)
    C_kernel = C_tilde.reshape(k, k, U, P).transpose(0, 1, 3, 2)
    bu = conv(u.reshape(b * t, h, w, U).astype(jnp.complex64), B_kernel).reshape(b, t, h, w, P)
    a = jnp.broadcast_to(lam_bar, (b, t, h, w, P))

    def operator(q_i, q_j):
        return q_j[0] * q_i[0], q_j[0] * q_i[1] + q_j[1]

    _, xs = jax.lax.associative_scan(operator, (a, bu), axis=1)
    return 2.0 * conv(xs.reshape(b * t, h, w, P), C_kernel).real.reshape(b, t, h, w, U)


def measure_core(batch: int, length: int, side: int, width: int, repeats: int) -> list[tuple[str, float, float]]:
    """(name, ms per fwd+bwd, max |difference| to the release's output) for the release row and each scan mode."""
    u = jax.random.normal(jax.random.key(0), (batch, length, side, side, width))
    rows = []
    for mode in ("release",) + scan.MODES:
        settings = convs5.ConvS5Settings(d_model=width, ssm_size=2 * width, scan_mode=mode if mode in scan.MODES
                                         else "associative")
        module = convs5.ConvS5SSM(settings)
        params = module.init(jax.random.key(1), u, None)["params"]  # the same draw for every row

        def loss(params, u):
            if mode == "release":
                lam_bar, B_bar, C_tilde = DiagonalSSM(
                    settings.ssm_size, settings.blocks, width * 9, width * 9, settings.dt_min, settings.dt_max,
                    settings.clip_eigs, settings.ssm_init, 9).apply({"params": params["diagonal"]})
                y = release_core(u, lam_bar, B_bar, C_tilde, settings.B_kernel_size)
            else:
                y = module.apply({"params": params}, u, None)[0]
            return jnp.mean(y ** 2), y

        step = jax.jit(jax.value_and_grad(loss, has_aux=True))
        (_, y), _ = jax.block_until_ready(step(params, u))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(step(params, u))
            times.append(time.perf_counter() - start)
        if mode == "release":
            reference = y
        rows.append((mode, 1e3 * float(np.median(times)), float(jnp.max(jnp.abs(y - reference)))))
    return rows


def core_table(shapes: str, repeats: int) -> None:
    print(f"{'T':>5} {'H x W':>6} {'U = P':>6} {'core':<12} {'ms/step':>9} {'release / this':>15} {'max |diff|':>11}")
    for shape in shapes.split(","):
        length, side, width = map(int, shape.split("x"))
        rows = measure_core(2, length, side, width, repeats)
        baseline = rows[0][1]
        for mode, ms, diff in rows:
            print(f"{length:>5} {f'{side}x{side}':>6} {width:>6} {mode:<12} {ms:>9.1f} {baseline / ms:>15.2f} "
                  f"{diff:>11.1e}", flush=True)


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
    host_memory.configure()  # as the teco-ssm front end runs
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="32,64,128,256,512")
    parser.add_argument("--backbones", default=",".join(backbones.NAMES))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--paper", action="store_true", help="the paper's DMLab sizes (8x8 latent, defaults)")
    parser.add_argument("--core", action="store_true", help="the ConvS5 core against the release's algorithm")
    parser.add_argument("--core-shapes", default="32x8x128,128x8x128,32x8x512",
                        help="T x side x (U = P) per core shape, comma-separated")
    args = parser.parse_args()
    if args.core:
        print(f"# ConvS5 core, forward+backward; {platform.processor() or platform.machine()}, "
              f"{jax.devices()[0].device_kind}, jax {jax.__version__}; batch 2, 3x3 kernels")
        core_table(args.core_shapes, args.repeats)
        return

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
