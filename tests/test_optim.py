"""teco_ssm.optim: parameter groups, schedules, and AdamW updates against a float64 NumPy reference."""
import jax
import numpy as np
import pytest

from configs import mazelab
from teco_ssm import backbones, optim, teco

SSM = optim.SSM_PARAMS
TREE = {  # a hand-made parameter tree with the names the models use
    "backbone": {"layer_0": {"ssm": {"diagonal": {"Lambda_re": (4,), "Lambda_im": (4,), "log_step": (4, 1),
                                                  "B": (4, 3), "C": (3, 4)},
                                     "raw_b_H": (2, 3), "raw_b_W": (2, 3)},
                             "norm": {"scale": (3,), "bias": (3,)},
                             "D": (3,)},
                 "input_proj": {"kernel": (5, 3), "bias": (3,)}},
    "start_latent": (2, 2, 3),
}
EXPECTED = {
    "backbone/layer_0/ssm/diagonal/Lambda_re": "ssm", "backbone/layer_0/ssm/diagonal/Lambda_im": "ssm",
    "backbone/layer_0/ssm/diagonal/log_step": "ssm", "backbone/layer_0/ssm/diagonal/B": "ssm",
    "backbone/layer_0/ssm/diagonal/C": "decay", "backbone/layer_0/ssm/raw_b_H": "ssm",
    "backbone/layer_0/ssm/raw_b_W": "ssm", "backbone/layer_0/norm/scale": "no_decay",
    "backbone/layer_0/norm/bias": "no_decay", "backbone/layer_0/D": "no_decay",
    "backbone/input_proj/kernel": "decay", "backbone/input_proj/bias": "no_decay", "start_latent": "decay",
}


def params(seed=0):
    leaves, treedef = jax.tree_util.tree_flatten(TREE, is_leaf=lambda x: isinstance(x, tuple))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_unflatten(treedef, [rng.normal(size=s).astype(np.float32) for s in leaves])


