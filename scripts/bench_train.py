"""Train steps per second and peak memory of the full TECO train step (`teco_ssm.train.train_step`), per backbone.

    python scripts/bench_train.py                          # MazeLab config (configs/mazelab.py), on this machine
    python scripts/bench_train.py --steps 20 --backbones convs5,convt3
    python scripts/bench_train.py --dmlab                  # DMLab config, batch 16 x 300 frames, remat, bfloat16
                                                           # (for a GPU; the default when one is present)
    python scripts/bench_train.py --compile-only           # DMLab config on CPU: initialisation and compilation only
    python scripts/bench_train.py --backbones convt3 --set "model.decoder_depths=(32,64)"   # a variant of the config

Runs the real train step (AdamW update included) on random codes of the config's shapes on one device, after one
compiling call. Prints, per backbone: parameters, seconds to initialise the state and to compile the step, steps/s
and ms/step (median of the timed steps), CPU seconds per step (the process's CPU time over the timed steps, which
load changes less than wall time), and XLA's peak memory estimate of the compiled step (arguments + outputs +
temporaries - donated aliases). `--compile-only` runs the DMLab config on the CPU and stops after compiling (no timed steps).
Progress lines go to stderr. Set JAX_COMPILATION_CACHE_DIR to reuse compiled steps across runs.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import dmlab, mazelab
from teco_ssm import backbones, config_io, host_memory, optim, sharding, teco, train


def bench_config(name: str, use_dmlab: bool):
    if not use_dmlab:
        return mazelab.get_config(name)
    config = dmlab.get_config(name)
    config.batch_size, config.seq_len = 16, 300
    config.model.remat, config.model.dtype = True, "bfloat16"
    config[name].remat, config[name].dtype = True, "bfloat16"  # the backbone's own settings
    return config


def log(message: str) -> None:
    """A progress line on stderr: compiling the paper-size step takes minutes."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def measure(config, steps: int, compile_only: bool = False) -> dict[str, float | None]:
    """Parameters, init_s, compile_s, peak_mib, and (unless `compile_only`) steps_per_s and loss."""
    start = time.perf_counter()
    model = teco.build(config)
    settings = optim.OptimizerSettings.of_experiment(config)
    mesh = sharding.make_mesh(1, jax.devices()[:1])
    static = dict(model=model, settings=settings, mesh=mesh, shard_params=False)
    state, constants = train.init_state(train.init_key(0), None, **static)
    jax.block_until_ready(state)
    init_s = time.perf_counter() - start
    log(f"{config.backbone}: state initialised in {init_s:.1f} s; compiling the train step")
    rng = np.random.default_rng(0)
    shape = (config.batch_size, config.seq_len)
    batch = sharding.global_batch({
        "codes": rng.integers(0, model.vqgan_codes, shape + tuple(model.code_shape)).astype(np.int32),
        "actions": rng.integers(0, model.num_actions, shape).astype(np.int32)}, mesh)
    key = jax.random.key(0)

    start = time.perf_counter()
    compiled = train.train_step.lower(state, constants, batch, key, **static).compile()
    compile_s = time.perf_counter() - start
    log(f"{config.backbone}: compiled in {compile_s:.1f} s"
        + ("" if compile_only else f"; running {steps + 1} steps"))
    memory = compiled.memory_analysis()
    peak = None
    if memory is not None:
        peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
                - memory.alias_size_in_bytes)
    row = dict(params=sum(x.size for x in jax.tree_util.tree_leaves(state["params"])), init_s=init_s,
               compile_s=compile_s, peak_mib=None if peak is None else peak / 2 ** 20, steps_per_s=None, loss=None)
    if compile_only:
        return row
    state, metrics = compiled(state, constants, batch, key)
    jax.block_until_ready(metrics)
    times = []
    cpu_start = time.process_time()
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = compiled(state, constants, batch, key)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    cpu_s = (time.process_time() - cpu_start) / steps
    return row | dict(steps_per_s=1.0 / float(np.median(times)), cpu_s_per_step=cpu_s, loss=float(metrics["loss"]))


def main() -> None:
    host_memory.configure()  # as the teco-ssm front end runs
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default=",".join(backbones.NAMES))
    parser.add_argument("--steps", type=int, default=10, help="timed steps per backbone")
    parser.add_argument("--dmlab", action="store_true", help="DMLab config at batch 16 x 300, remat, bfloat16")
    parser.add_argument("--compile-only", action="store_true",
                        help="DMLab config on the CPU: initialise and compile, no timed steps")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="change the config as `teco-ssm train --set` does, e.g. --set model.decoder_depths=(32,64)")
    args = parser.parse_args()
    if args.compile_only:
        jax.config.update("jax_platforms", "cpu")
    use_dmlab = args.dmlab or args.compile_only or jax.default_backend() == "gpu"

    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    device = jax.devices()[0]
    print(f"# {'DMLab (16 x 300, remat, bfloat16)' if use_dmlab else 'MazeLab'} train step; {device.device_kind} "
          f"({platform.machine()}, {os.cpu_count()} cores), jax {jax.__version__}; load average before: {load}")
    print(f"{'backbone':<12} {'params':>12} {'init s':>7} {'compile s':>10} {'steps/s':>9} {'ms/step':>9} "
          f"{'CPU s/step':>10} {'peak MiB':>10}")
    for name in args.backbones.split(","):
        config = bench_config(name, use_dmlab)
        for item in args.overrides:
            try:
                config_io.apply_override(config, item)
            except (ValueError, KeyError, AttributeError) as error:
                parser.error(f"--set {item}: {error}")
        row = measure(config, args.steps, args.compile_only)
        peak = "-" if row["peak_mib"] is None else f"{row['peak_mib']:.1f}"
        rate = row["steps_per_s"]
        speed = (f"{'-':>9} {'-':>9} {'-':>10}" if rate is None
                 else f"{rate:>9.2f} {1e3 / rate:>9.1f} {row['cpu_s_per_step']:>10.3f}")
        print(f"{name:<12} {row['params']:>12,} {row['init_s']:>7.1f} {row['compile_s']:>10.1f} {speed} {peak:>10}",
              flush=True)
    print(f"# load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
