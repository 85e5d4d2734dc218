"""Generates the MazeLab benchmark: `<root>/{train,test}/<shard>/*.npz`, metadata.json, contact_sheet.png.

    python scripts/make_mazelab.py --root /data/mazelab --num_train 1000 --num_test 100 --workers 2

Interrupted runs resume (finished files are kept). See docs/data.md for the format and the actions.
"""
import argparse
import json
from pathlib import Path

from teco_ssm import mazelab


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--root', required=True, help='output folder')
    parser.add_argument('--num_train', type=int, default=1000)
    parser.add_argument('--num_test', type=int, default=100)
    parser.add_argument('--length', type=int, default=300, help='frames per trajectory')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--workers', type=int, default=2, help='processes')
    parser.add_argument('--files_per_shard', type=int, default=100)
    parser.add_argument('--no_compress', action='store_true', help='np.savez instead of np.savez_compressed')
    parser.add_argument('--sheet_rows', type=int, default=6, help='test trajectories on the contact sheet')
    args = parser.parse_args()

    stats = mazelab.write_dataset(args.root, args.num_train, args.num_test, args.length, args.seed,
                                  workers=args.workers, files_per_shard=args.files_per_shard,
                                  compress=not args.no_compress)
    print(json.dumps(stats, indent=2))
    root = Path(args.root)
    split = 'test' if args.num_test else 'train'
    count = min(args.sheet_rows, args.num_test or args.num_train)
    videos = [mazelab.load_trajectory(mazelab.trajectory_path(root, split, i, args.files_per_shard))[1]['video']
              for i in range(count)]
    mazelab.contact_sheet(videos, root / 'contact_sheet.png')
    print(f'contact sheet: {root / "contact_sheet.png"}')


if __name__ == '__main__':
    main()
