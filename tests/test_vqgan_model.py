"""The VQGAN module: parameter tree as TECO's checkpoints name it, and the forward pass against float64 NumPy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqgan.model import VQGAN, abstract_variables, init_variables, nearest_codes

SMALL = dict(ch=4, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), z_channels=6, resolution=8,
             n_embed=12, embed_dim=3, num_groups=2)


def expected_tree(ch, ch_mult, num_res_blocks, attn_resolutions, z_channels, resolution, n_embed, embed_dim,
                  **_):
    """Name -> shape of every parameter, written from the reference description of TECO's layout."""
    tree = {}

    def conv(prefix, k, cin, cout):
        tree[f'{prefix}/kernel'] = (k, k, cin, cout)
        tree[f'{prefix}/bias'] = (cout,)

    def norm(prefix, c):
        tree[f'{prefix}/scale'] = (c,)
        tree[f'{prefix}/bias'] = (c,)

    def part(prefix):
        counts = {}

        def nxt(kind):
            counts[kind] = counts.get(kind, -1) + 1
            return f'{prefix}/{kind}_{counts[kind]}'
        return nxt

    def resnet(name, cin, cout):
        norm(f'{name}/GroupNorm_0', cin)
        conv(f'{name}/Conv_0', 3, cin, cout)
        norm(f'{name}/GroupNorm_1', cout)
        conv(f'{name}/Conv_1', 3, cout, cout)
        if cin != cout:
            conv(f'{name}/Conv_2', 1, cin, cout)

    def attn(name, c):
        norm(f'{name}/GroupNorm_0', c)
        for i in range(4):
            conv(f'{name}/Conv_{i}', 1, c, c)

    nxt = part('params/encoder')
    conv(nxt('Conv'), 3, 3, ch)
    res, cin = resolution, ch
    for level, mult in enumerate(ch_mult):
        for _ in range(num_res_blocks):
            resnet(nxt('ResnetBlock'), cin, ch * mult)
            cin = ch * mult
            if res in attn_resolutions:
                attn(nxt('AttnBlock'), cin)
        if level != len(ch_mult) - 1:
            conv(nxt('Downsample') + '/Conv_0', 3, cin, cin)
            res //= 2
    resnet(nxt('ResnetBlock'), cin, cin)
    attn(nxt('AttnBlock'), cin)
    resnet(nxt('ResnetBlock'), cin, cin)
    norm(nxt('GroupNorm'), cin)
    conv(nxt('Conv'), 3, cin, z_channels)

    nxt = part('params/decoder')
    cin = ch * ch_mult[-1]
    conv(nxt('Conv'), 3, z_channels, cin)
    resnet(nxt('ResnetBlock'), cin, cin)
    attn(nxt('AttnBlock'), cin)
    resnet(nxt('ResnetBlock'), cin, cin)
    for level in reversed(range(len(ch_mult))):
        for _ in range(num_res_blocks + 1):
            resnet(nxt('ResnetBlock'), cin, ch * ch_mult[level])
            cin = ch * ch_mult[level]
            if res in attn_resolutions:
                attn(nxt('AttnBlock'), cin)
        if level != 0:
            conv(nxt('Upsample') + '/Conv_0', 3, cin, cin)
            res *= 2
    norm(nxt('GroupNorm'), cin)
    conv(nxt('Conv'), 3, cin, 3)
    conv('params/quant_conv', 1, z_channels, embed_dim)
    conv('params/post_quant_conv', 1, embed_dim, z_channels)
    tree['stats/quantize/embeddings'] = (n_embed, embed_dim)
    return tree


def flat_shapes(tree, prefix=''):
    out = {}
    for k, v in tree.items():
        name = f'{prefix}/{k}' if prefix else k
        out.update(flat_shapes(v, name) if isinstance(v, dict) else {name: tuple(v.shape)})
    return out


@pytest.mark.parametrize('fields', [
    SMALL,
    dict(SMALL, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(8, 2), resolution=16),
    # DMLab's published VQGAN at 64x64: checks the full-size tree without allocating it
    dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), z_channels=256, resolution=64,
         n_embed=1024, embed_dim=256),
])
def test_parameter_tree_matches_reference_layout(fields):
    model = VQGAN(**fields)
    assert flat_shapes(abstract_variables(model)) == expected_tree(**fields)


def test_top_level_creation_order_matches_reference():
    model = VQGAN(**SMALL)
    order = []

    def init(rng):  # records the dict order inside the trace (flattening outside it sorts keys)
        variables = model.init(rng, jnp.zeros((1, 8, 8, 3)), method=VQGAN.initialize)
        order.append((list(variables['params']), list(variables['params']['encoder'])))
        return variables
    jax.eval_shape(init, jax.random.key(0))
    top, encoder = order[0]
    assert top == ['encoder', 'decoder', 'quant_conv', 'post_quant_conv']
    assert encoder == creation_order(None, SMALL, 'encoder')


# ---------- float64 NumPy reference of the forward pass, driven by the parameter names ----------

