"""Interrupted, refused and failing jobs leave every folder right, at toy size, as a user on a shared cluster meets
them: `teco-ssm` children killed with SIGKILL at a chosen call, a writer failing with ENOSPC, two processes on one
workdir, partial and mixed inputs, and resumed requests with other settings.

The chain (data -> tokenizer -> encode -> train -> sample) is built once, uninterrupted, in this process; each
property test kills a child running one stage at a step drawn from TECO_KILL_SEED (default 0), runs the same stage
again and compares the outputs with the uninterrupted ones: npz and code files byte for byte, parameters exactly.
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from teco_ssm import checkpoint as ckpt, cli, lock
from teco_ssm.data import DataError, open_dataset
from teco_ssm.data.tfds_folder import ENCODING_FILE

TESTS = Path(__file__).parent
ROOT = TESTS.parent
RNG = np.random.default_rng(int(os.environ.get("TECO_KILL_SEED", "0")))

DATA_ARGS = ["--num_train", "6", "--num_test", "8", "--length", "12", "--workers", "1", "--files_per_shard", "4",
             "--sheet_rows", "1"]
TOKENIZER_STEPS, TOKENIZER_EVERY = 6, 2
TOKENIZER_SETS = [f"num_steps={TOKENIZER_STEPS}", f"loss.disc_start={TOKENIZER_STEPS}",
                  f"checkpoint_every={TOKENIZER_EVERY}", "keep_checkpoints=10", "log_every=2", "eval_batch=4",
                  "data.seq_len=4", "data.videos_per_batch=2", "data.frames_per_video=2", "data.eval_frames=4",
                  "model.ch=4", "model.ch_mult=(1, 1, 2, 2)", "model.z_channels=4", "model.n_embed=12",
                  "model.embed_dim=4", "model.num_groups=2", "disc.ch=8", "disc.num_groups=2"]
TRAIN_STEPS, TRAIN_EVERY = 8, 4
TECO_CONFIG = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
import test_train


def get_config(backbone="convt3"):
    config = test_train.toy_config(backbone, None, None, steps={TRAIN_STEPS}, checkpoint_every={TRAIN_EVERY},
                                   log_every=2)
    config.model.num_actions = 4
    return config
"""
SAMPLE_ARGS = ["--protocol", "4,4,actions", "--num_videos", "8", "--batch_size", "4"]

CHILD = """
import importlib, os, signal, sys
kill = {kill!r}
if kill:
    module, name, n, when = kill
    owner = importlib.import_module(module)
    original, calls = getattr(owner, name), [0]

    def trap(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n and when == 'before':
            os.kill(os.getpid(), signal.SIGKILL)
        result = original(*args, **kwargs)
        if calls[0] == n and when == 'after':
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(owner, name, trap)
{extra}
sys.argv = ['teco-ssm', *{args!r}]
from teco_ssm import cli
cli.main()
"""


def teco_ssm(args, *, kill=None, extra="", timeout=240):
    """`teco-ssm ARGS` in a child process, as the command runs (its own error handling). kill=(module, function, n,
    'before' | 'after'): the child SIGKILLs itself at the n-th call of module.function, before or after it runs."""
    code = CHILD.format(kill=kill, extra=textwrap.dedent(extra), args=[str(a) for a in args])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(TESTS)]))
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def main(args):
    """`teco-ssm ARGS` in this process (errors propagate)."""
    return cli.main([str(a) for a in args])


def killed(proc):
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]


def last_line(proc):
    return proc.stderr.strip().splitlines()[-1]


def files_of(folder, pattern="*"):
    """{relative path: bytes} of the files under `folder` matching `pattern`."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob(pattern)) if p.is_file()}


def params(workdir, item="model"):
    """The latest complete checkpoint's item, as numpy arrays."""
    mngr = ckpt.manager(str(workdir), read_only=True)
    try:
        step = ckpt.latest_step(mngr)
        tree = mngr.restore(step, args=ckpt.ocp.args.Composite(**{item: ckpt.ocp.args.StandardRestore()}))[item]
    finally:
        mngr.close()
    return step, jax.tree_util.tree_map(np.asarray, tree)


def assert_trees_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


