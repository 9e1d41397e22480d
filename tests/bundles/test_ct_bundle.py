"""The CT bundle (bundles/ct_totalseg_dynunet_lora) on the real JPEG 2000 CT series of ../shared/data.

DICOM series in through the ``monai.bundle`` CLI, NIfTI and DICOM SEG out: the NIfTI has the input's affine and
shape (checked against the independently stored TotalSegmentator label NIfTI of the same series), the SEG read back
by pydicom and highdicom has the source geometry (per-frame positions, orientation, pixel spacing, the referenced
series and SOP instances), its segment labels, and the same voxels as the NIfTI. evaluate.json measures the held-out
slab Dice (slices 14-19, never trained on) and the shipped adapter beats the base alone. Bad input (a DICOM folder
with no image, two series in one folder, a missing input, a NaN volume, an adapter for another base) gives a clear
error and writes nothing. train.json runs a short epoch into a temp folder; torchrun runs multi_gpu_train.json with
gloo on 2 CPU processes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.bundles.bundle_utils import cli_env, inference_cli, run_bundle
from tests.conftest import REPO_ROOT, require_shared

BUNDLE = REPO_ROOT / "bundles" / "ct_totalseg_dynunet_lora"
SERIES = "ct_dicom_series"
LABEL = "totalseg/ct_dicom_series_label.nii.gz"
CLASS_NAMES = ["spleen", "liver", "stomach", "aorta", "autochthon_left", "autochthon_right"]
RESULTS = REPO_ROOT / "benchmarks" / "results"
# the margin absorbs float differences between machines (the figures come from scripts/compare.py)
MARGIN = 0.03

sys.path.insert(0, str(BUNDLE / "scripts"))


def _dataset_with(tmp_path: Path, case: str = "patient01") -> Path:
    """A --dataset_dir holding one case folder: a symlink to the real series (nothing is copied)."""
    src = require_shared(SERIES)
    root = tmp_path / "in"
    root.mkdir(parents=True)
    (root / case).symlink_to(src, target_is_directory=True)
    return root


def _run(configs: str | list[str] = "inference.json", **overrides):
    return run_bundle(BUNDLE, configs, **overrides)


@pytest.fixture(scope="module")
def cli_prediction(tmp_path_factory):
    """inference.json alone through the CLI on the real series; returns (output folder, log)."""
    tmp = tmp_path_factory.mktemp("ct_cli")
    data = _dataset_with(tmp)
    out = tmp / "out"
    return out, inference_cli(BUNDLE, data, out)


def test_cli_writes_nifti_and_seg_named_after_the_case(cli_prediction):
    out, log = cli_prediction
    assert sorted(p.name for p in out.iterdir()) == ["patient01_seg.dcm", "patient01_seg.nii.gz"]
    assert "cases" in log  # progress over the cases


def test_nifti_has_the_input_affine_and_shape(cli_prediction):
    import nibabel as nib

    from monai_peft.transforms import load_volume

    out, _ = cli_prediction
    pred = nib.load(out / "patient01_seg.nii.gz")
    image = load_volume(require_shared(SERIES))
    assert pred.shape == tuple(image.shape[1:]) == (512, 512, 20)
    np.testing.assert_allclose(pred.affine, image.affine.numpy(), atol=1e-4)
    # independent reference: the label NIfTI stored with the series describes the same grid (up to axis flips)
    ref = nib.load(require_shared(LABEL))
    np.testing.assert_allclose(nib.as_closest_canonical(pred).affine, nib.as_closest_canonical(ref).affine, atol=1e-3)
    values = set(np.unique(np.asarray(pred.dataobj)).tolist())
    assert values <= set(range(7)) and {1, 2, 4} <= values  # spleen, liver, aorta fill every slice of this series


def test_prediction_overlaps_the_reference_labels_on_the_original_grid(cli_prediction):
    """The NIfTI lies on the source grid: liver and spleen overlap the TotalSegmentator map (after its ids ->
    bundle classes), which a flipped or shifted output would not."""
    import ct_dynunet as ct
    import nibabel as nib

    out, _ = cli_prediction
    pred = nib.as_closest_canonical(nib.load(out / "patient01_seg.nii.gz"))
    ref = nib.as_closest_canonical(nib.load(require_shared(LABEL)))
    lut = np.zeros(256, dtype=np.int64)
    for src, dst in ct.class_ids(str(require_shared(LABEL))).items():
        lut[src] = dst
    dice = ct.dice_per_class(torch.as_tensor(np.asarray(pred.dataobj).astype(np.int64)),
                             torch.as_tensor(lut[np.asarray(ref.dataobj).astype(np.int64)]))  # fmt: skip
    assert dice["liver"] > 0.8 and dice["spleen"] > 0.6, dice
    # the same comparison with the prediction mirrored left-right collapses: the check sees the geometry
    flipped = torch.as_tensor(np.asarray(pred.dataobj)[::-1].astype(np.int64).copy())
    assert ct.dice_per_class(flipped, torch.as_tensor(lut[np.asarray(ref.dataobj).astype(np.int64)]))["spleen"] < 0.2


def test_seg_has_the_source_geometry_and_references(cli_prediction):
    import highdicom as hd
    import nibabel as nib
    import pydicom

    from monai_peft.transforms import find_dicom_series, sop_uids

    out, _ = cli_prediction
    seg_path = out / "patient01_seg.dcm"
    ds = pydicom.dcmread(seg_path)
    assert ds.Modality == "SEG" and ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    series = find_dicom_series(require_shared(SERIES))
    slices = {sop_uids(s)[1]: s for s in series.datasets}
    assert len(slices) == 20
    # referenced series and instances
    ref_series = ds.ReferencedSeriesSequence[0]
    assert ref_series.SeriesInstanceUID == (series.datasets[0].get("SeriesInstanceUID") or "")
    referenced = {item.ReferencedSOPInstanceUID for item in ref_series.ReferencedInstanceSequence}
    assert referenced == set(slices)
    # geometry: shared orientation / pixel spacing / thickness equal the source's
    shared = ds.SharedFunctionalGroupsSequence[0]
    np.testing.assert_allclose(
        [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient],
        [float(v) for v in series.datasets[0].ImageOrientationPatient],
        atol=1e-6,
    )
    np.testing.assert_allclose(
        [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing],
        [float(v) for v in series.datasets[0].PixelSpacing],
        atol=1e-6,
    )
    assert (ds.Rows, ds.Columns) == (series.datasets[0].Rows, series.datasets[0].Columns) == (512, 512)
    # every frame: its source slice's ImagePositionPatient
    for frame in ds.PerFrameFunctionalGroupsSequence:
        src_uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        pos = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(pos, [float(v) for v in slices[src_uid].ImagePositionPatient], atol=1e-4)
    # segments: one per predicted class, with the class names
    pred = np.asarray(nib.load(out / "patient01_seg.nii.gz").dataobj).astype(np.int64)
    present = [int(v) for v in np.unique(pred) if v]
    labels = [s.SegmentLabel for s in ds.SegmentSequence]
    assert labels == [CLASS_NAMES[v - 1] for v in present]
    # highdicom reads it back, with the same frame-of-reference and the same voxels as the NIfTI
    hseg = hd.seg.segread(seg_path)
    assert hseg.FrameOfReferenceUID == series.datasets[0].FrameOfReferenceUID
    assert [int(n) for n in hseg.get_segment_numbers()] == list(range(1, len(present) + 1))
    from monai_peft.transforms import read_dicom_seg

    numbers = dict(enumerate(present, start=1))  # segment number -> label value (numbered in increasing order)
    back = read_dicom_seg(seg_path, require_shared(SERIES), label_values=numbers)
    assert tuple(back.shape[1:]) == pred.shape
    np.testing.assert_allclose(back.affine.numpy(), nib.load(out / "patient01_seg.nii.gz").affine, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(back[0]).astype(np.int64), pred)


# --------------------------------------------------------------------------------------------- held-out Dice
@pytest.fixture(scope="module")
def heldout_dice():
    """evaluate.json on the held-out slab for the shipped adapter and for the base alone."""
    require_shared(SERIES)
    import compare

    return {"lora": compare.evaluate({}, str(BUNDLE / "models" / "adapter")), "base": compare.evaluate({}, None)}


def test_evaluate_json_reproduces_the_model_card_figures(heldout_dice):
    for variant in ("lora", "base"):
        recorded = json.loads((RESULTS / f"ct_compare_{variant}.json").read_text())["test"]
        got = heldout_dice[variant]
        assert got["mean_dice"] == pytest.approx(recorded["mean_dice"], abs=MARGIN), (variant, got, recorded)
        assert set(got["dice"]) == set(CLASS_NAMES)


def test_adapter_beats_the_base_alone_on_the_held_out_slab(heldout_dice):
    assert heldout_dice["lora"]["mean_dice"] > heldout_dice["base"]["mean_dice"] + 0.05, heldout_dice


def test_evaluate_json_runs_through_monai_bundle_and_saves_metrics(tmp_path):
    require_shared(SERIES)
    _run(["train.json", "evaluate.json"], eval_dir=str(tmp_path / "metrics"))
    text = (tmp_path / "metrics" / "metrics.csv").read_text()
    assert "val_mean_dice" in text
    value = float(text.strip().splitlines()[-1].split(",")[-1])
    recorded = json.loads((RESULTS / "ct_compare_lora.json").read_text())["test"]["mean_dice"]
    assert value == pytest.approx(recorded, abs=MARGIN)


def test_slabs_do_not_overlap_and_split_the_series():
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / "train.json"), str(BUNDLE / "configs" / "evaluate.json")])
    train, val, test = (parser.get(k) for k in ("train_slab", "val_slab", "test_slab"))
    assert train[1] <= val[0] and val[1] <= test[0] and test[1] == 20
    assert parser.get("val_input_slab")[1] <= test[0]  # validation never sees the held-out slices


def test_label_ids_are_mapped_by_name_from_the_file_table():
    import ct_dynunet as ct

    table = ct.totalseg_label_table(str(require_shared(LABEL)))
    assert table["liver"] == 5 and table["aorta"] == 52 and len(table) == 117
    assert ct.class_ids(str(require_shared(LABEL))) == {1: 1, 5: 2, 6: 3, 52: 4, 86: 5, 87: 6}


def test_a_label_table_with_other_ids_is_refused(tmp_path):
    import ct_dynunet as ct
    import nibabel as nib

    from monai_peft.errors import InputDataError

    xml = '<CaretExtension><Label Key="7" Red="0"><![CDATA[liver]]></Label></CaretExtension>'
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4))
    img.header.extensions.append(nib.nifti1.Nifti1Extension(0, xml.encode()))
    img.to_filename(tmp_path / "other.nii.gz")
    with pytest.raises(InputDataError, match="spleen"):
        ct.class_ids(str(tmp_path / "other.nii.gz"))


# --------------------------------------------------------------------------------------------- bad input
def _expect_refusal(tmp_path: Path, data: Path, match: str, **overrides) -> None:
    """Inference raises monai_peft's error naming the problem, writes nothing new, keeps an earlier output."""
    from monai_peft.errors import MonaiPeftError

    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    earlier = out / "earlier_seg.nii.gz"
    earlier.write_bytes(b"an earlier output")
    with pytest.raises(Exception) as info:
        _run(dataset_dir=str(data), output_dir=str(out), device="cpu", **overrides)
    chain, cur = [], info.value
    while cur is not None and len(chain) < 20:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    text = " ".join(str(e) for e in chain)
    assert any(isinstance(e, MonaiPeftError) for e in chain), repr(info.value)
    assert match in text, text
    assert sorted(p.name for p in out.iterdir()) == ["earlier_seg.nii.gz"]
    assert earlier.read_bytes() == b"an earlier output"


