"""`load(path)`: a frame tokenizer from a TECO checkpoint folder or from this project's VQGAN workdir.

Layouts recognised (by their files, never by the path's name):
  TECO     <path>/args (pickled argparse.Namespace) + <path>/checkpoints/checkpoint_<step> (legacy Flax msgpack,
           {'step', 'params', 'opt_state', 'model_state'}; codebook at model_state/stats/quantize/embeddings)
  project  <path>/config.json (its `model` block holds the VQGAN fields) + <path>/checkpoints/<step>/ (orbax,
           item 'model' = {'params': ..., 'stats': {'quantize': {'embeddings': ...}}}), as `vqgan.train` writes
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from teco_ssm import checkpoint as ckpt
from vqgan.model import VQGAN, abstract_variables, model_fields
from vqgan.safe_io import load_args, read_msgpack

Variables = dict[str, Any]
_CHECKPOINT_RE = re.compile(r'^checkpoint_(\d+)$')


def flat_paths(tree: Any, prefix: str = '') -> dict[str, Any]:
    """'a/b/c' -> leaf for every leaf of a tree of nested dicts."""
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(flat_paths(v, f'{prefix}/{k}' if prefix else str(k)))
        return out
    return {prefix: tree}


def check_variables(variables: Variables, model: VQGAN, source: str) -> Variables:
    """Checks names and shapes of loaded `variables` against `model`; returns them as float32 jax arrays.

    Raises ValueError naming `source` and the first missing, unexpected or mis-shaped field.
    """
    expected = flat_paths(jax.tree_util.tree_map(lambda s: s.shape, abstract_variables(model)))
    got = flat_paths(variables)
    for name, shape in expected.items():
        if name not in got:
            raise ValueError(f'{source}: missing field {name} (expected shape {tuple(shape)})')
        value = got[name]
        if not hasattr(value, 'shape') or tuple(value.shape) != tuple(shape):
            what = 'codebook' if name.endswith('quantize/embeddings') else 'parameter'
            raise ValueError(f'{source}: {what} {name} has shape {getattr(value, "shape", type(value).__name__)}'
                             f', the model built from its hyperparameters expects {tuple(shape)}')
    extra = sorted(set(got) - set(expected))
    if extra:
        raise ValueError(f'{source}: unexpected field {extra[0]} for this architecture ({len(extra)} in all)')
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), variables)


def fingerprint(model: VQGAN, variables: Variables) -> str:
    """sha256 (hex) over the model's hyperparameters and every variable (names, shapes, float32 bytes): what
    encoding.json records as `tokenizer_sha256` and what readers of codes compare."""
    digest = hashlib.sha256()
    fields = {f: getattr(model, f) for f in ('resolution', 'ch', 'ch_mult', 'num_res_blocks', 'attn_resolutions',
                                             'z_channels', 'n_embed', 'embed_dim', 'num_groups')}
    digest.update(json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()},
                             sort_keys=True).encode())
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        value = np.ascontiguousarray(np.asarray(leaf, np.float32))
        digest.update(jax.tree_util.keystr(path).encode())
        digest.update(str(value.shape).encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class Tokenizer:
    """A VQGAN with its variables: jitted, frame-batched encode / decode / lookup on numpy arrays.

    Frames are processed in chunks of at most `chunk_size` (padded, so each chunk size compiles once), so a
    300-frame video never sits in the network at once.
    """

    def __init__(self, model: VQGAN, variables: Variables, chunk_size: int = 64, source: str = '<variables>'):
        self.model = model
        self.variables = check_variables(variables, model, source)
        self.chunk_size = int(chunk_size)
        self.source = source
        self._encode = jax.jit(lambda v, x: model.apply(v, x, method=VQGAN.encode))
        self._decode = jax.jit(lambda v, c: jnp.clip(model.apply(v, c, method=VQGAN.decode_codes), -1.0, 1.0))

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 of the hyperparameters and weights (`fingerprint`): which tokenizer made a set of codes."""
        return fingerprint(self.model, self.variables)

    @property
    def n_codes(self) -> int:
        return self.model.n_embed

    @property
    def embedding_dim(self) -> int:
        return self.model.embed_dim

    @property
    def latent_shape(self) -> tuple[int, int]:
        return (self.model.latent_size, self.model.latent_size)

    @property
    def frame_shape(self) -> tuple[int, int, int]:
        return (self.model.resolution, self.model.resolution, 3)

    @property
    def codebook(self) -> jax.Array:
        """(n_codes, embedding_dim) float32."""
        return self.variables['stats']['quantize']['embeddings']

    def _chunked(self, fn: Callable[[Variables, jax.Array], Any], frames: np.ndarray) -> list[Any]:
        n = frames.shape[0]
        size = min(self.chunk_size, _next_pow2(n))
        outs = []
        for start in range(0, n, size):
            part = frames[start:start + size]
            valid = part.shape[0]
            if valid < size:
                part = np.concatenate([part, np.zeros((size - valid,) + part.shape[1:], part.dtype)])
            out = fn(self.variables, jnp.asarray(part))
            outs.append(jax.tree_util.tree_map(lambda a: np.asarray(a)[:valid], out))
        return outs

    def encode(self, video: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """video (B, T, H, W, 3) float in [-1, 1] -> (embeddings (B, T, h, w, D) float32, codes (B, T, h, w) int32)."""
        video = np.asarray(video)
        if video.ndim != 5 or tuple(video.shape[2:]) != self.frame_shape:
            raise ValueError(f'video: expected shape (B, T, {", ".join(map(str, self.frame_shape))}) for '
                             f'{self.source}, got {video.shape}')
        if not np.issubdtype(video.dtype, np.floating):
            raise ValueError(f'video: expected float frames in [-1, 1], got dtype {video.dtype}')
        lo, hi = (float(video.min()), float(video.max())) if video.size else (0.0, 0.0)
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -1.0 - 1e-5 or hi > 1.0 + 1e-5:
            raise ValueError(f'video: values must lie in [-1, 1] (uint8 / 127.5 - 1), found [{lo}, {hi}]')
        b, t = video.shape[:2]
        frames = video.reshape((b * t,) + self.frame_shape).astype(np.float32)
        outs = self._chunked(self._encode, frames)
        h, w = self.latent_shape
        emb = np.concatenate([o[0] for o in outs]).reshape(b, t, h, w, self.embedding_dim)
        codes = np.concatenate([o[1] for o in outs]).reshape(b, t, h, w).astype(np.int32)
        return emb.astype(np.float32), codes

    def _check_codes(self, codes: np.ndarray, name: str = 'codes') -> np.ndarray:
        codes = np.asarray(codes)
        if not np.issubdtype(codes.dtype, np.integer):
            raise ValueError(f'{name}: expected integer codes, got dtype {codes.dtype}')
        if codes.size and (codes.min() < 0 or codes.max() >= self.n_codes):
            raise ValueError(f'{name}: codes must lie in [0, {self.n_codes}), found [{codes.min()}, {codes.max()}]')
        return codes.astype(np.int32)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """codes (B, T, h, w) int -> frames (B, T, H, W, 3) float32 in [-1, 1] (clipped)."""
        codes = self._check_codes(codes)
        if codes.ndim != 4 or tuple(codes.shape[2:]) != self.latent_shape:
            raise ValueError(f'codes: expected shape (B, T, {self.latent_shape[0]}, {self.latent_shape[1]}), '
                             f'got {codes.shape}')
        b, t = codes.shape[:2]
        outs = self._chunked(self._decode, codes.reshape((b * t,) + self.latent_shape))
        return np.concatenate(outs).reshape((b, t) + self.frame_shape).astype(np.float32)

    def lookup(self, codes: np.ndarray) -> np.ndarray:
        """codes (...) int -> codebook rows (..., D) float32."""
        codes = self._check_codes(codes)
        return np.asarray(self.codebook)[codes]


def latest_teco_checkpoint(path: str) -> str:
    """`<path>/checkpoints/checkpoint_<step>` with the highest step; FileNotFoundError naming the folder if none."""
    folder = os.path.join(path, 'checkpoints')
    steps = []
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            match = _CHECKPOINT_RE.match(name)
            if match and os.path.isfile(os.path.join(folder, name)):
                steps.append((int(match.group(1)), name))
    if not steps:
        raise FileNotFoundError(f'{folder}: no checkpoint_<step> file (TECO checkpoint layout)')
    return os.path.join(folder, max(steps)[1])


def load_teco(path: str, chunk_size: int = 64) -> Tokenizer:
    """A Tokenizer from a folder in TECO's layout (see module docstring)."""
    args_path = os.path.join(path, 'args')
    model = VQGAN(**model_fields(load_args(args_path), args_path))
    file = latest_teco_checkpoint(path)
    tree = read_msgpack(file)
    if not isinstance(tree, dict):
        raise ValueError(f'{file}: expected a dict with params and model_state, found {type(tree).__name__}')
    for key in ('params', 'model_state'):
        if not isinstance(tree.get(key), dict):
            raise ValueError(f'{file}: missing field {key!r}')
    try:
        codebook = tree['model_state']['stats']['quantize']['embeddings']
    except (KeyError, TypeError):
        raise ValueError(f'{file}: missing field model_state/stats/quantize/embeddings (the codebook)') from None
    if getattr(codebook, 'shape', None) != (model.n_embed, model.embed_dim):
        raise ValueError(f'{file}: codebook model_state/stats/quantize/embeddings has shape '
                         f'{getattr(codebook, "shape", None)}, but {args_path} gives n_embed={model.n_embed}, '
                         f'embed_dim={model.embed_dim}')
    variables = {'params': tree['params'], 'stats': {'quantize': {'embeddings': codebook}}}
    return Tokenizer(model, variables, chunk_size, source=file)


def load_project(path: str, chunk_size: int = 64) -> Tokenizer:
    """A Tokenizer from a workdir written by `vqgan.train` (config.json + orbax checkpoints)."""
    config = ckpt.read_config(path)
    source = os.path.join(path, ckpt.CONFIG_FILE)
    if not isinstance(config.get('model'), dict):
        raise ValueError(f'{source}: missing field model (the VQGAN hyperparameters)')
    model = VQGAN(**model_fields(config['model'], f'{source} [model]'))
    mngr = ckpt.manager(path, read_only=True)
    try:
        step = ckpt.latest_step(mngr)
        if step is None:
            raise FileNotFoundError(f'{os.path.join(path, ckpt.CHECKPOINT_DIR)}: no complete checkpoint (an '
                                    'interrupted `teco-ssm tokenizer` leaves none: run it again to finish)')
        try:
            restored = ckpt.restore(mngr, {'model': abstract_variables(model)}, step)['model']
        except ckpt.CheckpointMismatchError as error:
            fields = ', '.join(f'{k}={v!r}' for k, v in sorted(config['model'].items()))
            raise ValueError(f'{source}: field model ({fields}) does not describe the VQGAN saved beside it, so one '
                             f'of those fields was changed after training; the checkpoint says: {error}') from None
    finally:
        mngr.close()
    return Tokenizer(model, restored, chunk_size,
                     source=os.path.join(path, ckpt.CHECKPOINT_DIR, str(step)))


def load(path: str | os.PathLike, chunk_size: int = 64) -> Tokenizer:
    """A Tokenizer from a TECO checkpoint folder or a project VQGAN workdir, told apart by their files.

    chunk_size: frames per jitted call. Raises FileNotFoundError / ValueError naming the file and field.
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f'{path}: no such checkpoint folder')
    if os.path.isfile(os.path.join(path, 'args')):
        return load_teco(path, chunk_size)
    if ckpt.has_checkpoints(path):
        return load_project(path, chunk_size)
    raise FileNotFoundError(f'{path}: neither a TECO checkpoint folder (args + checkpoints/checkpoint_<step>) nor '
                            f'a VQGAN workdir (config.json + checkpoints/)')