# ------------------------------------------------------------------------------------------ the uninterrupted chain
@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Every stage's output of one uninterrupted chain, made by `cli.main` in this process."""
    root = tmp_path_factory.mktemp("chain")
    config = root / "teco_toy.py"
    config.write_text(TECO_CONFIG)
    paths = dict(root=root, data=root / "data", tokenizer=root / "tokenizer", encoded=root / "encoded",
                 codes=root / "encoded" / "maze", train=root / "train", samples=root / "samples", config=config)
    assert main(["data", "--out", paths["data"], *DATA_ARGS]) == 0
    assert main(["tokenizer", "--config", "configs/vqgan_mazelab.py:quick", "--data", paths["data"],
                     "--workdir", paths["tokenizer"], *sum([["--set", s] for s in TOKENIZER_SETS], [])]) == 0
    assert main(["encode", "--tokenizer", paths["tokenizer"], "--data", paths["data"], "--out",
                     paths["encoded"], "--name", "maze", "--examples_per_shard", "2"]) == 0
    assert main(["train", "--config", config, "--data", paths["codes"], "--tokenizer", paths["tokenizer"],
                     "--workdir", paths["train"]]) == 0
    assert main(["sample", "--workdir", paths["train"], "--out", paths["samples"], *SAMPLE_ARGS]) == 0
    return {k: str(v) for k, v in paths.items()}


def stage_args(chain, stage, out):
    """The command line of `stage` writing to `out`, reading the uninterrupted chain's inputs."""
    return {
        "data": ["data", "--out", out, *DATA_ARGS],
        "tokenizer": ["tokenizer", "--config", "configs/vqgan_mazelab.py:quick", "--data", chain["data"],
                      "--workdir", out, *sum([["--set", s] for s in TOKENIZER_SETS], [])],
        "encode": ["encode", "--tokenizer", chain["tokenizer"], "--data", chain["data"], "--out", out, "--name",
                   "maze", "--examples_per_shard", "2"],
        "train": ["train", "--config", chain["config"], "--data", chain["codes"], "--tokenizer", chain["tokenizer"],
                  "--workdir", out],
        "sample": ["sample", "--workdir", chain["train"], "--out", out, *SAMPLE_ARGS],
    }[stage]


# a call made once per unit of work of each stage, and how many units there are
KILL_POINTS = {
    "data": ("teco_ssm.mazelab", "save_npz", 14, "after"),          # a trajectory written, not yet renamed
    "tokenizer": ("vqgan.train", "sample_frames", TOKENIZER_STEPS, "before"),
    "encode": ("vqgan.encode", "encode_video", 14, "before"),
    "train": ("teco_ssm.sharding", "global_batch", TRAIN_STEPS, "before"),
    "sample": ("teco_ssm.sample_files", "_write_npz_atomic", 2, "after"),
}


def compare(chain, stage, out):
    if stage == "data":
        assert files_of(out, "*.npz") == files_of(chain["data"], "*.npz")
        assert not list(Path(out).rglob("*.partial"))
    elif stage == "tokenizer":
        (step, got), (expected_step, expected) = params(out), params(chain["tokenizer"])
        assert step == expected_step == TOKENIZER_STEPS
        assert_trees_equal(got, expected)
    elif stage == "encode":
        assert files_of(out, "*.tfrecord*") == files_of(chain["encoded"], "*.tfrecord*")
        assert files_of(out, ENCODING_FILE) == files_of(chain["encoded"], ENCODING_FILE)
    elif stage == "train":
        (step, got), (expected_step, expected) = params(out), params(chain["train"])
        assert step == expected_step == TRAIN_STEPS
        assert_trees_equal(got, expected)
    else:
        assert files_of(out, "*.npz") == files_of(chain["samples"], "*.npz")


@pytest.mark.parametrize("stage", list(KILL_POINTS))
def test_a_stage_killed_at_a_random_step_and_rerun_equals_an_uninterrupted_run(chain, tmp_path, stage):
    module, function, units, when = KILL_POINTS[stage]
    at = int(RNG.integers(1, units + 1))
    out = tmp_path / stage
    killed(teco_ssm(stage_args(chain, stage, out), kill=(module, function, at, when)))
    assert main(stage_args(chain, stage, out)) == 0
    compare(chain, stage, out)


# --------------------------------------------------------------------------------- 1. partial output taken for whole
def test_an_interrupted_encode_is_refused_by_readers_naming_the_command_that_finishes_it(chain, tmp_path):
    args = stage_args(chain, "encode", tmp_path)
    killed(teco_ssm(args, kill=("vqgan.encode", "encode_video", 5, "before")))  # 2 shards of 2 of 6 train videos
    with pytest.raises(DataError, match=r"split 'train' holds 4 videos; .*encoding.json lists 6 .*teco-ssm encode"):
        open_dataset(tmp_path / "maze", "train", seq_len=4, batch_size=2)
    with pytest.raises(DataError, match=r"split 'test' not found.*lists 8 videos for it.*teco-ssm encode"):
        open_dataset(tmp_path / "maze", "test", seq_len=4, batch_size=2)
    assert main(args) == 0
    assert open_dataset(tmp_path / "maze", "train", seq_len=4, batch_size=2).info.num_videos == 6