def test_dicom_folder_without_images_is_refused(tmp_path):
    import pydicom

    src = sorted(require_shared(SERIES).iterdir())[0]
    case = tmp_path / "in" / "noimage"
    case.mkdir(parents=True)
    ds = pydicom.dcmread(src, stop_before_pixels=True)  # a header without pixel data
    ds.save_as(case / "header_only.dcm")
    _expect_refusal(tmp_path, case.parent, "noimage")


def test_folder_with_no_dicom_slice_is_refused(tmp_path):
    case = tmp_path / "in" / "notes"
    case.mkdir(parents=True)
    (case / "readme.txt").write_text("not an image")
    _expect_refusal(tmp_path, case.parent, "holds no DICOM slice")


def test_two_series_in_one_folder_are_refused(tmp_path):
    import pydicom
    from pydicom.uid import generate_uid

    case = tmp_path / "in" / "mixed"
    case.mkdir(parents=True)
    uid = generate_uid()
    for i, f in enumerate(sorted(require_shared(SERIES).iterdir())):
        if i < 10:
            shutil.copy(f, case / f"{i:02d}.dcm")
        else:
            ds = pydicom.dcmread(f)
            ds.SeriesInstanceUID = uid
            ds.save_as(case / f"{i:02d}.dcm")
    _expect_refusal(tmp_path, case.parent, "2 DICOM series")


