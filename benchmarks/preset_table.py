"""Measure every paper preset on MONAI ViT-B/16 and ResNet-50 and write the table of docs/methods/presets.md.

Usage (about a minute on CPU; no weights or data needed, counts only)::

    python benchmarks/preset_table.py            # rewrite the generated block of docs/methods/presets.md
    python benchmarks/preset_table.py --check    # exit 1 if the document is out of date

The counts come from :func:`monai_peft.paper_presets.count_preset` (``get_peft_model`` with
``get_config(method, preset=...)``); ``tests/test_paper_presets.py`` asserts them against the papers.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from monai_peft.paper_presets import measure_all, preset_table_markdown, replace_table

DOC = Path(__file__).resolve().parents[1] / "docs" / "methods" / "presets.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--doc", type=Path, default=DOC)
    parser.add_argument("--check", action="store_true", help="do not write; fail if the document differs")
    args = parser.parse_args(argv)
    text = args.doc.read_text()
    new = replace_table(text, preset_table_markdown(measure_all()))
    if args.check:
        if new != text:
            print(f"{args.doc} is out of date: run python benchmarks/preset_table.py", file=sys.stderr)
            return 1
        print(f"{args.doc} is up to date")
        return 0
    fd, tmp = tempfile.mkstemp(dir=args.doc.parent, prefix=".presets-", suffix=".md")
    with os.fdopen(fd, "w") as handle:
        handle.write(new)
    os.replace(tmp, args.doc)
    print(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
