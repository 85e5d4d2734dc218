"""Training feedback shared by the trainers: a progress bar, a scalar writer, and a NaN/Inf guard.

  bar = ProgressBar(total=num_steps, initial=start_step, desc='vqgan')
  writer = ScalarWriter(workdir)              # TensorBoard event files + metrics.jsonl in workdir
  check_finite(step, metrics)                 # FloatingPointError naming the step and the offending terms
  writer.write(step, metrics); bar.update(step, metrics)
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Mapping

import numpy as np
from tqdm.auto import tqdm


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {str(k): float(np.asarray(v)) for k, v in metrics.items() if np.ndim(v) == 0}


def check_finite(step: int, metrics: Mapping[str, Any]) -> None:
    """Raises FloatingPointError naming `step` and every scalar term of `metrics` that is NaN or infinite."""
    bad = {k: v for k, v in _scalars(metrics).items() if not math.isfinite(v)}
    if bad:
        terms = ', '.join(f'{k}={v}' for k, v in sorted(bad.items()))
        raise FloatingPointError(f'step {step}: non-finite training terms: {terms}')


class ProgressBar:
    """A tqdm bar over steps showing chosen scalar metrics, steps per second and the ETA."""

    def __init__(self, total: int, initial: int = 0, desc: str = 'train', keys: tuple[str, ...] = ('loss',),
                 disable: bool = False):
        self.keys = keys
        self._bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, disable=disable,
                         unit='step')
        self._last = initial

    def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
        """Moves the bar to `step` (the number of steps done) and shows `metrics[keys]`."""
        if metrics:
            values = _scalars({k: metrics[k] for k in self.keys if k in metrics})
            self._bar.set_postfix({k: f'{v:.4g}' for k, v in values.items()}, refresh=False)
        self._bar.update(step - self._last)
        self._last = step

    def close(self) -> None:
        self._bar.close()


class ScalarWriter:
    """Writes scalar metrics as TensorBoard event files and as lines of `<workdir>/metrics.jsonl`."""

    def __init__(self, workdir: str, filename: str = 'metrics.jsonl'):
        from tensorboardX import SummaryWriter
        os.makedirs(workdir, exist_ok=True)
        self._tb = SummaryWriter(logdir=workdir)
        self._jsonl = open(os.path.join(workdir, filename), 'a')
        self._start = time.time()

    def write(self, step: int, metrics: Mapping[str, Any], prefix: str = '') -> None:
        values = _scalars(metrics)
        for k, v in values.items():
            self._tb.add_scalar(prefix + k, v, global_step=step)
        record = {'step': int(step), 'time': round(time.time() - self._start, 3)}
        record.update({prefix + k: v for k, v in values.items()})
        self._jsonl.write(json.dumps(record) + '\n')
        self._jsonl.flush()

    def close(self) -> None:
        self._tb.close()
        self._jsonl.close()
