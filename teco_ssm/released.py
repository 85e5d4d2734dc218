"""Importing the world-model checkpoints TECO and the ConvS5 release published, as ordinary teco_ssm workdirs.

    teco-ssm convert-teco --ckpt /ckpt/dmlab_teco --tokenizer /ckpt/dmlab_vqgan --out runs/dmlab_teco
    teco-ssm sample --workdir runs/dmlab_teco --data /data/dmlab --out runs/dmlab_teco/samples

Recognised folders (by the `model` setting, never by the path's name):

| release | `model` | backbone here |
| --- | --- | --- |
| wilson1yan/teco (`teco/models/teco.py`) | `teco` | transformer |
| NVlabs/ConvSSM (`src/models/sequence_models/VQ/teco_convS5.py`) | `teco_convS5` | convs5 |
| NVlabs/ConvSSM (`teco_S5.py`) | `teco_S5` | s5 |

On disk both releases write `<run>/args` (a pickled `argparse.Namespace`: the training YAML's keys and the command
line) and `<run>/checkpoints/checkpoint_<step>` (one legacy flax msgpack file, `flax.training.checkpoints`, a dict
{step, params, opt_state, model_state}). `args` is read with a restricted unpickler (`vqgan.safe_io.load_args`):
plain values and `argparse.Namespace` only. The ConvSSM release rebuilds its settings from the YAML when it evaluates,
so a folder's `args` may be missing or written by an evaluation run: `config=` (the release's YAML) then gives the
settings instead.

The settings become a config of this project's schema (`settings_to_config`): every structural option is read from
the release's settings; an option this project does not implement (`UNSUPPORTED`) is refused with its name and
value. The parameters then map one to one (`release_to_params`, the table in docs/model.md): every released leaf
lands in exactly one leaf here and every leaf here comes from the release, or the conversion fails naming the path.
The code embeddings are the tokenizer's codebook, the same table the release looks codes up in.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import tempfile
from typing import Any, Callable, Mapping

import numpy as np

from teco_ssm import backbones
from vqgan.tokenizer import flat_paths

KINDS = {"teco": "transformer", "teco_convS5": "convs5", "teco_S5": "s5"}
RELEASES = {"teco": "wilson1yan/teco TECO", "teco_convS5": "NVlabs/ConvSSM TECO-ConvS5",
            "teco_S5": "NVlabs/ConvSSM TECO-S5"}
PROVENANCE_FILE = "released_from.json"

# Release options this project does not implement: option -> (the value implemented here, the release's default
# when the settings omit it: `StackedLayers` and `SequenceLayer` in src/models/{convS5,S5}/layers.py).
UNSUPPORTED = {
    "teco_convS5": {"ssm.C_D_config": ("resnet", None), "seq_model.layer_activation": ("gelu", "gelu"),
                    "seq_model.use_norm": (True, False), "seq_model.prenorm": (False, False),
                    "seq_model.per_layer_skip": (True, True), "seq_model.skip_connections": (False, False),
                    "seq_model.squeeze_excite": (False, False)},
    "teco_S5": {"seq_model.use_norm": (True, False), "seq_model.prenorm": (False, False),
                "seq_model.per_layer_skip": (True, True), "seq_model.skip_connections": (False, False)},
    "teco": {},
}
# The prior's attention-weight dropout is not an option here (rate 0 in every release config).
_ZERO = ("z_git.tfm_kwargs.attention_dropout",)


class ReleaseError(ValueError):
    """A released folder this project cannot import exactly: a missing or unsupported setting, a parameter that
    is missing, left over or of another shape, a tokenizer that does not fit. The message names the file and the
    setting or parameter path."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """The release's settings (a dict of the YAML's keys, nested as the YAML nests them) and where they came from
    (the `args` file or the YAML), for error messages."""
    values: Mapping[str, Any]
    source: str

    def get(self, dotted: str, default: Any = dataclasses.MISSING) -> Any:
        """The setting `a.b.c`; ReleaseError naming the source and the setting when absent and no default."""
        node: Any = self.values
        for key in dotted.split("."):
            if isinstance(node, Mapping) and key in node:
                node = node[key]
            else:
                if default is dataclasses.MISSING:
                    raise ReleaseError(f"{self.source}: setting {dotted} is missing")
                return default
        return node

    def number(self, dotted: str, kind: type = int, default: Any = dataclasses.MISSING) -> Any:
        """The setting as an int / float / bool; ReleaseError naming it when it is not one."""
        value = self.get(dotted, default)
        if kind is bool:
            if not isinstance(value, (bool, np.bool_)):
                raise ReleaseError(f"{self.source}: setting {dotted}={value!r} is not true or false")
            return bool(value)
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or (
                kind is int and float(value) != int(value)):
            raise ReleaseError(f"{self.source}: setting {dotted}={value!r} is not {'an integer' if kind is int else 'a number'}")
        return kind(value)

    def ints(self, dotted: str) -> tuple[int, ...]:
        value = self.get(dotted)
        if not isinstance(value, (list, tuple)) or not value or not all(
                isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value):
            raise ReleaseError(f"{self.source}: setting {dotted}={value!r} is not a list of integers")
        return tuple(int(v) for v in value)


def _plain(value: Any) -> Any:
    """A Namespace's values as plain dicts (nested Namespaces included)."""
    if isinstance(value, argparse.Namespace):
        value = vars(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def read_settings(folder: str, config: str | None = None) -> Settings:
    """The release's settings: the YAML `config` when given, else `<folder>/args`.

    Raises FileNotFoundError naming both when neither exists, ReleaseError for a YAML that is not a mapping,
    `vqgan.safe_io.UnsafeFileError` for an `args` pickle that names anything but plain values and
    `argparse.Namespace` (nothing it names is run).
    """
    if config is not None:
        import yaml

        if not os.path.isfile(config):
            raise FileNotFoundError(f"--config {config}: {'a folder' if os.path.isdir(config) else 'no such file'}; "
                                    "expected the release's YAML settings")
        try:
            with open(config) as f:
                values = yaml.safe_load(f)
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            raise ReleaseError(f"--config {config}: not a readable YAML file ({error})") from None
        if not isinstance(values, Mapping):
            raise ReleaseError(f"{config}: expected the release's YAML settings (a mapping), found "
                               f"{type(values).__name__}")
        return Settings(_plain(values), os.path.abspath(config))
    from vqgan.safe_io import load_args

    path = os.path.join(folder, "args")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no args file; pass the release's YAML with --config (for example "
                                "configs/3D_ENV_BENCHMARK/habitat/habitat_teco_convS5.yaml of NVlabs/ConvSSM)")
    return Settings(_plain(load_args(path)), path)


