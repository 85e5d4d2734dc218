"""MazeLab: procedural first-person 3D mazes, a long-range video benchmark generated with NumPy.

A maze is a 7x7 grid of cells laid out on a 15x15 block map (cells at odd coordinates, walls one block
thick), carved by a randomised depth-first search with a few extra openings so that it has loops. Each
maze has its own colours: a base wall material (bricks), a few accent materials (stripes, a disc) on
scattered wall blocks that act as landmarks, a two-tone tiled floor and a ceiling.

Poses live on a lattice, so a pose seen twice renders the same frame byte for byte:
  pose = (row, col, heading) int32; the camera stands at block coordinates (row / 2 + 0.5, col / 2 + 0.5)
  (half-block steps) and looks along angle heading * 30 degrees (0: east (+col), 3: south (+row)).

Actions (ACTION_DIM = 4); actions[t] moves frame t-1 to frame t, actions[0] is NOOP:
  0 NOOP     stay
  1 FORWARD  half a block along the heading; only along a corridor axis (heading a multiple of 90
             degrees, standing on the corridor's centre line) and into an open block, else stay
  2 LEFT     turn 30 degrees counter-clockwise seen from above
  3 RIGHT    turn 30 degrees clockwise

The agent repeatedly picks a random cell and walks the shortest path to it (turning on the spot at
block centres, with short pauses and glances), so a 300-frame trajectory comes back to places seen
long before. Frames are rendered by vectorised ray casting (DDA on the block map) with textured walls,
floor and ceiling casting and distance shading, using only IEEE-exact arithmetic per pixel so that any
batch of poses renders the same bytes as the poses one by one.
"""
from __future__ import annotations

import colorsys
import dataclasses
import json
import multiprocessing
import os
import time
import zipfile
from collections import deque
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np

from teco_ssm.data.formats import PARTIAL_SUFFIX

NUM_CELLS = 7
NUM_BLOCKS = 2 * NUM_CELLS + 1
STEPS_PER_BLOCK = 2          # forward moves 1 / STEPS_PER_BLOCK of a block
TURNS_PER_QUARTER = 3        # a quarter turn takes this many LEFT/RIGHT actions (30 degrees each)
NUM_HEADINGS = 4 * TURNS_PER_QUARTER
IMAGE_SIZE = 64
PLANE = 1.0                  # tan(horizontal FOV / 2): 90 degrees, as in DMLab
FOG_DISTANCE = 5.0           # blocks at which distance shading halves brightness
NOOP, FORWARD, LEFT, RIGHT = 0, 1, 2, 3
ACTION_DIM = 4
ACTION_NAMES = ('noop', 'forward', 'left', 'right')
NUM_MATERIALS = 4            # 1: base bricks; 2, 3: stripes, disc (landmarks); 4: bricks in a second colour
_AXIS_STEPS = ((0, 1), (1, 0), (0, -1), (-1, 0))  # (d_row, d_col) for headings 0, 3, 6, 9

SeedLike = Union[int, Sequence[int]]


