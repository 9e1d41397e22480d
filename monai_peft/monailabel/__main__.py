"""``python -m monai_peft.monailabel app DIR [--overwrite]``: copy the MONAI Label app to DIR.

``python -m monai_peft.monailabel path`` prints the folder of the shipped app.
"""

from __future__ import annotations

import argparse
import sys

from monai_peft.monailabel import app_dir, copy_app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m monai_peft.monailabel", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_app = sub.add_parser("app", help="copy the app (main.py) to a writable folder")
    p_app.add_argument("dest")
    p_app.add_argument("--overwrite", action="store_true")
    sub.add_parser("path", help="print the folder of the shipped app")
    args = parser.parse_args(argv)
    if args.cmd == "path":
        print(app_dir())
        return 0
    try:
        dest = copy_app(args.dest, overwrite=args.overwrite)
    except FileExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"app copied to {dest}; link bundles into {dest / 'model'} and run monailabel start_server --app {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
