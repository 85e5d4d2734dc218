"""Training a VQGAN on frames sampled from a video dataset: `train_and_evaluate(config, workdir)`.

The state is one explicit pytree:
  {'model': {'params', 'stats'}  VQGAN variables (the codebook in stats/quantize/embeddings is trained too),
   'disc': PatchGAN variables, 'opt_model', 'opt_disc': optax states,
   'usage': (n_embed,) code counts since the last dead-code reinit, 'step': int32}
Checkpoints (teco_ssm.checkpoint) hold two items, 'model' (what `vqgan.load(workdir)` reads) and 'train' (the rest).
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from teco_ssm import checkpoint as ckpt
from teco_ssm import lock
from teco_ssm.progress import ProgressBar, ScalarWriter, check_finite
from vqgan import losses
from vqgan.model import VQGAN, abstract_variables, host_init, model_fields

State = dict[str, Any]
TRAINED_WITH = ('model',)  # the config fields a resumed run must share with its checkpoints (`ckpt.check_resume`)


def build_model(config: ml_collections.ConfigDict) -> VQGAN:
    return VQGAN(**model_fields(config.model.to_dict(), 'config.model'))


def build_discriminator(config: ml_collections.ConfigDict) -> losses.PatchDiscriminator:
    return losses.PatchDiscriminator(**config.disc.to_dict())


def make_optimizer(config: ml_collections.ConfigDict, learning_rate: float) -> optax.GradientTransformation:
    """Adam(b1, b2) with linear warm-up and cosine decay; weight decay on conv kernels only."""
    opt = config.optim
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, opt.warmup_steps, max(config.num_steps, 1),
                                                  end_value=learning_rate * opt.final_lr_fraction)
    decay_mask = lambda tree: jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda path, _: str(getattr(path[-1], 'key', '')) == 'kernel', tree)
    return optax.chain(optax.clip_by_global_norm(opt.grad_clip),
                       optax.adamw(schedule, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay,
                                   mask=decay_mask))


def abstract_disc(disc: losses.PatchDiscriminator, resolution: int) -> Any:
    return jax.eval_shape(lambda r: disc.init(r, jnp.zeros((1, resolution, resolution, 3))), jax.random.key(0))


def init_state(config: ml_collections.ConfigDict, model: VQGAN, disc: losses.PatchDiscriminator,
               opt_model: optax.GradientTransformation, opt_disc: optax.GradientTransformation) -> State:
    """A fresh training state (weights drawn on the host, see `vqgan.model.host_init`)."""
    variables = host_init(abstract_variables(model), config.seed,
                          codebook_scale=config.loss.codebook_init_scale or None)
    disc_vars = host_init(abstract_disc(disc, model.resolution), config.seed + 1)
    return {'model': variables, 'disc': disc_vars, 'opt_model': opt_model.init(variables),
            'opt_disc': opt_disc.init(disc_vars), 'usage': jnp.zeros(model.n_embed, jnp.float32),
            'step': jnp.zeros((), jnp.int32)}


def split_state(state: State) -> dict[str, Any]:
    """The checkpoint items: 'model' (the VQGAN variables) and 'train' (everything else)."""
    return {'model': state['model'], 'train': {k: v for k, v in state.items() if k != 'model'}}


def join_state(items: dict[str, Any]) -> State:
    return {'model': items['model'], **items['train']}


def _last_decoder_conv(abstract: Any) -> str:
    convs = [k for k in abstract['params']['decoder'] if k.startswith('Conv_')]
    return max(convs, key=lambda k: int(k.split('_')[1]))


def make_train_step(config: ml_collections.ConfigDict, model: VQGAN, disc: losses.PatchDiscriminator,
                    opt_model: optax.GradientTransformation, opt_disc: optax.GradientTransformation,
                    lpips_params: Any, adversarial: bool) -> Callable[[State, jax.Array], tuple[State, dict]]:
    """A jitted step: state, frames (N, H, W, 3) float32 in [-1, 1] -> (new state, scalar metrics).

    With `adversarial` the PatchGAN hinge terms (generator with the adaptive weight, and a discriminator update)
    are included; without, neither is computed.
    """
    lc = config.loss
    last = _last_decoder_conv(abstract_variables(model))
    deterministic = model.dropout == 0.0

    def apply(variables, frames, rng):
        return model.apply(variables, frames, deterministic=deterministic, rngs={'dropout': rng})

    def nll_of(frames, recon):
        rec = losses.l1(frames, recon)
        perc = losses.lpips_term(lpips_params, frames, recon) if lc.perceptual_weight > 0 else jnp.zeros(())
        return rec + lc.perceptual_weight * perc, (rec, perc)

    def gen_loss(variables, disc_vars, frames, rng, adv_weight):
        recon, aux = apply(variables, frames, rng)
        nll, (rec, perc) = nll_of(frames, recon)
        codebook, commitment = losses.vq_losses(aux['latents'], aux['quantized'])
        loss = nll + lc.codebook_weight * codebook + lc.beta * commitment
        g_adv = jnp.zeros(())
        if adversarial:
            g_adv = losses.generator_adv_loss(disc.apply(disc_vars, recon))
            loss = loss + adv_weight * g_adv
        terms = {'loss': loss, 'l1': rec, 'lpips': perc, 'codebook': codebook, 'commitment': commitment,
                 'g_adv': g_adv, 'psnr': jnp.mean(losses.psnr(frames, jnp.clip(recon, -1, 1)))}
        return loss, (terms, recon, aux)

    def step(state: State, frames: jax.Array) -> tuple[State, dict]:
        rng = jax.random.fold_in(jax.random.key(config.seed), state['step'])
        k_drop, k_reinit = jax.random.split(rng)
        variables, disc_vars = state['model'], state['disc']
        adv_weight = jnp.zeros(())
        if adversarial:
            def recon_of(kernel):
                v = jax.tree_util.tree_map(lambda x: x, variables)
                v['params']['decoder'][last]['kernel'] = kernel
                return apply(v, frames, k_drop)[0]
            recon, vjp = jax.vjp(recon_of, variables['params']['decoder'][last]['kernel'])
            g_nll = vjp(jax.grad(lambda r: nll_of(frames, r)[0])(recon))[0]
            g_adv = vjp(jax.grad(lambda r: losses.generator_adv_loss(disc.apply(disc_vars, r)))(recon))[0]
            adv_weight = losses.adaptive_weight(g_nll, g_adv) * lc.disc_weight
        grads, (terms, recon, aux) = jax.grad(gen_loss, has_aux=True)(variables, disc_vars, frames, k_drop,
                                                                        adv_weight)
        updates, opt_model_state = opt_model.update(grads, state['opt_model'], variables)
        variables = optax.apply_updates(variables, updates)

        opt_disc_state = state['opt_disc']
        if adversarial:
            fake = jax.lax.stop_gradient(recon)

            def d_loss_of(dv):
                return losses.hinge_d_loss(disc.apply(dv, frames), disc.apply(dv, fake))
            d_loss, d_grads = jax.value_and_grad(d_loss_of)(disc_vars)
            d_updates, opt_disc_state = opt_disc.update(d_grads, opt_disc_state, disc_vars)
            disc_vars = optax.apply_updates(disc_vars, d_updates)
            terms = dict(terms, d_loss=d_loss, adv_weight=adv_weight)

        counts, perplexity = losses.code_statistics(aux['codes'], model.n_embed)
        usage = state['usage'] + counts
        reinit_now = (lc.reinit_every > 0) & ((state['step'] + 1) % max(lc.reinit_every, 1) == 0)
        book = variables['stats']['quantize']['embeddings']
        fresh, dead = losses.reinit_dead_codes(book, usage, aux['latents'], k_reinit, lc.reinit_threshold)
        variables['stats']['quantize']['embeddings'] = jnp.where(reinit_now, fresh, book)
        terms = dict(terms, perplexity=perplexity, dead_codes=jnp.sum(usage < lc.reinit_threshold))
        new_state = {'model': variables, 'disc': disc_vars, 'opt_model': opt_model_state,
                     'opt_disc': opt_disc_state, 'usage': jnp.where(reinit_now, 0.0, usage),
                     'step': state['step'] + 1}
        return new_state, terms

    return jax.jit(step, donate_argnums=(0,))


def sample_frames(batch: dict[str, np.ndarray], frames_per_video: int, rng: np.random.Generator) -> np.ndarray:
    """`frames_per_video` distinct random frames of each valid video: (B, T, H, W, 3) -> (B*k, H, W, 3).

    Raises ValueError for a batch of codes (an encoded dataset): a VQGAN trains on frames."""
    if 'frames' not in batch:
        raise ValueError(f'a VQGAN trains on frames; this batch holds {sorted(batch)} (an encoded dataset?)')
    video = batch['frames'][batch['valid']]
    b, t = video.shape[:2]
    k = min(frames_per_video, t)
    idx = np.stack([rng.choice(t, k, replace=False) for _ in range(b)])
    return video[np.arange(b)[:, None], idx].reshape((b * k,) + video.shape[2:]).astype(np.float32)


def load_eval_frames(config: ml_collections.ConfigDict) -> np.ndarray:
    """Up to config.data.eval_frames held-out frames (N, H, W, 3) from the test split, deterministic."""
    from teco_ssm.data import open_dataset
    d = config.data
    ds = open_dataset(d.path, d.eval_split, seq_len=d.seq_len, batch_size=d.videos_per_batch, shuffle=False,
                      image_size=config.model.resolution)
    rng = np.random.default_rng(1234)
    out, total = [], 0
    for batch in ds:
        frames = sample_frames(batch, d.frames_per_video, rng)
        out.append(frames)
        total += len(frames)
        if total >= d.eval_frames:
            break
    if not out:
        raise ValueError(f'{d.path}: split {d.eval_split!r} yielded no frames for evaluation')
    return np.concatenate(out)[:d.eval_frames]


def make_eval_fn(model: VQGAN) -> Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]:
    """Jitted variables, frames (N, H, W, 3) -> (reconstructions clipped to [-1, 1], codes (N, h, w))."""
    def recon(variables, frames):
        quantized, codes = model.apply(variables, frames, method=VQGAN.encode)
        return jnp.clip(model.apply(variables, quantized, method=VQGAN.decode), -1.0, 1.0), codes
    return jax.jit(recon)


def evaluate(eval_fn: Callable, variables: Any, frames: np.ndarray, n_codes: int, batch: int
             ) -> tuple[dict[str, float], np.ndarray]:
    """Mean PSNR (dB, [0, 1] range), L1 and code perplexity over `frames`; also returns the reconstructions."""
    recons, codes = [], []
    for start in range(0, len(frames), batch):
        part = frames[start:start + batch]
        pad = batch - len(part)
        if pad:
            part = np.concatenate([part, np.zeros((pad,) + part.shape[1:], part.dtype)])
        r, c = eval_fn(variables, jnp.asarray(part))
        recons.append(np.asarray(r)[:batch - pad])
        codes.append(np.asarray(c)[:batch - pad])
    recon, codes = np.concatenate(recons), np.concatenate(codes)
    mse = np.mean(((frames - recon) / 2.0) ** 2, axis=(1, 2, 3))
    counts = np.bincount(codes.reshape(-1), minlength=n_codes) / codes.size
    perplexity = float(np.exp(-np.sum(counts[counts > 0] * np.log(counts[counts > 0]))))
    return {'psnr': float(np.mean(-10 * np.log10(np.maximum(mse, 1e-10)))),
            'l1': float(np.mean(np.abs(frames - recon))), 'perplexity': perplexity,
            'codes_used': int(np.sum(counts > 0))}, recon


def save_grid(path: str, frames: np.ndarray, recon: np.ndarray, count: int = 8) -> None:
    """PNG with originals on the top row and reconstructions below; frames (N, H, W, 3) in [-1, 1]."""
    from PIL import Image
    n = min(count, len(frames))
    rows = [np.concatenate(list(x[:n]), axis=1) for x in (frames, recon)]
    grid = ((np.concatenate(rows, axis=0) + 1.0) * 127.5).clip(0, 255).astype(np.uint8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(grid).save(path)


def check_config(config: ml_collections.ConfigDict) -> None:
    """The tokenizer config's value ranges, before anything is written: ValueError naming the field, its value and
    the range (every problem, one per line)."""
    errors = []
    count = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    for name in ('num_steps', 'log_every', 'eval_every', 'eval_batch', 'checkpoint_every', 'keep_checkpoints',
                 'data.seq_len', 'data.videos_per_batch', 'data.frames_per_video', 'data.eval_frames'):
        node = config
        for key in name.split('.'):
            node = node[key]
        if not count(node) or node < 1:
            errors.append(f'config.{name}={node!r} must be an integer >= 1')
    if not errors and config.data.frames_per_video > config.data.seq_len:
        errors.append(f'config.data.frames_per_video={config.data.frames_per_video} must be at most '
                      f'config.data.seq_len={config.data.seq_len} (frames are drawn from each clip)')
    warmup = config.optim.warmup_steps
    if not count(warmup) or warmup < 0 or (count(config.num_steps) and warmup >= config.num_steps):
        errors.append(f'config.optim.warmup_steps={warmup!r} must be an integer in [0, config.num_steps='
                      f'{config.num_steps!r}) (the cosine decays after the warm-up)')
    model = config.model
    for name in ('resolution', 'ch', 'num_res_blocks', 'z_channels', 'n_embed', 'embed_dim', 'num_groups'):
        if not count(model[name]) or model[name] < 1:
            errors.append(f'config.model.{name}={model[name]!r} must be an integer >= 1')
    mult = tuple(model.ch_mult)
    if not mult or not all(count(m) and m >= 1 for m in mult):
        errors.append(f'config.model.ch_mult={mult!r} must be a non-empty tuple of integers >= 1')
    elif not errors:
        widths = sorted({model.ch * m for m in mult} | {model.ch})
        if any(width % model.num_groups for width in widths):
            errors.append(f'config.model.num_groups={model.num_groups} must divide every width ch * ch_mult = '
                          f'{widths} (GroupNorm)')
        if model.resolution % 2 ** (len(mult) - 1):
            errors.append(f'config.model.resolution={model.resolution} must be divisible by 2 ** (len(ch_mult) - 1) '
                          f'= {2 ** (len(mult) - 1)}')
    for name in ('beta', 'codebook_weight', 'perceptual_weight', 'disc_weight'):
        value = config.loss[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            errors.append(f'config.loss.{name}={value!r} must be a number >= 0')
    for name in ('learning_rate', 'disc_learning_rate'):
        value = config.optim[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            errors.append(f'config.optim.{name}={value!r} must be a number > 0')
    if errors:
        raise ValueError('invalid tokenizer config:\n  ' + '\n  '.join(errors))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains (resuming from `workdir` when it holds checkpoints) and returns the final held-out metrics.

    Writes config.json, orbax checkpoints, TensorBoard events + metrics.jsonl and recon/step_<k>.png to workdir.
    Returns {'psnr', 'l1', 'perplexity', 'codes_used', 'step', 'seconds'}.
    Raises ValueError, before anything is written, when `workdir` holds checkpoints of another `config.model`
    (naming the field), and lock.Busy when another process trains in `workdir`.
    """
    ckpt.check_path(workdir)
    check_config(config)
    if not config.data.path:
        raise ValueError('config.data.path: required (a video dataset root, e.g. a MazeLab or TECO npz folder)')
    from teco_ssm.data import inspect_dataset

    for split in (config.data.train_split, config.data.eval_split):  # a wrong path fails before anything is written
        inspect_dataset(config.data.path, split)
    workdir = os.path.abspath(workdir)
    with lock.hold(workdir):
        ckpt.check_resume(workdir, config, TRAINED_WITH)
        return _train(config, workdir)


