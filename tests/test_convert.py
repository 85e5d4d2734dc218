"""taming-transformers state_dict -> TECO layout: checked against a float64 NCHW reference of taming's forward pass."""
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vqgan
from vqgan.convert import conv_kernel, read_torch_checkpoint, taming_to_variables, write_teco_folder
from vqgan.model import VQGAN, abstract_variables
from vqgan.tokenizer import Tokenizer

ARCH = dict(ch=4, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(8,), z_channels=4, resolution=16,
            n_embed=12, embed_dim=3)
GROUPS = 2


# ---------- taming's VQModel state_dict, key by key, following taming/modules/diffusionmodules/model.py ----------

def taming_shapes(ch, ch_mult, num_res_blocks, attn_resolutions, z_channels, resolution, n_embed, embed_dim):
    shapes = {}

    def conv(key, cout, cin, k):
        shapes[f'{key}.weight'], shapes[f'{key}.bias'] = (cout, cin, k, k), (cout,)

    def norm(key, c):
        shapes[f'{key}.weight'], shapes[f'{key}.bias'] = (c,), (c,)

    def resnet(key, cin, cout):
        norm(f'{key}.norm1', cin)
        conv(f'{key}.conv1', cout, cin, 3)
        norm(f'{key}.norm2', cout)
        conv(f'{key}.conv2', cout, cout, 3)
        if cin != cout:
            conv(f'{key}.nin_shortcut', cout, cin, 1)

    def attn(key, c):
        norm(f'{key}.norm', c)
        for name in ('q', 'k', 'v', 'proj_out'):
            conv(f'{key}.{name}', c, c, 1)

    conv('encoder.conv_in', ch, 3, 3)
    res, in_mult = resolution, (1,) + tuple(ch_mult)
    for i, mult in enumerate(ch_mult):
        block_in = ch * in_mult[i]
        for j in range(num_res_blocks):
            resnet(f'encoder.down.{i}.block.{j}', block_in, ch * mult)
            block_in = ch * mult
            if res in attn_resolutions:
                attn(f'encoder.down.{i}.attn.{j}', block_in)
        if i != len(ch_mult) - 1:
            conv(f'encoder.down.{i}.downsample.conv', block_in, block_in, 3)
            res //= 2
    resnet('encoder.mid.block_1', block_in, block_in)
    attn('encoder.mid.attn_1', block_in)
    resnet('encoder.mid.block_2', block_in, block_in)
    norm('encoder.norm_out', block_in)
    conv('encoder.conv_out', z_channels, block_in, 3)

    block_in = ch * ch_mult[-1]
    conv('decoder.conv_in', block_in, z_channels, 3)
    resnet('decoder.mid.block_1', block_in, block_in)
    attn('decoder.mid.attn_1', block_in)
    resnet('decoder.mid.block_2', block_in, block_in)
    for i in reversed(range(len(ch_mult))):
        for j in range(num_res_blocks + 1):
            resnet(f'decoder.up.{i}.block.{j}', block_in, ch * ch_mult[i])
            block_in = ch * ch_mult[i]
            if res in attn_resolutions:
                attn(f'decoder.up.{i}.attn.{j}', block_in)
        if i != 0:
            conv(f'decoder.up.{i}.upsample.conv', block_in, block_in, 3)
            res *= 2
    norm('decoder.norm_out', block_in)
    conv('decoder.conv_out', 3, block_in, 3)
    conv('quant_conv', embed_dim, z_channels, 1)
    conv('post_quant_conv', z_channels, embed_dim, 1)
    shapes['quantize.embedding.weight'] = (n_embed, embed_dim)
    shapes['loss.discriminator.main.0.weight'] = (8, 3, 4, 4)      # training-only entries, dropped
    shapes['loss.perceptual_loss.lin0.model.1.weight'] = (1, 64, 1, 1)
    return shapes


def random_state_dict(seed=0):
    rng = np.random.default_rng(seed)
    sd = {}
    for key, shape in taming_shapes(**ARCH).items():
        if key.endswith('.bias'):
            sd[key] = rng.normal(0, 0.1, shape)
        elif len(shape) == 1:                                      # GroupNorm weight
            sd[key] = 1.0 + rng.normal(0, 0.1, shape)
        else:
            fan_in = np.prod(shape[1:])
            sd[key] = rng.normal(0, 1.0 / np.sqrt(fan_in), shape)
    return {k: v.astype(np.float32) for k, v in sd.items()}


# ---------- float64 NCHW reference in torch semantics, reading the state_dict by taming's names ----------

def t_conv(x, sd, key, stride=1, pad=None):
    w, b = sd[f'{key}.weight'].astype(np.float64), sd[f'{key}.bias'].astype(np.float64)
    k = w.shape[2]
    p = k // 2 if pad is None else 0
    x = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p))) if pad is None else np.pad(x, ((0, 0), (0, 0)) + pad)
    ho, wo = (x.shape[2] - k) // stride + 1, (x.shape[3] - k) // stride + 1
    out = np.zeros((x.shape[0], w.shape[0], ho, wo))
    for i in range(k):
        for j in range(k):
            patch = x[:, :, i:i + stride * ho:stride, j:j + stride * wo:stride]
            out += np.einsum('nchw,oc->nohw', patch, w[:, :, i, j])
    return out + b[None, :, None, None]