def test_missing_input_is_refused(tmp_path):
    require_shared(SERIES)
    _expect_refusal(tmp_path, tmp_path / "does_not_exist", "does_not_exist")


def test_nan_volume_is_refused_naming_the_file(tmp_path):
    import nibabel as nib

    vol = np.full((40, 36, 12), -100.0, dtype=np.float32)
    vol[5, 6, 7] = np.nan
    (tmp_path / "in").mkdir()
    nib.Nifti1Image(vol, np.diag([3.0, 3.0, 2.0, 1.0])).to_filename(tmp_path / "in" / "nan_ct.nii.gz")
    _expect_refusal(tmp_path, tmp_path / "in", "NaN")
    _expect_refusal(tmp_path, tmp_path / "in", "nan_ct.nii.gz")


def test_2d_image_and_single_slice_are_refused(tmp_path):
    import nibabel as nib

    (tmp_path / "in").mkdir()
    nib.Nifti1Image(np.zeros((64, 48), np.float32), np.eye(4)).to_filename(tmp_path / "in" / "flat.nii.gz")
    _expect_refusal(tmp_path, tmp_path / "in", "flat.nii.gz")
    _expect_refusal(tmp_path, tmp_path / "in", "3D volume")
    (tmp_path / "in" / "flat.nii.gz").unlink()
    nib.Nifti1Image(np.zeros((64, 48, 2), np.float32), np.eye(4)).to_filename(tmp_path / "in" / "thin.nii.gz")
    _expect_refusal(tmp_path, tmp_path / "in", "this 3D CT bundle needs a volume of at least 4 voxels")
    _expect_refusal(tmp_path, tmp_path / "in", "thin.nii.gz")


