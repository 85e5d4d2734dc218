"""Sampling speed of every backbone: the compiled rollout against its baselines.

    python scripts/bench_sampling.py                          # MazeLab model sizes, every backbone
    python scripts/bench_sampling.py --size toy               # the test suite's tiny model
    python scripts/bench_sampling.py --size dmlab --context 36   # the paper's DMLab model (for a GPU)
    python scripts/bench_sampling.py --backbones convs5 --repeats 1 --rerun_frames 10   # a quick look
    python scripts/bench_sampling.py --stages runs/mazelab    # the sampling stages of a `teco-ssm run` workdir

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

--stages RUN_WORKDIR (a `teco-ssm run` workdir, e.g. one made with `teco-ssm run --quick --workdir ...`; read only)
times the three sampling stages of `teco-ssm run` for its first model as `teco_ssm.run` calls them
(`sample_files.sample_dataset` into a temporary folder: trained action-conditioned, unconditioned, untrained), in
one process, after its imports, and then where a stage's time goes: imports, checkpoint restore, tokenizer load,
compilation of the rollout's two parts, the context encoding, per generated frame the backbone step, the MaskGit
passes and the decoder, the tokenizer's decoding to pixels, and writing a file.
"""
from __future__ import annotations

import time

_START = time.perf_counter()  # before the heavy imports: --stages reports their time

import argparse
import dataclasses
import os
import platform
import tempfile
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from configs import dmlab, mazelab
from teco_ssm import backbones, host_memory, run, sample, teco
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
    """The MazeLab config of backbone `name` (shrunk to the toy model for size 'toy'; the DMLab config, the paper's
    model, for size 'dmlab'), and its model."""
    config = dmlab.get_config(name) if size == "dmlab" else mazelab.get_config(name)
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


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - start


