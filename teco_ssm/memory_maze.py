"""Memory Maze (Pasukonis et al. 2022) trajectories generated locally, in the npz layout MazeLab writes.

Memory Maze is a 3D first-person benchmark built on MuJoCo (`dm_control`): mazes of 9x9 to 15x15 cells with
rooms and corridors, 64x64 frames whose border shows the colour of the current target, and 6 discrete actions
at 4 steps per second. It is installed with the optional extra `pip install -e '.[memory-maze]'`, which pins
versions that work together (`EXTRA` below), and renders headless with `MUJOCO_GL=egl` (Mesa's software EGL
on a CPU machine) or `MUJOCO_GL=osmesa`.

Actions (ACTION_DIM = 6, the package's discrete action set); actions[t] moves frame t-1 to frame t and
actions[0] is NOOP:
  0 NOOP, 1 FORWARD, 2 LEFT, 3 RIGHT, 4 FORWARD_LEFT, 5 FORWARD_RIGHT

The agent is this project's scripted explorer, not the policy behind the published offline dataset: it reads
the environment's global observables (maze layout, position, direction), repeatedly picks a random cell (half
of the time one it has visited) and walks the shortest path there, with short pauses and glances, so a
trajectory comes back to places it saw long before, as MazeLab's agent does.

Coordinates are those of the package's global observables: cell (row, col) of `maze_layout`, row 0 at the
bottom; a position (row, col) float lies in cell (floor(row), floor(col)); an angle is counter-clockwise from
the +col axis seen from above, so LEFT increases it.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import io
import json
import logging
import multiprocessing
import os
import time
from collections import deque
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from teco_ssm import mazelab
from teco_ssm.data.formats import PARTIAL_SUFFIX  # a file being written; the loaders refuse it

NOOP, FORWARD, LEFT, RIGHT, FORWARD_LEFT, FORWARD_RIGHT = range(6)
ACTION_DIM = 6
ACTION_NAMES = ('noop', 'forward', 'left', 'right', 'forward_left', 'forward_right')
IMAGE_SIZE = 64
NUM_HEADINGS = 8               # pose headings: the angle rounded to 45 degrees
MAZE_SIZES = {9: 'memory_maze_9x9', 11: 'memory_maze_11x11', 13: 'memory_maze_13x13', 15: 'memory_maze_15x15'}
EPISODE_STEPS = {9: 1000, 11: 2000, 13: 3000, 15: 4000}   # the package's time limits at 4 steps per second
EXTRA = {'memory-maze': '1.0.3', 'dm-control': '1.0.50', 'mujoco': '3.17.0', 'gym': '0.26.2'}
INSTALL = "pip install -e '.[memory-maze]'"


def _import(module: str) -> Any:
    """Imports a module of the extra without the notice gym 0.26 prints to stderr on import (that it is
    unmaintained; memory_maze imports it only to register gym environments, which this module does not use)."""
    with contextlib.redirect_stderr(io.StringIO()):
        return importlib.import_module(module)


class MemoryMazeUnavailable(RuntimeError):
    """The memory-maze extra is not installed, or MuJoCo cannot render here; the message says what to install."""


def _problem() -> Optional[str]:
    """Why Memory Maze cannot run in this process (a package of the extra missing, MuJoCo 4.x, which breaks
    dm-control 1.0.50, or a `MUJOCO_GL` backend that cannot be loaded or open a context), or None when it can.
    Imports MuJoCo and its GL backend: call it in a child process (see `check_available`)."""
    os.environ.setdefault('MUJOCO_GL', 'egl')
    backend = os.environ['MUJOCO_GL']
    pins = ', '.join(f'{k} {v}' for k, v in EXTRA.items())
    missing = f'Memory Maze needs the optional memory-maze extra ({pins}): {INSTALL}'
    no_gl = (f'Memory Maze renders with MuJoCo, and its MUJOCO_GL={backend} backend does not work here. Install EGL '
             '(Debian: apt-get install libegl1 libegl-mesa0 libgl1-mesa-dri) and set MUJOCO_GL=egl, or OSMesa '
             '(apt-get install libosmesa6) and set MUJOCO_GL=osmesa')
    try:
        version = importlib.metadata.version('mujoco')
    except importlib.metadata.PackageNotFoundError:
        version = None
    if version is not None and int(version.split('.')[0]) >= 4:
        return f'mujoco {version} breaks dm-control 1.0.50: {missing}'
    for module in ('mujoco', 'dm_control', 'gym', 'memory_maze.tasks'):
        try:
            _import(module)
        except ModuleNotFoundError as error:
            return f'{missing} ({error})'
        except Exception as error:  # MuJoCo and dm_control load the GL backend when imported
            return f'{no_gl} (importing {module}: {type(error).__name__}: {error})'
    try:
        import mujoco

        context = mujoco.GLContext(8, 8)
        context.make_current()
        context.free()
    except Exception as error:
        return f'{no_gl} (opening a context: {type(error).__name__}: {error})'
    return None


def check_available() -> None:
    """Checks, in a child process, that the extra's packages import and that MuJoCo can render here.

    The check and the generation run in child processes because MuJoCo's Mesa GL backend and TensorFlow crash
    each other in one process (either import order), and the caller of this module usually goes on to train.

    Raises:
      MemoryMazeUnavailable: with one message naming what to install.
    """
    with _pool(1) as pool:
        problem = pool.apply(_problem)
    if problem:
        raise MemoryMazeUnavailable(problem)


def _pool(workers: int):
    return multiprocessing.get_context('spawn').Pool(workers)


# ------------------------------------------------------------------------------------------- explorer

def shortest_path(layout: np.ndarray, start: tuple[int, int], goal: tuple[int, int]) -> list[tuple[int, int]]:
    """Open cells (row, col) from start to goal, both included, by breadth-first search over `layout` (n, n)
    uint8 (1 open). Raises ValueError when goal cannot be reached."""
    rows, cols = layout.shape
    is_open = lambda r, c: 0 <= r < rows and 0 <= c < cols and bool(layout[r, c])
    return mazelab.grid_shortest_path(is_open, start, goal)


def _wrap(angle: float) -> float:
    return float((angle + np.pi) % (2 * np.pi) - np.pi)


class Explorer:
    """The scripted agent: walks shortest paths between random cells of a known layout.

    Args:
      layout: (n, n) uint8, 1 where a cell is open (the `maze_layout` observable).
      rng: the only source of randomness.
      return_prob: chance that a new goal is a cell visited before (revisits) rather than any open cell.
      pause_prob, glance_prob: chance per step of 1-3 NOOPs, or of turning away 1-3 steps and back.
    """

    STUCK_STEPS = 6        # moving forward this many steps with less than STUCK_DISTANCE cells of progress:
    STUCK_DISTANCE = 0.05  # stuck on a wall corner; turn away and retry

    def __init__(self, layout: np.ndarray, rng: np.random.Generator, *, return_prob: float = 0.5,
                 pause_prob: float = 0.03, glance_prob: float = 0.03):
        self.layout = np.asarray(layout)
        self.rng = rng
        self.return_prob, self.pause_prob, self.glance_prob = return_prob, pause_prob, glance_prob
        self.open_cells = [tuple(int(v) for v in c) for c in np.argwhere(self.layout > 0)]
        self._open = set(self.open_cells)
        self.visited: list[tuple[int, int]] = []
        self.goal: Optional[tuple[int, int]] = None
        self.queue: deque[int] = deque()
        self.positions: deque[np.ndarray] = deque(maxlen=self.STUCK_STEPS + 1)
        self.actions: deque[int] = deque(maxlen=self.STUCK_STEPS)

    def _cell(self, position: np.ndarray) -> tuple[int, int]:
        cell = (int(np.floor(position[0])), int(np.floor(position[1])))
        if cell in self._open:
            return cell
        # on a cell boundary the floor can name a wall cell: take the nearest open cell centre
        centres = np.asarray(self.open_cells) + 0.5
        return self.open_cells[int(np.argmin(((centres - position) ** 2).sum(1)))]

    def act(self, position: np.ndarray, angle: float) -> int:
        """The next action from position (2,) (row, col) float and angle (radians)."""
        position = np.asarray(position, np.float64)
        self.positions.append(position)
        cell = self._cell(position)
        if cell not in self.visited:
            self.visited.append(cell)
        action = self.queue.popleft() if self.queue else self._choose(cell, position, angle)
        self.actions.append(action)
        return action

    def _choose(self, cell: tuple[int, int], position: np.ndarray, angle: float) -> int:
        stuck = (len(self.actions) == self.STUCK_STEPS
                 and all(a in (FORWARD, FORWARD_LEFT, FORWARD_RIGHT) for a in self.actions)
                 and np.abs(self.positions[-1] - self.positions[0]).max() < self.STUCK_DISTANCE)
        if stuck:
            turn = int(self.rng.choice([LEFT, RIGHT]))
            self.queue.extend([turn] * int(self.rng.integers(2, 5)) + [FORWARD] * 2)
        elif self.rng.random() < self.pause_prob:
            self.queue.extend([NOOP] * int(self.rng.integers(1, 4)))
        elif self.rng.random() < self.glance_prob:
            turn, turns = int(self.rng.choice([LEFT, RIGHT])), int(self.rng.integers(1, 4))
            self.queue.extend([turn] * turns + [LEFT + RIGHT - turn] * turns)
        if self.queue:
            return self.queue.popleft()

        while self.goal is None or self.goal == cell:
            pool = self.visited if len(self.visited) > 1 and self.rng.random() < self.return_prob else self.open_cells
            self.goal = pool[int(self.rng.integers(len(pool)))]
        path = shortest_path(self.layout, cell, self.goal)
        step = np.subtract(path[1], cell)
        far = 1                    # aim at the last cell of the straight stretch ahead (up to 3 cells)
        while far + 1 < len(path) and far < 3 and tuple(np.subtract(path[far + 1], path[far])) == tuple(step):
            far += 1
        offset = position - (np.asarray(cell) + 0.5)
        lateral = offset[1] if step[0] else offset[0]  # across the direction of travel
        target = np.asarray(path[far]) + 0.5
        if abs(lateral) > 0.25:    # off the corridor's centre line: back to the cell centre before turning off
            target = np.asarray(cell) + 0.5
        error = _wrap(np.arctan2(target[0] - position[0], target[1] - position[1]) - angle)
        if abs(error) > np.radians(50):
            return LEFT if error > 0 else RIGHT
        if abs(error) > np.radians(15):
            return FORWARD_LEFT if error > 0 else FORWARD_RIGHT
        return FORWARD


# ------------------------------------------------------------------------------------------- trajectories

def _environment(maze_size: int, seed: int):
    os.environ.setdefault('MUJOCO_GL', 'egl')
    tasks = _import('memory_maze.tasks')
    return getattr(tasks, MAZE_SIZES[maze_size])(global_observables=True, seed=seed)


def _state(observation: dict[str, Any]) -> tuple[np.ndarray, float]:
    """Position (row, col) and angle of the package's agent_pos (x, y) and agent_dir (dx, dy)."""
    x, y = observation['agent_pos']
    dx, dy = observation['agent_dir']
    return np.asarray([y, x], np.float64), float(np.arctan2(dy, dx))


