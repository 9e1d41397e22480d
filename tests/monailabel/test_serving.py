"""monai_peft.monailabel without MONAI Label: conf parsing, the versioned store, the multi-adapter server and its
lock, refresh of published versions, training only the adapter, and the real BraTS bundle in-process."""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import monai_peft as mp
from monai_peft.errors import BaseModelMismatchError, CheckpointError, ConfigError, InputDataError
from monai_peft.monailabel import app_dir, copy_app
from monai_peft.monailabel.serving import AdapterStore, BundleRuntime, MultiAdapterServer, parse_adapters
from monai_peft.monailabel.train import train_adapter
from tests.conftest import require_shared
from tests.monailabel.conftest import BUNDLE, write_two_channel

# ------------------------------------------------------------------------------------------------
# a tiny 2D network on a non-square grid (24 x 40), slow enough between its two adapted layers that a
# switch of the active adapter by another thread mid-forward would show in the output
# ------------------------------------------------------------------------------------------------
GRID = (24, 40)


class _Pause(nn.Module):
    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return x


def tiny_net(seed: int = 0, pause: float = 0.0) -> nn.Module:
    """``(B, 1, 24, 40) -> (B, 3, 24, 40)``: conv1 - pause - conv2 (both LoRA targets)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), _Pause(pause), nn.Conv2d(8, 3, 3, padding=1)
    )  # fmt: skip


def make_adapter(folder: Path, seed: int, base_seed: int = 0, scale: float = 0.5) -> Path:
    model = mp.get_peft_model(tiny_net(base_seed), mp.LoraConfig(r=2, alpha=2.0, target_modules=["0", "3"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    model.save_adapter(folder)
    return folder


def copier(src: Path):
    """A ``write(folder)`` for :meth:`AdapterStore.publish` that copies the adapter folder ``src``."""

    def write(dest: Path) -> None:
        for n in ("adapter_config.json", "adapter_model.safetensors"):
            (dest / n).write_bytes((src / n).read_bytes())

    return write


def direct(x: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """An inferer that runs the live (unmerged) model, so mid-forward switches would be visible."""
    return model(x)


@pytest.fixture
def tiny(tmp_path):
    a = make_adapter(tmp_path / "a", seed=1)
    b = make_adapter(tmp_path / "b", seed=2)
    store = AdapterStore(tmp_path / "store")
    server = MultiAdapterServer(
        tiny_net(0, pause=0.02), None, direct, {"a": a, "b": b}, store=store, spatial_dims=2, in_channels=1
    )
    x = torch.randn(1, *GRID, generator=torch.Generator().manual_seed(3))
    return server, store, x, tmp_path


# ------------------------------------------------------------------------------------------------
def test_parse_adapters_forms_and_errors(tmp_path):
    assert parse_adapters("t=/m/t, s2=rel", base_dir="/base") == {"t": "/m/t", "s2": "/base/rel"}
    assert parse_adapters('{"t": "/m/t"}') == {"t": "/m/t"}
    f = tmp_path / "adapters.json"
    f.write_text(json.dumps({"x": "sub/x"}))
    assert parse_adapters(str(f)) == {"x": str(tmp_path / "sub" / "x")}
    assert parse_adapters("") == {}
    with pytest.raises(ConfigError, match="has no '='"):
        parse_adapters("t=/a,broken")
    with pytest.raises(ConfigError, match="given twice"):
        parse_adapters("t=/a,t=/b")
    with pytest.raises(ConfigError, match="not valid"):
        parse_adapters("bad name=/a")
    with pytest.raises(ConfigError, match="cannot read the adapters file"):
        parse_adapters(str(tmp_path / "missing.json"))


def test_store_publishes_versions_atomically(tmp_path):
    src = make_adapter(tmp_path / "src", seed=1)
    store = AdapterStore(tmp_path / "store")
    assert store.current("t") is None
    copy = copier(src)
    assert store.publish("t", copy, info={"epochs": 1})[0] == 1
    v2, p2 = store.publish("t", copy)
    assert v2 == 2 and store.current("t") == (2, p2) and store.versions("t") == [1, 2]
    assert json.loads((p2 / "version_info.json").read_text())["created"]

    def broken(d: Path) -> None:
        copy(d)
        (d / "adapter_model.safetensors").write_bytes(b"truncated")

    def failing(d: Path) -> None:
        raise OSError("disk full")

    for bad, err in ((broken, CheckpointError), (failing, OSError)):
        with pytest.raises(err):
            store.publish("t", bad)
        assert store.current("t") == (2, p2) and store.versions("t") == [1, 2]
    assert [p.name for p in (tmp_path / "store" / "t").iterdir() if p.name.startswith(".")] == []


def test_two_adapters_on_one_base_differ_and_equal_their_own_models(tiny):
    server, _, x, tmp_path = tiny
    out_a, va = server.predict("a", x)
    out_b, _ = server.predict("b", x)
    assert va.version == 0 and out_a.shape == (1, 3, *GRID)
    assert not torch.allclose(out_a, out_b)
    ref = mp.PeftModel.from_pretrained(tiny_net(0), tmp_path / "a").eval()
    with torch.no_grad():
        torch.testing.assert_close(out_a, ref(x[None]))
    assert len([p for p in server.peft.base_model.parameters()]) > 0  # one base network holds both adapters
    assert set(server.peft.peft_config) == {"a__v0", "b__v0"}


def test_concurrent_predictions_never_mix_adapters(tiny):
    server, _, x, _ = tiny
    ref = {n: server.predict(n, x)[0] for n in ("a", "b")}
    names = ["a", "b"] * 6
    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda n: server.predict(n, x)[0], names))
    for n, out in zip(names, outs):
        torch.testing.assert_close(out, ref[n])


def test_without_the_lock_adapters_would_mix(tiny):
    """Negative control: the concurrency test above can fail. With a lock that does not lock, threads switch the
    active adapter in the middle of each other's forward pass and outputs come out mixed."""
    server, _, x, _ = tiny
    ref = {n: server.predict(n, x)[0] for n in ("a", "b")}

    class NoLock:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    server.lock = NoLock()
    names = ["a", "b"] * 6
    barrier = threading.Barrier(len(names))

    def run(n):
        barrier.wait()
        return server.predict(n, x)[0]

    with ThreadPoolExecutor(len(names)) as pool:
        outs = list(pool.map(run, names))
    assert any(not torch.allclose(out, ref[n]) for n, out in zip(names, outs))