def bench_stages(run_dir: Path, repeats: int) -> None:
    """Prints the sampling stages' times and where they go (module docstring, --stages)."""
    import ml_collections

    import vqgan
    from teco_ssm import checkpoint, sample_files
    from teco_ssm.data import batch_codes, open_dataset

    imports = time.perf_counter() - _START
    model_dir = sorted((run_dir / "models").iterdir())[0]
    config = ml_collections.ConfigDict(checkpoint.read_config(str(model_dir)))
    tokenizer, t_tokenizer = _timed(lambda: vqgan.load(config.tokenizer.path))
    model = teco.build(config)
    stages = run.sampling_runs(config, model_dir, tokenizer)
    untrained = stages["untrained"][1]
    print(f"## stages of {model_dir} (as teco_ssm.run calls them, one process)")
    real_videos: dict[Any, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as out:
        for label, (protocol, variables) in stages.items():
            _, seconds = _timed(lambda: sample_files.sample_dataset(config, variables(), tokenizer, config.dataset.path,
                                                                    Path(out) / label, protocol=protocol,
                                                                    split="test", real_cache=real_videos))
            print(f"| sample-{label} | {seconds:.1f} s |", flush=True)

        print("## where the time goes")
        variables, t_restore = _timed(lambda: checkpoint.load_variables(config, str(model_dir)))
        variables = teco.set_code_embeddings(variables, tokenizer.codebook)
        _, t_init = _timed(untrained)
        rows = [("imports (jax, flax, teco_ssm, vqgan)", imports), ("tokenizer load", t_tokenizer),
                ("checkpoint restore", t_restore), ("untrained variables (again: compiled once per process)", t_init)]
        settings = sample.SamplerSettings.from_config(config.sampling)
        passes = settings.draft_steps + settings.revise_rounds * settings.revise_steps
        for protocol_name in ("action_conditioned", "unconditioned"):
            protocol = sample.resolve_protocol(protocol_name, config.sampling)
            batch = next(iter(open_dataset(config.dataset.path, "test", seq_len=protocol.num_frames,
                                           batch_size=config.sampling.batch_size, shuffle=False)))
            codes = batch_codes(batch, tokenizer)
            size = codes.shape[0]
            actions = jnp.asarray(batch["actions"], jnp.int32) if protocol.use_actions else None
            context = jnp.asarray(codes[:, :protocol.context])
            use = protocol.use_actions
            condition = jax.jit(lambda v, c, a: model.apply(v, c, a, method=teco.Teco.condition, use_actions=use))
            generate = jax.jit(lambda v, c, a: sample.generate(model, v, c, a, jax.random.key(0),
                                                               horizon=protocol.horizon, settings=settings))
            past = None if actions is None else actions[:, :protocol.context]
            future = None if actions is None else actions[:, protocol.context:]
            condition_c, t_cc = _timed(lambda: condition.lower(variables, context, past).compile())
            carry = condition_c(variables, context, past)
            generate_c, t_gc = _timed(lambda: generate.lower(variables, carry, future).compile())
            step = jax.jit(lambda v, c, a: model.apply(v, c, a, method=lambda m, c, a: m._advance(c, a)))
            hidden, _ = step(variables, carry, None if future is None else future[:, 0])
            latent = carry["latent"]
            tokens = jnp.full((size,) + tuple(latent.shape[1:3]), model.latent_codes, jnp.int32)  # the prior's mask id
            prior = jax.jit(lambda v, t, h: model.apply(v, t, h, method=lambda m, t, h: m.prior(t, h)))
            decoder = jax.jit(lambda v, h, z: model.apply(v, h, z, method=lambda m, h, z: m._decode(h, z)))
            fns = {"condition": lambda: condition_c(variables, context, past),
                   "generate": lambda: generate_c(variables, carry, future),
                   "backbone step": lambda: step(variables, carry, None if future is None else future[:, 0]),
                   "prior pass": lambda: prior(variables, tokens, hidden),
                   "decoder": lambda: decoder(variables, hidden, latent)}
            times = interleaved_times(fns, repeats)
            generated = np.asarray(generate_c(variables, carry, future)[1])
            _, t_decode_first = _timed(lambda: tokenizer.decode(generated))
            decode = interleaved_times({"decode": lambda: tokenizer.decode(codes)}, repeats)["decode"]
            frames = sample_files.to_uint8(tokenizer.decode(codes))
            _, t_write = _timed(lambda: sample_files._write_npz_atomic(Path(out) / "x.npz",
                                                                       dict(real=frames, fake=frames)))
            ms = lambda seconds: f"{1e3 * seconds / protocol.horizon:.1f} ms"
            rows += [(f"{protocol_name}: compile condition / generate", f"{t_cc:.1f} s / {t_gc:.1f} s"),
                     (f"{protocol_name}: condition on {protocol.context} frames, batch {size}", times["condition"]),
                     (f"{protocol_name}: generate {protocol.horizon} frames", times["generate"]),
                     ("  per generated frame", ms(times["generate"])),
                     ("    backbone step", f"{1e3 * times['backbone step']:.1f} ms"),
                     (f"    prior, {passes} passes", f"{1e3 * passes * times['prior pass']:.1f} ms"),
                     ("    decoder", f"{1e3 * times['decoder']:.1f} ms"),
                     (f"{protocol_name}: tokenizer decode of {codes.shape[0] * codes.shape[1]} frames "
                      f"(chunks of {tokenizer.chunk_size})", decode),
                     ("  first call (with compilation)", t_decode_first),
                     ("write one sample file", t_write)]
        for name, value in rows:
            print(f"| {name} | {value if isinstance(value, str) else f'{value:.2f} s'} |")


def main() -> None:
    host_memory.configure()  # as the teco-ssm front end runs
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default=",".join(backbones.NAMES))
    parser.add_argument("--size", choices=("mazelab", "toy", "dmlab"), default="mazelab")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=16, help="MazeLab's action-conditioned context")
    parser.add_argument("--chunk", type=int, default=20, help="frames per chunk for the per-frame cost")
    parser.add_argument("--max_len", type=int, default=300, help="the Transformer's window (TECO: 300)")
    parser.add_argument("--rerun_frames", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the rollout timings")
    parser.add_argument("--chunk_repeats", type=int, default=7, help="rounds of the per-frame cost timings")
    parser.add_argument("--stages", type=Path, default=None,
                        help="a `teco-ssm run` workdir: time its sampling stages instead (module docstring)")
    args = parser.parse_args()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    if args.stages is not None:
        print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}, "
              f"load at start {load}")
        bench_stages(args.stages, args.repeats)
        print(f"# load at end {os.getloadavg() if hasattr(os, 'getloadavg') else None}")
        return
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
