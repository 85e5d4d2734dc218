"""Encode a video dataset into tokenizer codes once (a TFDS folder that teco_ssm.data reads as codes).

  python scripts/encode.py --tokenizer=/ckpt/dmlab_vqgan --data=/data/dmlab --out_root=/data/encoded \
      --name=dmlab_codes --splits=train,test
Re-running after an interruption resumes; an existing complete output is kept unless --overwrite.
"""
from absl import app, flags

from vqgan.encode import encode_dataset

_TOKENIZER = flags.DEFINE_string('tokenizer', None, 'Checkpoint folder: TECO layout or a VQGAN workdir.')
_DATA = flags.DEFINE_string('data', None, 'Video dataset root (<root>/<split>/<shard>/*.npz or *.mp4).')
_OUT_ROOT = flags.DEFINE_string('out_root', None, 'Folder that receives <name>/1.0.0/.')
_NAME = flags.DEFINE_string('name', None, 'Dataset name (lowercase letters, digits, underscores).')
_SPLITS = flags.DEFINE_list('splits', ['train', 'test'], 'Splits to encode.')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace an existing output.')
_CHUNK = flags.DEFINE_integer('chunk_size', 64, 'Frames per tokenizer call.')
_PER_SHARD = flags.DEFINE_integer('examples_per_shard', 64, 'Trajectories per tfrecord shard.')
flags.mark_flags_as_required(['tokenizer', 'data', 'out_root', 'name'])


def main(argv):
    del argv
    result = encode_dataset(_TOKENIZER.value, _DATA.value, _OUT_ROOT.value, _NAME.value, tuple(_SPLITS.value),
                            _OVERWRITE.value, examples_per_shard=_PER_SHARD.value, chunk_size=_CHUNK.value)
    print(f"{result['path']}: {result['splits']} videos, codes {result['code_shape']} of {result['n_codes']}")


if __name__ == '__main__':
    app.run(main)
