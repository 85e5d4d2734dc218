"""Convert a taming-transformers VQGAN checkpoint (.ckpt, PyTorch) into a folder that `vqgan.load` reads.

  pip install "teco_ssm[torch]"
  python scripts/convert_taming.py --ckpt=logs/vqgan/checkpoints/last.ckpt --resolution=64 --out=/ckpt/my_vqgan
"""
from absl import app, flags

from vqgan.convert import convert_taming

_CKPT = flags.DEFINE_string('ckpt', None, 'taming-transformers checkpoint (.ckpt).')
_RESOLUTION = flags.DEFINE_integer('resolution', None, 'Frame size the VQGAN was trained at.')
_OUT = flags.DEFINE_string('out', None, 'Output folder (TECO layout: args + checkpoints/checkpoint_0).')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace an existing output folder.')
flags.mark_flags_as_required(['ckpt', 'resolution', 'out'])


def main(argv):
    del argv
    print(convert_taming(_CKPT.value, _OUT.value, _RESOLUTION.value, overwrite=_OVERWRITE.value))


if __name__ == '__main__':
    app.run(main)