def kind_of(settings: Settings) -> str:
    """The release's model name (`KINDS`); ReleaseError naming the setting for any other."""
    kind = settings.get("model")
    if kind not in KINDS:
        raise ReleaseError(f"{settings.source}: setting model={kind!r} is not a released world model this project "
                           f"imports; recognised: {', '.join(f'{k} ({RELEASES[k]})' for k in KINDS)}")
    return kind


def check_supported(settings: Settings, kind: str) -> None:
    """ReleaseError naming the first option whose value this project does not implement (never approximated)."""
    for group in sorted({option.rpartition(".")[0] for option in UNSUPPORTED[kind]} - {""}):
        if not isinstance(settings.get(group), Mapping):
            raise ReleaseError(f"{settings.source}: setting {group} is not a group of settings")
    for option, (implemented, default) in UNSUPPORTED[kind].items():
        value = settings.get(option, default)
        if value is None and default is None:
            settings.get(option)  # required: raises naming it
        if value != implemented:
            raise ReleaseError(f"{settings.source}: setting {option}={value!r} is not implemented here (only "
                               f"{implemented!r}); this model cannot be imported exactly")
    for option in _ZERO:
        value = settings.get(option, 0.0)
        if value:
            raise ReleaseError(f"{settings.source}: setting {option}={value!r} is not implemented here (only 0)")


def _protocols(settings: Settings, seq_len: int) -> dict[str, dict[str, Any]]:
    """The two evaluation protocols from the release's sampling settings: the action-conditioned context is
    `open_loop_ctx_1` (ConvSSM), else 144 frames when the clips are longer, else `open_loop_ctx`; the
    unconditioned context is `open_loop_ctx_2`, else `open_loop_ctx` (36), with actions when
    `action_conditioned_2` says so (ConvSSM's Minecraft). Each generates the rest of `eval_seq_len`; a model
    trained without actions (use_actions false) is given none in either."""
    length = settings.number("eval_seq_len", int, seq_len)
    open_loop = settings.number("open_loop_ctx", int, 36)
    conditioned = settings.number("open_loop_ctx_1", int, 144 if length > 144 else open_loop)
    unconditioned = settings.number("open_loop_ctx_2", int, open_loop)
    for name, context, fallback in (("open_loop_ctx_1", conditioned, "144 or open_loop_ctx"),
                                    ("open_loop_ctx_2", unconditioned, "open_loop_ctx, else 36")):
        if not 1 <= context < length:
            raise ReleaseError(f"{settings.source}: the protocol's context {context} ({name}, else {fallback}) must "
                               f"lie in [1, eval_seq_len={length})")
    actions = settings.number("use_actions", bool)
    return dict(
        action_conditioned=dict(context=conditioned, horizon=length - conditioned, use_actions=actions),
        unconditioned=dict(context=unconditioned, horizon=length - unconditioned,
                           use_actions=actions and settings.number("action_conditioned_2", bool, False)))