def t_norm(x, sd, key):
    n, c, h, w = x.shape
    g = x.reshape(n, GROUPS, c // GROUPS, h, w)
    g = (g - g.mean(axis=(2, 3, 4), keepdims=True)) / np.sqrt(g.var(axis=(2, 3, 4), keepdims=True) + 1e-6)
    return g.reshape(x.shape) * sd[f'{key}.weight'][None, :, None, None] + sd[f'{key}.bias'][None, :, None, None]


def t_swish(x):
    return x / (1.0 + np.exp(-x))


def t_resnet(x, sd, key):
    h = t_conv(t_swish(t_norm(x, sd, f'{key}.norm1')), sd, f'{key}.conv1')
    h = t_conv(t_swish(t_norm(h, sd, f'{key}.norm2')), sd, f'{key}.conv2')
    return (t_conv(x, sd, f'{key}.nin_shortcut') if f'{key}.nin_shortcut.weight' in sd else x) + h


def t_attn(x, sd, key):
    b, c, hh, ww = x.shape
    h = t_norm(x, sd, f'{key}.norm')
    q, k, v = (t_conv(h, sd, f'{key}.{n}').reshape(b, c, hh * ww) for n in ('q', 'k', 'v'))
    w = np.einsum('bci,bcj->bij', q, k) * c ** -0.5
    w = np.exp(w - w.max(axis=2, keepdims=True))
    w /= w.sum(axis=2, keepdims=True)
    h = np.einsum('bcj,bij->bci', v, w).reshape(b, c, hh, ww)
    return x + t_conv(h, sd, f'{key}.proj_out')


def t_encode_latents(x, sd):
    levels, blocks = len(ARCH['ch_mult']), ARCH['num_res_blocks']
    h = t_conv(x, sd, 'encoder.conv_in')
    for i in range(levels):
        for j in range(blocks):
            h = t_resnet(h, sd, f'encoder.down.{i}.block.{j}')
            if f'encoder.down.{i}.attn.{j}.q.weight' in sd:
                h = t_attn(h, sd, f'encoder.down.{i}.attn.{j}')
        if i != levels - 1:
            h = t_conv(h, sd, f'encoder.down.{i}.downsample.conv', stride=2, pad=((0, 1), (0, 1)))
    h = t_resnet(h, sd, 'encoder.mid.block_1')
    h = t_attn(h, sd, 'encoder.mid.attn_1')
    h = t_resnet(h, sd, 'encoder.mid.block_2')
    h = t_conv(t_swish(t_norm(h, sd, 'encoder.norm_out')), sd, 'encoder.conv_out')
    return t_conv(h, sd, 'quant_conv')


def t_decode(zq, sd):
    levels, blocks = len(ARCH['ch_mult']), ARCH['num_res_blocks']
    h = t_conv(t_conv(zq, sd, 'post_quant_conv'), sd, 'decoder.conv_in')
    h = t_resnet(h, sd, 'decoder.mid.block_1')
    h = t_attn(h, sd, 'decoder.mid.attn_1')
    h = t_resnet(h, sd, 'decoder.mid.block_2')
    for i in reversed(range(levels)):
        for j in range(blocks + 1):
            h = t_resnet(h, sd, f'decoder.up.{i}.block.{j}')
            if f'decoder.up.{i}.attn.{j}.q.weight' in sd:
                h = t_attn(h, sd, f'decoder.up.{i}.attn.{j}')
        if i != 0:
            h = t_conv(h.repeat(2, axis=2).repeat(2, axis=3), sd, f'decoder.up.{i}.upsample.conv')
    return t_conv(t_swish(t_norm(h, sd, 'decoder.norm_out')), sd, 'decoder.conv_out')


def t_quantize(z, codebook):
    """z (N, D, h, w) -> codes (N, h, w): taming's argmin of |z|^2 + |e|^2 - 2 z.e."""
    flat = z.transpose(0, 2, 3, 1).reshape(-1, z.shape[1])
    d = (flat ** 2).sum(1, keepdims=True) + (codebook ** 2).sum(1)[None] - 2 * flat @ codebook.T
    return d.argmin(1).reshape(z.shape[0], z.shape[2], z.shape[3])


@pytest.fixture(scope='module')
def converted():
    sd = random_state_dict()
    frames = np.random.default_rng(1).uniform(-1, 1, (6, 3, 16, 16))
    latents = t_encode_latents(frames, sd)
    flat = latents.transpose(0, 2, 3, 1).reshape(-1, ARCH['embed_dim'])
    sd['quantize.embedding.weight'] = flat[np.random.default_rng(2).choice(len(flat), ARCH['n_embed'],
                                                                          replace=False)].astype(np.float32)
    fields, variables = taming_to_variables(sd, resolution=16, num_groups=GROUPS)
    return sd, frames, latents, fields, variables


def test_inferred_fields_and_tree_match_the_model(converted):
    _, _, _, fields, variables = converted
    assert fields == dict(ARCH, num_groups=GROUPS, dropout=0.0)
    expected = jax.tree_util.tree_map(lambda s: s.shape, abstract_variables(VQGAN(**fields)))
    got = jax.tree_util.tree_map(lambda a: a.shape, variables)
    assert got == expected                     # same names, nesting and shapes as the model (and TECO's layout)


def test_converted_model_reproduces_taming_forward(converted, tmp_path):
    sd, frames, latents, fields, variables = converted
    folder = write_teco_folder(tmp_path / 'converted', fields, variables, step=7)
    tok = vqgan.load(folder)
    video = frames.transpose(0, 2, 3, 1)[None].astype(np.float32)          # (1, 6, 16, 16, 3)
    embeddings, codes = tok.encode(video)
    ref_codes = t_quantize(latents, sd['quantize.embedding.weight'].astype(np.float64))
    np.testing.assert_array_equal(codes[0], ref_codes)
    assert len(np.unique(ref_codes)) > 4
    codebook = sd['quantize.embedding.weight'].astype(np.float64)
    np.testing.assert_allclose(embeddings[0], codebook[ref_codes], atol=1e-6)
    ref_frames = t_decode(codebook[ref_codes].transpose(0, 3, 1, 2), sd).transpose(0, 2, 3, 1)
    np.testing.assert_allclose(tok.decode(codes)[0], np.clip(ref_frames, -1, 1), atol=2e-4)
    direct = Tokenizer(VQGAN(**fields), variables)
    np.testing.assert_array_equal(direct.encode(video)[1], codes)


def test_conv_kernel_transposition_matches_direct_convolution():
    rng = np.random.default_rng(3)
    weight = rng.normal(size=(5, 2, 2, 3))                                 # (out, in, kh, kw), non-square
    bias = rng.normal(size=5)
    x = rng.normal(size=(1, 2, 6, 7))                                      # NCHW
    direct = np.zeros((1, 5, 5, 5))
    for o in range(5):
        for y in range(5):
            for z in range(5):
                direct[0, o, y, z] = bias[o] + np.sum(weight[o] * x[0, :, y:y + 2, z:z + 3])
    conv = nn.Conv(5, (2, 3), padding='VALID')
    out = conv.apply({'params': {'kernel': jnp.asarray(conv_kernel(weight), jnp.float32),
                                 'bias': jnp.asarray(bias, jnp.float32)}},
                     jnp.asarray(x.transpose(0, 2, 3, 1), jnp.float32))
    np.testing.assert_allclose(np.asarray(out).transpose(0, 3, 1, 2), direct, rtol=1e-5, atol=1e-5)


def test_missing_and_unexpected_entries_are_named():
    sd = random_state_dict()
    del sd['decoder.up.1.block.2.conv2.bias']
    with pytest.raises(ValueError, match=r"ckpt: missing entry 'decoder\.up\.1\.block\.2\.conv2\.bias'"):
        taming_to_variables(sd, 16, GROUPS, source='ckpt')
    sd = random_state_dict()
    sd['decoder.extra_head.weight'] = np.zeros((3, 3, 1, 1), np.float32)
    with pytest.raises(ValueError, match=r"unexpected entry 'decoder\.extra_head\.weight'"):
        taming_to_variables(sd, 16, GROUPS)
    sd = random_state_dict()
    sd['encoder.conv_out.weight'] = np.zeros((8, 8, 3, 3), np.float32)
    with pytest.raises(ValueError, match='double_z'):
        taming_to_variables(sd, 16, GROUPS)


def test_without_torch_the_message_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'torch', None)
    with pytest.raises(ImportError, match=r'needs torch.*pip install "teco_ssm\[torch\]"'):
        read_torch_checkpoint(tmp_path / 'last.ckpt')


def test_existing_output_is_not_overwritten(converted, tmp_path):
    _, _, _, fields, variables = converted
    folder = tmp_path / 'out'
    folder.mkdir()
    (folder / 'keep').write_text('x')
    with pytest.raises(FileExistsError, match='out: exists'):
        write_teco_folder(folder, fields, variables)
    assert (folder / 'keep').read_text() == 'x'


def test_a_missing_checkpoint_or_a_bracketed_output_is_named_before_any_work(tmp_path):
    from vqgan.convert import convert_taming

    with pytest.raises(FileNotFoundError, match=r'--ckpt .*nothing.ckpt: no such file'):
        convert_taming(tmp_path / 'nothing.ckpt', tmp_path / 'out', 64)
    with pytest.raises(ValueError, match=r"--out .*out\[1\]: contains '\[' and '\]'"):
        convert_taming(tmp_path / 'nothing.ckpt', tmp_path / 'out[1]', 64)
    assert sorted(tmp_path.iterdir()) == []
