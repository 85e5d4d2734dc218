"""Sampling speed of every backbone: the compiled rollout against its baselines.

    python scripts/bench_sampling.py                          # MazeLab model sizes, every backbone
    python scripts/bench_sampling.py --size toy               # the test suite's tiny model
    python scripts/bench_sampling.py --backbones convs5 --repeats 1 --rerun_frames 10   # a quick look

For each backbone (MazeLab config sizes; the Transformer with a 300-frame window, TECO's setting, unless
--max_len), after compilation and with the model conditioned on `--context` frames:

  fps@300, fps@1000   generated frames per second of one compiled `lax.scan` rollout of 300 / 1,000 frames
                      (batch --batch, so frames/s counts batch x frames)
  ms@50, ms@1000      cost of one frame at state age 50 and 1,000: a compiled chunk of --chunk frames started from
                      the carry after 50 and after 1,000 frames, divided by the chunk length; ratio = ms@1000 / ms@50
  loop fps            the same model driven by a Python loop calling a jitted one-frame step (the frames stay on
                      the device; one sync at the end), 300 frames; compiled/loop = fps@300 / loop fps
  rerun fps           Transformer only: TECO's way, re-running the whole prefix in parallel for every new frame
                      (fixed shapes: a buffer of context + 300 frames, as TECO's sampler pads to its sequence
                      length), timed over --rerun_frames frames (its per-frame cost does not depend on the frame);
                      cached/rerun = fps@300 / rerun fps

Each time is the fastest of --repeats rounds (--chunk_repeats for the chunks) in which the compared functions take
turns, so that the load of a shared machine does not favour one of them.
Targets: ratio <= 1.2 for the SSMs, cached/rerun >= 5, compiled/loop >= 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from configs import mazelab
from teco_ssm import backbones, host_memory, sample, teco
from teco_ssm.backbones import transformer


class RerunTransformer(transformer.Backbone):
    """The Transformer stepped as TECO samples it: every step re-runs the parallel call over all inputs so far.

    Same parameters as `transformer.Backbone`. State: inputs (B, max_frames, H, W, input_channels), the inputs so
    far (zeros after them; causal attention never reads them), and time () int32. Every parallel call starts from
    TECO's start frame, so the state needs none of it.
    """
    max_frames: int = 316
    input_channels: int = 0

    def init_state(self, batch_size: int, spatial_shape: tuple[int, int]) -> dict[str, Any]:
        inputs = jnp.zeros((batch_size, self.max_frames, *spatial_shape, self.input_channels), jnp.float32)
        return dict(inputs=inputs, time=jnp.asarray(0, jnp.int32))

    def __call__(self, x: jax.Array, state: Any = None, train: bool = False) -> tuple[jax.Array, dict[str, Any]]:
        """x: (B, T, H, W, C) from the first input frame (`state` is the initial one) -> (y (B, T, H, W, d_model),
        the buffer holding x)."""
        y, _ = super().__call__(x, None, train)
        buffer = jnp.zeros((x.shape[0], self.max_frames) + x.shape[2:], x.dtype).at[:, :x.shape[1]].set(x)
        return y, dict(inputs=buffer, time=jnp.asarray(x.shape[1], jnp.int32))

    def step(self, x_t: jax.Array, state: dict[str, Any]) -> tuple[jax.Array, dict[str, Any]]:
        """x_t: (B, H, W, C) -> (y_t (B, H, W, d_model), state): the whole buffer through the parallel call."""
        time_index = state["time"]
        inputs = jax.lax.dynamic_update_index_in_dim(state["inputs"], x_t.astype(state["inputs"].dtype),
                                                     time_index, axis=1)
        y, _ = super().__call__(inputs, None, False)
        return jax.lax.dynamic_index_in_dim(y, time_index, axis=1, keepdims=False), dict(inputs=inputs,
                                                                                          time=time_index + 1)


def interleaved_times(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Fastest wall time in seconds of each `fn()` (its result blocked on) over `repeats` rounds, after one warm-up
    each; the functions take turns within a round, so a change of load on a shared machine hits them alike."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return {name: min(values) for name, values in times.items()}


# --size toy: the test suite's tiny model (8x8 codes, widths 16), where the per-frame work is small enough for
# per-frame dispatch costs to show.
TOY_MODEL = dict(code_shape=(8, 8), vqgan_codes=12, vqgan_embedding_dim=8, encoder_depths=(16, 16),
                 encoder_blocks=1, decoder_depths=(16, 16), decoder_blocks=1, latent_codes=16, latent_proj_dim=8,
                 latent_dim=8, prior_width=16, prior_mlp_dim=32, prior_heads=2, prior_layers=1, prior_token_dim=8,
                 num_actions=3, action_embed_dim=4)
TOY_BACKBONES = {
    "transformer": dict(d_model=16, n_layers=1, embed_dim=16, mlp_dim=32, num_heads=2, downsample=2),
    "s5": dict(d_model=16, n_layers=1, ssm_size=8, downsample=4, out_dim=8),
    "convs5": dict(d_model=16, n_layers=1, ssm_size=8, num_groups=4),
    "convt3": dict(d_model=16, n_layers=1, ssm_size=8, num_groups=4),
}


def build(name: str, size: str, max_len: int) -> tuple[Any, teco.Teco]:
    """The MazeLab config of backbone `name` (shrunk to the toy model for size 'toy'), and its model."""
    config = mazelab.get_config(name)
    if size == "toy":
        config.model.update(TOY_MODEL)
        config[name].update(TOY_BACKBONES[name])
    if name == "transformer":
        config.transformer.max_len = max_len
    return config, teco.build(config)


def bench_backbone(name: str, args: argparse.Namespace) -> dict[str, float]:
    config, model = build(name, args.size, args.max_len)
    variables = teco.init_variables(model, jax.random.key(0))
    settings = sample.SamplerSettings.from_config(config.sampling)
    rng = jax.random.key(1)
    keys = jax.random.split(jax.random.key(2), 2)
    codes = jax.random.randint(keys[0], (args.batch, args.context) + tuple(model.code_shape), 0, model.vqgan_codes)
    actions = jax.random.randint(keys[1], (args.batch, args.context + 1000 + args.chunk), 0, model.num_actions)
    condition = jax.jit(lambda v, c, a: model.apply(v, c, a, method=teco.Teco.condition))
    carry0 = condition(variables, codes, actions[:, :args.context])

    @jax.jit
    def generate_300(variables, carry, actions):
        return sample.generate(model, variables, carry, actions, rng, horizon=300, settings=settings)

    @jax.jit
    def generate_1000(variables, carry, actions):
        return sample.generate(model, variables, carry, actions, rng, horizon=1000, settings=settings)

    @jax.jit
    def chunk(variables, carry, actions):
        return sample.generate(model, variables, carry, actions, rng, horizon=args.chunk, settings=settings)

    future = actions[:, args.context:]
    at_1000, _ = generate_1000(variables, carry0, future[:, :1000])
    at_50, _ = jax.jit(lambda v, c, a: sample.generate(model, v, c, a, rng, horizon=50 - args.context,
                                                       settings=settings))(
        variables, carry0, future[:, :50 - args.context])
    step = jax.jit(lambda v, c, a: sample.sample_frame(model, v, c, a, rng, settings))

    def python_loop():
        carry, frames = carry0, []
        for t in range(300):
            carry, frame = step(variables, carry, future[:, t])
            frames.append(frame)
        return frames

    def chunk_from(carry):
        offset = int(carry["time"]) - args.context
        window = future[:, offset:offset + args.chunk]
        return lambda: chunk(variables, carry, window)

    rollouts = interleaved_times({300: lambda: generate_300(variables, carry0, future[:, :300]),
                                  1000: lambda: generate_1000(variables, carry0, future[:, :1000]),
                                  "loop": python_loop}, args.repeats)
    ages = interleaved_times({50: chunk_from(at_50), 1000: chunk_from(at_1000)}, args.chunk_repeats)
    row: dict[str, float] = {
        "fps@300": args.batch * 300 / rollouts[300], "fps@1000": args.batch * 1000 / rollouts[1000],
        "ms@50": 1e3 * ages[50] / args.chunk, "ms@1000": 1e3 * ages[1000] / args.chunk,
        "loop fps": args.batch * 300 / rollouts["loop"]}
    row["ratio"] = row["ms@1000"] / row["ms@50"]
    row["compiled/loop"] = row["fps@300"] / row["loop fps"]

    if name == "transformer":
        fields = {f.name: getattr(model.backbone, f.name) for f in dataclasses.fields(model.backbone)
                  if f.name not in ("parent", "name")}
        rerun_model = model.clone(backbone=RerunTransformer(
            **fields, max_frames=args.context + 300, input_channels=model.latent_dim + model.action_embed_dim))
        rerun_carry = jax.jit(lambda v, c, a: rerun_model.apply(v, c, a, method=teco.Teco.condition))(
            variables, codes, actions[:, :args.context])
        rerun = jax.jit(lambda v, c, a: sample.generate(rerun_model, v, c, a, rng, horizon=args.rerun_frames,
                                                        settings=settings))
        rerun_time = interleaved_times({"rerun": lambda: rerun(variables, rerun_carry, future[:, :args.rerun_frames])},
                                       args.repeats)["rerun"]
        row["rerun fps"] = args.batch * args.rerun_frames / rerun_time
        row["cached/rerun"] = row["fps@300"] / row["rerun fps"]
        # Same frames both ways: the re-running backbone computes what the cache computes.
        cached = generate_300(variables, carry0, future[:, :300])[1][:, :args.rerun_frames]
        again = rerun(variables, rerun_carry, future[:, :args.rerun_frames])[1]
        row["rerun frames equal"] = float(np.mean(np.asarray(cached) == np.asarray(again)))
    return row


def main() -> None:
    host_memory.configure()  # as the teco-ssm front end runs
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default=",".join(backbones.NAMES))
    parser.add_argument("--size", choices=("mazelab", "toy"), default="mazelab")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=16, help="MazeLab's action-conditioned context")
    parser.add_argument("--chunk", type=int, default=20, help="frames per chunk for the per-frame cost")
    parser.add_argument("--max_len", type=int, default=300, help="the Transformer's window (TECO: 300)")
    parser.add_argument("--rerun_frames", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the rollout timings")
    parser.add_argument("--chunk_repeats", type=int, default=7, help="rounds of the per-frame cost timings")
    args = parser.parse_args()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__} on "
          f"{jax.devices()[0].device_kind}, {args.size} size, batch {args.batch}, context {args.context}, "
          f"load at start {load}")
    columns = ["fps@300", "fps@1000", "ms@50", "ms@1000", "ratio", "loop fps", "compiled/loop", "rerun fps",
               "cached/rerun", "rerun frames equal"]
    print("| backbone | " + " | ".join(columns) + " |")
    print("|" + " --- |" * (len(columns) + 1))
    for name in args.backbones.split(","):
        row = bench_backbone(name, args)
        cells = [f"{row[c]:.3g}" if c in row else "-" for c in columns]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    print(f"# load at end {os.getloadavg() if hasattr(os, 'getloadavg') else None}")


if __name__ == "__main__":
    main()