def _action_dropout(settings: Settings, kind: str) -> float:
    """The rate at which training dropped a sequence's actions: TECO's fixed 0.5, ConvSSM's action_dropout_rate.
    The dropped sequences see the extra action id action_dim (-1 in the releases), this project's no-action id."""
    if not settings.number("dropout_actions", bool, False):
        return 0.0
    if kind == "teco":
        return 0.5
    mask_id = settings.get("action_mask_id")
    if mask_id not in (-1, settings.number("action_dim")):
        raise ReleaseError(f"{settings.source}: setting action_mask_id={mask_id!r} is not implemented here (only -1, "
                           "the extra embedding row action_dim, this project's no-action id)")
    return settings.number("action_dropout_rate", float)


def backbone_settings(settings: Settings, kind: str, latent_shape: tuple[int, int]) -> dict[str, Any]:
    """The backbone block's fields from the release's settings (`KINDS[kind]`'s settings dataclass)."""
    get, n = settings.get, settings.number
    if kind == "teco":
        tfm = "z_tfm_kwargs"
        return dict(d_model=n("embedding_dim"), n_layers=n(f"{tfm}.num_layers"), dropout=n(f"{tfm}.dropout", float, 0.0),
                    attention_dropout=n(f"{tfm}.attention_dropout", float, 0.0), downsample=n("z_ds"),
                    embed_dim=n(f"{tfm}.embed_dim"), mlp_dim=n(f"{tfm}.mlp_dim"), num_heads=n(f"{tfm}.num_heads"),
                    max_len=n("seq_len"), start_token=True)
    common = dict(d_model=n("d_model"), n_layers=n("seq_model.n_layers"),
                  dropout=n("seq_model.dropout", float, 0.0), ssm_size=n("ssm.ssm_size"), blocks=n("ssm.blocks"),
                  clip_eigs=n("ssm.clip_eigs", bool), dt_min=n("ssm.dt_min", float), dt_max=n("ssm.dt_max", float))
    if kind == "teco_S5":
        if n("z_ds") != latent_shape[0] or latent_shape[0] != latent_shape[1]:
            raise ReleaseError(f"{settings.source}: setting z_ds={get('z_ds')} must equal the latent grid "
                               f"{latent_shape} (the release's S5 takes one token per frame)")
        return dict(common, downsample=n("z_ds"), out_dim=n("embedding_dim"))
    return dict(common, B_kernel_size=n("ssm.B_kernel_size"), C_kernel_size=n("ssm.C_kernel_size"),
                D_kernel_size=n("ssm.D_kernel_size"), num_groups=n("seq_model.num_groups", int, 32),
                ssm_init="he_normal", D_term=False)


