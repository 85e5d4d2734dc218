"""teco_ssm.memory_maze: tiny generations (9x9 mazes, 16 frames) through the dataset loader, poses against the
actions, determinism, resuming, the missing-extra message, and the whole `run --quick` chain.

Generation only ever runs in child processes (MuJoCo's Mesa GL and TensorFlow crash each other in one process);
this test process imports neither MuJoCo nor the memory-maze package.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from teco_ssm import cli, memory_maze as mm
from teco_ssm.data import open_dataset

LENGTH = 16
SEED = 3
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    """One train and one test trajectory, written by two workers."""
    root = tmp_path_factory.mktemp('memory_maze') / 'a'
    figures = mm.write_dataset(root, 1, 1, LENGTH, SEED, workers=2, progress=False)
    assert figures['frames'] == 2 * LENGTH
    return root


def _files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob('*') if p.is_file() and p.name != 'metadata.json')


def test_files_load_through_open_dataset(dataset):
    meta = json.loads((dataset / 'metadata.json').read_text())
    assert meta['action_dim'] == mm.ACTION_DIM == 6 and meta['maze_size'] == 9 and meta['versions'] == mm.EXTRA
    for split in ('train', 'test'):
        ds = open_dataset(dataset, split, seq_len=LENGTH, batch_size=1, process_index=0, process_count=1,
                          shuffle=False)
        assert ds.info.action_dim == 6 and ds.info.frame_shape == (64, 64, 3) and ds.info.video_length == LENGTH
        (batch,) = list(ds)
        arrays = mm.load_trajectory(ds.locate(int(batch['index'][0])))
        assert arrays['video'].shape == (LENGTH, 64, 64, 3) and arrays['video'].dtype == np.uint8
        assert arrays['actions'].dtype == np.int32 and arrays['poses'].dtype == np.int32
        assert arrays['poses'].shape == (LENGTH, 3) and arrays['maze_layout'].shape == (9, 9)
        np.testing.assert_allclose(batch['frames'][0], arrays['video'] / 127.5 - 1, atol=1e-6)
        np.testing.assert_array_equal(batch['actions'][0], arrays['actions'])
        assert ds.read_field(int(batch['index'][0]), 'poses').shape == (LENGTH, 3)
        assert arrays['video'].std() > 10  # rendered frames, not a blank buffer


def test_poses_follow_the_actions(dataset):
    for path in sorted(dataset.rglob('*.npz')):
        arrays = mm.load_trajectory(path)
        actions, poses, layout = arrays['actions'], arrays['poses'], arrays['maze_layout']
        position, angle = arrays['position'].astype(np.float64), arrays['angle'].astype(np.float64)
        assert actions[0] == mm.NOOP and actions.min() >= 0 and actions.max() < mm.ACTION_DIM
        np.testing.assert_array_equal(poses[:, :2], np.floor(position))
        np.testing.assert_array_equal(poses[:, 2], np.round(angle / (np.pi / 4)) % 8)
        assert (layout[poses[:, 0], poses[:, 1]] == 1).all()  # the agent stands in open cells
        turned = (np.diff(angle) + np.pi) % (2 * np.pi) - np.pi
        moved = np.linalg.norm(np.diff(position, axis=0), axis=1)
        for t in range(1, len(actions)):
            if actions[t] == mm.LEFT:
                assert turned[t - 1] > 0, (path, t)   # counter-clockwise seen from above
            elif actions[t] == mm.RIGHT:
                assert turned[t - 1] < 0, (path, t)
            elif actions[t] in (mm.FORWARD, mm.FORWARD_LEFT, mm.FORWARD_RIGHT) and moved[t - 1] < 1e-3:
                assert _next_to_a_wall(layout, position[t]), (path, t)  # a forward move that did not move
        forward = np.isin(actions[1:], (mm.FORWARD, mm.FORWARD_LEFT, mm.FORWARD_RIGHT))
        assert moved[forward].mean() > 0.05 and np.abs(turned[np.isin(actions[1:], (mm.LEFT, mm.RIGHT))]).min() > 0.02


def _next_to_a_wall(layout: np.ndarray, position: np.ndarray, reach: float = 0.45) -> bool:
    """Whether a wall cell lies within `reach` cells of position (row, col)."""
    row, col = np.floor(position).astype(int)
    for r in range(row - 1, row + 2):
        for c in range(col - 1, col + 2):
            wall = not (0 <= r < layout.shape[0] and 0 <= c < layout.shape[1]) or layout[r, c] == 0
            nearest = np.clip(position, [r, c], [r + 1, c + 1])
            if wall and np.linalg.norm(position - nearest) < reach:
                return True
    return False


def test_same_seed_same_bytes_whatever_the_worker_count(dataset, tmp_path):
    mm.write_dataset(tmp_path, 1, 1, LENGTH, SEED, workers=1, progress=False)
    assert _files(tmp_path) == _files(dataset)
    for name in _files(dataset):
        a, b = mm.load_trajectory(dataset / name), mm.load_trajectory(tmp_path / name)
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].tobytes() == b[key].tobytes(), (name, key)
    train, test = (mm.load_trajectory(dataset / name) for name in _files(dataset))
    assert not np.array_equal(train['video'], test['video'])  # splits draw other mazes


def test_interrupted_generation_resumes_without_duplicates(dataset, tmp_path):
    root = tmp_path / 'data'
    script = (f'from teco_ssm import memory_maze; memory_maze.write_dataset({str(root)!r}, 3, 1, {LENGTH}, {SEED}, '
              'workers=1, progress=False)')
    process = subprocess.Popen([sys.executable, '-c', script], cwd=REPO, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(root.rglob('*.npz')) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    finished = {p: p.stat().st_mtime_ns for p in root.rglob('*.npz')}
    assert 1 <= len(finished) < 4, 'stopped too late to test resuming'
    # a crash in the middle of writing the last file (test 0): it must not appear as a finished file
    crash = ('import os\nfrom teco_ssm import memory_maze\n'
             'def cut_off(path, arrays, **kwargs):\n'
             '    open(path, "wb").write(b"PK\\x03\\x04")\n'
             '    os._exit(3)\n'
             'memory_maze.mazelab.save_npz = cut_off\n'
             f'memory_maze._write_one(({str(root)!r}, "test", 0, {SEED}, {LENGTH}, 9, 100))\n')
    assert subprocess.run([sys.executable, '-c', crash], cwd=REPO, capture_output=True).returncode == 3
    last = mm.mazelab.trajectory_path(root, 'test', 0, 100)
    assert not last.exists() and last.with_name(last.name + mm.PARTIAL_SUFFIX).exists()
    stale = mm.mazelab.trajectory_path(root, 'train', 7, 100)  # left by an earlier, larger request
    stale.with_name(stale.name + mm.PARTIAL_SUFFIX).write_bytes(b'PK\x03\x04')

    figures = mm.write_dataset(root, 3, 1, LENGTH, SEED, workers=2, progress=False)
    assert figures['frames'] == (4 - len(finished)) * LENGTH
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # finished files kept as they were
    assert not list(root.rglob(f'*{mm.PARTIAL_SUFFIX}'))
    assert _files(root) == [Path(f'test/0000/{0:06d}.npz')] + [Path(f'train/0000/{i:06d}.npz') for i in range(3)]
    for name in _files(dataset):  # the same bytes as an uninterrupted run
        a, b = mm.load_trajectory(dataset / name), mm.load_trajectory(root / name)
        for key in a:
            assert a[key].tobytes() == b[key].tobytes(), (name, key)
    assert mm.write_dataset(root, 3, 1, LENGTH, SEED, progress=False)['frames'] == 0
    with pytest.raises(ValueError, match='maze_size'):
        mm.write_dataset(root, 3, 1, LENGTH, SEED, maze_size=11, progress=False)


def test_shortest_path_and_argument_checks():
    layout = np.array([[1, 1, 1],
                       [0, 0, 1],
                       [1, 1, 1]], np.uint8)
    assert mm.shortest_path(layout, (0, 0), (2, 0)) == [(0, 0), (0, 1), (0, 2), (1, 2), (2, 2), (2, 1), (2, 0)]
    with pytest.raises(ValueError, match='cannot be reached'):
        mm.shortest_path(np.array([[1, 0, 1]], np.uint8), (0, 0), (0, 2))
    np.testing.assert_array_equal(mm.heading_index(np.radians([0, 44, 46, 180, -90, -1])), [0, 1, 1, 4, 6, 0])
    with pytest.raises(ValueError, match=r'length 1001 outside \[1, 1000\]'):
        mm.write_dataset('/nonexistent', 1, 1, 1001)
    with pytest.raises(ValueError, match='maze size 10'):
        mm.write_dataset('/nonexistent', 1, 1, 16, maze_size=10)


def _command(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-m', 'teco_ssm.cli', *args], cwd=cwd, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300)


def test_without_the_extra_the_command_stops_with_one_message(tmp_path):
    blocker = tmp_path / 'no_extra'
    blocker.mkdir()  # every process started with it on the path finds no memory_maze package
    (blocker / 'sitecustomize.py').write_text("import sys\nsys.modules['memory_maze'] = None\n")
    env = {'PYTHONPATH': os.pathsep.join([str(blocker), str(REPO)])}
    result = _command(['data', '--source', 'memory-maze', '--out', str(tmp_path / 'out')], env, tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(
        "teco-ssm data: Memory Maze needs the optional memory-maze extra (memory-maze 1.0.3, dm-control 1.0.50, "
        "mujoco 3.17.0, gym 0.26.2): pip install -e '.[memory-maze]'")
    assert 'Traceback' not in result.stderr and not (tmp_path / 'out').exists()
    result = _command(['run', '--dataset', 'memory-maze', '--quick', '--workdir', str(tmp_path / 'run')], env,
                      tmp_path)
    assert result.returncode == 1 and "pip install -e '.[memory-maze]'" in result.stderr
    assert not (tmp_path / 'run').exists()  # stopped before any work


def test_without_a_gl_backend_the_command_names_what_to_install(tmp_path):
    import ctypes.util

    if ctypes.util.find_library('OSMesa'):
        pytest.skip('OSMesa is installed here: MUJOCO_GL=osmesa works')
    result = _command(['data', '--source', 'memory-maze', '--out', str(tmp_path / 'out')],
                      {'MUJOCO_GL': 'osmesa', 'PYTHONPATH': str(REPO)}, tmp_path)
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert 'MUJOCO_GL=osmesa backend does not work here' in result.stderr
    assert 'apt-get install libegl1 libegl-mesa0 libgl1-mesa-dri' in result.stderr and 'libosmesa6' in result.stderr
    assert not (tmp_path / 'out').exists()


def test_quick_run_through_the_whole_chain(tmp_path, capsys):
    """`teco-ssm run --dataset memory-maze --quick`: generation, tokenizer, encoding, training, sampling, eval."""
    from teco_ssm import data, run

    workdir = tmp_path / 'run'
    assert cli.main(['run', '--dataset', 'memory-maze', '--quick', '--workdir', str(workdir)]) == 0
    quick = run.world_model_config('convt3', run.SIZES['quick'], dataset='memory-maze')
    assert quick.model.num_actions == mm.ACTION_DIM and quick.dataset.name == 'memory_maze'
    assert len(list((workdir / 'data' / 'train').rglob('*.npz'))) == run.SIZES['quick'].num_train
    assert (workdir / 'data' / 'contact_sheet.png').stat().st_size > 0
    encoded = data.inspect_dataset(workdir / 'encoded' / 'memory_maze', 'test')
    assert encoded.kind == 'codes' and encoded.action_dim == mm.ACTION_DIM
    summary = json.loads((workdir / 'report' / 'summary.json').read_text())
    assert summary['dataset'] == 'Memory Maze 9x9' and summary['backbones']['convt3']['train']['step'] == quick.steps
    trained = summary['backbones']['convt3']['trained']
    assert 5.0 < trained['psnr']['mean'] < 100.0 and 'revisit_psnr' in trained
    assert (workdir / 'report' / 'report.md').read_text().startswith('# teco_ssm on Memory Maze 9x9')
    with pytest.raises(ValueError, match="dataset 'memory-maze' there, 'mazelab' asked"):
        cli.main(['run', '--quick', '--workdir', str(workdir)])
    shutil.rmtree(workdir / 'data')  # the run is complete: nothing is regenerated
    capsys.readouterr()
    assert cli.main(['run', '--dataset', 'memory-maze', '--quick', '--workdir', str(workdir)]) == 0
    assert '] ...' not in capsys.readouterr().out
