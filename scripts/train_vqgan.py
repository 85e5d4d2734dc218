"""Train a VQGAN frame tokenizer.

  python scripts/train_vqgan.py --config=configs/vqgan_mazelab.py --config.data.path=/data/mazelab \
      --workdir=/tmp/vqgan_mazelab
Re-running with the same workdir resumes from its latest checkpoint.
"""
from absl import app, flags
from ml_collections import config_flags

from vqgan.train import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a configs/vqgan_*.py file[:variant].',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Folder for checkpoints, config.json, metrics and images.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
    del argv
    result = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    print(' '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}' for k, v in result.items()))


if __name__ == '__main__':
    app.run(main)