def settings_to_config(settings: Settings, kind: str, tokenizer: Any, tokenizer_path: str, step: int) -> Any:
    """A locked experiment config (`teco_ssm.schema`) that builds the released model exactly.

    tokenizer: the VQGAN whose codes the model reads (`vqgan.load`): it gives code_shape, vqgan_codes and
    vqgan_embedding_dim. step: the checkpoint's step, which is also `steps` (nothing left to train until it is
    raised) and every optimiser block's `schedule_start` (fine-tuning gets a warm-up and decay of its own, over the
    steps after the release's). Raises ReleaseError naming the setting for a missing, malformed or unsupported one.
    """
    from configs import common
    from teco_ssm import config_check, schema

    n = settings.number
    check_supported(settings, kind)
    code_shape = tuple(int(s) for s in tokenizer.latent_shape)
    frame = getattr(tokenizer, "frame_shape", None)
    image_size = settings.get("image_size", None)
    if frame is not None and image_size is not None and int(image_size) != int(frame[0]):
        raise ReleaseError(f"{settings.source}: setting image_size={image_size}, but the tokenizer "
                           f"({getattr(tokenizer, 'source', 'given')}) takes {frame[0]}x{frame[1]} frames: pass the "
                           "VQGAN the model was trained with")
    depths = settings.ints("encoder.depths")
    factor = 2 ** (len(depths) - 1)
    latent_shape = (code_shape[0] // factor, code_shape[1] // factor)
    backbone = KINDS[kind]
    causal = n("causal_masking", bool, False)
    if causal and settings.get("frame_mask_id") is None:
        raise ReleaseError(f"{settings.source}: setting causal_masking is true but frame_mask_id is unset")
    prior = "z_git.tfm_kwargs"
    model = dict(
        code_shape=code_shape, vqgan_codes=int(tokenizer.n_codes), vqgan_embedding_dim=int(tokenizer.embedding_dim),
        encoder_depths=depths, encoder_blocks=n("encoder.blocks"), decoder_depths=settings.ints("decoder.depths"),
        decoder_blocks=n("decoder.blocks"), latent_codes=n("codebook.n_codes"), latent_proj_dim=n("codebook.proj_dim"),
        latent_dim=n("embedding_dim"), commitment_cost=0.25, prior_width=n(f"{prior}.embed_dim"),
        prior_mlp_dim=n(f"{prior}.mlp_dim"), prior_heads=n(f"{prior}.num_heads"), prior_layers=n(f"{prior}.num_layers"),
        prior_token_dim=n("z_git.vocab_dim"), prior_dropout=n(f"{prior}.dropout", float, 0.0),
        mask_schedule=settings.get("z_git.mask_schedule"), num_actions=n("action_dim"),
        action_embed_dim=n("action_embed_dim"), use_actions=n("use_actions", bool),
        action_dropout=_action_dropout(settings, kind), condition_frames=n("n_cond"), start_position=False,
        mask_future_frames=causal, mask_future_after=n("open_loop_ctx_1") if causal else 144,
        drop_loss_rate=0.0 if settings.get("drop_loss_rate", None) is None else n("drop_loss_rate", float),
        label_smoothing=0.01)  # the releases score every frame when drop_loss_rate is null
    seq_len = n("seq_len")
    schedule = settings.get("lr_schedule", "cosine")
    if schedule not in ("cosine", "constant"):
        raise ReleaseError(f"{settings.source}: setting lr_schedule={schedule!r} is not implemented here (only "
                           "'cosine' or 'constant')")
    optimizer = dict(common.release_optimizer(n("lr", float)), warmup_steps=n("warmup_steps"),
                     weight_decay=n("weight_decay", float), ssm_weight_decay=n("weight_decay", float),
                     schedule=schedule, schedule_start=step)
    sampling = common.sampling(batch_size=16)
    for name, protocol in _protocols(settings, seq_len).items():
        sampling[name].update(protocol)
    for field, setting in (("draft_steps", "T_draft"), ("revise_steps", "T_revise"), ("revise_rounds", "M")):
        sampling[field] = n(setting, int, sampling[field])
    try:
        config = schema.experiment(
            dataset=str(settings.get("dataset", "released")), backbone=backbone, model=model,
            backbone_settings={backbone: backbone_settings(settings, kind, latent_shape)},
            optim={name: optimizer for name in backbones.NAMES}, seed=n("seed", int, 1),
            batch_size=n("batch_size"), seq_len=seq_len, steps=step, sampling=sampling)
        config.tokenizer.path = tokenizer_path
        config_check.validate(config, check_paths=False)
    except ValueError as error:
        raise ReleaseError(f"{settings.source}: the settings give a config this project refuses: {error}") from None
    return config


# ------------------------------------------------------------------------------------------- the parameter mapping
@dataclasses.dataclass(frozen=True)
class _Layout:
    """How one released leaf becomes one leaf here: `convert(value, settings)` and the released shape that a leaf
    of `shape` here comes from, `release_shape(shape)` (for the error naming both shapes)."""
    convert: Callable[[np.ndarray], np.ndarray]
    release_shape: Callable[[tuple[int, ...]], tuple[int, ...]]


def _same() -> _Layout:
    return _Layout(lambda x: x, lambda shape: shape)


def _log_step() -> _Layout:
    """(P, 1) there, (P,) here."""
    return _Layout(lambda x: x.reshape(x.shape[:1]), lambda shape: (*shape, 1))


def _conv1x1() -> _Layout:
    """The 1x1 `action_conv` kernel (1, 1, in, out) there, a Dense kernel (in, out) here."""
    return _Layout(lambda x: x.reshape(x.shape[2:]), lambda shape: (1, 1, *shape))


def _convs5_B(k: int) -> _Layout:
    """ConvS5's B: (P, U k k, 2) ordered (u, i, j) there, (P, k k U, 2) ordered (i, j, u) here."""
    def convert(x):
        P, n, two = x.shape
        return x.reshape(P, n // (k * k), k, k, two).transpose(0, 2, 3, 1, 4).reshape(P, n, two)
    return _Layout(convert, lambda shape: shape)


def _convs5_C(k: int) -> _Layout:
    """ConvS5's C: (k, k, P, U, 2) there, (k k U, P, 2) ordered (i, j, u) here."""
    def convert(x):
        kh, kw, P, U, two = x.shape
        return x.transpose(0, 1, 3, 2, 4).reshape(kh * kw * U, P, two)
    return _Layout(convert, lambda shape: (k, k, shape[1], shape[0] // (k * k), shape[2]))


def _action_rows(use_actions: bool, num_actions: int) -> _Layout:
    """The action embedding table (num_actions + 1, E). A model trained with use_actions false read row 0 for
    every frame (the release zeroes the actions), where this project reads its no-action row num_actions: the two
    rows are swapped, so the same row meets the same frames."""
    if use_actions:
        return _same()
    order = np.arange(num_actions + 1)
    order[[0, num_actions]] = order[[num_actions, 0]]
    return _Layout(lambda x: x[order], lambda shape: shape)


def _transformer_layer_rules(source: str, target: str, names: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """The rules of one release `TransformerLayer` (teco/models/transformer.py: LayerNorm_0, MultiHeadAttention_0
    with query, key, value, out and the separate out_bias, LayerNorm_1, MlpBlock_0 with wi, wo and the separate
    wo_bias) onto `target`_<i>/<names[part]>: the separate bias leaves become the layers' biases."""
    attention, mlp = rf"{source}_(\d+)/MultiHeadAttention_0", rf"{source}_(\d+)/MlpBlock_0"
    layer = rf"{target}_\1"
    return (
        (rf"{source}_(\d+)/LayerNorm_0/(scale|bias)", rf"{layer}/{names['attention_norm']}/\2"),
        (rf"{source}_(\d+)/LayerNorm_1/(scale|bias)", rf"{layer}/{names['mlp_norm']}/\2"),
        (rf"{attention}/(query|key|value)/(kernel|bias)", rf"{layer}/{names['qkv']}\2/\3"),
        (rf"{attention}/out/kernel", rf"{layer}/{names['attention_out']}/kernel"),
        (rf"{attention}/out_bias/bias", rf"{layer}/{names['attention_out']}/bias"),
        (rf"{mlp}/wi/(kernel|bias)", rf"{layer}/{names['mlp_in']}/\2"),
        (rf"{mlp}/wo/kernel", rf"{layer}/{names['mlp_out']}/kernel"),
        (rf"{mlp}/wo_bias/bias", rf"{layer}/{names['mlp_out']}/bias"),
    )


# Where the parts of a release TransformerLayer live here: the prior's blocks (`teco_ssm.maskgit`) and the temporal
# transformer's layers (`teco_ssm.backbones.transformer`).
PRIOR_LAYER = dict(attention_norm="LayerNorm_0", mlp_norm="LayerNorm_1", qkv="MultiHeadDotProductAttention_0/",
                   attention_out="MultiHeadDotProductAttention_0/out", mlp_in="Dense_0", mlp_out="Dense_1")
TEMPORAL_LAYER = dict(attention_norm="attention_norm", mlp_norm="mlp_norm", qkv="", attention_out="attention_out",
                      mlp_in="mlp_in", mlp_out="mlp_out")


_TECO_RULES = (  # shared by the three releases: posterior encoder, codebook, prior, decoder
    (r"sos_post", "start_code_embedding"),
    (r"encoder/layers_0/(ResNetBlock_\d+)/AddBias_0/bias", r"encoder/\1/Conv_1/bias"),
    (r"encoder/layers_0/(.+)", r"encoder/\1"),
    (r"encoder/layers_1/(kernel|bias)", r"encoder/Dense_0/\1"),
    (r"codebook/codebook", "codebook/codes"),
    (r"codebook/Dense_0/kernel", "codebook/proj_in/kernel"),
    (r"codebook/Dense_1/kernel", "codebook/proj_out/kernel"),
    (r"decoder/(ResNetBlock_\d+)/AddBias_0/bias", r"decoder/\1/Conv_1/bias"),
    (r"decoder/(.+)", r"decoder/\1"),
    (r"z_git/token_embed", "prior/token_embedding"),
    (r"z_git/net/Dense_0/(kernel|bias)", r"prior/input/\1"),
    (r"z_git/net/BroadcastPositionBiases_0/d_0", "prior/row_embedding"),
    (r"z_git/net/BroadcastPositionBiases_0/d_1", "prior/column_embedding"),
    *_transformer_layer_rules("z_git/net/TransformerLayer", "prior/block", PRIOR_LAYER),
    (r"z_git/net/Dense_1/(kernel|bias)", r"prior/final_dense/\1"),
    (r"z_git/net/LayerNorm_0/(scale|bias)", r"prior/final_norm/\1"),
    (r"z_git/mlm/Dense_0/(kernel|bias)", r"prior/head/\1"),
    (r"z_git/mlm/LayerNorm_0/(scale|bias)", r"prior/head_norm/\1"),
    (r"z_git/mlm/AddBias_0/bias", "prior/output_bias"),
)
_BACKBONE_RULES = {
    "teco": (  # teco/models/teco.py: z_proj, sos, z_tfm (teco/models/transformer.py), z_unproj
        (r"z_proj/kernel", "backbone/tokenize/kernel"),
        (r"sos", "backbone/sos/embedding"),
        (r"z_unproj/kernel", "backbone/untokenize/kernel"),
        (r"z_tfm/Dense_0/(kernel|bias)", r"backbone/project/\1"),
        *_transformer_layer_rules("z_tfm/TransformerLayer", "backbone/layers", TEMPORAL_LAYER),
        (r"z_tfm/Dense_1/(kernel|bias)", r"backbone/head_dense/\1"),
        (r"z_tfm/LayerNorm_0/(scale|bias)", r"backbone/head_norm/\1"),
    ),
    "teco_S5": (  # src/models/sequence_models/VQ/teco_S5.py and src/models/S5/
        (r"z_proj/kernel", "backbone/downsample/kernel"),
        (r"z_unproj/kernel", "backbone/upsample/kernel"),
        (r"sos", None),  # created by setup but never read by the release
        (r"sequence_model/layers_(\d+)/seq/(Lambda_re|Lambda_im|B|C)", r"backbone/layer_\1/diagonal/\2"),
        (r"sequence_model/layers_(\d+)/seq/log_step", r"backbone/layer_\1/diagonal/log_step", "log_step"),
        (r"sequence_model/layers_(\d+)/seq/D", r"backbone/layer_\1/D"),
        (r"sequence_model/layers_(\d+)/seq/out2/(kernel|bias)", r"backbone/layer_\1/activation/Dense_0/\2"),
        (r"sequence_model/layers_(\d+)/norm/(scale|bias)", r"backbone/layer_\1/norm/\2"),
    ),
    "teco_convS5": (  # src/models/sequence_models/VQ/teco_convS5.py and src/models/convS5/
        (r"action_conv/Conv_0/kernel", "backbone/input_proj/kernel", "conv1x1"),
        (r"action_conv/Conv_0/bias", "backbone/input_proj/bias"),
        (r"sequence_model/layers_(\d+)/seq/(Lambda_re|Lambda_im)", r"backbone/layer_\1/ssm/diagonal/\2"),
        (r"sequence_model/layers_(\d+)/seq/B", r"backbone/layer_\1/ssm/diagonal/B", "convs5_B"),
        (r"sequence_model/layers_(\d+)/seq/C", r"backbone/layer_\1/ssm/diagonal/C", "convs5_C"),
        (r"sequence_model/layers_(\d+)/seq/log_step", r"backbone/layer_\1/ssm/diagonal/log_step", "log_step"),
        (r"sequence_model/layers_(\d+)/seq/C_D_conv/((?:GroupNorm|Conv)_[01])/(scale|bias|kernel)",
         r"backbone/layer_\1/activation/\2/\3"),
        (r"sequence_model/layers_(\d+)/norm/(scale|bias)", r"backbone/layer_\1/norm/\2"),
    ),
}


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def mapping_rules(kind: str) -> tuple[tuple[Any, ...], ...]:
    """(released path pattern, path here or None for a leaf the release never reads, layout name) for `kind`;
    the first pattern that matches a whole released path decides."""
    return _BACKBONE_RULES[kind] + ((r"action_embeds/embedding", "action_embedding/embedding", "actions"),) \
        + _TECO_RULES


def release_to_params(released: Mapping[str, Any], expected: Mapping[str, Any], kind: str, model: Any,
                      source: str, mask_value: float | None = None) -> dict[str, Any]:
    """The parameters here (a nested dict of float32 numpy arrays) from the release's `params` tree.

    released: the checkpoint's params (nested dicts of arrays); expected: this model's params tree of arrays or
    ShapeDtypeStructs (`jax.eval_shape` of `teco.init_variables(...)['params']`); model: the `Teco` they belong to;
    mask_value: the release's constant future-frame mask (`frame_mask_id`), which fills the learned
    `future_mask_latent` when the model masks future frames.

    Raises ReleaseError naming `source` and the path: a released parameter nothing here takes, a parameter here
    no released one gives, or one whose shape differs (both shapes named).
    """
    layouts = {"actions": _action_rows(model.use_actions, model.num_actions), "log_step": _log_step(),
               "conv1x1": _conv1x1()}
    if kind == "teco_convS5":
        layouts.update(convs5_B=_convs5_B(model.backbone.settings.B_kernel_size),
                       convs5_C=_convs5_C(model.backbone.settings.C_kernel_size))
    rules = [(re.compile(pattern), target, layouts[name[0]] if name else _same())
             for pattern, target, *name in mapping_rules(kind)]
    wanted = {path: tuple(leaf.shape) for path, leaf in flat_paths(expected).items()}
    out: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    for path, value in sorted(flat_paths(released).items()):
        rule = next(((p, t, lay) for p, t, lay in rules if p.fullmatch(path)), None)
        if rule is not None and rule[1] is None:
            continue
        target = rule[0].sub(rule[1], path) if rule else None
        if target is None or target not in wanted:
            raise ReleaseError(f"{source}: released parameter params/{path} has no counterpart in this model "
                               f"(a {RELEASES[kind]} checkpoint of another structure than its settings give?)")
        if target in origin:
            raise ReleaseError(f"{source}: released parameters params/{origin[target]} and params/{path} both map to "
                               f"{target}")
        value = np.asarray(value)
        layout = rule[2]
        release_shape = layout.release_shape(wanted[target])
        if tuple(value.shape) != tuple(release_shape):
            raise ReleaseError(f"{source}: released parameter params/{path} has shape {tuple(value.shape)}, but the "
                               f"settings give {tuple(release_shape)} (parameter {target} here)")
        out[target] = np.ascontiguousarray(layout.convert(value), np.float32)
        origin[target] = path
    if model.mask_future_frames and "future_mask_latent" in wanted and "future_mask_latent" not in out:
        if mask_value is None:
            raise ReleaseError(f"{source}: the model masks future frames but the settings give no frame_mask_id")
        out["future_mask_latent"] = np.full(wanted["future_mask_latent"], mask_value, np.float32)
    missing = sorted(set(wanted) - set(out))
    if missing:
        raise ReleaseError(f"{source}: no released parameter gives {missing[0]} ({len(missing)} missing in all; "
                           f"expected shape {wanted[missing[0]]})")
    return _unflatten(out)


# ---------------------------------------------------------------------------------------------------- the stage
def _check_tokenizer(params: Mapping[str, Any], tokenizer: Any, source: str) -> None:
    """ReleaseError naming both when the tokenizer's codebook or code grid is not the one the model was trained on
    (read from the release's `sos_post` (H, W, D_code) and the decoder's output bias (codes,))."""
    flat = flat_paths(params)
    start, out_bias = flat.get("sos_post"), flat.get("decoder/Dense_0/bias")
    if start is None or out_bias is None or np.ndim(start) != 3 or np.ndim(out_bias) != 1:
        raise ReleaseError(f"{source}: params/sos_post (H, W, D) and params/decoder/Dense_0/bias (codes,) are "
                           "missing or malformed: not a released TECO world model")
    trained = (int(out_bias.shape[0]), int(start.shape[2]), tuple(int(s) for s in start.shape[:2]))
    given = (int(tokenizer.n_codes), int(tokenizer.embedding_dim), tuple(int(s) for s in tokenizer.latent_shape))
    if trained != given:
        raise ReleaseError(
            f"{getattr(tokenizer, 'source', 'the tokenizer')}: the tokenizer has {given[0]} codes of {given[1]} "
            f"channels on a {given[2][0]}x{given[2][1]} grid, but the released model {source} was trained on "
            f"{trained[0]} codes (params/decoder/Dense_0/bias) of {trained[1]} channels on a "
            f"{trained[2][0]}x{trained[2][1]} grid (params/sos_post): pass the VQGAN it was trained with")


def _check_folders(folder: str, tokenizer: str, out: str) -> None:
    """Errors naming the option, before any work: --ckpt not a run folder, --tokenizer missing, --out existing (and
    not an empty folder) or inside the source folder (which is only read)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--ckpt {folder}: {'a file' if os.path.exists(folder) else 'no such folder'}; "
                                "expected a released run folder (args and checkpoints/checkpoint_<step>)")
    if not os.path.isdir(os.path.join(folder, "checkpoints")) and any(
            name.startswith("checkpoint_") for name in os.listdir(folder)):
        raise FileNotFoundError(f"--ckpt {folder}: holds checkpoint_<step> files itself; give the run folder, the "
                                "one that holds args and checkpoints/")
    if not os.path.isdir(tokenizer):
        raise FileNotFoundError(f"--tokenizer {os.path.abspath(tokenizer)}: no such folder (the VQGAN folder the "
                                "model was trained with)")
    real_out = os.path.realpath(out)
    for option, source in (("--ckpt", folder), ("--tokenizer", tokenizer)):
        real_source = os.path.realpath(source)
        if os.path.commonpath([real_out, real_source]) == real_source:
            raise ValueError(f"--out {out}: inside the {option} folder {os.path.abspath(source)}, which is only "
                             "read; convert into a folder outside it")
    if os.path.lexists(out) and not (os.path.isdir(out) and not os.path.islink(out) and not os.listdir(out)):
        raise FileExistsError(f"--out {out}: already exists; convert into a new folder")


def _partial_folder(out: str) -> str:
    """A new folder `.<name>.partial-<pid>-<random>` beside `out`, where the conversion is written before it is
    renamed into place. Those of earlier conversions whose process no longer runs (killed) are removed first."""
    parent, name = os.path.split(out)
    try:
        os.makedirs(parent, exist_ok=True)
        for entry in os.listdir(parent):
            match = re.fullmatch(re.escape(f".{name}.partial-") + r"(\d+)-\w+", entry)
            if match and not _running(int(match.group(1))):
                shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
        partial = tempfile.mkdtemp(prefix=f".{name}.partial-{os.getpid()}-", dir=parent)
    except OSError as error:
        raise ValueError(f"--out {out}: cannot write in {parent} ({error.strerror or error})") from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(partial, 0o777 & ~umask)  # mkdtemp's 0700 would outlive the rename
    return partial


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def convert(ckpt: str, tokenizer: str, out: str, *, config: str | None = None) -> dict[str, Any]:
    """Converts a released TECO, TECO-ConvS5 or TECO-S5 run folder `ckpt` into a teco_ssm workdir `out`.

    ckpt: the release's run folder (`args` and `checkpoints/checkpoint_<step>`; the highest step is taken,
    compared as numbers); tokenizer: the VQGAN folder the model was trained with (TECO's layout or a project
    workdir), stored as the workdir's tokenizer.path; config: the release's YAML, read instead of `args`.

    Writes `out/config.json` (a config of this project's schema that passes its check), an orbax checkpoint at the
    release's step with the converted parameters and a fresh optimiser state (`train` then fine-tunes from the
    released weights), and `out/released_from.json` (the source, its step and release). Everything is written in a
    temporary folder beside `out` and renamed into place when complete and read back, so a failed conversion
    leaves nothing at `out`; `ckpt` is only read.

    Returns {path, step, backbone, release, num_params}. Raises FileExistsError when `out` exists and is not an
    empty folder, FileNotFoundError naming a missing file, ReleaseError (a ValueError) naming the file and the
    setting or parameter for anything that cannot be imported exactly, `vqgan.safe_io.UnsafeFileError` for a
    crafted `args` pickle (nothing it names is run).
    """
    import jax
    import jax.numpy as jnp

    import vqgan
    from teco_ssm import checkpoint as ckpt_lib
    from teco_ssm import optim, teco
    from teco_ssm import train as train_lib
    from vqgan.safe_io import read_msgpack
    from vqgan.tokenizer import latest_teco_checkpoint

    folder, out = os.path.abspath(ckpt), os.path.abspath(out)
    ckpt_lib.check_path(out, "--out")
    _check_folders(folder, tokenizer, out)
    settings = read_settings(folder, config)
    kind = kind_of(settings)
    file = latest_teco_checkpoint(folder)
    step = int(os.path.basename(file).rpartition("_")[2])
    tree = read_msgpack(file)
    if not isinstance(tree, Mapping) or not isinstance(tree.get("params"), Mapping):
        raise ReleaseError(f"{file}: expected a dict holding params (flax.training.checkpoints layout), found "
                           f"{sorted(tree) if isinstance(tree, Mapping) else type(tree).__name__}")
    vq = vqgan.load(tokenizer)
    _check_tokenizer(tree["params"], vq, file)
    experiment = settings_to_config(settings, kind, vq, os.path.abspath(tokenizer), step)
    model = teco.build(experiment)
    abstract = jax.eval_shape(lambda key: teco.init_variables(model, key), jax.random.key(0))
    mask_value = settings.number("frame_mask_id", float) if model.mask_future_frames else None
    params = release_to_params(tree["params"], abstract["params"], kind, model, file, mask_value)
    variables = teco.set_code_embeddings({"params": params, "tokenizer": abstract["tokenizer"]},
                                         np.asarray(vq.codebook, np.float32))
    params = jax.tree_util.tree_map(jnp.asarray, variables["params"])
    opt_state = optim.build(optim.OptimizerSettings.of_experiment(experiment)).init(params)
    state = dict(step=jnp.asarray(step, jnp.int32), params=params, opt_state=opt_state)
    constants = {"tokenizer": {"code_embeddings": jnp.asarray(variables["tokenizer"]["code_embeddings"])}}

    partial = _partial_folder(out)
    try:
        mngr = ckpt_lib.manager(partial, config=experiment, keep=1, async_save=False)
        try:
            ckpt_lib.save(mngr, step, train_lib.checkpoint_items(state, constants), force=True)
        finally:
            ckpt_lib.close(mngr)
        written = flat_paths(jax.tree_util.tree_map(np.asarray, variables))
        restored = ckpt_lib.load_variables(experiment, partial, step)
        for path, value in flat_paths(jax.tree_util.tree_map(np.asarray, dict(restored))).items():
            if not np.array_equal(value, written[path]):
                raise RuntimeError(f"{partial}: {path} did not read back as written")
        provenance = dict(source=folder, checkpoint=file, step=step, release=RELEASES[kind], model=kind,
                          settings=settings.source, tokenizer=os.path.abspath(tokenizer))
        with open(os.path.join(partial, PROVENANCE_FILE), "w") as f:
            json.dump(provenance, f, indent=2)
        if os.path.isdir(out):
            os.rmdir(out)  # empty, checked above
        os.replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    num_params = int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params)))
    return dict(path=out, step=step, backbone=experiment.backbone, release=RELEASES[kind], num_params=num_params)


def provenance(workdir: str) -> dict[str, Any] | None:
    """What `convert` recorded in `workdir` (`released_from.json`), or None for a workdir trained here."""
    path = os.path.join(workdir, PROVENANCE_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)
