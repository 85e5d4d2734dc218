"""Converting a taming-transformers PyTorch VQGAN checkpoint (`.ckpt`) into a folder in TECO's layout.

  teco-ssm convert-taming --ckpt last.ckpt --resolution 64 --out /ckpt/my_vqgan
  tok = vqgan.load('/ckpt/my_vqgan')

Reading the `.ckpt` needs torch, an optional extra (`pip install -e '.[torch]'`); it is read with
`torch.load(weights_only=True)`, which refuses pickled objects other than tensors and plain containers, so a
checkpoint from a stranger cannot run code. The mapping itself (`taming_to_variables`) works on a plain dict of
numpy arrays keyed by the state_dict names of taming's `VQModel`:

  encoder.conv_in                          -> params/encoder/Conv_0
  encoder.down.{i}.block.{j}.{norm1, conv1, norm2, conv2, nin_shortcut}
                                           -> encoder/ResnetBlock_r/{GroupNorm_0, Conv_0, GroupNorm_1, Conv_1, Conv_2}
  encoder.down.{i}.attn.{j}.{norm, q, k, v, proj_out}
                                           -> encoder/AttnBlock_a/{GroupNorm_0, Conv_0, Conv_1, Conv_2, Conv_3}
  encoder.down.{i}.downsample.conv         -> encoder/Downsample_i/Conv_0
  encoder.mid.{block_1, attn_1, block_2}, encoder.norm_out, encoder.conv_out   (the same, in creation order)
  decoder.conv_in, decoder.mid.*, decoder.up.{i}.{block, attn, upsample.conv} (levels from last to first),
  decoder.norm_out, decoder.conv_out
  quant_conv, post_quant_conv              -> params/quant_conv, params/post_quant_conv
  quantize.embedding.weight                -> stats/quantize/embeddings (n_embed, embed_dim)
Conv weights (out, in, kh, kw) become kernels (kh, kw, in, out); GroupNorm weight becomes scale. The training-only
`loss.*` entries (LPIPS, discriminator) are dropped. Any other unused or missing entry is an error naming it.
"""
from __future__ import annotations

import argparse
import os
import pickle
import re
import shutil
from typing import Any, Mapping

import numpy as np

from vqgan.safe_io import UnsafeFileError

TAMING_NUM_GROUPS = 32
TORCH_MISSING = 'reading a PyTorch checkpoint needs torch, an optional extra: pip install "teco_ssm[torch]"'
_IGNORED_PREFIXES = ('loss.',)


class _Entries:
    """The state dict with a record of which entries were used, so leftovers can be reported."""

    def __init__(self, state_dict: Mapping[str, Any], source: str):
        self.values = {k: v for k, v in state_dict.items() if not k.startswith(_IGNORED_PREFIXES)}
        self.source = source
        self.used: set[str] = set()

    def has(self, key: str) -> bool:
        return key in self.values

    def get(self, key: str, ndim: int) -> np.ndarray:
        if key not in self.values:
            raise ValueError(f'{self.source}: missing entry {key!r} of a taming-transformers VQModel state_dict')
        value = np.asarray(self.values[key], np.float32)
        if value.ndim != ndim:
            raise ValueError(f'{self.source}: entry {key!r} has shape {value.shape}, expected {ndim} dimensions')
        self.used.add(key)
        return value

    def check_all_used(self) -> None:
        unused = sorted(set(self.values) - self.used)
        if unused:
            raise ValueError(f'{self.source}: unexpected entry {unused[0]!r} for a taming-transformers VQModel '
                             f'({len(unused)} unused in all)')


def conv_kernel(weight: np.ndarray) -> np.ndarray:
    """PyTorch Conv2d weight (out, in, kh, kw) -> Flax kernel (kh, kw, in, out)."""
    return np.ascontiguousarray(np.transpose(weight, (2, 3, 1, 0)))


def _conv(e: _Entries, key: str) -> dict[str, np.ndarray]:
    return {'kernel': conv_kernel(e.get(f'{key}.weight', 4)), 'bias': e.get(f'{key}.bias', 1)}


def _norm(e: _Entries, key: str) -> dict[str, np.ndarray]:
    return {'scale': e.get(f'{key}.weight', 1), 'bias': e.get(f'{key}.bias', 1)}


def _resnet(e: _Entries, key: str) -> dict[str, Any]:
    if e.has(f'{key}.conv_shortcut.weight'):
        raise ValueError(f'{e.source}: entry {key}.conv_shortcut (a 3x3 shortcut) is not part of the TECO layout')
    block = {'GroupNorm_0': _norm(e, f'{key}.norm1'), 'Conv_0': _conv(e, f'{key}.conv1'),
             'GroupNorm_1': _norm(e, f'{key}.norm2'), 'Conv_1': _conv(e, f'{key}.conv2')}
    if e.has(f'{key}.nin_shortcut.weight'):
        block['Conv_2'] = _conv(e, f'{key}.nin_shortcut')
    return block


