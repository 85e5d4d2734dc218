"""teco_ssm.mazelab: determinism, render/pose consistency, ray casting against a float64 march, dataset files."""
from collections import deque

import numpy as np
import pytest

from teco_ssm import mazelab as ml
from teco_ssm.data import open_dataset


@pytest.fixture(scope='module')
def trajectory():
    return ml.make_trajectory(7, 120)


def test_same_seed_same_bytes_other_seed_other_maze(trajectory):
    again = ml.make_trajectory(7, 120)
    assert trajectory.keys() == again.keys()
    for key in trajectory:
        assert trajectory[key].tobytes() == again[key].tobytes(), key
    other = ml.make_trajectory(8, 120)
    assert not np.array_equal(other['maze_walls'], trajectory['maze_walls'])
    assert trajectory['video'].shape == (120, 64, 64, 3) and trajectory['video'].dtype == np.uint8
    assert trajectory['actions'].dtype == np.int32 and trajectory['poses'].shape == (120, 3)


def test_render_and_rollout_regenerate_the_recorded_frames(trajectory):
    maze = ml.Maze.from_arrays(trajectory)
    poses = ml.rollout_poses(maze, trajectory['poses'][0], trajectory['actions'])
    np.testing.assert_array_equal(poses, trajectory['poses'])
    for t in (0, 1, 37, 119):
        assert ml.render(maze, poses[t]).tobytes() == trajectory['video'][t].tobytes()
    np.testing.assert_array_equal(ml.render_poses(maze, poses[50:60]), trajectory['video'][50:60])


def test_ray_casting_matches_a_float64_march():
    maze = ml.generate_maze(np.random.default_rng(0))
    open_blocks = np.argwhere(maze.walls == 0)
    rng = np.random.default_rng(1)
    table = ml._ray_table(16)
    for row, col in open_blocks[rng.choice(len(open_blocks), 6, replace=False)]:
        for heading in rng.choice(ml.NUM_HEADINGS, 3, replace=False):
            pose = np.array([row * ml.STEPS_PER_BLOCK, col * ml.STEPS_PER_BLOCK, heading])
            origin = ml.pose_position(pose)
            rays = table[heading]
            distance, _, _, block = ml._cast(maze.walls, np.repeat(origin[None], 16, 0), rays)
            for ray, d, b in zip(rays, distance, block):
                t = np.arange(1, 40000) * 5e-4            # march: distances along the forward axis
                points = np.clip(np.floor(origin + t[:, None] * ray).astype(int), 0, ml.NUM_BLOCKS - 1)
                first = np.argmax(maze.walls[points[:, 0], points[:, 1]] > 0)
                assert abs(t[first] - d) <= 5e-4 + 1e-9
                np.testing.assert_array_equal(points[first], b)


def test_action_rules():
    maze = ml.generate_maze(np.random.default_rng(3))
    cell = np.array([2, 2, 0])  # block (1, 1): the top-left cell, facing east
    pose = cell
    for _ in range(ml.NUM_HEADINGS):
        pose = ml.step_pose(maze, pose, ml.LEFT)
    np.testing.assert_array_equal(pose, cell)
    np.testing.assert_array_equal(ml.step_pose(maze, ml.step_pose(maze, cell, ml.LEFT), ml.RIGHT), cell)
    np.testing.assert_array_equal(ml.step_pose(maze, cell, ml.NOOP), cell)
    # facing north from the top row: the border wall blocks the move
    north = np.array([2, 2, 9])
    np.testing.assert_array_equal(ml.step_pose(maze, north, ml.FORWARD), north)
    # off-axis heading: forward does nothing
    np.testing.assert_array_equal(ml.step_pose(maze, [2, 2, 1], ml.FORWARD), [2, 2, 1])
    east_open = maze.walls[1, 2] == 0
    moved = ml.step_pose(maze, cell, ml.FORWARD)
    np.testing.assert_array_equal(moved, [2, 3, 0] if east_open else cell)
    with pytest.raises(ValueError):
        ml.step_pose(maze, cell, 4)


def test_maze_is_connected_with_loops_and_closed_borders():
    for seed in range(5):
        maze = ml.generate_maze(np.random.default_rng(seed))
        walls = maze.walls
        assert walls[0].all() and walls[-1].all() and walls[:, 0].all() and walls[:, -1].all()
        start = (1, 1)
        seen, queue = {start}, deque([start])
        while queue:
            r, c = queue.popleft()
            for dr, dc in ((0, 1), (1, 0), (0, -1), (-1, 0)):
                if walls[r + dr, c + dc] == 0 and (r + dr, c + dc) not in seen:
                    seen.add((r + dr, c + dc))
                    queue.append((r + dr, c + dc))
        assert all((2 * r + 1, 2 * c + 1) in seen for r in range(7) for c in range(7))
        passages = int((walls == 0).sum()) - 49
        assert passages > 48  # a spanning tree of 49 cells has 48 passages: extra ones make loops
        assert set(np.unique(walls)) <= set(range(ml.NUM_MATERIALS + 1))


