"""Importing released TECO, TECO-ConvS5 and TECO-S5 checkpoints (`teco_ssm.released`, `teco-ssm convert-teco`).

The released folders here are written by this test from the documented layout (docs/model.md, "Released
checkpoints": the parameter names and shapes of wilson1yan/teco `teco/models/teco.py` and NVlabs/ConvSSM
`teco_convS5.py`, `teco_S5.py`), with flax's legacy msgpack serialisation, as `flax.training.checkpoints` writes
them. Every parameter holds distinct random values, so where each released value lands can be read off the
converted checkpoint and compared with the documented mapping.
"""
import argparse
import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import flax.serialization
import ml_collections
import numpy as np
import pytest

from teco_ssm import checkpoint as ckpt
from teco_ssm import released, stages
from toy import write_tokenizer

# The toy VQGAN (tests/toy.py): 12 codes of 4 channels on an 8 x 8 grid of 16 x 16 frames.
N_CODES, CODE_DIM, GRID = 12, 4, 8
DEPTHS, E, K, PROJ, VOCAB_DIM, WIDTH, MLP, HEADS = (32, 64), 8, 16, 8, 8, 16, 32, 2
A, A_DIM, U, SSM, KERNEL = 3, 4, 16, 8, 3
LATENT = GRID // 2


def common_settings(**values):
    """A release YAML's keys at toy sizes (wilson1yan/teco configs/dmlab.yaml, shrunk)."""
    base = dict(
        seed=1, batch_size=4, lr=5e-4, lr_schedule="cosine", weight_decay=1e-5, total_steps=1000, warmup_steps=10,
        seq_len=6, eval_seq_len=6, image_size=16, channels=3, data_path="/home/author/data/dmlab_encoded",
        vqvae_ckpt="/home/author/ckpts/dmlab_vqgan", encoder=dict(depths=list(DEPTHS), blocks=1),
        decoder=dict(depths=list(DEPTHS), blocks=1),
        z_git=dict(vocab_dim=VOCAB_DIM, mask_schedule="cosine",
                   tfm_kwargs=dict(embed_dim=WIDTH, mlp_dim=MLP, num_heads=HEADS, num_layers=1, dropout=0.0,
                                   attention_dropout=0.0)),
        embedding_dim=E, codebook=dict(n_codes=K, proj_dim=PROJ), n_cond=1, drop_loss_rate=0.9, use_actions=True,
        action_dim=A, action_embed_dim=A_DIM, dropout_actions=True, T_draft=8, T_revise=8, M=2, open_loop_ctx=2)
    base.update(values)
    return base


SSM_LAYER = dict(dropout=0.0, use_norm=True, prenorm=False, per_layer_skip=True, skip_connections=False)
SETTINGS = {
    "teco": common_settings(model="teco", z_ds=2, z_tfm_kwargs=dict(embed_dim=WIDTH, mlp_dim=MLP, num_heads=HEADS,
                                                                    num_layers=1, dropout=0.0, attention_dropout=0.0)),
    "teco_convS5": common_settings(
        model="teco_convS5", d_model=U, latent_height=LATENT, latent_width=LATENT,
        seq_model=dict(SSM_LAYER, n_layers=2, layer_activation="gelu", num_groups=4, squeeze_excite=False),
        ssm=dict(ssm_size=SSM, blocks=1, clip_eigs=False, B_kernel_size=KERNEL, C_kernel_size=KERNEL,
                 D_kernel_size=KERNEL, dt_min=0.001, dt_max=0.1, C_D_config="resnet"),
        causal_masking=True, frame_mask_id=-2, action_dropout_rate=0.5, action_mask_id=-1, open_loop_ctx_1=3,
        action_conditioned_1=True, open_loop_ctx_2=2, action_conditioned_2=False),
    "teco_S5": common_settings(
        model="teco_S5", z_ds=LATENT, d_model=U, seq_model=dict(SSM_LAYER, n_layers=1),
        ssm=dict(ssm_size=SSM, blocks=1, clip_eigs=False, dt_min=0.001, dt_max=0.1), causal_masking=False,
        frame_mask_id=None, action_dropout_rate=0.5, action_mask_id=-1, open_loop_ctx_1=3, open_loop_ctx_2=2,
        action_conditioned_2=False),
}
SETTINGS["teco_noact"] = dict(SETTINGS["teco"], use_actions=False, dropout_actions=False)


# ------------------------------------------------------------------------------ the released tree, as documented
def dense(n_in, n_out, bias=True):
    return dict(kernel=(n_in, n_out), **({"bias": (n_out,)} if bias else {}))


def norm(n):
    return dict(scale=(n,), bias=(n,))


def resnet_block(n_in, n):
    """teco/models/base.py ResNetBlock: the second conv's bias is a separate AddBias leaf; a 1x1 `skip` when the
    width changes."""
    block = dict(GroupNorm_0=norm(n_in), Conv_0=dict(kernel=(3, 3, n_in, n), bias=(n,)), GroupNorm_1=norm(n),
                 Conv_1=dict(kernel=(3, 3, n, n)), AddBias_0=dict(bias=(n,)))
    if n_in != n:
        block["skip"] = dict(kernel=(1, 1, n_in, n))
    return block