def np_conv(x, p, stride=1, pad=None):
    k = np.asarray(p['kernel'], np.float64)
    kh = k.shape[0]
    if pad is None:
        pad = ((kh // 2, kh // 2), (kh // 2, kh // 2))
    x = np.pad(x, ((0, 0), pad[0], pad[1], (0, 0)))
    ho = (x.shape[1] - kh) // stride + 1
    wo = (x.shape[2] - kh) // stride + 1
    out = np.zeros((x.shape[0], ho, wo, k.shape[3]))
    for i in range(kh):
        for j in range(kh):
            out += x[:, i:i + stride * ho:stride, j:j + stride * wo:stride, :] @ k[i, j]
    return out + np.asarray(p['bias'], np.float64)


def np_norm(x, p, groups):
    n, h, w, c = x.shape
    g = x.reshape(n, h, w, groups, c // groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = g.var(axis=(1, 2, 4), keepdims=True)
    g = ((g - mean) / np.sqrt(var + 1e-6)).reshape(x.shape)
    return g * np.asarray(p['scale'], np.float64) + np.asarray(p['bias'], np.float64)


def np_swish(x):
    return x / (1.0 + np.exp(-x))


def np_resnet(x, p, groups):
    h = np_conv(np_swish(np_norm(x, p['GroupNorm_0'], groups)), p['Conv_0'])
    h = np_conv(np_swish(np_norm(h, p['GroupNorm_1'], groups)), p['Conv_1'])
    return (np_conv(x, p['Conv_2']) if 'Conv_2' in p else x) + h


def np_attn(x, p, groups):
    n, hh, ww, c = x.shape
    h = np_norm(x, p['GroupNorm_0'], groups)
    q, k, v = (np_conv(h, p[f'Conv_{i}']).reshape(n, -1, c) for i in range(3))
    w = q @ k.transpose(0, 2, 1) / np.sqrt(c)
    w = np.exp(w - w.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return x + np_conv((w @ v).reshape(n, hh, ww, c), p['Conv_3'])


def np_apply_sequence(x, p, names, groups, resolution, attn_resolutions):
    """Applies encoder/decoder children in name order (the order they were created)."""
    for name in names:
        kind = name.rsplit('_', 1)[0]
        if kind == 'ResnetBlock':
            x = np_resnet(x, p[name], groups)
        elif kind == 'AttnBlock':
            x = np_attn(x, p[name], groups)
        elif kind == 'Downsample':
            x = np_conv(x, p[name]['Conv_0'], stride=2, pad=((0, 1), (0, 1)))
        elif kind == 'Upsample':
            x = np_conv(x.repeat(2, axis=1).repeat(2, axis=2), p[name]['Conv_0'])
        elif kind == 'GroupNorm':
            x = np_swish(np_norm(x, p[name], groups))
        elif kind == 'Conv':
            x = np_conv(x, p[name])
    return x


def creation_order(part, fields, which):
    """Child names in creation order, as `expected_tree` writes them."""
    seen = []
    for key in expected_tree(**fields):
        if key.startswith(f'params/{which}/'):
            child = key.split('/')[2]
            if child not in seen:
                seen.append(child)
    return seen


def test_forward_matches_float64_numpy_reference():
    fields = SMALL
    model = VQGAN(**fields)
    variables = init_variables(model, 1)
    # random (not initial) values everywhere, so norms' scale/bias and biases matter too
    leaves, treedef = jax.tree_util.tree_flatten(variables)
    rng = np.random.default_rng(2)
    variables = jax.tree_util.tree_unflatten(
        treedef, [l + 0.3 * rng.standard_normal(l.shape).astype(np.float32) for l in leaves])
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), variables['params'])
    codebook = np.asarray(variables['stats']['quantize']['embeddings'], np.float64)
    frames = rng.uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)

    h = np_apply_sequence(frames.astype(np.float64), p['encoder'], creation_order(p, fields, 'encoder'), 2, 8,
                          fields['attn_resolutions'])
    latents = np_conv(h, p['quant_conv'])
    dist = ((latents[..., None, :] - codebook) ** 2).sum(-1)
    ref_codes = dist.argmin(-1)
    quantized = codebook[ref_codes]
    ref_frames = np_apply_sequence(np_conv(quantized, p['post_quant_conv']), p['decoder'],
                                   creation_order(p, fields, 'decoder'), 2, 8, fields['attn_resolutions'])

    got_latents, (emb, codes), decoded = jax.jit(lambda v, x, c: (
        model.apply(v, x, method=VQGAN.encode_latents), model.apply(v, x, method=VQGAN.encode),
        model.apply(v, c, method=VQGAN.decode_codes)))(variables, jnp.asarray(frames), jnp.asarray(ref_codes,
                                                                                                    jnp.int32))
    np.testing.assert_allclose(got_latents, latents, rtol=1e-4, atol=1e-4)
    sorted_d = np.sort(dist, axis=-1)
    clear = (sorted_d[..., 1] - sorted_d[..., 0]) > 1e-3
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(np.asarray(codes)[clear], ref_codes[clear])
    np.testing.assert_allclose(emb, codebook[np.asarray(codes)], rtol=1e-6)
    np.testing.assert_allclose(decoded, ref_frames, rtol=1e-4, atol=1e-4)


def test_nearest_codes_is_brute_force_argmin():
    rng = np.random.default_rng(0)
    lat = rng.standard_normal((5, 4, 3)).astype(np.float32)
    book = rng.standard_normal((9, 3)).astype(np.float32)
    ref = ((lat[..., None, :].astype(np.float64) - book) ** 2).sum(-1).argmin(-1)
    np.testing.assert_array_equal(nearest_codes(jnp.asarray(lat), jnp.asarray(book)), ref)


def test_training_forward_equals_decoding_its_codes():
    model = VQGAN(**SMALL)
    variables = init_variables(model, 0)
    frames = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (2, 8, 8, 3)), jnp.float32)
    recon, aux, decoded = jax.jit(lambda v: model.apply(v, frames) + (
        model.apply(v, model.apply(v, frames)[1]['codes'], method=VQGAN.decode_codes),))(variables)
    np.testing.assert_allclose(recon, decoded, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(aux['quantized'], variables['stats']['quantize']['embeddings'][aux['codes']])
