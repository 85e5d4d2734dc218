"""The optimiser: AdamW with linear warm-up and cosine decay, global-norm clipping and parameter groups.

    settings = OptimizerSettings.of_experiment(config)   # config.optim[config.backbone], config.steps
    tx = build(settings)                          # optax.GradientTransformation
    labels = param_labels(params, settings.ssm_params)

Three groups, chosen per parameter by its path (names joined by '/', e.g. 'backbone/layer_0/ssm/diagonal/Lambda_re'):
  'ssm'       path matches `ssm_params` (re.search): the SSM eigenvalues, timescales and input matrices (and
              ConvT3's stencils) train as S5 trains them, with their own peak rate `ssm_lr` and `ssm_weight_decay`
              (0 in every config);
  'no_decay'  other parameters with fewer than two dimensions (biases, norm scales and offsets): rate `lr`, no
              weight decay, unless `decay_all` (the releases' `optax.adamw` decays every parameter);
  'decay'     everything else: rate `lr`, decoupled weight decay `weight_decay` (scaled by the rate, as AdamW).
Both rates follow the same schedule shape: 0 -> peak linearly over `warmup_steps`, then cosine down to
`end_lr_factor * peak` at `total_steps`, or at `total_steps - warmup_steps` with `schedule_ends_early` (both
releases' `get_learning_rate_fn` pass decay_steps = total_steps - warmup_steps to optax's
`warmup_cosine_decay_schedule`, whose decay_steps already counts the warm-up), then constant. Gradients are clipped to global norm `grad_clip` (over all groups)
before the groups' updates.

The schedule runs over the steps from `schedule_start` to `total_steps`, read from the optimiser's own step count,
which starts at 0 with a fresh optimiser state: 0 for a model trained from scratch (the count is then the training
step), the release's step for a model converted from a release (`teco_ssm.released`), whose fine-tuning starts a
fresh optimiser at that step and so gets a warm-up and decay of its own.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping

import jax
import optax

_FILE = "teco_ssm/optim.py"
GROUPS = ("decay", "no_decay", "ssm")
SCHEDULES = ("cosine", "constant")

# Parameters trained as S5 trains its SSM parameters (own learning rate, no weight decay): the eigenvalues,
# timescales and input matrix of every diagonal SSM, and ConvT3's stencils. Matched with re.search against the
# parameter path joined by '/'.
SSM_PARAMS = r"(^|/)diagonal/(Lambda_re|Lambda_im|log_step|B)$|(^|/)raw_b_[HW]$"


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    """Everything that defines the optimiser; hashable, so a jitted step can take it as a static argument.

    An experiment config holds one block of these fields (all but total_steps, which is config.steps) per backbone,
    `config.optim.<backbone>`, built from these defaults (`teco_ssm.schema.optimizer_block`); the active
    backbone's is used. ssm_lr None means the same peak rate as lr.
    """
    lr: float
    total_steps: int
    warmup_steps: int = 5000
    schedule: str = "cosine"
    end_lr_factor: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    weight_decay: float = 1e-5
    grad_clip: float = 1.0
    ssm_lr: float | None = None
    ssm_weight_decay: float = 0.0
    ssm_params: str = SSM_PARAMS
    decay_all: bool = False
    schedule_ends_early: bool = False
    schedule_start: int = 0

    @property
    def schedule_steps(self) -> int:
        """The steps the schedule spans: total_steps - schedule_start."""
        return self.total_steps - self.schedule_start

    def __post_init__(self):
        for name, value in (("lr", self.lr), ("ssm_lr", self.ssm_lr)):
            if value is not None and not value > 0:
                raise ValueError(f"{_FILE}: {name} must be > 0, got {value} (config.optim.<backbone>.{name})")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"{_FILE}: schedule {self.schedule!r} is not one of {', '.join(SCHEDULES)} "
                             f"(config.optim.<backbone>.schedule)")
        if isinstance(self.schedule_start, bool) or not isinstance(self.schedule_start, int) or not (
                0 <= self.schedule_start <= self.total_steps):
            raise ValueError(f"{_FILE}: need 0 <= schedule_start ({self.schedule_start}) <= total_steps "
                             f"({self.total_steps}) (config.optim.<backbone>.schedule_start, config.steps)")
        span = self.schedule_steps
        if span == 0:  # a run with nothing left to train (a converted release before `steps` is raised)
            return
        start = f" - schedule_start ({self.schedule_start})" if self.schedule_start else ""
        if not 0 <= self.warmup_steps < span:
            raise ValueError(f"{_FILE}: need 0 <= warmup_steps ({self.warmup_steps}) < total_steps "
                             f"({self.total_steps}){start} (config.optim.<backbone>.warmup_steps, config.steps)")
        if self.schedule_ends_early and 2 * self.warmup_steps >= span:
            raise ValueError(f"{_FILE}: with schedule_ends_early the cosine ends at total_steps - warmup_steps, so "
                             f"need 2 * warmup_steps ({self.warmup_steps}) < total_steps ({self.total_steps})"
                             f"{start} (config.optim.<backbone>.warmup_steps, config.steps)")
        try:
            re.compile(self.ssm_params)
        except re.error as error:
            raise ValueError(f"{_FILE}: config.optim.<backbone>.ssm_params={self.ssm_params!r} is not a regular "
                             f"expression ({error})") from None

    @classmethod
    def from_config(cls, optim: Mapping[str, Any], total_steps: int) -> "OptimizerSettings":
        """From one optimiser block (e.g. `config.optim.convs5`) and the number of training steps."""
        fields = {f.name for f in dataclasses.fields(cls)} - {"total_steps"}
        given = dict(optim)
        unknown = sorted(set(given) - fields)
        if unknown:
            raise ValueError(f"{_FILE}: config.optim.<backbone> has unknown field(s) {', '.join(unknown)}; expected: "
                             f"{', '.join(sorted(fields))}")
        return cls(total_steps=int(total_steps), **given)

    @classmethod
    def of_experiment(cls, config: Mapping[str, Any]) -> "OptimizerSettings":
        """The optimiser of an experiment config: its active backbone's block `config.optim[config.backbone]` and
        `config.steps`. Raises ValueError when config.optim has no block for that backbone."""
        name, blocks = config["backbone"], config["optim"]
        if name not in blocks:
            raise ValueError(f"{_FILE}: config.optim has no block for backbone {name!r}; blocks: "
                             f"{', '.join(sorted(blocks.keys()))}")
        return cls.from_config(blocks[name], config["steps"])

    @property
    def peak_ssm_lr(self) -> float:
        return self.lr if self.ssm_lr is None else self.ssm_lr


def learning_rate_schedule(peak: float, settings: OptimizerSettings) -> optax.Schedule:
    """count (int) -> learning rate: linear warm-up from 0 to `peak`, then `settings.schedule` decay; 0 for a
    schedule of no steps (a run with nothing left to train)."""
    if settings.schedule_steps == 0:
        return optax.constant_schedule(0.0)
    if settings.schedule == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak, max(settings.warmup_steps, 1)), optax.constant_schedule(peak)],
            [settings.warmup_steps])
    length = settings.schedule_steps - (settings.warmup_steps if settings.schedule_ends_early else 0)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=settings.warmup_steps, decay_steps=length,
        end_value=settings.end_lr_factor * peak)


def path_name(path: tuple[Any, ...]) -> str:
    """A pytree key path as 'a/b/c'."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def param_labels(params: Any, ssm_params: str) -> Any:
    """The group ('ssm', 'no_decay' or 'decay') of every leaf of `params` (arrays or ShapeDtypeStructs);
    a pytree of strings of the same structure."""
    pattern = re.compile(ssm_params)

    def label(path, leaf) -> str:
        if pattern.search(path_name(path)):
            return "ssm"
        return "no_decay" if len(leaf.shape) < 2 else "decay"

    return jax.tree_util.tree_map_with_path(label, params)