def test_adapter_for_another_base_is_refused(tmp_path):
    import ct_dynunet as ct

    import monai_peft as mp

    data = _dataset_with(tmp_path)
    other = ct.build_network(seed=1)  # not the shipped base
    cfg = mp.LoraConfig(r=4, alpha=8.0, target_modules=ct.LORA_TARGETS)
    foreign = tmp_path / "foreign_adapter"
    mp.get_peft_model(other, cfg, modules_to_save=list(ct.HEAD_MODULES)).save_adapter(foreign)
    _expect_refusal(tmp_path, data, "different base model", adapter_dir=str(foreign))


# --------------------------------------------------------------------------------------------- training
def test_train_json_runs_one_short_epoch_into_a_temp_folder(tmp_path):
    require_shared(SERIES)
    shipped = (BUNDLE / "models/adapter/adapter_model.safetensors").read_bytes()
    run_dir = tmp_path / "run"
    _run("train.json", epochs=1, val_interval=1, output_dir=str(run_dir))
    for sub in ("best", "last"):
        assert (run_dir / sub / "adapter_model.safetensors").is_file()
    assert (run_dir / "last" / "trainer_state.pt").is_file()
    assert any((run_dir / "tb").iterdir())
    info = json.loads((run_dir / "best" / "checkpoint_info.json").read_text())
    assert "val_mean_dice" in json.dumps(info)
    assert (BUNDLE / "models/adapter/adapter_model.safetensors").read_bytes() == shipped  # never overwritten