def test_an_interrupted_data_stage_is_refused_by_readers(chain, tmp_path):
    args = stage_args(chain, "data", tmp_path)
    killed(teco_ssm(args, kill=("teco_ssm.mazelab", "save_npz", 3, "after")))
    # a whole trajectory under its temporary name, and metadata.json listing 6 training videos
    assert len(list(tmp_path.rglob("*.partial"))) == 1
    with pytest.raises(DataError, match=r"half-written \.partial .*teco-ssm data"):
        open_dataset(tmp_path, "train", seq_len=4, batch_size=2)
    next(tmp_path.rglob("*.partial")).unlink()
    with pytest.raises(DataError, match=r"holds 2 of the 6 videos .*metadata.json lists \(num_train\).*teco-ssm data"):
        open_dataset(tmp_path, "train", seq_len=4, batch_size=2)


def test_a_step_folder_without_the_commit_marker_is_never_the_latest(chain, tmp_path):
    workdir = tmp_path / "train"
    shutil.copytree(chain["train"], workdir)
    # an interrupted copy: the newest step folder arrived without orbax's commit marker
    (workdir / "checkpoints" / str(TRAIN_STEPS) / "commit_success.txt").unlink()
    mngr = ckpt.manager(str(workdir), read_only=True)
    assert ckpt.latest_step(mngr) == TRAIN_STEPS - TRAIN_EVERY
    assert ckpt.complete_steps(mngr) == [TRAIN_STEPS - TRAIN_EVERY]
    with pytest.raises(FileNotFoundError, match=f"no complete checkpoint of step {TRAIN_STEPS}"):
        ckpt.restore(mngr, {"model": {}}, TRAIN_STEPS)
    mngr.close()
    assert ckpt.resolve_step(workdir) == TRAIN_STEPS - TRAIN_EVERY
    # train finishes the run from the last complete step, the incomplete folder kept aside
    assert main(stage_args(chain, "train", workdir)) == 0
    (step, got), (_, expected) = params(workdir), params(chain["train"])
    assert step == TRAIN_STEPS
    assert_trees_equal(got, expected)
    assert [p.name.split(".")[0] for p in (workdir / ckpt.INCOMPLETE_DIR).iterdir()] == [str(TRAIN_STEPS)]


# ------------------------------------------------------------------------------- 2. outputs of different origins
def test_codes_of_another_tokenizer_are_refused_naming_both(chain, tmp_path):
    other = tmp_path / "other_tokenizer"  # the same VQGAN at an earlier step: the same sizes, other codes
    shutil.copytree(chain["tokenizer"], other)
    for step in range(TOKENIZER_EVERY * 2, TOKENIZER_STEPS + 1, TOKENIZER_EVERY):
        shutil.rmtree(other / "checkpoints" / str(step))
    args = stage_args(chain, "train", tmp_path / "train")
    args[args.index("--tokenizer") + 1] = str(other)
    with pytest.raises(DataError, match=r"codes made by the tokenizer .*tokenizer/checkpoints/6 .*this run uses the "
                                        r"tokenizer .*other_tokenizer/checkpoints/2"):
        main(args)
    assert not (tmp_path / "train" / "config.json").exists()
    sample = stage_args(chain, "sample", tmp_path / "samples") + ["--tokenizer", str(other)]
    with pytest.raises(DataError, match="codes made by the tokenizer"):
        main(sample)


def test_samples_record_their_origin_and_a_resume_of_another_origin_is_refused(chain, tmp_path):
    with np.load(Path(chain["samples"]) / "batch_00000.npz") as data:
        assert int(data["checkpoint_step"]) == TRAIN_STEPS
        assert str(data["data_path"]) == chain["codes"] and str(data["split"]) == "test"
        assert len(str(data["tokenizer_sha256"])) == 64 and chain["tokenizer"] in str(data["tokenizer_source"])
    out = tmp_path / "samples"
    shutil.copytree(chain["samples"], out)
    (out / "batch_00001.npz").unlink()
    with pytest.raises(ValueError, match=f"batch_00000.npz: field 'checkpoint_step' is {TRAIN_STEPS}, this run "
                                         f"asks for {TRAIN_STEPS - TRAIN_EVERY}"):
        main(stage_args(chain, "sample", out) + ["--step", str(TRAIN_STEPS - TRAIN_EVERY)])


