r"""Where do rollouts break? Per generated frame, a trained model's sampled rollout against what each part of the
model can do when the others are given the truth (a diagnostic script, not a test).

    python scripts/diagnose_rollouts.py --workdir runs/mazelab --backbone convt3 [--seeds 3] [--split test]

Reads a `teco-ssm run` workdir (the model in models/<backbone>, the tokenizer, the raw frames in data/). For the
action-conditioned protocol of the model's config (context C, horizon K), on the first `--num_videos` videos of the
split, it reports per generated frame k = 1..K (mean PSNR in dB against the real frames, over videos and seeds):

  tokenizer       the tokenizer's reconstruction of the real frame: the ceiling of every row below
  copy            the last context frame repeated (the baseline)
  teacher_forced  true history (posterior latents of every earlier frame) and the frame's own posterior latent:
                  the decoder alone
  one_step        true history, the prior's sampled latent for this frame: the prior alone, without accumulation
  rollout         the model's own samples fed back (what `teco-ssm sample` produces)

and, per frame, the prior's latent accuracy (one_step: share of latent codes equal to the posterior's) and how often
a generated frame is one the tokenizer would produce (share of its codes that survive decode -> encode unchanged;
the real frames' codes give the reference). `--split valid` reads a validation split when the dataset has one.
`--against tokenizer` scores every row against the tokenizer's reconstructions instead, as the report does. It also
prints the rollout's margin over the copy per seed and its spread.
Prints one table and writes it as JSON to `--out` (default <workdir>/diagnosis_<backbone>.json).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import vqgan
from teco_ssm import checkpoint, config_io, evaluate, metrics, modules, sample, teco
from teco_ssm.data import batch_codes, open_dataset
from teco_ssm.teco import Teco


def psnr_per_frame(real: np.ndarray, fake: np.ndarray) -> np.ndarray:
    """(B, T, H, W, 3) in [-1, 1] -> (B, T) dB (`metrics.psnr`), capped as the report caps it."""
    return np.minimum(np.asarray(metrics.psnr(real, np.clip(fake, -1, 1)), np.float64), evaluate.PSNR_CAP_DB)


def survive_round_trip(tokenizer, codes: np.ndarray) -> np.ndarray:
    """(B, T, h, w) codes -> (B, T) share of codes equal after decode -> encode."""
    again = np.asarray(tokenizer.encode(np.asarray(tokenizer.decode(codes)))[1])
    return (again == codes).mean(axis=(2, 3))


def teacher_and_one_step(model: Teco, variables, codes, actions, context: int, rng, settings):
    """Per future frame, with the true history: decoder codes from the posterior latent (teacher forced), codes and
    latent accuracy from the prior's sample (one step). codes (B, T, h, w), actions (B, T)."""
    latent_codes = model.apply(variables, codes, actions, method=Teco.predict)["latent_codes"]
    carry = model.apply(variables, codes[:, :context], actions[:, :context], method=Teco.condition)

    def step(carry, inputs):
        action, latent, t = inputs
        gen_carry, sampled = model.apply(variables, carry, action, jax.random.fold_in(rng, t),
                                         method=Teco.generate_step, settings=settings)
        true_latent = model.apply(variables, latent, method=lambda m, c: m.codebook.lookup(c))
        hits = jnp.mean(jnp.all(gen_carry["latent"] == true_latent, axis=-1), axis=(1, 2))
        carry, logits = model.apply(variables, carry, action, latent, method=Teco.teacher_forced_step)
        return carry, (modules.argmax(logits), sampled, hits)

    horizon = codes.shape[1] - context
    xs = (jnp.moveaxis(actions[:, context:], 1, 0), jnp.moveaxis(latent_codes[:, context:], 1, 0),
          jnp.arange(context, context + horizon))
    _, (teacher, one_step, hits) = jax.lax.scan(step, carry, xs)
    return jnp.moveaxis(teacher, 0, 1), jnp.moveaxis(one_step, 0, 1), jnp.moveaxis(hits, 0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/mazelab")
    parser.add_argument("--backbone", default="convt3")
    parser.add_argument("--split", default="test")
    parser.add_argument("--num_videos", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--against", choices=("raw", "tokenizer"), default="raw",
                        help="score against the raw frames, or against the tokenizer's reconstructions as the "
                             "report does (the copy then repeats the last context frame's reconstruction)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="a sampler setting for this diagnosis, e.g. --set sampling.temperature=0.5 or "
                             "--set sampling.feedback=posterior")
    args = parser.parse_args()

    model_dir = os.path.join(args.workdir, "models", args.backbone)
    config = ml_collections.ConfigDict(checkpoint.read_config(model_dir))
    sample.SamplerSettings.fill_added_later(config.sampling)
    for item in args.overrides:
        config_io.apply_override(config, item)
    tokenizer = vqgan.load(os.path.join(args.workdir, "tokenizer"))
    model = teco.build(config)
    variables = checkpoint.load_variables(config, model_dir, args.step)
    variables = teco.set_code_embeddings(variables, tokenizer.codebook)
    settings = sample.SamplerSettings.from_config(config.sampling)
    protocol = sample.Protocol.from_config(config.sampling.action_conditioned)
    context, horizon = protocol.context, protocol.horizon
    ds = open_dataset(os.path.join(args.workdir, "data"), args.split, seq_len=context + horizon,
                      batch_size=args.batch_size, shuffle=False)
    one_step_settings = dataclasses.replace(settings, feedback="sample")  # the latent accuracy reads the sample
    one_step_fn = jax.jit(lambda v, c, a, r: teacher_and_one_step(model, v, c, a, context, r, one_step_settings))

    rows: dict[str, list[np.ndarray]] = {k: [] for k in (
        "tokenizer", "copy", "teacher_forced", "one_step", "rollout", "latent_accuracy", "round_trip_real",
        "round_trip_rollout") if k != "tokenizer" or args.against == "raw"}  # against itself it is the cap
    start, seen = time.perf_counter(), 0
    for batch in ds:
        keep = np.flatnonzero(batch["valid"])[:args.num_videos - seen]
        if not len(keep):
            break
        codes = np.asarray(batch_codes(batch, tokenizer), np.int32)[keep]
        actions = np.asarray(batch["actions"], np.int32)[keep]
        future = slice(context, None)
        decode = lambda c: np.asarray(tokenizer.decode(c), np.float32)
        real = np.asarray(batch["frames"], np.float32)[keep] if args.against == "raw" else decode(codes)
        if "tokenizer" in rows:
            rows["tokenizer"].append(psnr_per_frame(real[:, future], decode(codes[:, future])))
        rows["copy"].append(psnr_per_frame(real[:, future], np.repeat(real[:, context - 1:context], horizon, 1)))
        rows["round_trip_real"].append(survive_round_trip(tokenizer, codes[:, future]))
        for seed in range(args.seeds):
            rng = jax.random.fold_in(jax.random.key(seed), seen)
            teacher, one_step, hits = jax.device_get(one_step_fn(variables, codes, actions, rng))
            generated = np.asarray(sample.rollout(model, variables, codes[:, :context], actions, rng,
                                                  horizon=horizon, settings=settings))[:, context:]
            rows["teacher_forced"].append(psnr_per_frame(real[:, future], decode(teacher)))
            rows["one_step"].append(psnr_per_frame(real[:, future], decode(one_step)))
            rows["rollout"].append(psnr_per_frame(real[:, future], decode(generated)))
            rows["latent_accuracy"].append(np.asarray(hits))
            rows["round_trip_rollout"].append(survive_round_trip(tokenizer, generated))
        seen += len(keep)
        if seen >= args.num_videos:
            break

    table = {k: np.concatenate(v).mean(axis=0).tolist() for k, v in rows.items()}
    spread = np.stack([np.concatenate(rows["rollout"][s::args.seeds]).mean(axis=0) for s in range(args.seeds)])
    table["rollout_seed_std"] = spread.std(axis=0).tolist()
    margins = spread.mean(axis=1) - np.mean(table["copy"])  # per seed: mean over the generated frames
    summary = {"workdir": args.workdir, "backbone": args.backbone, "split": args.split, "videos": seen,
               "settings": dataclasses.asdict(settings),
               "seeds": args.seeds, "context": context, "horizon": horizon, "seconds": time.perf_counter() - start,
               "against": args.against, "per_frame": table, "mean": {k: float(np.mean(v)) for k, v in table.items()},
               "margin_per_seed": margins.tolist(), "margin_seed_std": float(margins.std())}
    out = args.out or os.path.join(args.workdir, f"diagnosis_{args.backbone}.json")
    with open(out, "w") as f:
        json.dump(summary, f, indent=1)
    names = list(table)
    print(f"{seen} videos x {args.seeds} seeds, context {context}, horizon {horizon}; PSNR in dB")
    print("frame " + " ".join(f"{n[:14]:>14}" for n in names))
    for k in range(horizon):
        print(f"{k + 1:>5} " + " ".join(f"{table[n][k]:>14.3f}" for n in names))
    print(" mean " + " ".join(f"{summary['mean'][n]:>14.3f}" for n in names))
    print(f"margin over the copy per seed: {' '.join(f'{m:+.3f}' for m in margins)} dB (std {margins.std():.3f}); "
          f"frames at or above the copy: {sum(r >= c for r, c in zip(table['rollout'], table['copy']))} of {horizon}")
    print(f"written: {out}")


if __name__ == "__main__":
    main()
