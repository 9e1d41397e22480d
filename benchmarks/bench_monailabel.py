"""Memory and latency of serving N task adapters on one base (monai_peft's MONAI Label app) vs N full models.

For N = 1, 2, 4, 8 adapters of the BraTS bundle (``bundles/brats_mri_swinunetr_lora``: SwinUNETR feature size 12,
LoRA r=8 adapters; the N adapters are the shipped one and N-1 seeded variants), in the same run:

* resident memory (RSS growth, each measurement in a fresh subprocess) of ONE ``MultiAdapterServer`` holding the
  base + N adapters, versus N separate full models (each its own base with its adapter merged in), and the ratio;
  also the tensor bytes (base + N x adapter vs N x base);
* adapter switch time: ``set_adapter`` + re-preparing the merged working copy (first prediction after a switch
  minus a prediction with the same adapter);
* latency of one request (preprocess + inference + inversion) on a real BraTS volume, sequential and with 4
  concurrent clients (threads), in-process;
* with ``--server PYTHON`` (the MONAI Label environment's python), the same two latencies over HTTP ``/infer``
  against a real ``monailabel start_server`` holding N = 8 adapters.

Usage::

    OMP_NUM_THREADS=2 python benchmarks/bench_monailabel.py [--server .venv-monailabel/bin/python] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundles" / "brats_mri_swinunetr_lora"
DATA = Path(os.environ.get("MONAI_PEFT_SHARED_DATA", ROOT.parent / "shared" / "data"))
NS = (1, 2, 4, 8)


def _rss_mb() -> float:
    return _pid_rss_mb("self")


def _pid_rss_mb(pid: int | str) -> float:
    """Resident memory of a process (MB), from /proc (Linux)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def make_adapters(dest: Path, n: int) -> list[Path]:
    """The shipped LoRA adapter and n-1 variants (seeded noise on its tensors), as adapter folders."""
    import shutil

    import torch

    import monai_peft as mp
    from monai_peft.monailabel.serving import BundleRuntime

    rt = BundleRuntime.from_bundle(BUNDLE)
    out = [dest / "a0"]
    shutil.copytree(BUNDLE / "models" / "adapter", out[0])
    for i in range(1, n):
        model = mp.PeftModel.from_pretrained(rt.build_base(), out[0], is_trainable=True)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.01)
        out.append(model.save_adapter(dest / f"a{i}"))
    return out


def _memory_child(mode: str, folders: list[str]) -> dict:
    """Run in a subprocess: RSS growth of building ``mode`` ("shared" or "separate") with these adapters."""
    import gc

    import torch

    import monai_peft as mp
    from monai_peft.monailabel.serving import BundleRuntime, MultiAdapterServer

    torch.set_num_threads(1)
    rt = BundleRuntime.from_bundle(BUNDLE)
    warm = rt.build_base()  # imports, allocator warm-up; kept alive so that what follows is fresh memory
    gc.collect()
    before = _rss_mb()
    if mode == "shared":
        keep = MultiAdapterServer(
            rt.build_base(), rt.preprocessing, rt.inferer, {f"a{i}": f for i, f in enumerate(folders)}
        )
        tensors = sum(t.numel() * t.element_size() for t in keep.peft.state_dict().values())
    else:
        keep = [mp.PeftModel.from_pretrained(rt.build_base(), f).merge_and_unload() for f in folders]
        tensors = sum(t.numel() * t.element_size() for m in keep for t in m.state_dict().values())
    gc.collect()
    assert warm is not None
    return {"rss_mb": round(_rss_mb() - before, 1), "tensor_mb": round(tensors / 2**20, 2)}


def measure_memory(folders: list[Path]) -> dict:
    out = {}
    for mode in ("shared", "separate"):
        here, names = str(Path(__file__).parent), [str(f) for f in folders]
        code = (
            f"import json,sys; sys.path.insert(0, {here!r}); import bench_monailabel as b; "
            f"print('RESULT', json.dumps(b._memory_child({mode!r}, {names!r})))"
        )
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=1200)
        line = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
        if not line:
            raise RuntimeError(f"memory child failed: {done.stderr[-2000:]}")
        out[mode] = json.loads(line[0][7:])
    out["rss_ratio_separate_over_shared"] = round(out["separate"]["rss_mb"] / max(out["shared"]["rss_mb"], 1e-6), 2)
    out["tensor_ratio_separate_over_shared"] = round(
        out["separate"]["tensor_mb"] / max(out["shared"]["tensor_mb"], 1e-6), 2
    )
    return out


def measure_latency(folders: list[Path], image: Path, repeats: int) -> dict:
    import torch

    from monai_peft.monailabel.serving import BundleRuntime, MultiAdapterServer

    rt = BundleRuntime.from_bundle(BUNDLE)
    names = [f"a{i}" for i in range(len(folders))]
    server = MultiAdapterServer(rt.build_base(), rt.preprocessing, rt.inferer, dict(zip(names, map(str, folders))))
    x = server.preprocess(image)["image"]
    server.predict(names[0], x)  # warm-up (first merge)
    same, switch = [], []
    for r in range(repeats):
        t = time.perf_counter()
        server.predict(names[0], x)
        same.append(time.perf_counter() - t)
        other = names[(r % (len(names) - 1)) + 1] if len(names) > 1 else names[0]
        t = time.perf_counter()
        server.predict(other, x)
        switch.append(time.perf_counter() - t)
        server.predict(names[0], x)
    seq = []
    for r in range(repeats):
        t = time.perf_counter()
        server.segment(names[r % len(names)], image)
        seq.append(time.perf_counter() - t)
    with ThreadPoolExecutor(4) as pool:
        t = time.perf_counter()
        lat = list(
            pool.map(lambda n: _timed(server.segment, n, image), [names[i % len(names)] for i in range(4 * repeats)])
        )
        wall = time.perf_counter() - t
    del torch
    return {
        "predict_same_adapter_s": round(statistics.median(same), 3),
        "predict_after_switch_s": round(statistics.median(switch), 3),
        "switch_overhead_s": round(statistics.median(switch) - statistics.median(same), 3) if len(names) > 1 else 0.0,
        "request_sequential_s": round(statistics.median(seq), 3),
        "request_4_clients_median_s": round(statistics.median(lat), 3),
        "throughput_4_clients_req_per_s": round(len(lat) / wall, 3),
    }