def group_sizes(params: Any, ssm_params: str) -> dict[str, int]:
    """Number of parameter values in each group, e.g. {'decay': 10240, 'no_decay': 96, 'ssm': 512}."""
    sizes = dict.fromkeys(GROUPS, 0)
    labels = param_labels(params, ssm_params)
    for group, leaf in zip(jax.tree_util.tree_leaves(labels), jax.tree_util.tree_leaves(params)):
        sizes[group] += int(leaf.size)
    return sizes


def build(settings: OptimizerSettings) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW per group (see the module docstring).

    Written as one Adam moment estimate over every parameter, weight decay on the groups that have it, and the
    group's scheduled rate (`optax.multi_transform`): the same updates as one `optax.adamw` per group, with one
    moment state and a smaller compiled step.
    """
    labels = lambda params: param_labels(params, settings.ssm_params)
    decayed = ("decay", "no_decay") if settings.decay_all else ("decay",)
    in_group = lambda *groups: (lambda params: jax.tree_util.tree_map(lambda label: label in groups, labels(params)))
    rate = lambda peak: optax.scale_by_learning_rate(learning_rate_schedule(peak, settings))
    return optax.chain(
        optax.clip_by_global_norm(settings.grad_clip),
        optax.scale_by_adam(b1=settings.b1, b2=settings.b2),
        optax.add_decayed_weights(settings.weight_decay, mask=in_group(*decayed)),
        optax.add_decayed_weights(settings.ssm_weight_decay, mask=in_group("ssm")),
        optax.multi_transform({"decay": rate(settings.lr), "no_decay": rate(settings.lr),
                               "ssm": rate(settings.peak_ssm_lr)}, labels))


def learning_rates(settings: OptimizerSettings) -> Callable[[Any], dict[str, Any]]:
    """count -> {'lr': ..., 'ssm_lr': ...}, the two peaks' schedules (for logging); count is the optimiser's step
    count, the training step minus `schedule_start`."""
    main, ssm = learning_rate_schedule(settings.lr, settings), learning_rate_schedule(settings.peak_ssm_lr, settings)
    return lambda step: {"lr": main(step), "ssm_lr": ssm(step)}