def flat(tree):
    return {optim.path_name(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def settings(**overrides):
    fields = dict(lr=0.1, warmup_steps=4, total_steps=20, weight_decay=0.5, grad_clip=1.0, ssm_lr=0.03,
                  ssm_weight_decay=0.0, ssm_params=SSM, end_lr_factor=0.1)
    fields.update(overrides)
    return optim.OptimizerSettings(**fields)


def test_groups_of_a_hand_made_tree():
    assert flat(optim.param_labels(params(), SSM)) == EXPECTED
    sizes = optim.group_sizes(params(), SSM)
    assert sizes == {"ssm": 4 + 4 + 4 + 12 + 6 + 6, "no_decay": 3 + 3 + 3 + 3, "decay": 12 + 15 + 12}


def schedule_reference(step, peak, s):
    if step < s.warmup_steps:
        return peak * step / s.warmup_steps
    progress = (step - s.warmup_steps) / (s.total_steps - s.warmup_steps)
    end = s.end_lr_factor * peak
    return end + (peak - end) * 0.5 * (1 + np.cos(np.pi * min(progress, 1.0)))


def test_schedule_is_linear_warmup_then_cosine():
    s = settings()
    schedule = optim.learning_rate_schedule(s.lr, s)
    for step in (0, 1, 3, 4, 5, 12, 19, 20, 30):
        np.testing.assert_allclose(float(schedule(step)), schedule_reference(step, s.lr, s), rtol=1e-5, atol=1e-9)
    rates = optim.learning_rates(s)(8)
    np.testing.assert_allclose(float(rates["ssm_lr"]) / float(rates["lr"]), 0.3, rtol=1e-5)
    constant = optim.learning_rate_schedule(0.2, settings(schedule="constant"))
    np.testing.assert_allclose([float(constant(t)) for t in (0, 2, 4, 19, 50)], [0, 0.1, 0.2, 0.2, 0.2], rtol=1e-6)


def adamw_reference(p, grads, s, steps):
    """float64 NumPy: global-norm clip, Adam moments, decoupled weight decay and the rate of each group."""
    labels = flat(optim.param_labels(p, SSM))
    p = {k: np.asarray(v, np.float64) for k, v in flat(p).items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t in range(steps):
        g = {k: np.asarray(x, np.float64) for k, x in flat(grads[t]).items()}
        norm = np.sqrt(sum((x ** 2).sum() for x in g.values()))
        g = {k: x * min(1.0, s.grad_clip / norm) for k, x in g.items()}
        for k in p:
            m[k] = s.b1 * m[k] + (1 - s.b1) * g[k]
            v[k] = s.b2 * v[k] + (1 - s.b2) * g[k] ** 2
            update = (m[k] / (1 - s.b1 ** (t + 1))) / (np.sqrt(v[k] / (1 - s.b2 ** (t + 1))) + 1e-8)
            group = labels[k]
            peak, decay = {"ssm": (s.peak_ssm_lr, s.ssm_weight_decay), "decay": (s.lr, s.weight_decay),
                           "no_decay": (s.lr, 0.0)}[group]
            p[k] = p[k] - schedule_reference(t, peak, s) * (update + decay * p[k])
    return p


@pytest.mark.parametrize("ssm_weight_decay", [0.0, 0.2])
def test_updates_match_a_float64_adamw_per_group(ssm_weight_decay):
    s = settings(ssm_weight_decay=ssm_weight_decay)
    tx = optim.build(s)
    p = params()
    grads = [jax.tree_util.tree_map(lambda x, i=i: np.random.default_rng(10 + i).normal(size=x.shape).astype(
        np.float32) * (3.0 if i == 0 else 0.1), p) for i in range(6)]  # the first one is clipped
    state = tx.init(p)
    current = p
    update = jax.jit(tx.update)
    for g in grads:
        updates, state = update(g, state, current)
        current = jax.tree_util.tree_map(lambda a, b: a + b, current, updates)
    expected = adamw_reference(p, grads, s, len(grads))
    for k, value in flat(current).items():
        np.testing.assert_allclose(np.asarray(value, np.float64), expected[k], rtol=2e-5, atol=2e-6, err_msg=k)


def test_zero_gradients_show_each_groups_weight_decay_and_rate():
    """With zero gradients the Adam part vanishes: the update is -rate * decay * p, so an SSM parameter (decay 0)
    stays put, a norm or bias stays put, a matrix shrinks at the main rate."""
    s = settings(warmup_steps=0, ssm_weight_decay=0.25)
    tx = optim.build(s)
    p = params()
    zeros = jax.tree_util.tree_map(np.zeros_like, p)
    updates, _ = tx.update(zeros, tx.init(p), p)
    for k, u in flat(updates).items():
        group = EXPECTED[k]
        factor = {"ssm": -0.03 * 0.25, "decay": -0.1 * 0.5, "no_decay": 0.0}[group]
        np.testing.assert_allclose(np.asarray(u), factor * np.asarray(flat(p)[k]), rtol=1e-6, atol=1e-12,
                                   err_msg=k)


def test_from_config_and_bad_settings():
    config = mazelab.get_config("convs5")
    s = optim.OptimizerSettings.of_experiment(config)
    assert (s.lr, s.warmup_steps, s.total_steps, s.peak_ssm_lr) == (3e-3, 50, 3000, 3e-3)
    config.optim.convs5.ssm_lr = 1e-3
    assert optim.OptimizerSettings.from_config(config.optim.convs5, 100).peak_ssm_lr == 1e-3
    hash(s)  # static argument of the jitted train step
    with pytest.raises(ValueError, match=r"config.optim.<backbone> has unknown field\(s\) momentum"):
        optim.OptimizerSettings.from_config({**config.optim.convs5.to_dict(), "momentum": 0.9}, 10)
    with pytest.raises(ValueError, match=r"lr must be > 0, got 0.0"):
        settings(lr=0.0)
    with pytest.raises(ValueError, match=r"schedule 'step' is not one of cosine, constant"):
        settings(schedule="step")
    with pytest.raises(ValueError, match=r"warmup_steps \(20\) < total_steps \(20\)"):
        settings(warmup_steps=20)


TOY = {"transformer": dict(d_model=16, n_layers=1, embed_dim=16, mlp_dim=32, num_heads=2, downsample=2, max_len=8),
       "s5": dict(d_model=16, n_layers=1, ssm_size=8, downsample=2, out_dim=8),
       "convs5": dict(d_model=16, n_layers=1, ssm_size=8, num_groups=4),
       "convt3": dict(d_model=16, n_layers=1, ssm_size=8, num_groups=4)}


@pytest.mark.parametrize("name", backbones.NAMES)
def test_config_groups_catch_every_ssm_parameter_of_every_backbone(name):
    """With the configs' regex, every SSM eigenvalue, timescale and input matrix of the real models trains in the
    'ssm' group, and nothing else does."""
    model = teco.Teco(backbone=backbones.build(name, TOY[name]), code_shape=(4, 4), vqgan_codes=8,
                      vqgan_embedding_dim=4, encoder_depths=(8, 8), encoder_blocks=1, decoder_depths=(8, 8),
                      decoder_blocks=1, latent_codes=8, latent_dim=4, latent_proj_dim=4, prior_width=8,
                      prior_mlp_dim=8, prior_heads=1, prior_layers=1, prior_token_dim=4)
    abstract = jax.eval_shape(lambda k: teco.init_variables(model, k), jax.random.key(0))["params"]
    settings_of_config = optim.OptimizerSettings.of_experiment(mazelab.get_config(name))
    labels = flat(optim.param_labels(abstract, settings_of_config.ssm_params))
    ssm_names = ("Lambda_re", "Lambda_im", "log_step", "B", "raw_b_H", "raw_b_W")
    expected = {k for k in labels if ("/diagonal/" in k or "/raw_b_" in k) and k.rsplit("/", 1)[1] in ssm_names}
    assert {k for k, g in labels.items() if g == "ssm"} == expected
    assert bool(expected) == (name != "transformer")