def _attn(e: _Entries, key: str) -> dict[str, Any]:
    return {'GroupNorm_0': _norm(e, f'{key}.norm'), 'Conv_0': _conv(e, f'{key}.q'), 'Conv_1': _conv(e, f'{key}.k'),
            'Conv_2': _conv(e, f'{key}.v'), 'Conv_3': _conv(e, f'{key}.proj_out')}


def _count(e: _Entries, pattern: str) -> int:
    """How many consecutive indices i from 0 have an entry matching `pattern.format(i=i)` (a regex prefix)."""
    n = 0
    while any(re.match(pattern.format(i=n), k) for k in e.values):
        n += 1
    return n


def infer_fields(state_dict: Mapping[str, Any], resolution: int, source: str = '<state_dict>') -> dict[str, Any]:
    """The VQGAN hyperparameters (the fields of TECO's `args`) implied by a taming VQModel state_dict's shapes.

    resolution: the frame size the model was trained at (it fixes attn_resolutions; it is not in the weights).
    """
    e = _Entries(state_dict, source)
    ch = e.get('encoder.conv_in.weight', 4).shape[0]
    levels = _count(e, r'encoder\.down\.{i}\.')
    if levels == 0:
        raise ValueError(f'{source}: missing entries encoder.down.0.* (not a taming-transformers VQModel)')
    num_res_blocks = _count(e, r'encoder\.down\.0\.block\.{i}\.')
    ch_mult, attn_resolutions = [], []
    for level in range(levels):
        out = e.get(f'encoder.down.{level}.block.0.conv1.weight', 4).shape[0]
        if out % ch:
            raise ValueError(f'{source}: entry encoder.down.{level}.block.0.conv1.weight has {out} output channels, '
                             f'not a multiple of ch={ch}')
        ch_mult.append(out // ch)
        if e.has(f'encoder.down.{level}.attn.0.q.weight'):
            attn_resolutions.append(resolution // 2 ** level)
    n_embed, embed_dim = e.get('quantize.embedding.weight', 2).shape
    z_channels = e.get('quant_conv.weight', 4).shape[1]
    z_out = e.get('encoder.conv_out.weight', 4).shape[0]
    if z_out != z_channels:
        raise ValueError(f'{source}: entry encoder.conv_out.weight has {z_out} output channels but quant_conv takes '
                         f'{z_channels} (double_z=True is not supported)')
    if resolution % 2 ** (levels - 1):
        raise ValueError(f'resolution={resolution} is not divisible by 2**(levels-1)={2 ** (levels - 1)}')
    return dict(resolution=int(resolution), ch=int(ch), ch_mult=tuple(ch_mult), num_res_blocks=int(num_res_blocks),
                attn_resolutions=tuple(attn_resolutions), z_channels=int(z_channels), n_embed=int(n_embed),
                embed_dim=int(embed_dim), dropout=0.0)


def taming_to_variables(state_dict: Mapping[str, Any], resolution: int, num_groups: int = TAMING_NUM_GROUPS,
                        source: str = '<state_dict>') -> tuple[dict[str, Any], dict[str, Any]]:
    """(fields, variables) of this project's VQGAN from a taming VQModel state_dict of numpy arrays.

    fields: the VQGAN hyperparameters (`VQGAN(**fields)`); variables: {'params', 'stats'} float32 numpy, in the
    parameter tree of TECO's checkpoints. Raises ValueError naming `source` and the first missing or unused entry.
    """
    fields = infer_fields(state_dict, resolution, source)
    fields['num_groups'] = int(num_groups)
    e = _Entries(state_dict, source)
    levels, blocks = len(fields['ch_mult']), fields['num_res_blocks']

    enc: dict[str, Any] = {'Conv_0': _conv(e, 'encoder.conv_in')}
    r = a = 0
    for level in range(levels):
        for j in range(blocks):
            enc[f'ResnetBlock_{r}'] = _resnet(e, f'encoder.down.{level}.block.{j}')
            r += 1
            if e.has(f'encoder.down.{level}.attn.{j}.q.weight'):
                enc[f'AttnBlock_{a}'] = _attn(e, f'encoder.down.{level}.attn.{j}')
                a += 1
        if level != levels - 1:
            enc[f'Downsample_{level}'] = {'Conv_0': _conv(e, f'encoder.down.{level}.downsample.conv')}
    enc[f'ResnetBlock_{r}'] = _resnet(e, 'encoder.mid.block_1')
    enc[f'AttnBlock_{a}'] = _attn(e, 'encoder.mid.attn_1')
    enc[f'ResnetBlock_{r + 1}'] = _resnet(e, 'encoder.mid.block_2')
    enc['GroupNorm_0'] = _norm(e, 'encoder.norm_out')
    enc['Conv_1'] = _conv(e, 'encoder.conv_out')

    dec: dict[str, Any] = {'Conv_0': _conv(e, 'decoder.conv_in'),
                           'ResnetBlock_0': _resnet(e, 'decoder.mid.block_1'),
                           'AttnBlock_0': _attn(e, 'decoder.mid.attn_1'),
                           'ResnetBlock_1': _resnet(e, 'decoder.mid.block_2')}
    r, a, u = 2, 1, 0
    for level in reversed(range(levels)):
        for j in range(blocks + 1):
            dec[f'ResnetBlock_{r}'] = _resnet(e, f'decoder.up.{level}.block.{j}')
            r += 1
            if e.has(f'decoder.up.{level}.attn.{j}.q.weight'):
                dec[f'AttnBlock_{a}'] = _attn(e, f'decoder.up.{level}.attn.{j}')
                a += 1
        if level != 0:
            dec[f'Upsample_{u}'] = {'Conv_0': _conv(e, f'decoder.up.{level}.upsample.conv')}
            u += 1
    dec['GroupNorm_0'] = _norm(e, 'decoder.norm_out')
    dec['Conv_1'] = _conv(e, 'decoder.conv_out')

    variables = {'params': {'encoder': enc, 'decoder': dec, 'quant_conv': _conv(e, 'quant_conv'),
                            'post_quant_conv': _conv(e, 'post_quant_conv')},
                 'stats': {'quantize': {'embeddings': e.get('quantize.embedding.weight', 2)}}}
    e.check_all_used()
    return fields, variables


def read_torch_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The state_dict of a taming `.ckpt` (Lightning checkpoint or bare state_dict) as float32 numpy arrays.

    Raises ImportError saying how to install torch when it is missing; UnsafeFileError when the file holds
    pickled objects other than tensors and plain containers (it is never unpickled with code execution).
    """
    path = os.fspath(path)
    try:
        import torch
    except ImportError:
        raise ImportError(f'{path}: {TORCH_MISSING}') from None
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeFileError(
            f'{path}: holds pickled objects beyond tensors and plain containers, refused ({e}). In an environment '
            f'you trust, save only its weights: torch.save(torch.load(p)["state_dict"], "weights.ckpt")') from None
    state_dict = obj.get('state_dict', obj) if isinstance(obj, dict) else None
    if not isinstance(state_dict, dict):
        raise ValueError(f'{path}: expected a dict with a state_dict, found {type(obj).__name__}')
    return {k: v.detach().to(torch.float32).cpu().numpy() for k, v in state_dict.items() if torch.is_tensor(v)}


def write_teco_folder(out_dir: str | os.PathLike, fields: Mapping[str, Any], variables: Mapping[str, Any],
                      step: int = 0, overwrite: bool = False, **extra_args: Any) -> str:
    """Writes `<out_dir>/args` (argparse.Namespace pickle) and `<out_dir>/checkpoints/checkpoint_<step>` (msgpack).

    The folder is assembled beside `out_dir` and renamed into place, so a failed write leaves nothing behind;
    an existing `out_dir` is a FileExistsError unless `overwrite`. Returns the folder's path.
    """
    import flax.serialization

    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f'{out_dir}: exists; pass overwrite=True to replace it')
    args = argparse.Namespace(**{k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()},
                              double_z=False, **extra_args)
    tree = {'step': int(step), 'params': variables['params'], 'opt_state': None,
            'model_state': {'stats': variables['stats']}}
    tmp = out_dir + '.tmp'
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(os.path.join(tmp, 'checkpoints'))
    with open(os.path.join(tmp, 'args'), 'wb') as f:
        pickle.dump(args, f)
    with open(os.path.join(tmp, 'checkpoints', f'checkpoint_{int(step)}'), 'wb') as f:
        f.write(flax.serialization.msgpack_serialize(tree))
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def convert_taming(ckpt_path: str | os.PathLike, out_dir: str | os.PathLike, resolution: int,
                   overwrite: bool = False, num_groups: int = TAMING_NUM_GROUPS) -> str:
    """Converts a taming-transformers `.ckpt` into a TECO-layout folder and checks that `vqgan.load` reads it.

    resolution: the frame size the VQGAN was trained at. Returns the folder's path.
    """
    from vqgan.model import VQGAN
    from vqgan.tokenizer import check_variables, load

    from teco_ssm import checkpoint as ckpt

    ckpt_path = os.fspath(ckpt_path)
    ckpt.check_path(out_dir, '--out')  # `vqgan.load` reads the folder back through the checkpoint library
    if not os.path.isfile(ckpt_path):
        raise FileNotFoundError(f'--ckpt {ckpt_path}: no such file (a taming-transformers .ckpt)')
    state_dict = read_torch_checkpoint(ckpt_path)
    fields, variables = taming_to_variables(state_dict, resolution, num_groups, source=ckpt_path)
    check_variables(variables, VQGAN(**fields), ckpt_path)
    step = 0
    out = write_teco_folder(out_dir, fields, variables, step, overwrite, converted_from=os.path.abspath(ckpt_path))
    load(out)
    return out