def test_published_version_is_served_and_corrupt_one_refused(tiny, caplog):
    server, store, x, tmp_path = tiny
    before, _ = server.predict("a", x)
    newer = make_adapter(tmp_path / "a2", seed=7)
    store.publish("a", copier(newer))
    after, v = server.predict("a", x)
    assert v.version == 1 and not torch.allclose(before, after)
    assert set(server.peft.peft_config) == {"a__v1", "b__v0"}  # the old version was dropped
    # a corrupt version written behind the server's back: refused, version 1 keeps serving, one log line
    bad = tmp_path / "store" / "a" / "v0002"
    bad.mkdir()
    (bad / "adapter_config.json").write_bytes((newer / "adapter_config.json").read_bytes())
    (bad / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    (tmp_path / "store" / "a" / "CURRENT").write_text(json.dumps({"version": 2, "folder": "v0002"}))
    with caplog.at_level(logging.ERROR, logger="monai_peft.monailabel.serving"):
        again, v = server.predict("a", x)
        server.predict("a", x)
    assert v.version == 1
    torch.testing.assert_close(again, after)
    refused = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == 1 and "still serving version 1" in refused[0].getMessage()
    # a restart (new server) skips the corrupt version and serves the newest good one
    restarted = MultiAdapterServer(tiny_net(0), None, direct, {"a": tmp_path / "a"}, store=store, spatial_dims=2)
    assert restarted.version("a").version == 1


def test_adapter_of_another_base_is_refused_naming_the_folder(tmp_path):
    other = make_adapter(tmp_path / "other", seed=1, base_seed=5)
    with pytest.raises(BaseModelMismatchError, match=str(other)):
        MultiAdapterServer(tiny_net(0), None, direct, {"x": other}, spatial_dims=2)
    with pytest.raises(CheckpointError, match="has no adapter_config.json"):
        MultiAdapterServer(tiny_net(0), None, direct, {"x": tmp_path / "nowhere"}, spatial_dims=2)


def test_wrong_dimension_or_channels_refused(tiny):
    server, _, _, _ = tiny
    with pytest.raises(InputDataError, match="the model is 2D"):
        server._check_image(torch.zeros(1, 8, 8, 8), "vol.nii.gz")
    with pytest.raises(InputDataError, match="takes 1 channels"):
        server._check_image(torch.zeros(2, *GRID), "img.nii.gz")


def test_train_adapter_trains_only_the_adapter_and_publishes(tmp_path):
    folder = make_adapter(tmp_path / "a", seed=1)
    img = torch.randn(1, *GRID, generator=torch.Generator().manual_seed(0))
    lab = (img > 0.5).float() + (img > 1.2).float()  # 0 / 1 / 2, a learnable target

    def pre(d):
        assert d["image"] == "img.npy" and d["label"] == "lab.npy"
        return {"image": img.clone(), "label": lab.clone()}

    runtime = BundleRuntime(
        root=tmp_path, name="tiny", build_base=lambda: tiny_net(0), adapter_dir=folder, preprocessing=None,
        inferer=direct, spatial_dims=2, train_preprocessing=pre, learning_rate=0.05,
    )  # fmt: skip
    store = AdapterStore(tmp_path / "store")
    with pytest.raises(InputDataError, match="no labelled image"):
        train_adapter(runtime, store, "a", folder, [])
    out = train_adapter(runtime, store, "a", folder, [{"image": "img.npy", "label": "lab.npy"}] * 3, max_epochs=2)
    assert out["version"] == 1 and out["steps"] == 6 and out["loss"][1] < out["loss"][0]
    assert out["trainable"] == sum(p.numel() for n, p in mp.get_peft_model(
        tiny_net(0), mp.LoraConfig(r=2, alpha=2.0, target_modules=["0", "3"])).named_parameters() if p.requires_grad)  # fmt: skip
    old, new = (json.loads((p / "adapter_config.json").read_text()) for p in (folder, Path(out["path"])))
    assert new["base_model"]["fingerprint"] == old["base_model"]["fingerprint"]
    from monai_peft.checkpoint import load_safetensors

    t_old, _ = load_safetensors(folder / "adapter_model.safetensors")
    t_new, _ = load_safetensors(Path(out["path"]) / "adapter_model.safetensors")
    assert set(t_old) == set(t_new) and all(k.startswith("adapter.") for k in t_new)
    assert any(not torch.equal(t_old[k], t_new[k]) for k in t_old)
    # the next training starts from the published version
    out2 = train_adapter(runtime, store, "a", folder, [{"image": "img.npy", "label": "lab.npy"}])
    assert out2["from_version"] == 1 and out2["version"] == 2


def test_app_folder_and_copy(tmp_path):
    assert (app_dir() / "main.py").is_file()
    dest = copy_app(tmp_path / "app")
    assert (dest / "main.py").read_text() == (app_dir() / "main.py").read_text() and (dest / "model").is_dir()
    with pytest.raises(FileExistsError, match="--overwrite"):
        copy_app(dest)


# ------------------------------------------------------------------------------------------------
# the real BraTS bundle, in-process
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def brats_runtime():
    require_shared("brats")
    return BundleRuntime.from_bundle(BUNDLE)


def test_bundle_runtime_reads_the_brats_bundle(brats_runtime):
    rt = brats_runtime
    assert rt.name == BUNDLE.name and rt.spatial_dims == 3 and rt.in_channels == 2
    assert rt.labels == {"necrosis": 1, "edema": 2, "non-enhancing tumour": 3, "enhancing tumour": 4}
    assert rt.adapter_dir == BUNDLE / "models" / "adapter" and rt.train_preprocessing is not None
    a, b = rt.build_base(), rt.build_base()
    assert a is not b and all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_segment_anisotropic_real_volume_on_its_grid(brats_runtime, tmp_path):
    """A real anisotropic, non-square MR volume (117 x 91 x 20 at 3 mm slices), two channels: the label has its
    shape and exact affine."""
    import nibabel as nib

    src = nib.load(str(require_shared("totalseg/example_mr_sm.nii.gz")))
    data = np.asarray(src.dataobj, dtype=np.float32)
    path = tmp_path / "mr2.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([data, data[::-1]], -1), src.affine), str(path))
    rt = brats_runtime
    server = MultiAdapterServer(
        rt.build_base(), rt.preprocessing, rt.inferer, {"t": rt.adapter_dir}, spatial_dims=3, in_channels=2
    )
    label, version, data_out = server.segment("t", path)
    assert tuple(label.shape) == (1, *src.shape) and version.version == 0
    np.testing.assert_array_equal(label.affine.numpy(), nib.load(str(path)).affine)
    assert set(data_out["latencies"]) == {"pre", "infer", "invert"}
    with pytest.raises(InputDataError, match="3D bundle"):
        flat = tmp_path / "flat.nii.gz"
        nib.save(nib.Nifti1Image(np.stack([data[:, :, :1], data[:, :, :1]], -1), src.affine), str(flat))
        server.segment("t", flat)
    with pytest.raises(InputDataError, match="cannot read|could not be read"):
        junk = tmp_path / "junk.nii.gz"
        junk.write_bytes(b"not an image")
        server.segment("t", junk)


def test_two_channel_writer_keeps_the_grid(tmp_path):
    import nibabel as nib

    case = require_shared("brats/brats_2013_pat0006_1")
    out = write_two_channel(case, tmp_path / "p6.nii")
    img, ref = nib.load(str(out)), nib.load(str(case / "Flair_subtrMeanDivStd.nii.gz"))
    assert img.shape == (*ref.shape, 2)
    np.testing.assert_array_equal(img.affine, ref.affine)
