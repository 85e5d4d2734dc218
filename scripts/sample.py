r"""Sample a trained TECO model on a dataset's evaluation split and write `.npz` batches for `scripts/eval.py`.

  python scripts/sample.py --config configs/mazelab.py:convs5 --workdir /tmp/teco_mazelab \
      --config.dataset.path=/data/mazelab --config.tokenizer.path=/tmp/vqgan_mazelab \
      --out_dir /tmp/teco_mazelab/samples --protocol action_conditioned
  python scripts/eval.py /tmp/teco_mazelab/samples

--protocol names one of the ConvS5 paper's protocols (action_conditioned: 144 + 156 frames with actions;
unconditioned: 36 + 264 without; a config may shorten them, MazeLab's does); --context and --horizon (with
--use_actions) give explicit numbers instead. Re-running with the same --out_dir skips the finished batch files.
"""
from absl import app, flags
from ml_collections import config_flags

import vqgan
from teco_ssm.sample_files import sample_dataset

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/<dataset>.py file[:backbone].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (config.json + checkpoints/).")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Folder for the sample .npz files.")
_PROTOCOL = flags.DEFINE_enum("protocol", "action_conditioned", ["action_conditioned", "unconditioned"],
                              "Benchmark protocol (ignored when --context and --horizon are given).")
_CONTEXT = flags.DEFINE_integer("context", None, "Explicit number of context frames.")
_HORIZON = flags.DEFINE_integer("horizon", None, "Explicit number of generated frames.")
_USE_ACTIONS = flags.DEFINE_bool("use_actions", True, "With --context/--horizon: condition on actions.")
_NUM_VIDEOS = flags.DEFINE_integer("num_videos", None, "Videos to sample (default config.sampling.num_videos).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Videos per file (default config.sampling.batch_size).")
_SEED = flags.DEFINE_integer("seed", None, "Sampling seed (default config.seed).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.mark_flags_as_required(["config", "workdir", "out_dir"])


def main(argv):
    del argv
    config = _CONFIG.value
    if (_CONTEXT.value is None) != (_HORIZON.value is None):
        raise app.UsageError("--context and --horizon go together")
    protocol = (_PROTOCOL.value if _CONTEXT.value is None
                else (_CONTEXT.value, _HORIZON.value, _USE_ACTIONS.value))
    for field in ("dataset.path", "tokenizer.path"):
        group, name = field.split(".")
        if config[group][name] is None:
            raise app.UsageError(f"set --config.{field}")
    tokenizer = vqgan.load(config.tokenizer.path)
    result = sample_dataset(config, _WORKDIR.value, tokenizer, config.dataset.path, _OUT_DIR.value,
                            protocol=protocol, num_videos=_NUM_VIDEOS.value, batch_size=_BATCH_SIZE.value,
                            seed=_SEED.value, step=_STEP.value)
    p = result["protocol"]
    print(f"{result['num_videos']} videos ({p.context} context + {p.horizon} generated frames, actions "
          f"{'given' if p.use_actions else 'not given'}) in {len(result['files'])} files under {_OUT_DIR.value} "
          f"({result['written']} written now, {result['skipped']} already there)")


if __name__ == "__main__":
    app.run(main)
