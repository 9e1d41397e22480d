"""The ``monai-peft`` command.

Sub-commands::

    monai-peft demo [--method lora] [--epochs 3] ...   PEFT demo on PneumoniaMNIST (the default job)
    monai-peft methods                                 registered PEFT methods and their config fields
    monai-peft info ADAPTER_DIR                        what an adapter folder holds
    monai-peft erf [--backbone B] [--adapter DIR] ...  effective receptive field on real images
    monai-peft study CONFIG [--out DIR] [--workers N] [--ray ADDRESS] [--resume]
                                                       the PEFT study grid (docs/study.md)
    monai-peft pretrain DATA [--out DIR] [--image-size H W [D]] [--epochs N] [--resume] ...
                                                       MAE self-supervised pretraining (a study backbone)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence

__all__ = ["main", "register_command"]

_EXTRA_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


def register_command(add: Callable[[argparse._SubParsersAction], None]) -> Callable:
    """Let other modules add sub-commands (``add(subparsers)`` must set ``func``)."""
    _EXTRA_COMMANDS.append(add)
    return add


def _json_kwargs(text: str | None) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"--method-kwargs must be a JSON object, e.g. '{{\"r\": 8}}': {exc}") from exc
    if not isinstance(value, dict):
        raise SystemExit("--method-kwargs must be a JSON object")
    return value


def _cmd_demo(args: argparse.Namespace) -> int:
    from monai_peft.demo import run_demo

    res = run_demo(
        args.method,
        backbone=args.backbone,
        data=args.data,
        fraction=args.fraction,
        epochs=args.epochs,
        image_size=args.image_size,
        batch_size=args.batch_size,
        lr=args.lr,
        device=args.device,
        out_dir=args.out,
        seed=args.seed,
        method_kwargs=_json_kwargs(args.method_kwargs),
    )
    if args.json:
        print(json.dumps(res.as_dict(), indent=2))
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    import monai_peft as mp

    for name in mp.list_methods():
        cls = mp.get_method(name).config_cls
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        own = [f for f in cls.field_names() if f not in mp.PeftConfig.field_names()]
        print(f"{name:18s} {cls.__name__:24s} {doc}")
        if args.verbose and own:
            print(f"{'':18s} fields: {', '.join(own)}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from monai_peft.checkpoint import read_adapter_folder

    config, tensors, _ = read_adapter_folder(args.adapter)
    base = config.pop("base_model", {})
    n = sum(t.numel() for t in tensors.values())
    print(f"method: {config.get('method')}  (monai_peft {config.get('monai_peft_version')})")
    print(f"base model: {base.get('class')}  fingerprint {str(base.get('fingerprint'))[:16]}...")
    print(f"tensors: {len(tensors)}  values: {n:,d}")
    cfg = {k: v for k, v in config.items() if k not in ("method", "monai_peft_version", "tensors_sha256")}
    print("config:", json.dumps(cfg, sort_keys=True))
    return 0


def _cmd_study(args: argparse.Namespace) -> int:
    from monai_peft.study import preflight, run_study, study_from_dict
    from monai_peft.study.grid import expand_grid, expand_tuning
    from monai_peft.study.schema import read_study_file

    data = read_study_file(args.config)
    if isinstance(data, dict) and data.get("task") == "generation":  # the diffusion arm (docs/study.md)
        from monai_peft.study.generation import run_from_cli

        return run_from_cli(data, args)
    study = study_from_dict(data)
    out = args.out or f"runs/study_{study.name}"
    if args.dry_run:
        checks = preflight(study)
        print(f"study {study.name!r} (config hash {study.config_hash()}): data {checks.source}")
        print(f"{len(expand_tuning(study))} learning-rate searches, {len(expand_grid(study))} runs; results in {out}")
        for budget, sizes in checks.train_images.items():
            print(f"  budget {budget}: training images per seed {sizes}")
        for backbone, methods in checks.trainable.items():
            print(f"  {backbone}: trainable parameters {methods}")
        return 0
    res = run_study(
        study, out, workers=args.workers, ray_address=args.ray, resume=args.resume, progress=not args.no_progress
    )
    print(
        f"study {study.name!r}: {res['tuned']} searches and {res['ran']} runs done, {res['skipped']} skipped; results in {res['out']}"
    )
    for kind, path in (res["report"] or {}).items():
        print(f"  {kind}: {path}")
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from monai_peft.pretrain import MAEPretrainConfig, pretrain_mae

    cfg = MAEPretrainConfig(
        data=args.data,
        out=args.out,
        image_size=tuple(args.image_size) if args.image_size else None,
        patch_size=args.patch_size,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        mlp_dim=args.mlp_dim,
        decoder_hidden_size=args.decoder_hidden_size,
        decoder_layers=args.decoder_layers,
        decoder_heads=args.decoder_heads,
        mask_ratio=args.mask_ratio,
        norm_pix_loss=args.norm_pix_loss,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        seed=args.seed,
        save_every=args.save_every,
        max_steps=args.max_steps,
        device=args.device,
        in_channels=args.in_channels,
        spatial_dims=args.spatial_dims,
        data_key=args.key,
        pattern=args.pattern,
        progress=not args.no_progress,
        tensorboard=not args.no_tensorboard,
    )
    res = pretrain_mae(cfg, resume=args.resume)
    if not res["finished"]:
        print(f"stopped at step {res['step']} of {res['total_steps']}; continue with --resume (same options)")
        return 0
    arch = res["architecture"]
    print(
        f"MAE-ViT ({arch['spatial_dims']}D, {arch['img_size']}, patch {arch['patch_size']}, width "
        f"{arch['hidden_size']}, {arch['num_layers']} layers, {res['encoder_parameters']:,d} encoder parameters) "
        f"pretrained on {res['pretraining']['images']} images in {res['pretraining']['seconds']:.0f} s; "
        f"final epoch loss {res['pretraining']['epoch_loss'][-1]:.4f}"
    )
    print(f"  encoder: {res['out']}/encoder.safetensors + mae_vit.json")
    print(f"  use it: load_backbone('mae_vit', '{res['out']}', num_classes=K) or, in a study file,")
    print(f"          backbones: [{{name: mae_vit, source: {res['out']}}}]")
    return 0


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain",
        help="MAE self-supervised pretraining of a ViT on unlabelled images (2D npz or a folder of NIfTI volumes)",
        description="MAE pretraining with MONAI's MaskedAutoEncoderViT. The --out folder (encoder.safetensors + "
        "mae_vit.json) is the backbone 'mae_vit' of load_backbone and of study files. Checkpoints are saved "
        "atomically every --save-every steps and at each epoch end: after a kill, rerun the same command with "
        "--resume to continue from the last saved step.",
    )
    p.add_argument("data", help="an .npz (MedMNIST: train_images; labels unused) or a folder of NIfTI files")
    p.add_argument("--out", default="runs/pretrain_mae", help="output folder (default runs/pretrain_mae)")
    p.add_argument(
        "--image-size", type=int, nargs="+", default=None, help="H W (2D) or D H W (3D); one value for all axes"
    )
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=96, help="divisible by 4 (2D) / 6 (3D)")
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--mlp-dim", type=int, default=None, help="default 4 x hidden size")
    p.add_argument("--decoder-hidden-size", type=int, default=48)
    p.add_argument("--decoder-layers", type=int, default=2)
    p.add_argument("--decoder-heads", type=int, default=4)
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--norm-pix-loss", action="store_true", help="per-patch normalised targets (MAE)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=100, help="steps between checkpoints")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (continue with --resume)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--in-channels", type=int, default=None, choices=[1, 3])
    p.add_argument("--spatial-dims", type=int, default=None, choices=[2, 3])
    p.add_argument("--key", default="train_images", help="npz array holding the images")
    p.add_argument("--pattern", default=None, help="folder: glob of the files to use, e.g. '**/Flair*.nii.gz'")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-tensorboard", action="store_true")
    p.set_defaults(func=_cmd_pretrain)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="monai-peft", description="Parameter-efficient fine-tuning for MONAI.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command")

    demo = sub.add_parser("demo", help="fine-tune a pretrained network with a PEFT method on PneumoniaMNIST")
    demo.add_argument("--method", default="lora", help="any registered method (see `monai-peft methods`)")
    demo.add_argument("--method-kwargs", default=None, help="JSON config fields, e.g. '{\"r\": 8}'")
    demo.add_argument("--backbone", default="efficientnet_lite0", choices=["efficientnet_lite0", "densenet121"])
    demo.add_argument(
        "--data", default=None, help="path of pneumoniamnist_28.npz (default: ../shared/data, download, synthetic)"
    )
    demo.add_argument("--fraction", type=float, default=0.1, help="fraction of each class used for training")
    demo.add_argument("--epochs", type=int, default=3)
    demo.add_argument("--image-size", type=int, default=128)
    demo.add_argument("--batch-size", type=int, default=32)
    demo.add_argument("--lr", type=float, default=2e-3)
    demo.add_argument("--device", default=None)
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--json", action="store_true", help="also print the figures as JSON")
    demo.set_defaults(func=_cmd_demo)

    methods = sub.add_parser("methods", help="list the registered PEFT methods")
    methods.set_defaults(func=_cmd_methods)

    info = sub.add_parser("info", help="describe an adapter folder")
    info.add_argument("adapter")
    info.set_defaults(func=_cmd_info)

    study = sub.add_parser("study", help="run a PEFT study grid (methods x backbones x data budgets x seeds)")
    study.add_argument("config", help="study file (.yaml/.json) or a packaged study name, e.g. quick_pneumoniamnist")
    study.add_argument("--out", default=None, help="results folder (default runs/study_<name>)")
    study.add_argument("--workers", type=int, default=1, help="parallel local processes (default 1: this process)")
    study.add_argument(
        "--ray",
        default=None,
        metavar="ADDRESS",
        help="run the cells on Ray: ray.init(address=ADDRESS); 'local' starts one",
    )
    study.add_argument(
        "--resume", action="store_true", help="continue a results folder of this study (finished cells are skipped)"
    )
    study.add_argument("--dry-run", action="store_true", help="check the study and list the grid; train nothing")
    study.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    study.set_defaults(func=_cmd_study)

    from monai_peft.analysis.erf_cli import add_erf_command

    add_erf_command(sub)
    _add_pretrain(sub)
    for add in _EXTRA_COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if args.command is None:
        args = parser.parse_args(["demo", *(argv or [])])
    from monai_peft.errors import MonaiPeftError

    try:
        return int(args.func(args) or 0)
    except MonaiPeftError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
