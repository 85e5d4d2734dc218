"""Several processes for real: the README's launch lines started as separate `teco-ssm` processes on the loopback
address (gloo CPU collectives, one CPU device each), against one process of two fake CPU devices on the same data.

- 2 processes x 1 device train 3 steps with the same losses and parameters as 1 process x 2 devices;
- a 2-process checkpoint resumed by 1 process, and a 1-process checkpoint resumed by 2 processes (launched as SLURM
  would launch them), end as the uninterrupted run;
- 2 processes sample a complete folder (each video once) that `teco-ssm eval` scores as the 1-process folder;
- a bad launch stops before any work, naming the variable.
The 1-process runs and the launches being compared run at the same time to keep the tests short."""
import functools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest

from teco_ssm import checkpoint as ckpt, teco
from teco_ssm.data import TfdsWriter

import toy

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BACKBONE, STEPS = "s5", 3
CODES, GRID, VIDEO_LENGTH = toy.TOY_VQGAN["n_embed"], (8, 8), 12
PROTOCOL, SAMPLE_VIDEOS = "4,4,actions", 5
TIMEOUT = 240
CONFIG = """from configs import mazelab


def get_config(backbone="{backbone}"):
    config = mazelab.get_config(backbone)
    config[backbone].update({backbone_fields!r})
    config.model.update({model!r})
    config.optim[backbone].update(dict(lr=3e-3, warmup_steps=1))
    config.sampling.update(dict(draft_steps=2, revise_steps=2, revise_rounds=1))
    for key, value in {top!r}.items():
        config[key] = value
    return config
"""


# ----------------------------------------------------------------------------------------------- launching
def free_port(low=None, high=None):
    """A port no one listens on (in [low, high) when given)."""
    rng = np.random.default_rng()
    while True:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 0 if low is None else int(rng.integers(low, high))))
            except OSError:
                continue
            return s.getsockname()[1]


def environment(devices):
    """The suite's environment without any launch variable, with `devices` fake CPU devices per process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "OMPI_", "PMI"))}
    env.update(PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", PATH=f"{Path(sys.executable).parent}:{env['PATH']}",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0 "
                         "--xla_llvm_disable_expensive_passes=true")
    return env


def start(command, log, devices=1, **variables):
    """`command` (a shell line, run from the repository root) in its own process group, output to `log`."""
    with open(log, "w") as out:
        process = subprocess.Popen(["bash", "-c", command], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                   env=dict(environment(devices), **variables), start_new_session=True)
    process.log = Path(log)
    return process


def finish(*processes):
    """Waits for every process (killing its group after TIMEOUT s); fails with the end of a failing one's log."""
    for process in processes:
        try:
            process.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()
    for process in processes:
        assert process.returncode == 0, f"{process.args[-1]}\n{process.log.read_text()[-3000:]}"


def readme_block(first, last):
    """The README's lines from the one starting with `first` to the one starting with `last`."""
    lines = README.splitlines()
    begin = next(i for i, line in enumerate(lines) if line.startswith(first))
    end = next(i for i in range(begin, len(lines)) if lines[i].startswith(last))
    return "\n".join(lines[begin:end + 1])


def with_paths(command, setup, workdir):
    """A README command with the example paths replaced by the test's toy config, data, tokenizer and workdir."""
    for example, ours in (("configs/dmlab.py:convt3", setup["config"]), ("configs/mazelab.py:convt3", setup["config"]),
                          ("/data/dmlab_codes/dmlab", setup["data"]), ("/data/mazelab_encoded/mazelab", setup["data"]),
                          ("/data/teco/dmlab_vqgan", setup["tokenizer"]), ("/tmp/vqgan_mazelab", setup["tokenizer"]),
                          ("/shared/runs/dmlab_convt3", workdir), ("runs/two_processes", workdir)):
        command = command.replace(example, str(ours))
    return command


def train_one_process(setup, workdir, log):
    """`teco-ssm train` as one process of two devices."""
    return start(f"teco-ssm train --config {setup['config']} --data {setup['data']} --tokenizer {setup['tokenizer']} "
                 f"--workdir {workdir}", log, devices=2)