@dataclasses.dataclass(frozen=True)
class Maze:
    """One maze and its look.

    Attributes:
      walls: (15, 15) uint8 block map; 0 open, k in 1..4 wall of material k.
      wall_colors: (5, 3) uint8, row k the colour of material k (row 0 unused).
      accent_colors: (5, 3) uint8, second colour of each material (disc, stripes).
      floor_colors: (2, 3) uint8 checker tiles.
      ceiling_color: (3,) uint8.
      fog_color: (3,) uint8 colour that far surfaces fade to.
    """

    walls: np.ndarray
    wall_colors: np.ndarray
    accent_colors: np.ndarray
    floor_colors: np.ndarray
    ceiling_color: np.ndarray
    fog_color: np.ndarray

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The maze as `maze_*` arrays (what trajectory npz files store)."""
        return {f'maze_{f.name}': getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_arrays(cls, arrays) -> 'Maze':
        """Inverse of `to_arrays`; accepts a dict or an open npz file."""
        return cls(**{f.name: np.asarray(arrays[f'maze_{f.name}']) for f in dataclasses.fields(cls)})

    def is_open(self, row: int, col: int) -> bool:
        return 0 <= row < NUM_BLOCKS and 0 <= col < NUM_BLOCKS and self.walls[row, col] == 0


# --------------------------------------------------------------------------------------- generation

def _rgb(h: float, s: float, v: float) -> np.ndarray:
    return np.asarray([round(255 * c) for c in colorsys.hsv_to_rgb(h % 1.0, s, v)], np.uint8)


def generate_maze(rng: np.random.Generator, *, extra_openings: int = 5, landmark_fraction: float = 0.2) -> Maze:
    """A random 7x7 maze with loops and per-maze colours.

    Args:
      rng: the only source of randomness.
      extra_openings: walls between adjacent cells removed after carving (loops).
      landmark_fraction: share of wall blocks given an accent material.
    """
    walls = np.ones((NUM_BLOCKS, NUM_BLOCKS), np.uint8)
    visited = np.zeros((NUM_CELLS, NUM_CELLS), bool)
    start = (int(rng.integers(NUM_CELLS)), int(rng.integers(NUM_CELLS)))
    stack = [start]
    visited[start] = True
    walls[2 * start[0] + 1, 2 * start[1] + 1] = 0
    while stack:
        r, c = stack[-1]
        options = [(r + dr, c + dc) for dr, dc in _AXIS_STEPS
                   if 0 <= r + dr < NUM_CELLS and 0 <= c + dc < NUM_CELLS and not visited[r + dr, c + dc]]
        if not options:
            stack.pop()
            continue
        nr, nc = options[int(rng.integers(len(options)))]
        visited[nr, nc] = True
        walls[r + nr + 1, c + nc + 1] = 0          # the block between the two cells
        walls[2 * nr + 1, 2 * nc + 1] = 0
        stack.append((nr, nc))
    inner = [(r, c) for r in range(1, NUM_BLOCKS - 1) for c in range(1, NUM_BLOCKS - 1)
             if walls[r, c] and (r % 2) != (c % 2)]   # walls separating two cells
    for i in rng.permutation(len(inner))[:extra_openings]:
        walls[inner[i]] = 0
    solid = walls > 0
    material = np.where(rng.random(walls.shape) < landmark_fraction,
                        rng.integers(2, NUM_MATERIALS + 1, walls.shape), 1)
    walls = np.where(solid, material, 0).astype(np.uint8)

    hue = rng.random()
    wall_colors = np.stack([np.zeros(3, np.uint8), _rgb(hue, 0.35 + 0.3 * rng.random(), 0.75 + 0.2 * rng.random())]
                           + [_rgb(hue + 0.25 * k + 0.1 * rng.random(), 0.6, 0.85) for k in range(1, NUM_MATERIALS)])
    accent_colors = np.stack([np.zeros(3, np.uint8)] + [_rgb(hue + 0.5 + 0.2 * rng.random(), 0.7, 0.95)
                                                         for _ in range(NUM_MATERIALS)])
    floor_hue = hue + 0.3 + 0.4 * rng.random()
    floor_colors = np.stack([_rgb(floor_hue, 0.3, 0.55), _rgb(floor_hue, 0.3, 0.4)])
    ceiling_color = _rgb(hue + 0.5 * rng.random(), 0.25, 0.8)
    fog_color = _rgb(hue, 0.2, 0.12)
    return Maze(walls, wall_colors, accent_colors, floor_colors, ceiling_color, fog_color)


# -------------------------------------------------------------------------------------------- poses

def pose_position(poses: np.ndarray) -> np.ndarray:
    """(..., 2) float64 (row, col) block coordinates of poses (..., 3)."""
    return np.asarray(poses)[..., :2] / STEPS_PER_BLOCK + 0.5


def step_pose(maze: Maze, pose: Sequence[int], action: int) -> np.ndarray:
    """The pose (3,) int32 after one action (see the module docstring for the rules)."""
    row, col, heading = (int(x) for x in pose)
    if action == LEFT:
        heading = (heading - 1) % NUM_HEADINGS
    elif action == RIGHT:
        heading = (heading + 1) % NUM_HEADINGS
    elif action == FORWARD and heading % TURNS_PER_QUARTER == 0:
        d_row, d_col = _AXIS_STEPS[heading // TURNS_PER_QUARTER]
        lateral = col if d_row else row
        if lateral % STEPS_PER_BLOCK == 0:           # on the corridor's centre line
            new_row, new_col = row + d_row, col + d_col
            # the body (radius half a step) must fit in an open block
            front = np.floor((np.array([new_row, new_col]) + 0.5 * np.array([d_row, d_col])) / STEPS_PER_BLOCK + 0.5)
            if maze.is_open(int(front[0]), int(front[1])):
                row, col = new_row, new_col
    elif action not in (NOOP, FORWARD):
        raise ValueError(f'action {action} outside [0, {ACTION_DIM})')
    return np.asarray([row, col, heading], np.int32)


def rollout_poses(maze: Maze, start_pose: Sequence[int], actions: Sequence[int]) -> np.ndarray:
    """Poses (T, 3) int32 of an action sequence (T,): poses[0] = start_pose, poses[t] = step(poses[t-1], actions[t])."""
    actions = np.asarray(actions)
    poses = np.empty((len(actions), 3), np.int32)
    poses[0] = start_pose
    for t in range(1, len(actions)):
        poses[t] = step_pose(maze, poses[t - 1], int(actions[t]))
    return poses


def first_visit_index(poses: np.ndarray, *, exact: bool = True) -> np.ndarray:
    """(T,) int: for each frame, the first frame with the same pose (its own index if new).

    exact=True compares lattice poses (equal poses give byte-identical frames); exact=False compares the
    block the camera stands in plus the heading.
    """
    poses = np.asarray(poses)
    keys = poses if exact else np.concatenate([np.floor(pose_position(poses)).astype(np.int64), poses[:, 2:]], 1)
    first: dict[tuple[int, ...], int] = {}
    return np.asarray([first.setdefault(tuple(int(v) for v in k), t) for t, k in enumerate(keys)], np.int64)


def revisit_mask(poses: np.ndarray, *, exact: bool = True) -> np.ndarray:
    """(T,) bool: True where the frame's pose was already seen earlier in the trajectory."""
    return first_visit_index(poses, exact=exact) < np.arange(len(poses))