def test_agent_only_walks_open_corridors_and_revisits(trajectory):
    poses, actions = trajectory['poses'], trajectory['actions']
    assert actions[0] == ml.NOOP and set(np.unique(actions)) <= {0, 1, 2, 3}
    moved = np.any(poses[1:, :2] != poses[:-1, :2], axis=1)
    np.testing.assert_array_equal(moved, actions[1:] == ml.FORWARD)  # no forward step is ever blocked
    position = np.floor(ml.pose_position(poses)).astype(int)
    assert (trajectory['maze_walls'][position[:, 0], position[:, 1]] == 0).all()
    long = ml.make_trajectory(3, 300)
    assert ml.revisit_mask(long['poses']).mean() > 0.05


def test_revisit_helpers_and_identical_frames(trajectory):
    poses = np.array([[2, 2, 0], [2, 3, 0], [2, 2, 0], [2, 2, 1], [2, 3, 0], [1, 2, 0]])
    np.testing.assert_array_equal(ml.first_visit_index(poses), [0, 1, 0, 3, 1, 5])
    np.testing.assert_array_equal(ml.revisit_mask(poses), [False, False, True, False, True, False])
    # block-level: position (1, 2) = block coordinates (1.0, 1.5) lies in block (1, 1) like (2, 2)
    np.testing.assert_array_equal(ml.revisit_mask(poses, exact=False), [False, False, True, False, True, True])
    first = ml.first_visit_index(trajectory['poses'])
    video = trajectory['video']
    np.testing.assert_array_equal(video, video[first])  # a pose seen again renders the same bytes


def test_the_validation_split_is_its_own_and_disjoint_from_the_test_split(tmp_path):
    """num_valid writes `valid/`, drawn from its own seed stream: no maze and no trajectory of it is one of the test
    split's (nor the training split's), so choosing settings on it never looks at the test videos."""
    ml.write_dataset(tmp_path, 4, 6, length=16, seed=3, workers=1, num_valid=6, progress=False)
    splits = {split: [ml.load_trajectory(p)[1] for p in sorted((tmp_path / split).rglob('*.npz'))]
              for split in ('train', 'test', 'valid')}
    assert [len(splits[s]) for s in ('train', 'test', 'valid')] == [4, 6, 6]
    mazes = {s: {t['maze_walls'].tobytes() for t in splits[s]} for s in splits}
    assert len(mazes['valid']) == 6 and not mazes['valid'] & mazes['test'] and not mazes['valid'] & mazes['train']
    videos = {s: {t['video'].tobytes() for t in splits[s]} for s in splits}
    assert not videos['valid'] & videos['test']
    expected = ml.make_trajectory(ml.trajectory_seed(3, 'valid', 5), 16)
    np.testing.assert_array_equal(splits['valid'][5]['video'], expected['video'])
    assert ml.trajectory_seed(3, 'valid', 5) != ml.trajectory_seed(3, 'test', 5)
    assert open_dataset(tmp_path, 'valid', seq_len=16, batch_size=2).info.num_videos == 6


def test_written_dataset_loads_and_rebuilds_mazes(tmp_path):
    stats = ml.write_dataset(tmp_path / 'a', 3, 2, length=12, seed=5, workers=2, files_per_shard=2,
                             progress=False)
    assert stats['frames'] == 60
    ml.write_dataset(tmp_path / 'b', 3, 2, length=12, seed=5, workers=1, progress=False)
    maze, arrays = ml.load_trajectory(ml.trajectory_path(tmp_path / 'a', 'train', 2, 2))
    _, same = ml.load_trajectory(ml.trajectory_path(tmp_path / 'b', 'train', 2, 100))
    for key in arrays:  # worker count and sharding do not change the data
        np.testing.assert_array_equal(arrays[key], same[key])
    expected = ml.make_trajectory(ml.trajectory_seed(5, 'train', 2), 12)
    np.testing.assert_array_equal(arrays['video'], expected['video'])
    np.testing.assert_array_equal(ml.render(maze, arrays['poses'][5]), arrays['video'][5])
    resumed = ml.write_dataset(tmp_path / 'a', 3, 2, length=12, seed=5, workers=1, files_per_shard=2, progress=False)
    assert resumed['frames'] == 0  # finished files are kept
    with pytest.raises(ValueError, match='files_per_shard'):
        ml.write_dataset(tmp_path / 'a', 3, 2, length=12, seed=5, workers=1, progress=False)

    ds = open_dataset(tmp_path / 'a', 'test', seq_len=12, batch_size=2, process_index=0, process_count=1)
    assert ds.info.action_dim == ml.ACTION_DIM and ds.info.frame_shape == (64, 64, 3)
    (batch,) = list(ds)
    test0 = ml.load_trajectory(ds.locate(int(batch['index'][0])))[1]
    np.testing.assert_allclose(batch['frames'][0], test0['video'] / 127.5 - 1, atol=1e-6)
    np.testing.assert_array_equal(batch['actions'][0], test0['actions'])

    sheet = ml.contact_sheet([arrays['video'], same['video']], tmp_path / 'sheet.png', frames_per_row=4,
                             stride=3, scale=1)
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(tmp_path / 'sheet.png')), sheet)
    assert sheet.shape == (2 * 66, 4 * 66, 3)
    np.testing.assert_array_equal(sheet[1:65, 66 + 1:66 + 65], arrays['video'][3])
