"""Write 2D slices of a real BraTS case + a ``boxes.json``: an input folder for ``configs/inference.json``.

Usage (from the bundle folder)::

    python scripts/make_slices.py --data_root ../../../shared/data/brats --case brats_2013_pat0006_1 --out sample_slices

Writes ``--count`` axial FLAIR slices (240 x 240) and one coronal slice (240 x 155, non-square) as 2D NIfTI files
``(H, W)`` with the slice's affine, one axial slice as an 8-bit PNG, and ``boxes.json`` with each slice's whole-tumour
bounding box (``[x_min, y_min, x_max, y_max]``, x = column, y = row) moved by a seeded jitter of up to 5 pixels.
The files are derived from ``../shared/data`` (CC BY-NC-SA 3.0): keep them out of the repository.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import litemedsam_box as lb


def _slice_affine(affine: np.ndarray, axis: int, index: int) -> np.ndarray:
    """Affine of the 2D slice ``index`` along ``axis``: the volume's, with the dropped axis folded into the origin
    and the in-plane axes kept (a 2D NIfTI's third voxel axis is the slice normal)."""
    keep = [a for a in range(3) if a != axis]
    out = np.eye(4)
    out[:3, 0], out[:3, 1], out[:3, 2] = affine[:3, keep[0]], affine[:3, keep[1]], affine[:3, axis]
    out[:3, 3] = affine[:3, 3] + affine[:3, axis] * index
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    import nibabel as nib
    from PIL import Image

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data_root", default=str(Path(__file__).resolve().parents[3].parent / "shared/data/brats"))
    ap.add_argument("--case", default="brats_2013_pat0006_1")
    ap.add_argument("--out", default="sample_slices")
    ap.add_argument("--count", type=int, default=2, help="number of axial NIfTI slices")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jitter", type=int, default=5)
    args = ap.parse_args(argv)

    folder = Path(args.data_root) / args.case
    img = nib.load(str(folder / "Flair_subtrMeanDivStd.nii.gz"))
    vol = np.asarray(img.dataobj, dtype=np.float32)
    lab = np.asarray(nib.load(str(folder / "OTMultiClass.nii.gz")).dataobj) > 0
    rng = np.random.RandomState(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def pick(axis: int, n: int) -> list[int]:
        """``n`` distinct slices with large tumour sections, 7 apart in the order of decreasing area."""
        areas = lab.sum(axis=tuple(a for a in range(3) if a != axis))
        return [int(k) for k in np.argsort(-areas, kind="stable")[::7][:n]]

    axial = pick(2, args.count + 1)
    plan = [(2, k, "axial", "nii") for k in sorted(axial[: args.count])]
    plan += [(1, pick(1, 1)[0], "coronal", "nii"), (2, axial[-1], "axial", "png")]
    entries = []
    for axis, k, plane, fmt in plan:
        image, mask = np.take(vol, k, axis=axis), np.take(lab, k, axis=axis)
        h, w = mask.shape
        box = lb.jitter_box(lb.label_box(mask), rng.randint(-args.jitter, args.jitter + 1, size=4), h, w)
        name = f"{args.case}_{plane}{k:03d}"
        if fmt == "nii":
            path = out / f"{name}.nii.gz"
            nib.Nifti1Image(image, _slice_affine(img.affine, axis, k)).to_filename(str(path))
        else:
            lo, hi = np.percentile(image, [0.5, 99.5])
            png = (np.clip((image - lo) / max(hi - lo, 1e-8), 0, 1) * 255).round().astype(np.uint8)
            path = out / f"{name}.png"
            Image.fromarray(png, mode="L").save(str(path))
        entries.append({"image": path.name, "box": [round(v, 1) for v in box]})
    (out / "boxes.json").write_text(json.dumps(entries, indent=1) + "\n")
    print(f"wrote {len(entries)} slices and boxes.json to {out}")
    return entries


if __name__ == "__main__":
    main()