HOLDER = """
import sys, time
from teco_ssm import lock
with lock.hold(sys.argv[1], command='teco-ssm train (the first one)'):
    print('held', flush=True)
    time.sleep(600)
"""


def test_a_second_process_on_a_workdir_is_refused_at_once_naming_the_holder(chain, tmp_path):
    workdir = tmp_path / "train"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.monotonic()
        second = teco_ssm(stage_args(chain, "train", workdir))
        assert second.returncode == 1
        assert re.search(rf"teco-ssm train: error: Busy: .*{workdir}: in use by pid {holder.pid} on "
                         rf"{re.escape(os.uname().nodename)} \(running 'teco-ssm train \(the first one\)'",
                         last_line(second)), last_line(second)
        assert not (workdir / "checkpoints").exists() and not (workdir / "config.json").exists()
        assert time.monotonic() - start < 60
    finally:
        holder.send_signal(signal.SIGKILL)  # a crashed holder: the system releases its lock
        holder.wait()
    with lock.hold(workdir):
        pass


# --------------------------------------------------------------------------- 3. a refused request changes nothing
def test_resuming_with_another_model_is_refused_before_anything_is_written(chain, tmp_path):
    workdir = tmp_path / "train"
    shutil.copytree(chain["train"], workdir)
    before = files_of(workdir)
    with pytest.raises(ValueError, match=r"config.json: field convt3.n_layers is 1 there, 3 in this request"):
        main(stage_args(chain, "train", workdir) + ["--set", "convt3.n_layers=3", "--set", "steps=12"])
    assert files_of(workdir) == before
    assert main(["sample", "--workdir", workdir, "--out", tmp_path / "samples", *SAMPLE_ARGS]) == 0
    # The scan mode only picks how the same recurrence is computed: another one resumes.
    assert main(stage_args(chain, "train", workdir) + ["--set", "convt3.scan_mode=associative"]) == 0