def test_train_preprocessing_only_sees_the_training_slab():
    """The training chain crops the series to slices 0-11 before anything else sees it (no held-out voxel)."""
    import ct_dynunet as ct

    root = require_shared(SERIES).parent
    item = ct.ct_cases(root, SERIES, LABEL)[0]
    d = ct.preprocessing("validate", slab=(0, 12))(item)
    full = ct.preprocessing("validate")(item)
    assert d["image"].shape[-1] == 12 and full["image"].shape[-1] == 20
    torch.testing.assert_close(d["image"].as_tensor(), full["image"].as_tensor()[..., :12])
    assert float(d["image"].affine[2, 3]) == pytest.approx(float(full["image"].affine[2, 3]))  # same bottom slice
    assert d["image"].shape[1:3] == full["image"].shape[1:3] != (512, 512)  # resampled in-plane to 3 mm


def test_torchrun_ddp_on_two_cpu_processes_writes_rank0_adapter(tmp_path):
    """multi_gpu_train.json under torchrun (gloo, 2 processes): replicas stay equal, rank 0 alone writes."""
    import ct_dynunet as ct

    import monai_peft as mp
    from monai_peft.checkpoint import load_safetensors

    require_shared(SERIES)
    dump = tmp_path / "dump.json"
    dump.write_text(
        json.dumps(
            {
                "run": [
                    "$@train#trainer.run()",
                    "$@tb_writer.close()",
                    "$monai_peft.checkpoint.save_safetensors(monai_peft.bundle.unwrap_ddp(@network)"
                    f".adapter_state_dict(), '{tmp_path}/rank' + str(monai_peft.bundle.get_rank()) + '.safetensors')",
                ]
            }
        )
    )
    out = tmp_path / "run"
    args = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "monai.bundle", "run",
        "--config_file", f"['configs/train.json','configs/multi_gpu_train.json','{dump}']",
        "--output_dir", str(out), "--epochs", "2", "--val_interval", "2", "--num_samples", "1",
    ]  # fmt: skip
    proc = subprocess.run(args, cwd=BUNDLE, env=cli_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rank0, _ = load_safetensors(tmp_path / "rank0.safetensors")
    rank1, _ = load_safetensors(tmp_path / "rank1.safetensors")
    assert rank0.keys() == rank1.keys() and len(rank0) > 0
    for k in rank0:
        assert torch.equal(rank0[k], rank1[k]), k  # DDP kept the replicas identical
    sha = json.loads((BUNDLE / "configs" / "train.json").read_text())["base_sha256"]
    base = ct.load_base_network(BUNDLE / "models/base/base_model.safetensors", sha256=sha)
    loaded = mp.PeftModel.from_pretrained(base, out / "last")  # fingerprint of the real base checked
    for k, v in loaded.adapter_state_dict().items():
        assert torch.equal(v, rank0[k]), k
    assert len(list((out / "tb").glob("events.out.tfevents.*"))) == 1  # rank 1 wrote no log
    assert sorted(p.name for p in out.iterdir()) == ["best", "last", "tb"]
    assert torch.load(out / "last" / "trainer_state.pt", weights_only=True)["epoch"] == 2
