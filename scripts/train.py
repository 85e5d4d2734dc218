"""Train a TECO world model (any backbone) on tokenized video.

  python scripts/train.py --config configs/mazelab.py:convt3 --workdir runs/mazelab_convt3 \
      --config.dataset.path=/data/mazelab_encoded --config.tokenizer.path=/tmp/vqgan_mazelab
  python scripts/train.py --config configs/dmlab.py:convs5 --workdir runs/dmlab_convs5 \
      --config.dataset.path=/data/dmlab --config.tokenizer.path=/ckpt/dmlab_vqgan --config.batch_size=8

The dataset may hold frames (encoded by the tokenizer on the fly) or codes (`scripts/encode.py`).
Re-running with the same workdir resumes from its latest complete checkpoint, with the same data order.
On several hosts, start the same command on each; `jax.distributed` is initialised from the launcher's variables.
"""
from absl import app, flags
from ml_collections import config_flags

from teco_ssm.sharding import maybe_initialize_distributed
from teco_ssm.train import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a configs/<dataset>.py file[:backbone].',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Folder for checkpoints, config.json, metrics and rollout GIFs.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
    del argv
    maybe_initialize_distributed()
    result = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    print(' '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}' for k, v in result.items()))


if __name__ == '__main__':
    app.run(main)