# -------------------------------------------------------------------------------------- 4. silently dropped data
def test_a_split_of_mixed_files_is_refused_naming_them(chain, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(chain["data"], data)
    shard = data / "train" / "0000"
    _write_mp4(shard / "extra.mp4")
    with pytest.raises(DataError, match=r"mixed split of 1 mp4 video\(s\) \(extra.mp4\) and 6 npz trajectories"):
        open_dataset(data, "train", seq_len=4, batch_size=2)
    with pytest.raises(DataError, match="mixed split"):
        main(stage_args(chain, "encode", tmp_path / "codes")[:3] + ["--data", data, "--out", tmp_path / "codes"])
    assert not (tmp_path / "codes" / "maze").exists()
    (shard / "extra.mp4").unlink()
    (shard / "notes.txt").write_text("copied along")
    with pytest.raises(DataError, match=r"1 file\(s\) of another kind: notes.txt"):
        open_dataset(data, "train", seq_len=4, batch_size=2)


def _write_mp4(path):
    import imageio_ffmpeg

    writer = imageio_ffmpeg.write_frames(str(path), (64, 64), fps=4, macro_block_size=1)
    writer.send(None)
    for _ in range(12):
        writer.send(np.zeros((64, 64, 3), np.uint8).tobytes())
    writer.close()


# ---------------------------------------------------------------------- 5. errors that name nothing or never end
def test_a_float32_video_in_a_raw_dataset_ends_the_command_promptly_naming_the_file(chain, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(chain["data"], data)
    bad = data / "train" / "0000" / "000002.npz"
    with np.load(bad) as arrays:
        fields = dict(arrays)
    np.savez(bad, **dict(fields, video=fields["video"].astype(np.float32)))
    args = stage_args(chain, "tokenizer", tmp_path / "tokenizer")
    args[args.index("--data") + 1] = str(data)
    start = time.monotonic()
    proc = teco_ssm(args, timeout=120)
    assert proc.returncode == 1 and time.monotonic() - start < 120
    assert last_line(proc) == (f"teco-ssm tokenizer: error: DataError: {bad}: field 'video' expected (T, H, W, 3) "
                               "uint8, got (12, 64, 64, 3) float32")


FULL_DISK = """
import errno
from orbax.checkpoint._src.path import async_path

async def full(path, *args, **kwargs):
    raise OSError(errno.ENOSPC, 'No space left on device', str(path))

async_path.write_text = full
"""


def test_a_full_disk_ends_train_promptly_with_the_cause_last(chain, tmp_path):
    workdir = tmp_path / "train"
    start = time.monotonic()
    proc = teco_ssm(stage_args(chain, "train", workdir), extra=FULL_DISK, timeout=180)
    assert proc.returncode == 1 and time.monotonic() - start < 180
    assert re.fullmatch(r"teco-ssm train: error: no space left on device writing \S+ \(OSError\)", last_line(proc)), \
        (last_line(proc), len(proc.stderr.splitlines()))
    assert ckpt.complete_steps(ckpt.manager(str(workdir), read_only=True)) == []
    # the cause, and one line from each of orbax's background savers: no traceback, no closed-loop reports
    assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr, proc.stderr[-3000:]


def test_a_full_disk_in_the_checkpoint_layer_prints_no_thread_tracebacks(tmp_path):
    code = FULL_DISK + textwrap.dedent("""
        import jax.numpy as jnp
        from teco_ssm import checkpoint as ckpt
        mngr = ckpt.manager(WORKDIR, keep=1)
        ckpt.save(mngr, 1, {"model": {"a": jnp.ones(3)}}, force=True)
        try:
            ckpt.close(mngr)
        except OSError as error:
            print("raised:", error.errno)
    """).replace("WORKDIR", repr(str(tmp_path / "w")))
    for _ in range(4):  # the thread reports came in some runs only
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                              capture_output=True, text=True, timeout=120)
        assert "raised: 28" in proc.stdout, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr, proc.stderr[-2000:]
        assert len(proc.stderr.splitlines()) <= 8, proc.stderr


def test_the_cause_stays_last_while_other_threads_print():
    """Background threads (orbax's writers print tracebacks as the process ends) never land between the last line
    and its newline, or after it."""
    code = textwrap.dedent("""
        import sys, threading
        from teco_ssm import cli

        def chatter():
            while True:
                sys.stderr.write("RuntimeError: Event loop is closed\\n")

        def printer():
            while True:
                print("RuntimeError:", "Event loop is closed", file=sys.stderr)

        for target in (chatter, printer):
            threading.Thread(target=target, daemon=True).start()
        cli._exit_now(1, "teco-ssm train: error: the cause")
    """)
    for _ in range(20):
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1 and proc.stderr.endswith("\n"), proc.stderr[-200:]
        assert proc.stderr.splitlines()[-1] == "teco-ssm train: error: the cause", proc.stderr[-200:]


def _cli(args, tmp_path, extra_env=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", **(extra_env or {}))
    return subprocess.run([sys.executable, "-m", "teco_ssm.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_a_bad_request_ends_with_one_line_and_no_traceback(tmp_path):
    """Errors in the request or its inputs print their cause alone, as the last line; TECO_SSM_TRACEBACK=1 adds the
    traceback. Nothing is written for the refused requests."""
    result = _cli(["train", "--config", "configs/mazelb.py:convt3", "--workdir", str(tmp_path / "w")], tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert lines[-1].startswith("teco-ssm train: error: FileNotFoundError: config file configs/mazelb.py does not")
    (tmp_path / "not_a_run").mkdir()
    result = _cli(["sample", "--workdir", str(tmp_path / "not_a_run"), "--out", str(tmp_path / "s")], tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "not a TECO training workdir" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "s").exists() and not (tmp_path / "w").exists()
    result = _cli(["sample", "--workdir", str(tmp_path / "not_a_run"), "--out", str(tmp_path / "s")], tmp_path,
                  {"TECO_SSM_TRACEBACK": "1"})
    assert "Traceback" in result.stderr and "not a TECO training workdir" in result.stderr.strip().splitlines()[-1]


def test_the_one_line_cause_keeps_several_problems_apart():
    from teco_ssm import cli

    error = ValueError("invalid config:\n  config.a is wrong\n  config.b is missing")
    assert cli.cause(error) == "ValueError: invalid config: config.a is wrong; config.b is missing"
    assert cli.cause(OSError(28, "No space left on device", "/w/x")) == (
        "no space left on device writing /w/x (OSError)")


def test_a_ctrl_c_python_cannot_raise_is_kept_for_the_command_to_end_as_interrupted():
    """Ctrl-C during JAX's garbage-collection callback is reported by Python as unraisable (and the command went on to
    exit 0): the command's hook keeps it, prints nothing, and `main` then ends as interrupted."""
    import types

    from teco_ssm import cli

    seen, swallowed = [], []
    hook = cli._keep_interrupts(seen.append, swallowed)
    hook(types.SimpleNamespace(exc_value=KeyboardInterrupt()))
    other = types.SimpleNamespace(exc_value=RuntimeError("something else"))
    hook(other)
    assert len(swallowed) == 1 and seen == [other]