# ------------------------------------------------------------------------------------------ render

def _ray_table(width: int) -> np.ndarray:
    """(NUM_HEADINGS, width, 2) float64 (d_row, d_col) ray directions; the forward component is 1."""
    angles = np.arange(NUM_HEADINGS) * (2 * np.pi / NUM_HEADINGS)
    forward = np.stack([np.sin(angles), np.cos(angles)], -1)          # (d_row, d_col)
    forward = np.where(np.abs(forward) < 1e-12, 0.0, forward)
    right = np.stack([forward[:, 1], -forward[:, 0]], -1)             # forward turned 90 degrees clockwise
    screen = (2 * (np.arange(width) + 0.5) / width - 1) * PLANE       # (width,)
    return forward[:, None, :] + screen[None, :, None] * right[:, None, :]


def _cast(walls: np.ndarray, origin: np.ndarray, rays: np.ndarray):
    """DDA ray casting on the block map.

    Args:
      walls: (15, 15) uint8.
      origin: (R, 2) float64 (row, col) ray origins.
      rays: (R, 2) float64 (d_row, d_col) directions, forward component 1 (distances are perpendicular).
    Returns:
      distance (R,) float64 perpendicular distance to the wall hit; side (R,) bool, True when the wall
      face is perpendicular to the row axis; u (R,) float64 in [0, 1) along the face; block (R, 2) int64.
    """
    with np.errstate(divide='ignore'):
        delta = np.where(rays == 0, np.inf, np.abs(1.0 / np.where(rays == 0, 1.0, rays)))
    block = np.floor(origin).astype(np.int64)
    step = np.where(rays < 0, -1, 1)
    side_dist = np.where(rays < 0, (origin - block) * delta, (block + 1.0 - origin) * delta)
    side_dist = np.where(rays == 0, np.inf, side_dist)
    hit = np.zeros(len(rays), bool)
    hit_side = np.zeros(len(rays), bool)  # True: crossed a row boundary last
    for _ in range(2 * NUM_BLOCKS):
        cross_row = side_dist[:, 0] < side_dist[:, 1]
        move = ~hit
        axis = np.where(cross_row, 0, 1)
        rows = np.arange(len(rays))
        side_dist[rows[move], axis[move]] += delta[rows[move], axis[move]]
        block[rows[move], axis[move]] += step[rows[move], axis[move]]
        hit_side = np.where(move, cross_row, hit_side)
        clipped = np.clip(block, 0, NUM_BLOCKS - 1)
        hit |= walls[clipped[:, 0], clipped[:, 1]] > 0
        if hit.all():
            break
    axis = np.where(hit_side, 0, 1)
    rows = np.arange(len(rays))
    distance = side_dist[rows, axis] - delta[rows, axis]
    other = 1 - axis
    along = origin[rows, other] + distance * rays[rows, other]
    u = along - np.floor(along)
    return distance, hit_side, u, block