def transformer_layer(width):
    """teco/models/transformer.py TransformerLayer: attention and MLP output biases as separate leaves."""
    head = width // HEADS
    attention = {name: dict(kernel=(width, HEADS, head), bias=(HEADS, head)) for name in ("query", "key", "value")}
    attention.update(out=dict(kernel=(HEADS, head, width)), out_bias=dict(bias=(width,)))
    return dict(LayerNorm_0=norm(width), MultiHeadAttention_0=attention, LayerNorm_1=norm(width),
                MlpBlock_0=dict(wi=dense(width, MLP), wo=dict(kernel=(MLP, width)), wo_bias=dict(bias=(width,))))


def release_shapes(kind):
    """The released params tree (names and shapes) of `kind` at the sizes of SETTINGS[kind]."""
    s = SETTINGS[kind]
    backbone_out = U if kind == "teco_convS5" else E
    encoder = dict(Conv_0=dict(kernel=(3, 3, 2 * CODE_DIM, DEPTHS[0]), bias=(DEPTHS[0],)),
                   ResNetBlock_0=resnet_block(DEPTHS[0], DEPTHS[0]), ResNetBlock_1=resnet_block(DEPTHS[0], DEPTHS[1]))
    decoder = dict(Conv_0=dict(kernel=(3, 3, backbone_out + E, DEPTHS[0]), bias=(DEPTHS[0],)),
                   ResNetBlock_0=resnet_block(DEPTHS[0], DEPTHS[1]), ResNetBlock_1=resnet_block(DEPTHS[1], DEPTHS[0]),
                   LayerNorm_0=norm(DEPTHS[0]), Dense_0=dense(DEPTHS[0], N_CODES))
    prior = dict(token_embed=(K + 1, VOCAB_DIM),
                 net=dict(Dense_0=dense(VOCAB_DIM + backbone_out, WIDTH),
                          BroadcastPositionBiases_0=dict(d_0=(LATENT, WIDTH - WIDTH // 2), d_1=(LATENT, WIDTH // 2)),
                          TransformerLayer_0=transformer_layer(WIDTH), Dense_1=dense(WIDTH, WIDTH),
                          LayerNorm_0=norm(WIDTH)),
                 mlm=dict(Dense_0=dense(WIDTH, VOCAB_DIM), LayerNorm_0=norm(VOCAB_DIM), AddBias_0=dict(bias=(K,))))
    tree = dict(action_embeds=dict(embedding=(A + 1, A_DIM)), sos_post=(GRID, GRID, CODE_DIM),
                encoder=dict(layers_0=encoder, layers_1=dense(DEPTHS[1], E)),
                codebook=dict(codebook=(K, PROJ), Dense_0=dict(kernel=(E, PROJ)), Dense_1=dict(kernel=(PROJ, E))),
                z_git=prior, decoder=decoder)
    inputs = E + A_DIM
    if kind in ("teco", "teco_noact"):
        z = s["z_ds"]
        tree.update(z_proj=dict(kernel=(z, z, inputs, WIDTH)), sos=(LATENT // z, LATENT // z, WIDTH),
                    z_unproj=dict(kernel=(z, z, WIDTH, E)),
                    z_tfm=dict(Dense_0=dense(WIDTH, WIDTH), TransformerLayer_0=transformer_layer(WIDTH),
                               Dense_1=dense(WIDTH, WIDTH), LayerNorm_0=norm(WIDTH)))
    elif kind == "teco_S5":
        P = SSM // 2
        layer = dict(seq=dict(Lambda_re=(P,), Lambda_im=(P,), B=(P, U, 2), C=(U, P, 2), D=(U,), log_step=(P, 1),
                              out2=dense(U, U)), norm=norm(U))
        tree.update(z_proj=dict(kernel=(LATENT, LATENT, inputs, U)), sos=(1, 1, U),
                    z_unproj=dict(kernel=(LATENT, LATENT, U, E)), sequence_model=dict(layers_0=layer))
    else:
        P = SSM // 2
        activation = dict(GroupNorm_0=norm(U), Conv_0=dict(kernel=(KERNEL, KERNEL, U, U), bias=(U,)),
                          GroupNorm_1=norm(U), Conv_1=dict(kernel=(KERNEL, KERNEL, U, U), bias=(U,)))
        layer = dict(seq=dict(Lambda_re=(P,), Lambda_im=(P,), B=(P, U * KERNEL * KERNEL, 2),
                              C=(KERNEL, KERNEL, P, U, 2), log_step=(P, 1), C_D_conv=activation), norm=norm(U))
        tree.update(action_conv=dict(Conv_0=dict(kernel=(1, 1, inputs, U), bias=(U,))),
                    sequence_model=dict(layers_0=layer, layers_1=layer))
    return tree


def fill(shapes, rng):
    """Distinct random values for every leaf of a tree of shapes."""
    if isinstance(shapes, dict):
        return {k: fill(v, rng) for k, v in shapes.items()}
    return rng.standard_normal(shapes).astype(np.float32)


def write_release(folder, kind, steps=(100001,), params=None, settings=None, seed=0):
    """A released run folder: `args` (the settings as the release's train script pickles them) and
    checkpoints/checkpoint_<step> for each step (flax's msgpack of {step, params, opt_state, model_state}).
    Returns the params of the last step."""
    folder = Path(folder)
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    settings = SETTINGS[kind] if settings is None else settings
    if settings is not False:
        with open(folder / "args", "wb") as f:
            pickle.dump(argparse.Namespace(**settings, output_dir=str(folder), run_id=folder.name), f)
    rng, tree = np.random.default_rng(seed), params
    for step in steps:
        tree = fill(release_shapes(kind), rng) if params is None else params
        state = dict(step=np.int32(step), params=tree, opt_state={"0": {"count": np.int32(step)}}, model_state={})
        (folder / "checkpoints" / f"checkpoint_{step}").write_bytes(flax.serialization.msgpack_serialize(state))
    return tree


def flat(tree, prefix=""):
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in flat(sub, f"{prefix}/{key}" if prefix else key).items()}
    return {prefix: np.asarray(tree)}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return write_tokenizer(tmp_path_factory.mktemp("vqgan") / "vqgan")


def convert(tmp_path, kind, tokenizer, **kwargs):
    write_release(tmp_path / "release", kind, **kwargs)
    return released.convert(str(tmp_path / "release"), tokenizer, str(tmp_path / "out"))


def converted_variables(workdir):
    config = ml_collections.ConfigDict(ckpt.read_config(workdir))
    return config, flat(ckpt.load_variables(config, workdir))


# --------------------------------------------------------------------------------------------- the mapping
def documented_mapping(kind):
    """Release leaf -> leaf here, for every released leaf (docs/model.md, "Released checkpoints")."""
    pairs = {"action_embeds/embedding": "params/action_embedding/embedding",
             "sos_post": "params/start_code_embedding",
             "encoder/layers_1/kernel": "params/encoder/Dense_0/kernel",
             "encoder/layers_1/bias": "params/encoder/Dense_0/bias",
             "codebook/codebook": "params/codebook/codes", "codebook/Dense_0/kernel": "params/codebook/proj_in/kernel",
             "codebook/Dense_1/kernel": "params/codebook/proj_out/kernel",
             "z_git/token_embed": "params/prior/token_embedding",
             "z_git/net/Dense_0/kernel": "params/prior/input/kernel", "z_git/net/Dense_0/bias": "params/prior/input/bias",
             "z_git/net/BroadcastPositionBiases_0/d_0": "params/prior/row_embedding",
             "z_git/net/BroadcastPositionBiases_0/d_1": "params/prior/column_embedding",
             "z_git/mlm/AddBias_0/bias": "params/prior/output_bias"}
    for name in ("kernel", "bias"):
        pairs[f"z_git/net/Dense_1/{name}"] = f"params/prior/final_dense/{name}"
        pairs[f"z_git/mlm/Dense_0/{name}"] = f"params/prior/head/{name}"
    for name in ("scale", "bias"):
        pairs[f"z_git/net/LayerNorm_0/{name}"] = f"params/prior/final_norm/{name}"
        pairs[f"z_git/mlm/LayerNorm_0/{name}"] = f"params/prior/head_norm/{name}"
    for there, here in (("encoder/layers_0", "params/encoder"), ("decoder", "params/decoder")):
        for path in flat(release_shapes(kind)[there.split("/")[0]]):
            path = path.removeprefix("layers_0/")
            if not path.startswith(("ResNetBlock", "Conv_0", "LayerNorm", "Dense")):
                continue
            pairs[f"{there}/{path}"] = f"{here}/{path.replace('AddBias_0/bias', 'Conv_1/bias')}"
    attention = "MultiHeadAttention_0"
    layer = {f"LayerNorm_{i}/{n}": f"LayerNorm_{i}/{n}" for i in (0, 1) for n in ("scale", "bias")}
    layer.update({f"{attention}/{q}/{n}": f"MultiHeadDotProductAttention_0/{q}/{n}"
                  for q in ("query", "key", "value") for n in ("kernel", "bias")})
    layer.update({f"{attention}/out/kernel": "MultiHeadDotProductAttention_0/out/kernel",
                  f"{attention}/out_bias/bias": "MultiHeadDotProductAttention_0/out/bias",
                  "MlpBlock_0/wi/kernel": "Dense_0/kernel", "MlpBlock_0/wi/bias": "Dense_0/bias",
                  "MlpBlock_0/wo/kernel": "Dense_1/kernel", "MlpBlock_0/wo_bias/bias": "Dense_1/bias"})
    pairs.update({f"z_git/net/TransformerLayer_0/{k}": f"params/prior/block_0/{v}" for k, v in layer.items()})
    b = "params/backbone"
    if kind in ("teco", "teco_noact"):
        pairs.update({"z_proj/kernel": f"{b}/tokenize/kernel", "sos": f"{b}/sos/embedding",
                      "z_unproj/kernel": f"{b}/untokenize/kernel"})
        names = {"LayerNorm_0": "attention_norm", "LayerNorm_1": "mlp_norm", f"{attention}/query": "query",
                 f"{attention}/key": "key", f"{attention}/value": "value", f"{attention}/out": "attention_out",
                 f"{attention}/out_bias": "attention_out", "MlpBlock_0/wi": "mlp_in", "MlpBlock_0/wo": "mlp_out",
                 "MlpBlock_0/wo_bias": "mlp_out"}
        for path in flat(release_shapes(kind)["z_tfm"]["TransformerLayer_0"]):
            module, _, leaf = path.rpartition("/")
            pairs[f"z_tfm/TransformerLayer_0/{path}"] = f"{b}/layers_0/{names[module]}/{leaf}"
        for n in ("kernel", "bias"):
            pairs[f"z_tfm/Dense_0/{n}"], pairs[f"z_tfm/Dense_1/{n}"] = f"{b}/project/{n}", f"{b}/head_dense/{n}"
        for n in ("scale", "bias"):
            pairs[f"z_tfm/LayerNorm_0/{n}"] = f"{b}/head_norm/{n}"
    elif kind == "teco_S5":
        pairs.update({"z_proj/kernel": f"{b}/downsample/kernel", "z_unproj/kernel": f"{b}/upsample/kernel"})
        seq = "sequence_model/layers_0/seq"
        pairs.update({f"{seq}/{n}": f"{b}/layer_0/diagonal/{n}" for n in ("Lambda_re", "Lambda_im", "B", "C",
                                                                          "log_step")})
        pairs.update({f"{seq}/D": f"{b}/layer_0/D", f"{seq}/out2/kernel": f"{b}/layer_0/activation/Dense_0/kernel",
                      f"{seq}/out2/bias": f"{b}/layer_0/activation/Dense_0/bias",
                      "sequence_model/layers_0/norm/scale": f"{b}/layer_0/norm/scale",
                      "sequence_model/layers_0/norm/bias": f"{b}/layer_0/norm/bias"})
    else:
        pairs.update({"action_conv/Conv_0/kernel": f"{b}/input_proj/kernel",
                      "action_conv/Conv_0/bias": f"{b}/input_proj/bias"})
        for i in (0, 1):
            seq = f"sequence_model/layers_{i}/seq"
            pairs.update({f"{seq}/{n}": f"{b}/layer_{i}/ssm/diagonal/{n}"
                          for n in ("Lambda_re", "Lambda_im", "B", "C", "log_step")})
            pairs.update({f"{seq}/C_D_conv/{m}/{n}": f"{b}/layer_{i}/activation/{m}/{n}"
                          for m in ("GroupNorm_0", "GroupNorm_1") for n in ("scale", "bias")})
            pairs.update({f"{seq}/C_D_conv/{m}/{n}": f"{b}/layer_{i}/activation/{m}/{n}"
                          for m in ("Conv_0", "Conv_1") for n in ("kernel", "bias")})
            pairs.update({f"sequence_model/layers_{i}/norm/{n}": f"{b}/layer_{i}/norm/{n}" for n in ("scale", "bias")})
    return pairs


def release_layout(kind, path, value):
    """A leaf here in the release's layout, written from the documented index correspondences (not reshapes)."""
    if path.endswith("log_step"):
        return value[:, None]
    if path.endswith("input_proj/kernel"):
        return value[None, None]
    if kind == "teco_convS5" and path.endswith("diagonal/B"):  # ours [p, (i k + j) U + u] = release [p, u k k + i k + j]
        out = np.empty_like(value)
        for u in range(U):
            for i in range(KERNEL):
                for j in range(KERNEL):
                    out[:, u * KERNEL * KERNEL + i * KERNEL + j] = value[:, (i * KERNEL + j) * U + u]
        return out
    if kind == "teco_convS5" and path.endswith("diagonal/C"):  # ours [(i k + j) U + u, p] = release [i, j, p, u]
        out = np.empty((KERNEL, KERNEL, value.shape[1], U, 2), value.dtype)
        for u in range(U):
            for i in range(KERNEL):
                for j in range(KERNEL):
                    out[i, j, :, u] = value[(i * KERNEL + j) * U + u]
        return out
    if kind == "teco_noact" and path.endswith("action_embedding/embedding"):
        return value[[A, 1, 2, 0]]  # the release's row 0 (its actions were all 0) is the no-action row A here
    return value


@pytest.mark.parametrize("kind", ["teco", "teco_noact", "teco_convS5", "teco_S5"])
def test_every_released_parameter_lands_where_the_documented_mapping_says(tmp_path, kind, tokenizer):
    kind_settings = SETTINGS[kind]
    params = write_release(tmp_path / "release", kind.replace("_noact", ""), settings=kind_settings)
    result = released.convert(str(tmp_path / "release"), tokenizer, str(tmp_path / "out"))
    assert result["step"] == 100001
    config, ours = converted_variables(tmp_path / "out")
    theirs = flat(params)
    mapping = documented_mapping(kind)
    assert set(mapping) == set(theirs) - ({"sos"} if kind == "teco_S5" else set())  # S5's sos is never read
    for there, here in mapping.items():
        np.testing.assert_array_equal(release_layout(kind, here, ours[here]), theirs[there], err_msg=f"{there} -> {here}")
    extra = {"tokenizer/code_embeddings"} | ({"params/future_mask_latent"} if kind == "teco_convS5" else set())
    assert set(ours) == set(mapping.values()) | extra
    if kind == "teco_convS5":  # the release's constant mask value, frame_mask_id
        np.testing.assert_array_equal(ours["params/future_mask_latent"], np.full((LATENT, LATENT, E), -2.0))
    import vqgan

    np.testing.assert_array_equal(ours["tokenizer/code_embeddings"], np.asarray(vqgan.load(tokenizer).codebook))
    assert config.backbone == released.KINDS[kind.replace("_noact", "")]
    assert released.provenance(str(tmp_path / "out"))["step"] == 100001


DMLAB_CONVS5_YAML = dict(  # NVlabs/ConvSSM configs/3D_ENV_BENCHMARK/dmlab/dmlab_teco_convS5.yaml
    model="teco_convS5", seed=1, batch_size=16, lr=5e-4, weight_decay=1e-5, total_steps=500000,
    warmup_steps=5000, seq_len=300, eval_seq_len=300, encoder=dict(depths=[256, 512], blocks=2),
    decoder=dict(depths=[256, 512], blocks=4), d_model=512,
    seq_model=dict(n_layers=8, layer_activation="gelu", dropout=0.0, use_norm=True, prenorm=False,
                   per_layer_skip=True, num_groups=32, squeeze_excite=False, skip_connections=False),
    ssm=dict(ssm_size=1024, blocks=32, clip_eigs=False, B_kernel_size=3, C_kernel_size=3, D_kernel_size=3,
             dt_min=0.001, dt_max=0.1, C_D_config="resnet"),
    z_git=dict(vocab_dim=256, mask_schedule="cosine", tfm_kwargs=dict(embed_dim=512, mlp_dim=2048, num_heads=8,
                                                                      num_layers=8, dropout=0.0,
                                                                      attention_dropout=0.0)),
    embedding_dim=64, codebook=dict(n_codes=1024, proj_dim=32), n_cond=1, drop_loss_rate=0.9,
    causal_masking=True, frame_mask_id=-2, use_actions=True, action_dim=6, action_embed_dim=16,
    dropout_actions=True, action_dropout_rate=0.5, action_mask_id=-1, T_draft=8, T_revise=8, M=2,
    open_loop_ctx=36, open_loop_ctx_1=144, action_conditioned_1=True, open_loop_ctx_2=36,
    action_conditioned_2=False)
KINETICS_YAML = dict(  # wilson1yan/teco configs/kinetics.yaml
    model="teco", seed=1, batch_size=32, lr=1e-4, weight_decay=1e-5, total_steps=1000000, warmup_steps=5000,
    eval_seq_len=100, seq_len=100, image_size=128, encoder=dict(depths=[256, 512], blocks=8),
    decoder=dict(depths=[256, 512], blocks=10), z_ds=2,
    z_tfm_kwargs=dict(embed_dim=1536, mlp_dim=6144, num_heads=24, num_layers=24, dropout=0.0, attention_dropout=0.0),
    z_git=dict(vocab_dim=256, mask_schedule="cosine", tfm_kwargs=dict(embed_dim=1024, mlp_dim=4096, num_heads=16,
                                                                      num_layers=24, dropout=0.0,
                                                                      attention_dropout=0.0)),
    embedding_dim=256, codebook=dict(n_codes=1024, proj_dim=32), n_cond=1, drop_loss_rate=0.9, use_actions=False,
    action_dim=6, action_embed_dim=16, dropout_actions=False, T_draft=8, T_revise=8, M=2, open_loop_ctx=20)


@pytest.mark.parametrize("yaml_settings, kind, project_config, backbone", [
    (DMLAB_CONVS5_YAML, "teco_convS5", "configs/dmlab.py:convs5", "convs5"),
    (KINETICS_YAML, "teco", "configs/kinetics.py:transformer", "transformer")])
def test_converted_config_equals_the_project_config_of_the_same_release(yaml_settings, kind, project_config,
                                                                        backbone):
    """A release's YAML settings give the project's config of that release (model, backbone, optimiser, sampling)."""
    from teco_ssm.config_io import load_config

    vq = argparse.Namespace(n_codes=1024, embedding_dim=256, latent_shape=(16, 16))
    config = released.settings_to_config(released.Settings(yaml_settings, "release.yaml"), kind, vq,
                                         "/ckpt/vqgan", 100001)
    project = load_config(project_config)
    for block in ("model", backbone, f"optim.{backbone}", "sampling", "seq_len", "batch_size", "seed"):
        ours, theirs = config, project
        for key in block.split("."):
            ours, theirs = ours[key], theirs[key]
        ours, theirs = ckpt.config_to_dict(ours), ckpt.config_to_dict(theirs)
        if block.startswith("optim."):  # the schedule of a fine-tuning run starts at the release's step
            assert ours.pop("schedule_start") == 100001 and theirs.pop("schedule_start") == 0
        assert ours == theirs, block
    assert config.steps == 100001  # nothing to train until raised; the project config's is the release's budget
    assert project.steps == yaml_settings["total_steps"]


# ---------------------------------------------------------------------------------------------- bad input
def digest(folder):
    h = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*")):
        h.update(str(path.relative_to(folder)).encode())
        if path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()


def expect_refused(tmp_path, tokenizer, error, match, **kwargs):
    """Converting tmp_path/release raises `error` matching `match`, writes nothing at out and nothing beside it
    that a later command could take for a model, and leaves the source folder as it was."""
    before = digest(tmp_path / "release")
    with pytest.raises(error, match=match):
        released.convert(str(tmp_path / "release"), tokenizer, str(tmp_path / "out"), **kwargs)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release"]
    assert digest(tmp_path / "release") == before


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch /tmp/teco_ssm_released_pwned",))


def test_crafted_args_pickle_is_refused_and_runs_nothing(tmp_path, tokenizer):
    from vqgan.safe_io import UnsafeFileError

    write_release(tmp_path / "release", "teco")
    (tmp_path / "release" / "args").write_bytes(pickle.dumps(argparse.Namespace(model="teco", hook=_RunsCode())))
    if os.path.exists("/tmp/teco_ssm_released_pwned"):
        os.remove("/tmp/teco_ssm_released_pwned")
    expect_refused(tmp_path, tokenizer, UnsafeFileError, "refused to load global posix.system")
    assert not os.path.exists("/tmp/teco_ssm_released_pwned")


def test_latest_step_is_chosen_numerically(tmp_path, tokenizer):
    write_release(tmp_path / "release", "teco", steps=(10001, 999))
    early = flat(write_release(tmp_path / "early", "teco", steps=(10001,)))  # the same seed: checkpoint 10001's values
    result = released.convert(str(tmp_path / "release"), tokenizer, str(tmp_path / "out"))
    assert result["step"] == 10001
    assert ckpt.resolve_step(str(tmp_path / "out")) == 10001
    _, ours = converted_variables(tmp_path / "out")
    np.testing.assert_array_equal(ours["params/codebook/codes"], early["codebook/codebook"])


def test_folder_without_a_checkpoint_is_refused(tmp_path, tokenizer):
    write_release(tmp_path / "release", "teco", steps=())
    expect_refused(tmp_path, tokenizer, FileNotFoundError, "no checkpoint_<step> file")


@pytest.mark.parametrize("change, match", [
    (lambda p: p["z_tfm"]["Dense_0"].update(kernel=np.zeros((WIDTH, WIDTH + 1), np.float32)),
     r"params/z_tfm/Dense_0/kernel has shape \(16, 17\), but the settings give \(16, 16\)"),
    (lambda p: p["z_tfm"]["TransformerLayer_0"]["MlpBlock_0"].pop("wo_bias"),
     r"no released parameter gives backbone/layers_0/mlp_out/bias"),
    (lambda p: p["z_tfm"].update(Dense_9=dict(kernel=np.zeros((2, 2), np.float32))),
     r"released parameter params/z_tfm/Dense_9/kernel has no counterpart"),
    (lambda p: p["z_git"]["mlm"].pop("AddBias_0"), r"no released parameter gives prior/output_bias"),
])
def test_parameter_problems_name_the_path(tmp_path, tokenizer, change, match):
    params = fill(release_shapes("teco"), np.random.default_rng(0))
    change(params)
    write_release(tmp_path / "release", "teco", params=params)
    expect_refused(tmp_path, tokenizer, released.ReleaseError, match)


def test_convs5_shape_error_names_both_shapes_in_the_release_layout(tmp_path, tokenizer):
    params = fill(release_shapes("teco_convS5"), np.random.default_rng(0))
    params["sequence_model"]["layers_1"]["seq"]["C"] = np.zeros((KERNEL, KERNEL, 4, U + 1, 2), np.float32)
    write_release(tmp_path / "release", "teco_convS5", params=params)
    expect_refused(tmp_path, tokenizer, released.ReleaseError,
                   r"sequence_model/layers_1/seq/C has shape \(3, 3, 4, 17, 2\), but the settings give "
                   r"\(3, 3, 4, 16, 2\)")


def test_tokenizer_that_does_not_fit_is_refused_naming_both(tmp_path, tokenizer):
    other = write_tokenizer(tmp_path / "other_vqgan", fields=dict(ch=4, ch_mult=(1, 2), num_res_blocks=1,
                                                                  attn_resolutions=(), z_channels=4, resolution=16,
                                                                  n_embed=20, embed_dim=4, num_groups=2))
    write_release(tmp_path / "release", "teco")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(released.ReleaseError, match=r"the tokenizer has 20 codes of 4 channels on a 8x8 grid, but "
                                                    r"the released model .* was trained on 12 codes"):
        released.convert(str(tmp_path / "release"), other, str(tmp_path / "out"))
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("kind, option, value, match", [
    ("teco_convS5", ("seq_model", "prenorm"), True, r"setting seq_model.prenorm=True is not implemented"),
    ("teco_convS5", ("ssm", "C_D_config"), "standard", r"setting ssm.C_D_config='standard' is not implemented"),
    ("teco_convS5", ("seq_model", "layer_activation"), "relu", r"seq_model.layer_activation='relu'"),
    ("teco_convS5", ("seq_model", "use_norm"), None, r"seq_model.use_norm=False is not implemented"),  # the default
    ("teco_convS5", ("seq_model", "squeeze_excite"), True, r"seq_model.squeeze_excite=True"),
    ("teco_S5", ("seq_model", "per_layer_skip"), False, r"seq_model.per_layer_skip=False"),
    ("teco_S5", ("seq_model", "skip_connections"), True, r"seq_model.skip_connections=True"),
    ("teco", ("z_git", "tfm_kwargs"), "attention_dropout=0.1", r"z_git.tfm_kwargs.attention_dropout=0.1"),
    ("teco_convS5", ("action_mask_id",), 0, r"action_mask_id=0 is not implemented"),
    ("teco", ("model",), "teco_transformer", r"setting model='teco_transformer' is not a released world model"),
    ("teco", ("encoder",), "no depths", r"setting encoder.depths is missing"),
])
def test_unsupported_or_missing_settings_are_refused_by_name(tmp_path, tokenizer, kind, option, value, match):
    settings = {k: (dict(v) if isinstance(v, dict) else v) for k, v in SETTINGS[kind].items()}
    node = settings
    for key in option[:-1]:
        node[key] = dict(node[key])
        node = node[key]
    if value is None:
        node.pop(option[-1])
    elif value == "attention_dropout=0.1":
        node[option[-1]] = dict(node[option[-1]], attention_dropout=0.1)
    elif value == "no depths":
        node[option[-1]] = dict(blocks=1)
    else:
        node[option[-1]] = value
    write_release(tmp_path / "release", kind, settings=settings)
    expect_refused(tmp_path, tokenizer, released.ReleaseError, match)


def test_release_yaml_replaces_a_missing_or_overwritten_args(tmp_path, tokenizer):
    import yaml

    write_release(tmp_path / "release", "teco_convS5", settings=False)
    expect_refused(tmp_path, tokenizer, FileNotFoundError, "no args file; pass the release's YAML with --config")
    config_file = tmp_path / "teco_convS5.yaml"
    config_file.write_text(yaml.safe_dump(SETTINGS["teco_convS5"]))
    (tmp_path / "release" / "args").write_bytes(pickle.dumps(argparse.Namespace(model="teco_convS5", mode="eval")))
    released.convert(str(tmp_path / "release"), tokenizer, str(tmp_path / "out"), config=str(config_file))
    config, _ = converted_variables(tmp_path / "out")
    assert config.convs5.n_layers == 2 and config.model.mask_future_after == 3


def test_an_existing_output_is_never_overwritten(tmp_path, tokenizer):
    write_release(tmp_path / "release", "teco")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists"):
        released.convert(str(tmp_path / "release"), tokenizer, str(tmp_path / "out"))
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_command_line_error_is_one_last_line(tmp_path, tokenizer):
    write_release(tmp_path / "release", "teco", steps=())
    result = subprocess.run([sys.executable, "-m", "teco_ssm.cli", "convert-teco", "--ckpt", str(tmp_path / "release"),
                             "--tokenizer", tokenizer, "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("teco-ssm convert-teco: error: FileNotFoundError: ")
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------- using the workdir
def write_frames(root, num_videos=4, frames=6):
    rng = np.random.default_rng(0)
    (root / "test" / "0000").mkdir(parents=True)
    (root / "train" / "0000").mkdir(parents=True)
    (root / "metadata.json").write_text('{"action_dim": 3}')
    for split in ("train", "test"):
        for i in range(num_videos):
            np.savez(root / split / "0000" / f"{i:06d}.npz",
                     video=rng.integers(0, 256, (frames, 16, 16, 3), dtype=np.uint8),
                     actions=rng.integers(0, 3, frames).astype(np.int32))


def test_sample_evaluate_and_fine_tune_a_converted_workdir(tmp_path, tokenizer, capsys):
    write_release(tmp_path / "release", "teco_convS5")
    workdir = str(tmp_path / "out")
    released.convert(str(tmp_path / "release"), tokenizer, workdir)
    write_frames(tmp_path / "data")
    result = stages.sample(workdir, str(tmp_path / "samples"), protocol="3,3,actions", data=str(tmp_path / "data"),
                           num_videos=4, batch_size=4)
    assert result["num_videos"] == 4
    files = sorted((tmp_path / "samples").glob("*.npz"))
    assert files and np.load(files[0])["fake"].shape[1:] == (6, 16, 16, 3)
    before = converted_variables(workdir)[1]
    data = str(tmp_path / "data")
    assert stages.train(workdir, data=data)["step"] == 100001  # steps is the release's: nothing to train
    assert "holds step 100001, config.steps is 100001: nothing to train" in capsys.readouterr().err
    # the workdir's own config.json; the optimiser block may change before fine-tuning starts
    summary = stages.train(workdir, data=data, overrides=[
        "steps=100005", "optim.convs5.warmup_steps=1", "optim.convs5.lr=1e-3", "eval_every=0", "log_every=1",
        "visualise_every=1000000"])
    assert summary["step"] == 100005 and np.isfinite(summary["loss"])
    assert "fine-tuning the released weights of NVlabs/ConvSSM TECO-ConvS5" in capsys.readouterr().err
    after = converted_variables(workdir)[1]
    assert ckpt.resolve_step(workdir) == 100005
    assert not np.array_equal(after["params/prior/output_bias"], before["params/prior/output_bias"])
    # the logged rate is the applied one: warm-up over the first step after the release's, then the cosine
    from teco_ssm import optim

    config = ml_collections.ConfigDict(ckpt.read_config(workdir))
    schedule = optim.learning_rate_schedule(1e-3, optim.OptimizerSettings.of_experiment(config))
    records = list(map(json.loads, open(os.path.join(workdir, "metrics.jsonl"))))
    logged = {r["step"]: r["lr"] for r in records if "lr" in r}
    # the run with nothing to train wrote the released model's held-out loss at its step
    assert [r["step"] for r in records if "eval/loss" in r][0] == 100001
    assert logged[100002] == 0.0 and logged[100003] == pytest.approx(1e-3)
    for step, rate in logged.items():
        assert rate == pytest.approx(float(schedule(step - 1 - 100001)), abs=1e-12)
    with pytest.raises(ValueError, match=r"field optim.convs5.lr is 0.001 there, 0.0005 in this request"):
        stages.train(workdir, data=data, overrides=["steps=100007", "optim.convs5.lr=5e-4"])  # fixed once trained


def test_request_errors_name_the_option_before_any_work(tmp_path, tokenizer):
    write_release(tmp_path / "release", "teco")
    source = str(tmp_path / "release")
    cases = [
        (dict(out=str(tmp_path / "release" / "converted")), ValueError, "inside the --ckpt folder"),
        (dict(out=str(Path(tokenizer) / "converted")), ValueError, "inside the --tokenizer folder"),
        (dict(ckpt=str(tmp_path / "release" / "checkpoints")), FileNotFoundError,
         "holds checkpoint_<step> files itself; give the run folder"),
        (dict(ckpt=str(tmp_path / "release" / "args")), FileNotFoundError, r"--ckpt .*args: a file"),
        (dict(tokenizer=str(tmp_path / "nowhere")), FileNotFoundError, r"--tokenizer .*nowhere: no such folder"),
        (dict(config=str(tmp_path)), FileNotFoundError, r"--config .*: a folder"),
        (dict(config=str(tmp_path / "none.yaml")), FileNotFoundError, r"--config .*none.yaml: no such file"),
    ]
    (tmp_path / "binary.yaml").write_bytes(b"\x99\x00\xff")
    cases.append((dict(config=str(tmp_path / "binary.yaml")), released.ReleaseError, "not a readable YAML file"))
    (tmp_path / "file").write_text("")
    cases.append((dict(out=str(tmp_path / "file" / "out")), ValueError, r"--out .*: cannot write in"))
    for change, error, match in cases:
        arguments = {**dict(ckpt=source, tokenizer=tokenizer, out=str(tmp_path / "out"), config=None), **change}
        with pytest.raises(error, match=match):
            released.convert(arguments.pop("ckpt"), arguments.pop("tokenizer"), arguments.pop("out"), **arguments)
        assert not (tmp_path / "out").exists() and not (tmp_path / "release" / "converted").exists()
        assert not list(tmp_path.glob(".*partial*")), change


def test_a_killed_conversion_leaves_a_folder_the_next_one_removes(tmp_path, tokenizer):
    write_release(tmp_path / "release", "teco")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".out.partial-{int(dead.stdout)}-abc123"
    (stale / "checkpoints").mkdir(parents=True)
    alive = tmp_path / f".out.partial-{os.getpid()}-def456"  # a conversion still running: left alone
    alive.mkdir()
    released.convert(str(tmp_path / "release"), tokenizer, str(tmp_path / "out"))
    assert not stale.exists() and alive.exists() and (tmp_path / "out" / "config.json").exists()


@pytest.mark.parametrize("change, match", [
    (dict(lr_schedule="step"), r"lr_schedule='step' is not implemented here"),
    (dict(image_size=32), r"setting image_size=32, but the tokenizer .* takes 16x16 frames"),
    (dict(ssm=dict(SETTINGS["teco_convS5"]["ssm"], dt_min=-1.0)), r"config.convs5: field dt_min=-1.0 must be"),
    (dict(seq_model=None), r"setting seq_model is missing"),
    (dict(seq_model=3), r"setting seq_model is not a group of settings"),
    (dict(open_loop_ctx_1=9), r"the protocol's context 9 \(open_loop_ctx_1, else 144 or open_loop_ctx\)"),
])
def test_settings_this_project_would_compute_differently_are_refused(tmp_path, tokenizer, change, match):
    settings = {k: v for k, v in {**SETTINGS["teco_convS5"], **change}.items() if v is not None}
    write_release(tmp_path / "release", "teco_convS5", settings=settings)
    expect_refused(tmp_path, tokenizer, released.ReleaseError, match)


def test_a_constant_release_schedule_and_a_null_drop_loss_rate_are_kept(tmp_path, tokenizer):
    write_release(tmp_path / "release", "teco", settings=dict(SETTINGS["teco"], lr_schedule="constant",
                                                               drop_loss_rate=None))
    released.convert(str(tmp_path / "release"), tokenizer, str(tmp_path / "out"))
    config, _ = converted_variables(tmp_path / "out")
    assert config.optim.transformer.schedule == "constant" and config.optim.transformer.schedule_start == 100001
    assert config.model.drop_loss_rate == 0.0  # the release scores every frame when the rate is null