# ----------------------------------------------------------------------------------------------- the runs
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A toy config file, a tokenizer folder and a dataset of codes (train and test splits)."""
    root = tmp_path_factory.mktemp("multihost")
    tokenizer = toy.write_tokenizer(root / "tokenizer")
    model = dict(toy.TOY_MODEL, code_shape=GRID, vqgan_codes=CODES, vqgan_embedding_dim=toy.TOY_VQGAN["embed_dim"])
    top = dict(batch_size=4, seq_len=8, steps=STEPS, log_every=1, checkpoint_every=1, keep_checkpoints=10,
               visualise_every=1000, eval_every=1000, eval_batches=1)
    config = root / "toy_config.py"
    config.write_text(CONFIG.format(backbone=BACKBONE, backbone_fields=toy.TOY_BACKBONES[BACKBONE], model=model,
                                    top=top))
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("test", 6)):
        with TfdsWriter(root / "data", "toy", split, GRID, action_dim=3, examples_per_shard=4) as writer:
            for _ in range(count):
                writer.write(rng.integers(0, CODES, (VIDEO_LENGTH, *GRID)).astype(np.int32),
                             rng.integers(0, 3, VIDEO_LENGTH).astype(np.int32))
    return dict(root=root, config=str(config), tokenizer=tokenizer, data=str(root / "data" / "toy"))


@pytest.fixture(scope="module")
def trained(setup):
    """3 steps by 1 process of 2 devices and by the README's one-machine launch of 2 processes, at the same time."""
    root = setup["root"]
    one, two = root / "one_process", root / "two_processes"
    block = readme_block("# One machine, two processes", "done; wait")
    port = free_port()
    assert "127.0.0.1:12355" in block
    launch = with_paths(block, setup, two).replace("127.0.0.1:12355", f"127.0.0.1:{port}")
    reference = train_one_process(setup, one, root / "one.log")
    both = start(launch, root / "two.log")  # the block's `wait` returns 0 whatever the processes did: check the run
    finish(reference, both)
    assert (two / "checkpoints" / str(STEPS)).is_dir(), (root / "two.log").read_text()[-3000:]
    assert (root / "two.log").read_text().count('"num_processes": 2') == 2  # one run of two processes
    assert '"num_processes": 1' in (root / "one.log").read_text()
    return one, two


def losses(workdir):
    """step -> the logged values of that step (training terms, and 'eval/...' at the last step)."""
    logged = {}
    with open(Path(workdir) / "metrics.jsonl") as f:
        for record in map(json.loads, f):
            logged.setdefault(record["step"], {}).update(record)
    return logged


@functools.lru_cache(maxsize=1)
def abstract_variables(config_json):
    """The variables of the model of a workdir's config.json text, as ShapeDtypeStructs."""
    model = teco.build(ml_collections.ConfigDict(json.loads(config_json)))
    return jax.eval_shape(lambda key: teco.init_variables(model, key), jax.random.key(0))


def params(workdir, step):
    """The parameters saved at `step` in `workdir`, as numpy arrays."""
    mngr = ckpt.manager(str(workdir), read_only=True)
    try:
        abstract = abstract_variables((Path(workdir) / ckpt.CONFIG_FILE).read_text())
        return jax.device_get(ckpt.restore(mngr, {"model": abstract}, step)["model"]["params"])
    finally:
        mngr.close()