def render_poses(maze: Maze, poses: np.ndarray, *, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """First-person frames (N, image_size, image_size, 3) uint8 of poses (N, 3) int.

    Each frame depends on its own pose only: rendering a batch equals rendering the poses one by one.
    """
    poses = np.asarray(poses, np.int64).reshape(-1, 3)
    n, size = len(poses), image_size
    table = _ray_table(size)
    rays = table[poses[:, 2] % NUM_HEADINGS]                                   # (N, W, 2)
    origin = pose_position(poses)                                             # (N, 2)
    distance, side, u, block = _cast(maze.walls, np.repeat(origin, size, 0), rays.reshape(-1, 2))
    distance, side, u = distance.reshape(n, 1, size), side.reshape(n, 1, size), u.reshape(n, 1, size)
    block = block.reshape(n, size, 2)
    material = maze.walls[np.clip(block[..., 0], 0, NUM_BLOCKS - 1), np.clip(block[..., 1], 0, NUM_BLOCKS - 1)]

    # per pixel: a palette entry and a brightness; rgb = palette * brightness * light + fog * (1 - light)
    f32 = np.float32
    screen = (2 * (np.arange(size, dtype=f32) + 0.5) / size - 1).reshape(1, size, 1)   # -1 top .. 1 bottom
    dist32 = distance.astype(f32)
    is_wall = np.abs(screen) <= f32(0.5) / (dist32 * f32(PLANE))                        # (N, H, W)
    is_floor = screen > 0

    # walls: u across the face, v down from the top; bricks, stripes, a framed disc
    u32 = u.astype(f32)
    v = f32(0.5) + screen * dist32 * f32(PLANE)
    mat = material[:, None, :]
    v4 = v * f32(4)
    brick_row = np.floor(v4)
    brick_u = (u32 + f32(0.25) * _parity(brick_row)) * f32(2)
    brick_col = np.floor(brick_u)
    mortar = ((v4 - brick_row) < f32(0.12)) | ((brick_u - brick_col) < f32(0.08))
    brick_id = _parity(brick_col + brick_row + ((block[..., 0] + block[..., 1]) % 2)[:, None, :].astype(f32))
    bricks = (mat == 1) | (mat == 4)
    wall_shade = np.where(bricks, np.where(mortar, f32(0.55), f32(1) - f32(0.07) * brick_id),
                          np.where((np.minimum(u32, 1 - u32) < f32(0.06)) | (np.minimum(v, 1 - v) < f32(0.06)),
                                   f32(0.6), f32(1)))
    wall_shade = wall_shade * np.where(side, f32(0.8), f32(1))
    accent = np.where(mat == 2, _parity(np.floor(u32 * f32(6))) == 0,
                      (mat == 3) & (((u32 - f32(0.5)) ** 2 + (v - f32(0.5)) ** 2) < f32(0.08)))
    wall_index = np.where(accent, mat.astype(np.int32) + NUM_MATERIALS + 1, mat.astype(np.int32))                          # palette rows 0..9

    # floor and ceiling: the surface point each row sees along its column's ray
    flat_dist = f32(0.5) / (np.maximum(np.abs(screen), f32(1e-6)) * f32(PLANE))         # (1, H, 1)
    rays32 = rays.astype(f32)
    world_row = origin[:, 0, None, None].astype(f32) + flat_dist * rays32[:, None, :, 0]  # (N, H, W)
    world_col = origin[:, 1, None, None].astype(f32) + flat_dist * rays32[:, None, :, 1]
    tile = _parity(np.floor(world_row * f32(2)) + np.floor(world_col * f32(2)))
    grid = ((world_row - np.floor(world_row)) < f32(0.04)) | ((world_col - np.floor(world_col)) < f32(0.04))
    flat_index = np.where(is_floor, 10 + tile.astype(np.int32), 12)
    flat_shade = np.where(is_floor | ~grid, f32(1), f32(0.85))

    index = np.where(is_wall, wall_index, flat_index)
    depth = np.where(is_wall, dist32, flat_dist)
    light = f32(1) / (f32(1) + (depth / f32(FOG_DISTANCE)) ** 2)
    brightness = np.where(is_wall, wall_shade, flat_shade) * light
    palette = np.concatenate([maze.wall_colors, maze.accent_colors, maze.floor_colors,
                              maze.ceiling_color[None]]).astype(f32)                    # (13, 3)
    rgb = np.take(palette, index, axis=0) * brightness[..., None]
    rgb += maze.fog_color.astype(f32) * (f32(1) - light)[..., None]
    rgb += f32(0.5)
    return rgb.astype(np.uint8)  # values lie in [0.5, 255.5): truncation rounds to nearest


def _parity(x: np.ndarray) -> np.ndarray:
    """x mod 2 of float arrays holding integers (exact, faster than `%` on floats)."""
    return x - np.float32(2) * np.floor(x * np.float32(0.5))


def render(maze: Maze, pose: Sequence[int]) -> np.ndarray:
    """The (64, 64, 3) uint8 frame seen from one pose (row, col, heading)."""
    return render_poses(maze, np.asarray(pose)[None])[0]


# ------------------------------------------------------------------------------------------- agent

def grid_shortest_path(is_open: Callable[[int, int], bool], start: tuple[int, int],
                       goal: tuple[int, int]) -> list[tuple[int, int]]:
    """Cells (row, col) from start to goal, both included, by breadth-first search over the 4-neighbour grid whose
    open cells `is_open(row, col)` names (it must be False outside the grid). Raises ValueError when goal cannot be
    reached."""
    previous = {start: start}
    queue = deque([start])
    while queue:
        here = queue.popleft()
        if here == goal:
            break
        for d_row, d_col in _AXIS_STEPS:
            nxt = (here[0] + d_row, here[1] + d_col)
            if nxt not in previous and is_open(*nxt):
                previous[nxt] = here
                queue.append(nxt)
    if goal not in previous:
        raise ValueError(f"cell {goal} cannot be reached from {start}")
    path = [goal]
    while path[-1] != start:
        path.append(previous[path[-1]])
    return path[::-1]


def agent_actions(maze: Maze, rng: np.random.Generator, start_pose: np.ndarray, length: int, *,
                  pause_prob: float = 0.05, glance_prob: float = 0.05, return_prob: float = 0.5) -> np.ndarray:
    """(length,) int32 actions of the goal-seeking agent from `start_pose` (actions[0] is NOOP).

    Each goal is a random cell; with probability `return_prob` one of the cells visited so far, so that
    the agent returns to places it saw long before.
    """
    actions = [NOOP]
    row, col, heading = (int(x) for x in start_pose)
    block = (row // STEPS_PER_BLOCK, col // STEPS_PER_BLOCK)
    cells = [(2 * r + 1, 2 * c + 1) for r in range(NUM_CELLS) for c in range(NUM_CELLS)]
    visited = [block]
    while len(actions) < length:
        pool = visited if rng.random() < return_prob else cells
        goal = pool[int(rng.integers(len(pool)))]
        if goal == block:
            continue
        for nxt in grid_shortest_path(maze.is_open, block, goal)[1:]:
            if rng.random() < pause_prob:
                actions += [NOOP] * int(rng.integers(1, 4))
            if rng.random() < glance_prob:
                turns, turn = int(rng.integers(1, TURNS_PER_QUARTER + 1)), int(rng.choice([LEFT, RIGHT]))
                actions += [turn] * turns + [LEFT + RIGHT - turn] * turns
            want = _AXIS_STEPS.index((nxt[0] - block[0], nxt[1] - block[1])) * TURNS_PER_QUARTER
            diff = (want - heading) % NUM_HEADINGS
            if diff == NUM_HEADINGS // 2:
                turn = int(rng.choice([LEFT, RIGHT]))
            else:
                turn = RIGHT if diff < NUM_HEADINGS // 2 else LEFT
            turns = diff if turn == RIGHT else (NUM_HEADINGS - diff) % NUM_HEADINGS
            actions += [turn] * turns + [FORWARD] * STEPS_PER_BLOCK
            heading, block = want, nxt
            if nxt[0] % 2 and nxt[1] % 2 and nxt not in visited:
                visited.append(nxt)
    return np.asarray(actions[:length], np.int32)


def make_trajectory(seed: SeedLike, length: int = 300) -> dict[str, np.ndarray]:
    """One trajectory in a fresh maze, fully determined by `seed`.

    Returns:
      video (T, 64, 64, 3) uint8, actions (T,) int32, poses (T, 3) int32, seed (k,) int64 and the maze
      arrays (`maze_*`, see `Maze.to_arrays`), i.e. the keys of a MazeLab npz file.
    """
    seed_seq = np.atleast_1d(np.asarray(seed, np.int64))
    rng = np.random.default_rng([int(s) for s in seed_seq])
    maze = generate_maze(rng)
    cell = (int(rng.integers(NUM_CELLS)), int(rng.integers(NUM_CELLS)))
    start = np.asarray([2 * cell[0] * STEPS_PER_BLOCK + STEPS_PER_BLOCK, 2 * cell[1] * STEPS_PER_BLOCK
                        + STEPS_PER_BLOCK, TURNS_PER_QUARTER * int(rng.integers(4))], np.int32)
    actions = agent_actions(maze, rng, start, length)
    poses = rollout_poses(maze, start, actions)
    return {'video': render_poses(maze, poses), 'actions': actions, 'poses': poses, 'seed': seed_seq,
            **maze.to_arrays()}


def load_trajectory(path: str | os.PathLike) -> tuple[Maze, dict[str, np.ndarray]]:
    """The maze and arrays (video, actions, poses, ...) of a MazeLab npz file."""
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    return Maze.from_arrays(arrays), arrays


# ------------------------------------------------------------------------------------------ dataset

SPLITS = ('train', 'test', 'valid')


def trajectory_seed(seed: int, split: str, index: int) -> tuple[int, int, int]:
    """The seed of trajectory `index` of a split: independent streams for train, test and valid (the validation
    split, for choosing settings without looking at the test split)."""
    return (int(seed), SPLITS.index(split), int(index))


def trajectory_path(root: Path, split: str, index: int, files_per_shard: int) -> Path:
    return Path(root) / split / f'{index // files_per_shard:04d}' / f'{index:06d}.npz'


def _write_one(task: tuple[str, str, int, int, int, int, bool]) -> int:
    root, split, index, seed, length, files_per_shard, compress = task
    path = trajectory_path(Path(root), split, index, files_per_shard)
    if path.exists():
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    trajectory = make_trajectory(trajectory_seed(seed, split, index), length)
    partial = path.with_name(path.name + PARTIAL_SUFFIX)  # the loaders refuse it until it is renamed
    save_npz(partial, trajectory, compress=compress)
    os.replace(partial, path)
    return length


def save_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray], *, compress: bool = True) -> None:
    """`np.savez_compressed` with fast deflate (level 1): a third of the time, files about 1.3x larger. Members get
    a fixed timestamp, so the same arrays always give the same bytes (a resumed run writes what one run would)."""
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, 'w', compression=method, compresslevel=1 if compress else None) as archive:
        for key, value in arrays.items():
            member = zipfile.ZipInfo(f'{key}.npy', date_time=(1980, 1, 1, 0, 0, 0))
            member.compress_type = method
            with archive.open(member, 'w', force_zip64=True) as out:
                np.lib.format.write_array(out, np.asarray(value), allow_pickle=False)