def _train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    from teco_ssm.data import open_dataset
    from teco_ssm import lpips as lpips_lib

    t0 = time.time()
    model, disc = build_model(config), build_discriminator(config)
    opt_model = make_optimizer(config, config.optim.learning_rate)
    opt_disc = make_optimizer(config, config.optim.disc_learning_rate)

    lpips_params = None
    if config.loss.perceptual_weight > 0:
        paths = lpips_lib.resolve_weights(config.loss.lpips_dir or None, required=False)
        lpips_params = None if paths is None else jax.tree_util.tree_map(jnp.asarray, lpips_lib.load_params(paths))
        if lpips_params is None:
            import warnings
            warnings.warn('LPIPS weights not found locally, training without the perceptual loss; to use it, '
                          + lpips_lib.HOW_TO_OBTAIN, stacklevel=2)
            config = ml_collections.ConfigDict(config.to_dict())
            config.loss.perceptual_weight = 0.0

    mngr = ckpt.manager(workdir, config, keep=config.keep_checkpoints, save_every=config.checkpoint_every)
    abstract = jax.eval_shape(lambda: init_state(config, model, disc, opt_model, opt_disc))
    restored = ckpt.restore_or_none(mngr, split_state(abstract))
    state = join_state(restored) if restored is not None else init_state(config, model, disc, opt_model, opt_disc)
    start = int(state['step'])

    steps = {adv: make_train_step(config, model, disc, opt_model, opt_disc, lpips_params, adv)
             for adv in (False, True)}
    eval_fn = make_eval_fn(model)
    eval_frames = load_eval_frames(config)
    d = config.data
    ds = open_dataset(d.path, d.train_split, seq_len=d.seq_len, batch_size=d.videos_per_batch, shuffle=True,
                      seed=config.seed, start_step=start, image_size=config.model.resolution)
    writer = ScalarWriter(workdir)
    bar = ProgressBar(config.num_steps, start, desc='vqgan', keys=('loss', 'psnr', 'perplexity'))
    metrics: dict[str, Any] = {}
    step = start
    try:
        for batch in ds:
            if step >= config.num_steps:
                break
            frames = sample_frames(batch, d.frames_per_video, np.random.default_rng((config.seed, step)))
            adversarial = config.loss.disc_weight > 0 and step >= config.loss.disc_start
            state, metrics = steps[adversarial](state, jnp.asarray(frames))
            step += 1
            if step % config.log_every == 0 or step == config.num_steps:
                metrics = jax.device_get(metrics)
                check_finite(step, metrics)
                writer.write(step, metrics, prefix='train/')
                bar.update(step, metrics)
            if step % config.eval_every == 0 and step < config.num_steps:
                scores, recon = evaluate(eval_fn, state['model'], eval_frames, model.n_embed, config.eval_batch)
                writer.write(step, scores, prefix='eval/')
                save_grid(os.path.join(workdir, 'recon', f'step_{step}.png'), eval_frames, recon)
            if step % config.checkpoint_every == 0:  # orbax's own interval would also save the first step
                ckpt.save(mngr, step, split_state(state), force=True)
        scores, recon = evaluate(eval_fn, state['model'], eval_frames, model.n_embed, config.eval_batch)
        writer.write(step, scores, prefix='eval/')
        save_grid(os.path.join(workdir, 'recon', f'step_{step}.png'), eval_frames, recon)
        ckpt.wait(mngr)
        if step not in mngr.all_steps():
            ckpt.save(mngr, step, split_state(state), force=True)
    finally:
        bar.close()
        writer.close()
        ckpt.close(mngr)
    return dict(scores, step=step, seconds=time.time() - t0)
