"""``python -m monai_peft.bundle <command>``: bundle build products.

Commands::

    export --bundle_root B [--out models/model.pt] [--torchscript models/model.ts] [--config_file ...]
        merged state dict (and TorchScript) of the bundle's network, for tools that need one file
    medmnist_images --out DIR [--count 16] [--split test] [--dicom 0] [--npz FILE]
        real PneumoniaMNIST images as PNG/DICOM files, to try a 2D bundle's inference.json
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m monai_peft.bundle", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="write a merged models/model.pt (and optionally models/model.ts)")
    ex.add_argument("--bundle_root", required=True)
    ex.add_argument("--out", default="models/model.pt", help="state-dict file ('none' to skip); relative to the bundle")
    ex.add_argument("--torchscript", default=None, help="also write TorchScript here (e.g. models/model.ts)")
    ex.add_argument("--config_file", default=None, help="default configs/inference.json")
    ex.add_argument("--use_trace", action="store_true", help="trace instead of script for TorchScript")
    ex.add_argument("--adapter_dir", default=None, help="override the adapter folder of the config")
    mi = sub.add_parser("medmnist_images", help="export MedMNIST images as PNG/DICOM files")
    mi.add_argument("--out", required=True)
    mi.add_argument("--count", type=int, default=16)
    mi.add_argument("--split", default="test")
    mi.add_argument("--dicom", type=int, default=0, help="write the first N as DICOM")
    mi.add_argument("--npz", default=None)
    args = parser.parse_args(argv)
    if args.command == "export":
        from monai_peft.bundle.export import export_merged_model

        override = {"adapter_dir": args.adapter_dir} if args.adapter_dir else {}
        out = None if str(args.out).lower() == "none" else args.out
        result = export_merged_model(
            args.bundle_root,
            out=out,
            torchscript=args.torchscript,
            config_file=args.config_file,
            use_trace=args.use_trace,
            **override,
        )
        for key in ("model_pt", "model_ts"):
            if result[key] is not None:
                print(f"{key}: {result[key]}")
        if result["max_abs_diff"] is not None:
            print(f"max |torchscript - eager merged| = {result['max_abs_diff']:.3g}")
        return 0
    from monai_peft.bundle.samples import export_medmnist_images

    paths = export_medmnist_images(args.out, npz=args.npz, split=args.split, count=args.count, dicom=args.dicom)
    print(f"{len(paths)} image(s) written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