def heading_index(angle: np.ndarray) -> np.ndarray:
    """Angles (radians) -> int32 headings in [0, NUM_HEADINGS): the angle rounded to a multiple of 45 degrees."""
    return (np.round(np.asarray(angle) / (2 * np.pi / NUM_HEADINGS)) % NUM_HEADINGS).astype(np.int32)


def trajectory_seeds(seed: Sequence[int]) -> tuple[int, np.random.Generator]:
    """The environment's seed (maze, targets, start) and the explorer's generator for a trajectory seed."""
    sequence = np.random.SeedSequence([int(s) for s in seed])
    env_seed, agent = sequence.spawn(2)
    return int(env_seed.generate_state(1)[0] % 2 ** 31), np.random.default_rng(agent)


def _check_request(maze_size: int, length: int) -> None:
    if maze_size not in MAZE_SIZES:
        raise ValueError(f'maze size {maze_size} not one of {sorted(MAZE_SIZES)}')
    if not 1 <= length <= EPISODE_STEPS[maze_size]:
        raise ValueError(f'length {length} outside [1, {EPISODE_STEPS[maze_size]}] (a {maze_size}x{maze_size} '
                         'Memory Maze episode)')


def make_trajectory(seed: Sequence[int] | int, length: int, maze_size: int = 9) -> dict[str, np.ndarray]:
    """One trajectory of the explorer in a fresh Memory Maze, fully determined by `seed`.

    Imports MuJoCo with its GL backend, after which this process cannot use TensorFlow (see `check_available`);
    `write_dataset` calls it in child processes.

    Returns:
      video (T, 64, 64, 3) uint8; actions (T,) int32 in [0, 6), actions[0] NOOP; poses (T, 3) int32 (row, col,
      heading): the cell and the angle in 45-degree steps (`heading_index`); position (T, 2) float32 (row, col)
      and angle (T,) float32 radians, as the environment reported them; maze_layout (n, n) uint8 (1 open, row 0
      at the bottom); seed (k,) int64.
    Raises:
      ValueError: an unknown maze size, or a length beyond the package's episode (EPISODE_STEPS).
    """
    _check_request(maze_size, length)
    seed_array = np.atleast_1d(np.asarray(seed, np.int64))
    env_seed, rng = trajectory_seeds(seed_array)
    env = _environment(maze_size, env_seed)
    absl_logger = logging.getLogger('absl')
    level = absl_logger.level
    try:
        absl_logger.setLevel(logging.ERROR)  # dm_control warns on every reset that the walker has no free joint
        observation = env.reset().observation
        absl_logger.setLevel(level)
        layout = np.asarray(observation['maze_layout'], np.uint8).copy()
        explorer = Explorer(layout, rng)
        video = np.empty((length, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
        actions = np.zeros(length, np.int32)
        position = np.empty((length, 2), np.float64)
        angle = np.empty(length, np.float64)
        for t in range(length):
            if t:
                actions[t] = explorer.act(position[t - 1], angle[t - 1])
                observation = env.step(actions[t]).observation
            video[t] = observation['image']
            position[t], angle[t] = _state(observation)
    finally:
        absl_logger.setLevel(level)
        env.close()
    cells = np.floor(position).astype(np.int32)
    poses = np.concatenate([cells, heading_index(angle)[:, None]], 1).astype(np.int32)
    return {'video': video, 'actions': actions, 'poses': poses, 'position': position.astype(np.float32),
            'angle': angle.astype(np.float32), 'maze_layout': layout, 'seed': seed_array}


# ------------------------------------------------------------------------------------------- dataset



def _write_one(task: tuple[str, str, int, int, int, int, int]) -> tuple[int, float]:
    root, split, index, seed, length, maze_size, files_per_shard = task
    path = mazelab.trajectory_path(Path(root), split, index, files_per_shard)
    if path.exists():
        return 0, 0.0
    start = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    trajectory = make_trajectory(mazelab.trajectory_seed(seed, split, index), length, maze_size)
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    mazelab.save_npz(partial, trajectory)
    os.replace(partial, path)
    return length, time.perf_counter() - start


def write_dataset(root: str | os.PathLike, num_train: int, num_test: int, length: int = 300, seed: int = 0, *,
                  maze_size: int = 9, workers: int = 2, files_per_shard: int = 100,
                  progress: bool = True) -> dict[str, float]:
    """Writes `<root>/{train,test}/<shard>/<index>.npz` Memory Maze trajectories and `<root>/metadata.json`.

    Trajectory i of a split uses seed (seed, split, i) (`mazelab.trajectory_seed`), so the files do not depend on
    the worker count. Each file is written under a `.partial` name and renamed when complete; finished files are
    kept and leftover `.partial` files deleted, so an interrupted run resumes where it stopped.

    Returns:
      {'seconds', 'frames', 'frames_per_second', 'frames_per_second_per_worker'} for the files written now (the
      last: frames over the seconds the workers spent generating them).
    Raises:
      MemoryMazeUnavailable: before any work, when the extra or a rendering backend is missing.
      ValueError: an unknown maze size, a length beyond the episode, or a dataset at `root` made with another
        seed, length, maze size or sharding.
    """
    _check_request(maze_size, length)
    root = Path(root)
    meta = {'generator': 'teco_ssm.memory_maze', 'action_dim': ACTION_DIM, 'action_names': list(ACTION_NAMES),
            'image_size': IMAGE_SIZE, 'video_length': length, 'seed': seed, 'num_train': num_train,
            'num_test': num_test, 'maze_size': maze_size, 'num_headings': NUM_HEADINGS,
            'files_per_shard': files_per_shard}
    meta_path = root / 'metadata.json'
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        clash = {k: (old.get(k), meta[k]) for k in ('generator', 'seed', 'video_length', 'maze_size',
                                                     'files_per_shard') if old.get(k) != meta[k]}
        if clash:
            raise ValueError(f'{meta_path}: existing dataset differs from this request (stored, asked): {clash}')
    tasks = [(str(root), split, i, seed, length, maze_size, files_per_shard)
             for split, count in (('train', num_train), ('test', num_test)) for i in range(count)
             if not mazelab.trajectory_path(root, split, i, files_per_shard).exists()]
    from tqdm import tqdm

    # every trajectory is made in a child process, even with one worker (see check_available)
    with _pool(max(1, min(workers, len(tasks)))) as pool:
        problem = pool.apply(_problem)
        if problem:
            raise MemoryMazeUnavailable(problem)
        root.mkdir(parents=True, exist_ok=True)
        meta['versions'] = {name: importlib.metadata.version(name) for name in EXTRA}
        tmp = meta_path.with_name(meta_path.name + PARTIAL_SUFFIX)
        tmp.write_text(json.dumps(meta, indent=2))
        os.replace(tmp, meta_path)
        for split in ('train', 'test'):
            for stale in (root / split).rglob(f'*{PARTIAL_SUFFIX}'):
                stale.unlink()
        start = time.perf_counter()
        frames, busy = 0, 0.0
        bar = tqdm(total=len(tasks) * length, desc=f'memory maze {maze_size}x{maze_size}', unit='frame',
                   disable=not progress, smoothing=0.1)
        for written, seconds in pool.imap_unordered(_write_one, tasks, chunksize=1):
            frames, busy = frames + written, busy + seconds
            bar.update(written)
    bar.close()
    seconds = time.perf_counter() - start
    return {'seconds': seconds, 'frames': frames, 'frames_per_second': frames / max(seconds, 1e-9),
            'frames_per_second_per_worker': frames / max(busy, 1e-9)}


def load_trajectory(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays (video, actions, poses, position, angle, maze_layout, seed) of a Memory Maze npz file."""
    with np.load(path) as data:
        return {k: data[k] for k in data.files}
