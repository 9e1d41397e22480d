"""A real ``monailabel start_server`` with monai_peft's app, checked over HTTP on real BraTS volumes.

One module-scoped server (start-up is slow) serves, on 127.0.0.1 and a free port:

* ``brats_dka`` - standard bundle mode (``--conf models``): a copy of the BraTS bundle whose adapter is a
  non-mergeable DKA adapter;
* ``tumour`` and ``site2`` - multi-adapter mode (``--conf base_bundle brats --conf adapters ...``): the bundle's
  LoRA adapter and the same DKA adapter, on ONE shared base.

The studies folder holds two real BraTS cases (FLAIR + T1c as one 4D NIfTI, full 240 x 240 x 155 grid), copied to
tmp. Commands are the ones docs/monailabel.md gives. Needs MONAI Label's environment (see conftest.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from tests.monailabel.conftest import (
    BUNDLE,
    bundle_helpers,
    dka_bundle,
    monailabel_python,
    perturbed_adapter,
    write_two_channel,
)

requests = pytest.importorskip("requests")
nib = pytest.importorskip("nibabel")

START_TIMEOUT_S = 300
INFER_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_cmd(python: Path, app: Path, studies: Path, port: int, conf: dict[str, str]) -> list[str]:
    cmd = [str(python), "-m", "monailabel.main", "start_server", "--app", str(app), "--studies", str(studies)]
    for k, v in conf.items():
        cmd += ["--conf", k, v]
    return cmd + ["--host", "127.0.0.1", "--port", str(port)]


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "MONAI_LABEL_TASKS_SCORING": "false", "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the training processes it started (its group)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


class Server:
    def __init__(self, url: str, proc: subprocess.Popen, log: Path, root: Path) -> None:
        self.url, self.proc, self.log, self.root = url, proc, log, root

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def infer(self, model: str, image: str = "pat0006") -> tuple[np.ndarray, np.ndarray, dict]:
        """(label array, affine, result params) of ``/infer/<model>?image=<image>``."""
        r = requests.post(f"{self.url}/infer/{model}", params={"image": image}, timeout=INFER_TIMEOUT_S)
        assert r.status_code == 200, f"{model}: HTTP {r.status_code} {r.text[:500]}"
        return _parse_multipart(r)


def _parse_multipart(r) -> tuple[np.ndarray, np.ndarray, dict]:
    from email.parser import BytesParser
    from email.policy import HTTP

    msg = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: " + r.headers["content-type"].encode() + b"\r\n\r\n" + r.content
    )
    params, image = None, None
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name == "params":
            params = json.loads(
                part.get_content() if isinstance(part.get_content(), str) else part.get_payload(decode=True)
            )
        elif name == "image":
            image = part.get_payload(decode=True)
    assert params is not None and image is not None, f"reply lacks params or image: {r.headers}"
    img = nib.Nifti1Image.from_bytes(image) if image[:2] != b"\x1f\x8b" else _gz_nifti(image)
    return np.asarray(img.dataobj), img.affine, params


def _gz_nifti(data: bytes):
    import gzip

    return nib.Nifti1Image.from_bytes(gzip.decompress(data))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, brats_cases):
    python = monailabel_python()
    root = tmp_path_factory.mktemp("monailabel")
    studies = root / "studies"
    studies.mkdir()
    for name, case in brats_cases.items():
        write_two_channel(case, studies / f"{name}.nii")
    adapters = root / "adapters"
    adapters.mkdir()
    import shutil

    shutil.copytree(BUNDLE / "models" / "adapter", adapters / "tumour")
    perturbed_adapter("dka", adapters / "site2_dka", seed=1)
    dka = dka_bundle(root / "bundles" / "brats_dka", adapters / "site2_dka")
    app = root / "app"
    subprocess.run(
        [str(python), "-m", "monai_peft.monailabel", "app", str(app)], check=True, capture_output=True, timeout=120
    )
    (app / "model" / "brats").symlink_to(BUNDLE, target_is_directory=True)
    (app / "model" / "brats_dka").symlink_to(dka, target_is_directory=True)
    return {"python": python, "root": root, "studies": studies, "app": app, "adapters": adapters}


@pytest.fixture(scope="module")
def server(workspace):
    port = _free_port()
    a = workspace["adapters"]
    conf = {
        "models": "brats_dka",
        "base_bundle": "brats",
        "adapters": f"tumour={a / 'tumour'},site2={a / 'site2_dka'}",
        "adapter_store": str(workspace["root"] / "store"),
        "device": "cpu",
    }
    log = workspace["root"] / "server.log"
    proc = _start(_server_cmd(workspace["python"], workspace["app"], workspace["studies"], port, conf), log)
    url = f"http://127.0.0.1:{port}"
    t0 = time.time()
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited with {proc.returncode}:\n{log.read_text(errors='replace')[-4000:]}")
            try:
                if requests.get(f"{url}/info/", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.time() - t0 > START_TIMEOUT_S:
                pytest.fail(
                    f"the server did not answer in {START_TIMEOUT_S} s:\n{log.read_text(errors='replace')[-4000:]}"
                )
            time.sleep(1)
        yield Server(url, proc, log, workspace["root"])
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def sequential(server):
    """Labels of each model on pat0006, one request at a time (the reference for the other checks)."""
    return {m: server.infer(m) for m in ("tumour", "site2", "brats_dka")}


def test_info_lists_models(server):
    info = requests.get(f"{server.url}/info/", timeout=30).json()
    assert set(info["models"]) == {"brats_dka", "tumour", "site2"}
    for m in info["models"].values():
        assert m["type"] == "segmentation" and m["dimension"] == 3
        assert m["labels"] == {"necrosis": 1, "edema": 2, "non-enhancing tumour": 3, "enhancing tumour": 4}
    assert {"tumour", "site2", "brats_dka"} <= set(info["trainers"])
    assert "on a shared base" in info["models"]["tumour"]["description"]


def test_label_on_the_image_grid(server, sequential, workspace):
    image = nib.load(str(workspace["studies"] / "pat0006.nii"))
    for model, (label, affine, params) in sequential.items():
        assert label.shape == image.shape[:3] == (240, 240, 155), model
        np.testing.assert_array_equal(affine, image.affine, err_msg=model)
        assert label.dtype == np.uint8 and set(np.unique(label)) <= {0, 1, 2, 3, 4}, model
        assert params["adapter"] == model and params["adapter_version"] == 0
        assert (label > 0).sum() > 100, f"{model} found no tumour at all"


def test_two_adapters_differ_and_bundle_mode_equals_shared_base(sequential):
    tumour, site2, dka = (sequential[m][0] for m in ("tumour", "site2", "brats_dka"))
    assert (tumour != site2).sum() > 1000, "LoRA and DKA adapters gave (nearly) the same label"
    # the same DKA adapter, served from its own bundle (own base) and on the shared base: identical labels
    np.testing.assert_array_equal(site2, dka)


def test_concurrent_requests_never_mix_adapters(server, sequential):
    models = ["tumour", "site2"] * 4
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(server.infer, models))
    for model, (label, _, params) in zip(models, results):
        assert params["adapter"] == model
        np.testing.assert_array_equal(label, sequential[model][0], err_msg=f"concurrent {model} differs")


def test_unknown_model_is_a_clear_404(server):
    r = requests.post(f"{server.url}/infer/no_such_model", params={"image": "pat0006"}, timeout=60)
    assert r.status_code == 404
    detail = r.json()["detail"]
    assert "no_such_model" in detail and "tumour" in detail
    assert "infer refused: unknown model 'no_such_model'" in server.log_text()


def test_unknown_image_is_a_clear_404(server):
    r = requests.post(f"{server.url}/infer/tumour", params={"image": "pat9999"}, timeout=60)
    assert r.status_code == 404 and "pat9999" in r.json()["detail"]


def test_non_image_upload_is_refused(server):
    files = {"file": ("notes.txt", io.BytesIO(b"this is not a NIfTI volume\n" * 20), "application/octet-stream")}
    r = requests.post(f"{server.url}/infer/tumour", files=files, timeout=120)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert ".txt" in detail and "could not be read as a medical image" in detail, detail
    assert requests.get(f"{server.url}/info/", timeout=30).status_code == 200  # the server lives on


def test_2d_image_to_3d_model_is_refused(server, workspace, tmp_path):
    vol = nib.load(str(workspace["studies"] / "pat0006.nii"))
    slice2d = np.asarray(vol.dataobj[:, :, 77, :]).astype(np.float32)  # (240, 240, 2): one axial slice
    path = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(slice2d[:, :, None, :], vol.affine), str(path))
    with open(path, "rb") as f:
        r = requests.post(f"{server.url}/infer/site2", files={"file": ("slice.nii.gz", f)}, timeout=120)
    assert r.status_code == 422, r.text
    assert "3D" in r.json()["detail"]
    assert "infer site2 refused" in server.log_text()


def test_corrupt_adapter_published_while_running_keeps_previous_version(server, sequential):
    store = server.root / "store" / "site2"
    bad = store / "v0001"
    bad.mkdir(parents=True)
    src = server.root / "adapters" / "site2_dka"
    (bad / "adapter_config.json").write_bytes((src / "adapter_config.json").read_bytes())
    (bad / "adapter_model.safetensors").write_bytes(b"\x00garbage, not safetensors" * 100)
    (store / "CURRENT").write_text(json.dumps({"version": 1, "folder": "v0001"}))
    label, _, params = server.infer("site2")
    assert params["adapter_version"] == 0
    np.testing.assert_array_equal(label, sequential["site2"][0])
    assert "new version" in server.log_text() and "refused" in server.log_text()


def test_train_one_epoch_publishes_a_version_the_next_infer_uses(server, sequential, workspace, brats_cases):
    with open(brats_cases["pat0005"] / "OTMultiClass.nii.gz", "rb") as f:
        r = requests.put(
            f"{server.url}/datastore/label",
            params={"image": "pat0005", "tag": "final"},
            files={"label": ("pat0005.nii.gz", f)},
            timeout=120,
        )
    assert r.status_code == 200, r.text
    r = requests.post(f"{server.url}/train/tumour", json={"max_epochs": 1}, timeout=120)
    assert r.status_code == 200, r.text
    t0 = time.time()
    while True:
        status = requests.get(f"{server.url}/train/", timeout=30).json()
        if status.get("status") in ("DONE", "ERROR"):
            break
        assert time.time() - t0 < 600, f"training did not finish: {status}"
        time.sleep(2)
    assert status["status"] == "DONE", "\n".join(status.get("details", [])) + server.log_text()[-3000:]
    pointer = json.loads((server.root / "store" / "tumour" / "CURRENT").read_text())
    assert pointer["version"] == 1
    new = server.root / "store" / "tumour" / pointer["folder"]
    old_cfg = json.loads((server.root / "adapters" / "tumour" / "adapter_config.json").read_text())
    new_cfg = json.loads((new / "adapter_config.json").read_text())
    assert new_cfg["base_model"]["fingerprint"] == old_cfg["base_model"]["fingerprint"]  # only the adapter trained
    old_bytes = (server.root / "adapters" / "tumour" / "adapter_model.safetensors").read_bytes()
    assert (new / "adapter_model.safetensors").read_bytes() != old_bytes
    info = json.loads((new / "version_info.json").read_text())
    assert info["epochs"] == 1 and info["steps"] == 1 and info["images"][0].endswith("pat0005.nii")

    label, _, params = server.infer("tumour")
    assert params["adapter_version"] == 1
    assert params["adapter_sha256"] == hashlib.sha256((new / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert (label != sequential["tumour"][0]).any(), "the retrained adapter gave exactly the old label"
    assert not (server.root / "store" / "site2" / "v0002").exists()  # the other adapter got no new version


def test_adapter_of_another_base_is_refused_at_start_up(workspace, tmp_path):
    h = bundle_helpers()
    other = perturbed_adapter("lora", tmp_path / "other_base_lora", seed=2, base=h.build_network(5, seed=1))
    port = _free_port()
    conf = {"base_bundle": "brats", "adapters": f"bad={other}", "adapter_store": str(tmp_path / "store")}
    log = tmp_path / "bad.log"
    proc = _start(_server_cmd(workspace["python"], workspace["app"], workspace["studies"], port, conf), log)
    try:
        proc.wait(START_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _stop(proc)
        pytest.fail("the server started with an adapter of another base:\n" + log.read_text(errors="replace")[-3000:])
    text = log.read_text(errors="replace")
    assert "Application startup failed" in text
    assert str(other) in text and "different base" in text, text[-3000:]