def write_dataset(root: str | os.PathLike, num_train: int, num_test: int, length: int = 300, seed: int = 0, *,
                  workers: int = 2, files_per_shard: int = 100, compress: bool = True, num_valid: int = 0,
                  progress: bool = True) -> dict[str, float]:
    """Writes `<root>/{train,test}/<shard>/<index>.npz` trajectories (and `<root>/valid/...` when `num_valid`: a
    validation split, its own seed stream) and `<root>/metadata.json`.

    Files already present are kept (an interrupted run resumes). Returns timing figures:
    {'seconds', 'frames', 'frames_per_second', 'trajectories_per_second'} for the files written now.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    meta = {'generator': 'teco_ssm.mazelab', 'action_dim': ACTION_DIM, 'action_names': list(ACTION_NAMES),
            'image_size': IMAGE_SIZE, 'video_length': length, 'seed': seed, 'num_train': num_train,
            'num_test': num_test, 'num_valid': num_valid, 'num_cells': NUM_CELLS, 'steps_per_block': STEPS_PER_BLOCK,
            'turn_degrees': 360 // NUM_HEADINGS, 'files_per_shard': files_per_shard}
    meta_path = root / 'metadata.json'
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        clash = {k: (old.get(k), meta[k]) for k in ('seed', 'video_length', 'action_dim', 'files_per_shard')
                 if old.get(k) != meta[k]}
        if clash:
            raise ValueError(f'{meta_path}: existing dataset differs from this request (stored, asked): {clash}')
    meta_path.write_text(json.dumps(meta, indent=2))
    tasks = [(str(root), split, i, seed, length, files_per_shard, compress)
             for split, count in (('train', num_train), ('test', num_test), ('valid', num_valid))
             for i in range(count)]
    from tqdm import tqdm

    start = time.perf_counter()
    frames = 0
    bar = tqdm(total=len(tasks), desc='mazelab', unit='traj', disable=not progress)
    if workers > 1:
        with multiprocessing.get_context('spawn').Pool(workers) as pool:
            for written in pool.imap_unordered(_write_one, tasks, chunksize=4):
                frames += written
                bar.update()
    else:
        for task in tasks:
            frames += _write_one(task)
            bar.update()
    bar.close()
    seconds = time.perf_counter() - start
    return {'seconds': seconds, 'frames': frames, 'frames_per_second': frames / max(seconds, 1e-9),
            'trajectories_per_second': frames / length / max(seconds, 1e-9)}


def contact_sheet(videos: Sequence[np.ndarray], path: str | os.PathLike, *, frames_per_row: int = 12,
                  stride: Optional[int] = None, scale: int = 2) -> np.ndarray:
    """Saves a PNG grid: one row per video (T, H, W, 3) uint8, `frames_per_row` frames `stride` apart.

    Returns the sheet (rows * H * scale, frames_per_row * W * scale, 3) uint8.
    """
    from PIL import Image

    rows = []
    for video in videos:
        video = np.asarray(video)
        step = stride or max(1, len(video) // frames_per_row)
        picks = [video[min(i * step, len(video) - 1)] for i in range(frames_per_row)]
        row = np.concatenate([np.pad(f, ((1, 1), (1, 1), (0, 0)), constant_values=255) for f in picks], 1)
        rows.append(row)
    sheet = np.concatenate(rows, 0)
    sheet = sheet.repeat(scale, 0).repeat(scale, 1)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sheet).save(path)
    return sheet