def assert_same_run(workdir, reference, steps):
    """The logged terms of `steps` and the parameters of every saved step equal the reference's (float rounding:
    the gradients are summed across processes by gloo, across devices inside XLA)."""
    got, expected = losses(workdir), losses(reference)
    for step in steps:
        for key in ("loss", "recon_loss", "prior_loss", "grad_norm", "param_norm"):
            np.testing.assert_allclose(got[step][key], expected[step][key], rtol=1e-5, err_msg=f"step {step} {key}")
    # The held-out loss of the last step: the same global batches of the test split, whoever reads them.
    np.testing.assert_allclose(got[STEPS]["eval/loss"], expected[STEPS]["eval/loss"], rtol=1e-5)
    saved = sorted(int(p.name) for p in (Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == list(range(1, STEPS + 1))
    for path, a in jax.tree_util.tree_leaves_with_path(params(reference, STEPS)):
        b = dict(jax.tree_util.tree_leaves_with_path(params(workdir, STEPS)))[path]
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_two_processes_train_as_one_process_of_two_devices(trained):
    one, two = trained
    assert_same_run(two, one, range(1, STEPS + 1))
    assert list(losses(one)) == list(range(1, STEPS + 1))
    # The steps moved the parameters: the comparison is between trained states.
    first, last = params(one, 1), params(one, STEPS)
    assert max(float(np.abs(a - b).max()) for a, b in zip(jax.tree_util.tree_leaves(first),
                                                            jax.tree_util.tree_leaves(last))) > 1e-4


def truncated_copy(workdir, target, step):
    """A copy of `workdir` as it was after `step`: later checkpoints and logged steps removed."""
    shutil.copytree(workdir, target)
    for path in (target / "checkpoints").iterdir():
        if path.name.isdigit() and int(path.name) > step:
            shutil.rmtree(path)
    lines = (target / "metrics.jsonl").read_text().splitlines(keepends=True)
    (target / "metrics.jsonl").write_text("".join(line for line in lines if json.loads(line)["step"] <= step))
    return target


def logged_steps(workdir):
    return [json.loads(line)["step"] for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def test_a_checkpoint_resumes_with_another_number_of_processes(setup, trained):
    """2 -> 1: one process of two devices continues the 2-process run from step 2; 1 -> 2: the README's SLURM line,
    with the variables `srun` sets on one node, continues the 1-process run. Both end as the uninterrupted run."""
    root = setup["root"]
    one, two = trained
    to_one = truncated_copy(two, root / "two_then_one", 2)
    to_two = truncated_copy(one, root / "one_then_two", 2)
    srun = with_paths(readme_block("srun ", "    --data"), setup, to_two).replace("\\\n", " ")
    assert srun.startswith("srun --nodes=2 --ntasks-per-node=1 teco-ssm train")
    command = "teco-ssm" + srun.split("teco-ssm", 1)[1]  # what srun starts on each node
    port = free_port(65535 - 4095, 65536)  # JAX's SLURM port: SLURM_JOB_ID % 4096 + 61440
    slurm = dict(SLURM_JOB_ID=str(port - 61440), SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2",
                 SLURM_STEP_NUM_NODES="1")
    processes = [train_one_process(setup, to_one, root / "to_one.log")]
    for task in range(2):
        log = root / f"to_two_{task}.log"
        processes.append(start(command, log, SLURM_PROCID=str(task), SLURM_LOCALID=str(task), **slurm))
    finish(*processes)
    for task in range(2):
        assert '"num_processes": 2' in (root / f"to_two_{task}.log").read_text()
    for resumed in (to_one, to_two):
        assert logged_steps(resumed) == logged_steps(one)  # resumed at step 3, not trained again from step 1
        assert_same_run(resumed, one, [STEPS])


def sample_files_of(folder):
    return {p.name: dict(np.load(p)) for p in sorted(Path(folder).glob("*.npz"))}


def test_two_processes_sample_a_complete_folder_that_evaluates_as_one_process(setup, trained):
    """The plain multi-host variables (the README's first line) on two local processes of batch 2, against one
    process of two devices and batch 4: the same videos, each once, the same samples, the same evaluation."""
    from teco_ssm import evaluate

    root = setup["root"]
    one, _ = trained
    arguments = (f"sample --workdir {one} --protocol {PROTOCOL} --num_videos {SAMPLE_VIDEOS} --seed 3")
    plain = readme_block("JAX_COORDINATOR_ADDRESS=10.0.0.1", "JAX_COORDINATOR_ADDRESS=10.0.0.1")
    variables = plain.split(" teco-ssm")[0]
    assert variables == "JAX_COORDINATOR_ADDRESS=10.0.0.1:12355 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0"
    port = free_port()
    processes = [start(f"teco-ssm {arguments} --batch_size 4 --out {root / 'samples_one'}", root / "s1.log",
                       devices=2)]
    for process in range(2):
        line = variables.replace("10.0.0.1:12355", f"127.0.0.1:{port}").replace("JAX_PROCESS_ID=0",
                                                                             f"JAX_PROCESS_ID={process}")
        log = root / f"s2_{process}.log"
        processes.append(start(f"{line} teco-ssm {arguments} --batch_size 2 --out {root / 'samples_two'}", log))
    finish(*processes)

    single, several = sample_files_of(root / "samples_one"), sample_files_of(root / "samples_two")
    assert list(single) == ["batch_00000.npz", "batch_00001.npz"]
    # Process 1 holds no video of batch 1 (videos 4..7 of which only 4 is asked for): no file.
    assert list(several) == ["batch_00000_p0.npz", "batch_00000_p1.npz", "batch_00001_p0.npz"]
    index = np.concatenate([f["index"] for f in several.values()])
    assert index.tolist() == list(range(SAMPLE_VIDEOS))  # every video once, in order
    for key in ("real", "fake", "actions", "index"):
        np.testing.assert_array_equal(np.concatenate([f[key] for f in several.values()]),
                                      np.concatenate([f[key] for f in single.values()]), err_msg=key)

    def score(folder):
        numbers = evaluate.evaluate_samples(folder, None, lpips=lambda x, y: np.abs(x - y).mean(axis=(1, 2, 3)),
                                            i3d=lambda v: v.mean(axis=(2, 3)).reshape(v.shape[0], -1), num_gifs=0)
        return json.dumps({k: numbers[k] for k in ("psnr", "ssim", "lpips", "fvd")}, sort_keys=True, default=str)

    assert score(root / "samples_two") == score(root / "samples_one")


def test_a_bad_launch_stops_before_any_work(setup, tmp_path):
    """The process id outside the count: the command ends at once naming the variables, the workdir never made."""
    log = tmp_path / "bad.log"
    process = start(f"teco-ssm train --config {setup['config']} --data {setup['data']} --tokenizer "
                    f"{setup['tokenizer']} --workdir {tmp_path / 'run'}", log,
                    JAX_COORDINATOR_ADDRESS="127.0.0.1:1", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="2")
    process.wait(timeout=TIMEOUT)
    assert process.returncode == 1
    assert re.search(r"LaunchError: .*JAX_PROCESS_ID=2 must lie in \[0, JAX_NUM_PROCESSES=2\)", log.read_text())
    assert not (tmp_path / "run").exists()


def launch_line(setup, workdir):
    return (f"teco-ssm train --config {setup['config']} --data {setup['data']} --tokenizer {setup['tokenizer']} "
            f"--workdir {workdir}")


def ended(process, timeout=90):
    """The exit status and the last line of output of a process expected to end within `timeout` s."""
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        pytest.fail(f"still running after {timeout} s:\n{process.log.read_text()[-2000:]}")
    lines = [line for line in process.log.read_text().splitlines() if line.strip()]
    return process.returncode, lines[-1] if lines else ""


def launch(port, count, index, timeout=6):
    return dict(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(count),
                JAX_PROCESS_ID=str(index), TECO_SSM_LAUNCH_TIMEOUT=str(timeout))


def test_a_taken_coordinator_port_ends_process_0_naming_the_port(setup, tmp_path):
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = start(launch_line(setup, tmp_path / "run"), tmp_path / "p0.log", **launch(port, 2, 0))
        status, last = ended(process)
    assert status == 1
    assert re.fullmatch(rf"teco-ssm train: error: LaunchError: JAX_COORDINATOR_ADDRESS=127.0.0.1:{port}: port "
                        rf"{port} cannot be opened on this host, process 0's .*set JAX_COORDINATOR_ADDRESS to a free "
                        r"port on every process", last), last
    assert "Segmentation fault" not in process.log.read_text() and not (tmp_path / "run").exists()


def test_processes_that_cannot_meet_each_end_with_one_line_naming_the_cause(setup, tmp_path):
    """Within the launch timeout (6 s here), each case ends every process with one line of ours, naming the
    variable: a process never started, two processes with one id, process 0 never started."""
    port = free_port()
    alone = start(launch_line(setup, tmp_path / "a"), tmp_path / "alone.log", **launch(port, 3, 0))
    status, last = ended(alone)
    assert status == 1 and re.search(r"LaunchError: processes 1, 2 of JAX_NUM_PROCESSES=3 did not join within 6 s: "
                                     r"start every process, each with its own JAX_PROCESS_ID", last), last
    log = alone.log.read_text()
    assert "waiting up to 6 s for the other processes to join" in log and "Traceback" not in log

    port = free_port()
    group = [start(launch_line(setup, tmp_path / "b"), tmp_path / f"twice{i}.log", **launch(port, 3, index))
             for i, index in enumerate((0, 1, 1))]
    for process in group:
        status, last = ended(process)
        assert status == 1 and "JAX_PROCESS_ID=1 is set on two processes" in last, (process.log, last)

    port = free_port()
    orphan = start(launch_line(setup, tmp_path / "c"), tmp_path / "orphan.log", **launch(port, 2, 1))
    status, last = ended(orphan)
    assert status == 1 and re.search(rf"process 0 at JAX_COORDINATOR_ADDRESS=127.0.0.1:{port} could not be reached "
                                     r"within 6 s: start it \(JAX_PROCESS_ID=0\)", last), last
    assert "waiting up to 6 s for process 0" in orphan.log.read_text()
    assert not any((tmp_path / name).exists() for name in "abc")


def test_launch_timeout_is_checked():
    from teco_ssm import sharding

    assert sharding.launch_timeout({}) == 300
    assert sharding.launch_timeout({"TECO_SSM_LAUNCH_TIMEOUT": "12.5"}) == 12.5
    with pytest.raises(sharding.LaunchError, match=r"JAX_COORDINATOR_ADDRESS='127.0.0.1:99999' is not HOST:PORT with "
                                                   r"a port in 1 .. 65535"):
        sharding.distributed_arguments(dict(JAX_COORDINATOR_ADDRESS="127.0.0.1:99999", JAX_NUM_PROCESSES="2",
                                            JAX_PROCESS_ID="0"))
    for bad in ("0", "-3", "soon", "inf", "nan"):
        with pytest.raises(sharding.LaunchError, match=f"TECO_SSM_LAUNCH_TIMEOUT='{bad}' must be a positive"):
            sharding.launch_timeout({"TECO_SSM_LAUNCH_TIMEOUT": bad})
