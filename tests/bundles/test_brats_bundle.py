"""The BraTS 3D segmentation bundle (bundles/brats_mri_swinunetr_lora) on the real BraTS volumes.

Inference through the ``monai.bundle`` CLI on a real case (output on the input grid: exact shape and affine) in each
input layout: one file per modality, one 4D NIfTI per case, and one DICOM series folder per modality (made here from
the real volumes with pydicom; NIfTI and a DICOM SEG referencing the FLAIR series out, geometry read back), the
shipped adapter's Dice on the held-out case (pat0006) above the value measured by benchmarks/brats_bundle_compare.py
minus a margin, bad inputs (2D image, wrong number of modalities, NaN volume, adapter for another base: clear
message naming the file, no output written, earlier outputs intact), and one short training epoch of train.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.bundles.bundle_utils import inference_cli, run_bundle
from tests.conftest import REPO_ROOT, require_shared

BUNDLE = REPO_ROOT / "bundles" / "brats_mri_swinunetr_lora"
MODALITIES = ["Flair_subtrMeanDivStd.nii.gz", "T1c_subtrMeanDivStd.nii.gz"]
HELD_OUT = "brats_2013_pat0006_1"
# measured by `python benchmarks/brats_bundle_compare.py --variant lora --install` (results/brats_compare_lora.json):
# whole tumour 0.841, edema 0.524 on pat0006; the margin absorbs float differences between machines
MARGIN = 0.05


def _case(tmp_path: Path, name: str = "pat0006") -> Path:
    """A dataset folder holding one case folder that links the real modality files (nothing is copied)."""
    src = require_shared(f"brats/{HELD_OUT}")
    case = tmp_path / "in" / name
    case.mkdir(parents=True)
    for m in MODALITIES:
        (case / m).symlink_to(src / m)
    return case.parent


def _run(config: str = "inference.json", **overrides):
    return run_bundle(BUNDLE, config, **overrides)


@pytest.fixture(scope="module")
def cli_prediction(tmp_path_factory):
    """Run inference.json alone through the CLI on the held-out case; return (output folder, stdout)."""
    tmp = tmp_path_factory.mktemp("brats_cli")
    data = _case(tmp)
    out = tmp / "out"
    return out, inference_cli(BUNDLE, data, out)


def test_cli_inference_writes_the_case_on_its_original_grid(cli_prediction):
    import nibabel as nib

    out, log = cli_prediction
    assert sorted(p.name for p in out.iterdir()) == ["pat0006_seg.nii.gz"]  # named after the case folder
    pred = nib.load(out / "pat0006_seg.nii.gz")
    ref = nib.load(require_shared(f"brats/{HELD_OUT}/{MODALITIES[0]}"))
    assert pred.shape == ref.shape == (240, 240, 155)
    np.testing.assert_allclose(pred.affine, ref.affine, atol=1e-6)
    values = set(np.unique(np.asarray(pred.dataobj)).tolist())
    assert values <= {0, 1, 2, 3, 4} and len(values) > 1
    assert "cases" in log  # progress over the cases


def test_shipped_adapter_dice_on_held_out_case(cli_prediction):
    import nibabel as nib

    out, _ = cli_prediction
    pred = np.asarray(nib.load(out / "pat0006_seg.nii.gz").dataobj).astype(int)
    label = np.asarray(nib.load(require_shared(f"brats/{HELD_OUT}/OTMultiClass.nii.gz")).dataobj).astype(int)

    def dice(p, g):
        return 2.0 * (p & g).sum() / max(p.sum() + g.sum(), 1)

    measured = json.loads((REPO_ROOT / "benchmarks/results/brats_compare_lora.json").read_text())["test"][0]
    whole = dice(pred > 0, label > 0)
    edema = dice(pred == 2, label == 2)
    assert whole >= measured["whole_tumour_dice"] - MARGIN, whole
    assert edema >= measured["dice"]["edema"] - MARGIN, edema
    assert whole > 0.7  # far above chance whatever the results file says


# ---------------------------------------------------------------------------------------- other input layouts
def write_mr_series(
    volume: np.ndarray, affine: np.ndarray, folder: Path, *, study: str, frame: str, description: str, number: int
) -> str:
    """Write a ``(X, Y, Z)`` volume on a RAS ``affine`` (a NIfTI's) as a DICOM MR series, one slice per ``Z``.

    DICOM patient space is LPS; slice ``k`` holds ``volume[:, :, k]`` with ``X`` along a row (Columns) and ``Y``
    down a column (Rows), at ``affine_lps @ (0, 0, k)``; values stored as int16 with RescaleSlope 0.001 (the BraTS
    volumes are z-scores). Returns the SeriesInstanceUID.
    """
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine, dtype=float)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    row, col = lps[:3, 0] / spacing[0], lps[:3, 1] / spacing[1]
    uid = pydicom.uid.generate_uid()
    folder.mkdir(parents=True)
    for k in range(volume.shape[2]):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, uid, frame
        ds.PatientName, ds.PatientID, ds.Modality = "Test^BraTS", "pat0006", "MR"
        ds.SeriesNumber, ds.SeriesDescription, ds.InstanceNumber = number, description, k + 1
        ds.Rows, ds.Columns = int(volume.shape[1]), int(volume.shape[0])
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.ImagePositionPatient = [float(v) for v in lps[:3, :3] @ [0.0, 0.0, float(k)] + lps[:3, 3]]
        ds.ImageOrientationPatient = [float(v) for v in (*row, *col)]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # (between rows, between columns)
        ds.SliceThickness = float(spacing[2])
        ds.RescaleSlope, ds.RescaleIntercept = 0.001, 0.0
        ds.PixelData = np.round(volume[:, :, k].T / 0.001).astype(np.int16).tobytes()
        ds.save_as(folder / f"IM{k:04d}.dcm", enforce_file_format=True)
    return uid


@pytest.fixture(scope="module")
def dicom_case(tmp_path_factory):
    """``dcm/pat0006/{flair,t1c}/*.dcm``: the held-out case's two modalities as two DICOM series of one study."""
    import nibabel as nib
    import pydicom

    root = tmp_path_factory.mktemp("brats_dicom") / "dcm"
    study, frame = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    uids = {}
    for number, (short, m) in enumerate(zip(["flair", "t1c"], MODALITIES), start=1):
        img = nib.load(require_shared(f"brats/{HELD_OUT}/{m}"))
        vol = np.asarray(img.dataobj, dtype=np.float32)
        uids[short] = write_mr_series(
            vol, img.affine, root / "pat0006" / short, study=study, frame=frame, description=short, number=number
        )
    return root, uids


def test_cli_dicom_series_per_modality_writes_nifti_and_a_seg_on_the_flair_series(cli_prediction, dicom_case, tmp_path):
    import nibabel as nib
    import pydicom

    from monai_peft.transforms import load_dicom_series, read_dicom_seg

    pytest.importorskip("highdicom")
    data, uids = dicom_case
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
        "--dataset_dir", str(data), "--output_dir", str(out), "--device", "cpu", "--modalities", "['flair','t1c']",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=BUNDLE, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["pat0006_seg.dcm", "pat0006_seg.nii.gz"]
    # the NIfTI: on the series' grid, which is the BraTS file's grid, and the same labels as from the NIfTI files
    ref = nib.load(require_shared(f"brats/{HELD_OUT}/{MODALITIES[0]}"))
    pred = nib.load(out / "pat0006_seg.nii.gz")
    assert pred.shape == ref.shape == (240, 240, 155)
    np.testing.assert_allclose(pred.affine, ref.affine, atol=1e-5)
    labels = np.asarray(pred.dataobj)
    from_nifti = np.asarray(nib.load(cli_prediction[0] / "pat0006_seg.nii.gz").dataobj)
    assert (labels > 0).sum() > 1000 and np.mean(labels == from_nifti) > 0.999
    # the SEG: references the FLAIR series (the first modality), its study and frame of reference, slice by slice
    flair = load_dicom_series(data / "pat0006" / "flair")
    np.testing.assert_allclose(flair.affine.numpy(), ref.affine, atol=1e-5)
    seg = pydicom.dcmread(out / "pat0006_seg.dcm")
    first = pydicom.dcmread(next((data / "pat0006" / "flair").iterdir()), stop_before_pixels=True)
    assert seg.Modality == "SEG" and seg.ReferencedSeriesSequence[0].SeriesInstanceUID == uids["flair"]
    assert seg.StudyInstanceUID == first.StudyInstanceUID and seg.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert (int(seg.Rows), int(seg.Columns)) == (240, 240)
    flair_sops = set(flair.meta["sop_instance_uids"].split("\\"))
    referenced = {
        f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        for f in seg.PerFrameFunctionalGroupsSequence
    }
    assert referenced and referenced <= flair_sops
    z_of_slice = {round(float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]), 3)
                  for p in (data / "pat0006" / "flair").iterdir()}  # fmt: skip
    frame_z = {round(float(f.PlanePositionSequence[0].ImagePositionPatient[2]), 3)
               for f in seg.PerFrameFunctionalGroupsSequence}  # fmt: skip
    assert frame_z <= z_of_slice
    names = {s.SegmentLabel for s in seg.SegmentSequence}
    assert names <= {"necrosis", "edema", "non-enhancing tumour", "enhancing tumour"} and "edema" in names
    back = read_dicom_seg(out / "pat0006_seg.dcm", data / "pat0006" / "flair")  # highdicom, aligned to the series
    np.testing.assert_allclose(back.affine.numpy(), ref.affine, atol=1e-5)
    np.testing.assert_array_equal(back[0].numpy().astype(np.uint8), labels)


def test_one_4d_nifti_per_case_gives_the_same_labels(cli_prediction, tmp_path):
    import nibabel as nib

    imgs = [nib.load(require_shared(f"brats/{HELD_OUT}/{m}")) for m in MODALITIES]
    data = tmp_path / "in4d"
    data.mkdir()
    stacked = np.stack([np.asarray(i.dataobj, dtype=np.float32) for i in imgs], axis=-1)  # (240, 240, 155, 2)
    nib.Nifti1Image(stacked, imgs[0].affine).to_filename(data / "pat0006.nii.gz")
    out = tmp_path / "out"
    _run(dataset_dir=str(data), output_dir=str(out), device="cpu")
    assert sorted(p.name for p in out.iterdir()) == ["pat0006_seg.nii.gz"]
    pred = nib.load(out / "pat0006_seg.nii.gz")
    assert pred.shape == (240, 240, 155)  # a 3D label map, although the input was 4D
    np.testing.assert_allclose(pred.affine, imgs[0].affine, atol=1e-6)
    from_files = np.asarray(nib.load(cli_prediction[0] / "pat0006_seg.nii.gz").dataobj)
    np.testing.assert_array_equal(np.asarray(pred.dataobj), from_files)


def _bad_case(tmp_path: Path, arrays: dict[str, np.ndarray], affine=None) -> Path:
    import nibabel as nib

    case = tmp_path / "bad" / "case01"
    case.mkdir(parents=True)
    for name, arr in arrays.items():
        nib.Nifti1Image(arr.astype(np.float32), np.eye(4) if affine is None else affine).to_filename(case / name)
    return case.parent


def _expect_refusal(tmp_path: Path, data: Path, match: str, **overrides) -> None:
    """Inference must raise naming the problem, write nothing new, and leave an earlier output intact."""
    from monai_peft.errors import MonaiPeftError

    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    earlier = out / "earlier_seg.nii.gz"
    earlier.write_bytes(b"an earlier output")
    with pytest.raises(Exception) as info:
        _run(dataset_dir=str(data), output_dir=str(out), device="cpu", **overrides)
    chain, cur = [], info.value
    while cur is not None and len(chain) < 20:  # the engine and Compose wrap the library's error
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    text = " ".join(str(e) for e in chain)
    assert any(isinstance(e, MonaiPeftError) for e in chain), repr(info.value)
    assert match in text, text
    assert sorted(p.name for p in out.iterdir()) == ["earlier_seg.nii.gz"]
    assert earlier.read_bytes() == b"an earlier output"


def test_2d_image_is_refused(tmp_path):
    require_shared(f"brats/{HELD_OUT}")
    data = _bad_case(tmp_path, {m: np.random.rand(64, 48) for m in MODALITIES})
    _expect_refusal(tmp_path, data, "3D")
    _expect_refusal(tmp_path, data, "Flair_subtrMeanDivStd.nii.gz")


def test_wrong_number_of_modalities_is_refused(tmp_path):
    require_shared(f"brats/{HELD_OUT}")
    data = _case(tmp_path)
    _expect_refusal(tmp_path, data, "takes 2 channels", modalities=[MODALITIES[0]])


def test_nan_volume_is_refused_naming_the_file(tmp_path):
    require_shared(f"brats/{HELD_OUT}")
    vol = np.random.rand(40, 36, 30)
    bad = vol.copy()
    bad[10, 10, 10] = np.nan
    data = _bad_case(tmp_path, {MODALITIES[0]: vol, MODALITIES[1]: bad})
    _expect_refusal(tmp_path, data, "NaN")
    _expect_refusal(tmp_path, data, "case01")


def test_adapter_for_another_base_is_refused(tmp_path):
    sys.path.insert(0, str(BUNDLE / "scripts"))
    import brats_swinunetr as bs

    import monai_peft as mp

    data = _case(tmp_path)
    other = bs.build_network(5, seed=1)  # not the shipped base
    cfg = mp.LoraConfig(r=8, alpha=16.0, qkv_slices="qv", target_modules=bs.LORA_TARGETS)
    foreign = tmp_path / "foreign_adapter"
    mp.get_peft_model(other, cfg, modules_to_save=list(bs.HEAD_MODULES)).save_adapter(foreign)
    _expect_refusal(tmp_path, data, "different base model", adapter_dir=str(foreign))


def test_train_json_runs_one_short_epoch_into_a_temp_folder(tmp_path):
    require_shared(f"brats/{HELD_OUT}")
    shipped = (BUNDLE / "models/adapter/adapter_model.safetensors").read_bytes()
    run_dir = tmp_path / "run"
    _run("train.json", epochs=1, val_interval=1, output_dir=str(run_dir), train_cases=["brats_2013_pat0003_1"])
    for sub in ("best", "last"):
        assert (run_dir / sub / "adapter_model.safetensors").is_file()
    assert (run_dir / "last" / "trainer_state.pt").is_file()
    assert any((run_dir / "tb").iterdir())  # TensorBoard events
    info = json.loads((run_dir / "best" / "checkpoint_info.json").read_text())
    assert info.get("metric_name") == "val_mean_dice" or "val_mean_dice" in json.dumps(info)
    assert (BUNDLE / "models/adapter/adapter_model.safetensors").read_bytes() == shipped  # never overwritten