def _timed(fn, *args):
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def measure_server(python: str, folders: list[Path], image: Path, work: Path, repeats: int) -> dict:
    """Real monailabel start_server with len(folders) adapters: /infer latency sequential and 4 clients."""
    import shutil
    import signal
    import socket

    import requests

    studies = work / "studies"
    studies.mkdir()
    shutil.copy(image, studies / image.name)
    image_id = image.name.split(".")[0]
    app = work / "app"
    subprocess.run([python, "-m", "monai_peft.monailabel", "app", str(app)], check=True, capture_output=True)
    (app / "model" / "brats").symlink_to(BUNDLE, target_is_directory=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    adapters = ",".join(f"a{i}={f}" for i, f in enumerate(folders))
    cmd = [python, "-m", "monailabel.main", "start_server", "--app", str(app), "--studies", str(studies),
           "--conf", "base_bundle", "brats", "--conf", "adapters", adapters, "--conf", "skip_trainers", "true",
           "--conf", "device", "cpu", "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    with open(work / "server.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if requests.get(f"{url}/info/", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(1)
        else:
            raise RuntimeError("server did not start")

        def call(name):
            t = time.perf_counter()
            r = requests.post(f"{url}/infer/{name}", params={"image": image_id, "output": "json"}, timeout=600)
            r.raise_for_status()
            return time.perf_counter() - t

        names = [f"a{i}" for i in range(len(folders))]
        call(names[0])
        seq = [call(names[i % len(names)]) for i in range(repeats)]
        with ThreadPoolExecutor(4) as pool:
            t = time.perf_counter()
            lat = list(pool.map(call, [names[i % len(names)] for i in range(4 * repeats)]))
            wall = time.perf_counter() - t
        rss = _pid_rss_mb(proc.pid)
        return {
            "adapters": len(folders),
            "http_infer_sequential_s": round(statistics.median(seq), 3),
            "http_infer_4_clients_median_s": round(statistics.median(lat), 3),
            "http_throughput_4_clients_req_per_s": round(len(lat) / wall, 3),
            "server_rss_mb": round(rss, 1),
        }
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", default=None, help="python of the MONAI Label environment (adds the HTTP figures)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--memory_only", action="store_true", help="only the memory figures (no inference)")
    p.add_argument("--server_only", action="store_true", help="only the HTTP figures of --server")
    args = p.parse_args(argv)
    case = DATA / "brats" / "brats_2013_pat0006_1"
    if not case.is_dir():
        print(f"real data {case} is absent (set MONAI_PEFT_SHARED_DATA)", file=sys.stderr)
        return 1
    sys.path.insert(0, str(ROOT))
    from tests.monailabel.conftest import write_two_channel

    results: dict = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": os.environ.get("OMP_NUM_THREADS")},
        "bundle": BUNDLE.name,
        "by_n": {},
    }
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        image = write_two_channel(case, tmp / "pat0006.nii")
        folders = make_adapters(tmp / "adapters", max(NS))
        for n in () if args.server_only else NS:
            row = {"memory": measure_memory(folders[:n])}
            if args.memory_only:
                m = row["memory"]
                print(f"N={n}: {json.dumps(m)}", flush=True)
                results["by_n"][str(n)] = row
                continue
            row["latency"] = measure_latency(folders[:n], image, args.repeats)
            results["by_n"][str(n)] = row
            m, lat = row["memory"], row["latency"]
            print(
                f"N={n}: RSS shared {m['shared']['rss_mb']} MB vs separate {m['separate']['rss_mb']} MB "
                f"(ratio {m['rss_ratio_separate_over_shared']}); tensors {m['shared']['tensor_mb']} vs "
                f"{m['separate']['tensor_mb']} MB (ratio {m['tensor_ratio_separate_over_shared']}); switch "
                f"{lat['switch_overhead_s']} s; request {lat['request_sequential_s']} s sequential, "
                f"{lat['request_4_clients_median_s']} s with 4 clients ({lat['throughput_4_clients_req_per_s']} req/s)",
                flush=True,
            )
        if args.server and not args.memory_only:
            (tmp / "srv").mkdir()
            results["server"] = measure_server(args.server, folders, image, tmp / "srv", args.repeats)
            print("server:", json.dumps(results["server"]), flush=True)
    results["wall_s"] = round(time.time() - t0, 1)
    text = json.dumps(results, indent=2)
    if args.out:
        out = Path(args.out)
        tmpf = out.with_name(f".{out.name}.tmp")
        tmpf.write_text(text + "\n")
        os.replace(tmpf, out)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
