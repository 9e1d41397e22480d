"""Core-engine benchmarks: trainable parameters and adapter file size per method, inference latency
of merged/unmerged adapters, training step time and peak memory relative to full fine-tuning,
and (if Hugging Face peft is installed) LoRA step time and output equality against peft.

Every figure is a ratio against a baseline measured in the same run. Timings interleave the
variants and report medians. Run::

    python benchmarks/bench_core.py --device cpu --out docs/benchmarks/core_cpu.json
    python benchmarks/bench_core.py --device cuda --out docs/benchmarks/core_gpu.json

Sections can be chosen with ``--only params,latency,train,peft``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import monai_peft as mp

METHODS_VIT = [
    ("lora", {"r": 4, "alpha": 32}),
    ("adapter", {"bottleneck": 64}),
    ("adaptformer", {"bottleneck": 64}),
    ("ssf", {}),
    ("bitfit", {}),
    ("norm_tuning", {}),
    ("attention_tuning", {}),
    ("partial", {"k": 1}),
    ("linear_probe", {}),
    ("full_finetune", {}),
    ("dka", {}),
    ("vpt", {"prompt_length": 10}),
    ("ept", {"prompt_length": 10}),
    ("convpass", {}),
    ("fact", {}),
]
METHODS_CNN = [
    ("lora", {"r": 4, "alpha": 32}),
    ("adapter", {"reduction_factor": 16}),
    ("ssf", {}),
    ("bitfit", {}),
    ("norm_tuning", {}),
    ("partial", {"k": 1}),
    ("linear_probe", {}),
    ("full_finetune", {}),
    ("dka", {}),
    ("conv_adapter", {}),
    ("tsa", {}),
]


def vit_b16(num_classes: int = 2) -> nn.Module:
    from monai.networks.nets import ViT

    return ViT(
        in_channels=3,
        img_size=(224, 224),
        patch_size=16,
        spatial_dims=2,
        classification=True,
        num_classes=num_classes,
        qkv_bias=True,
        post_activation=None,
    )


def swinunetr() -> nn.Module:
    from monai.networks.nets import SwinUNETR

    return SwinUNETR(in_channels=1, out_channels=14, feature_size=48, spatial_dims=3)


def densenet121() -> nn.Module:
    from monai.networks.nets import DenseNet121

    return DenseNet121(spatial_dims=2, in_channels=1, out_channels=2)


NETWORKS = {
    "ViT-B/16 (2D, 224)": (vit_b16, METHODS_VIT + [("lora_qv+head", {"r": 4, "alpha": 32})]),
    "SwinUNETR (3D, feature 48)": (
        swinunetr,
        [m for m in METHODS_VIT if m[0] != "adaptformer"] + [("adaptformer", {"bottleneck": 16})],
    ),
    "DenseNet121 (2D)": (densenet121, METHODS_CNN),
}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# ---------------------------------------------------------------------------------------------
def bench_params() -> list[dict]:
    rows = []
    for net_name, (factory, methods) in NETWORKS.items():
        for method, kw in methods:
            torch.manual_seed(0)
            net = factory()
            head = mp.get_preset(net).role("head").modules
            mts = None
            if method == "lora_qv+head":
                cfg = mp.LoraConfig(**kw)
                mts = [f"re:{head}"] if isinstance(head, str) else head
            else:
                cfg = mp.get_config(method, **kw)
            try:
                model = mp.get_peft_model(net, cfg, modules_to_save=mts)
            except mp.MonaiPeftError as exc:
                rows.append({"network": net_name, "method": method, "error": str(exc)[:120]})
                continue
            trainable, total = model.trainable_parameters()
            with tempfile.TemporaryDirectory() as d:
                model.save_adapter(d)
                size = sum(f.stat().st_size for f in Path(d).iterdir())
            base_params = sum(p.numel() for p in model.base_model.parameters()) - (
                sum(p.numel() for _, layer in model.adapter_layers() for p in layer.adapters.parameters())
            )
            rows.append(
                {
                    "network": net_name,
                    "method": method,
                    "config": kw,
                    "trainable": trainable,
                    "total": total,
                    "trainable_pct_of_base": round(100 * trainable / base_params, 4),
                    "adapter_file_bytes": size,
                }
            )
            print(
                f"{net_name:28s} {method:18s} trainable {trainable:>12,d} ({100 * trainable / base_params:8.4f} %)  file {size / 1e6:9.3f} MB",
                flush=True,
            )
            del model, net
            gc.collect()
    return rows


# ---------------------------------------------------------------------------------------------
def _time(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def _interleaved(fns: dict, device: str, reps: int, warmup: int = 2) -> dict[str, float]:
    for fn in fns.values():
        for _ in range(warmup):
            _time(fn, device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    for rep in range(reps):
        for k in order if rep % 2 == 0 else order[::-1]:  # alternate the order: no variant always runs first
            times[k].append(_time(fns[k], device))
    return {k: statistics.median(v) for k, v in times.items()}


def bench_latency(device: str, batch: int, reps: int) -> dict:
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 224, 224, device=device)
    base = vit_b16().to(device).eval()
    models = {"base": base}
    for name, cfg in [("lora", mp.LoraConfig(r=4, alpha=32)), ("ssf", mp.SSFConfig())]:
        pm = mp.get_peft_model(copy.deepcopy(base), cfg).to(device).eval()
        for p in pm.parameters():
            if p.requires_grad:
                nn.init.normal_(p, std=0.01) if name == "lora" else None
        models[f"{name}_unmerged"] = pm
        models[f"{name}_merged"] = mp.get_peft_model(copy.deepcopy(base), cfg).merge_and_unload().to(device).eval()
    fns = {}
    for k, m in models.items():

        def run(m=m):
            with torch.no_grad():
                m(x)

        fns[k] = run
    med = _interleaved(fns, device, reps)
    out = {"batch": batch, "median_s": med, "ratio_vs_base": {k: round(v / med["base"], 3) for k, v in med.items()}}
    print("latency ratios vs base:", out["ratio_vs_base"], flush=True)
    return out


# ---------------------------------------------------------------------------------------------
TRAIN_CHILD = r"""
import json, resource, sys, time, torch, torch.nn.functional as F
sys.path.insert(0, {bench_dir!r})
import bench_core as B, monai_peft as mp
method, kw, device, batch, steps = json.loads(sys.argv[1])
torch.manual_seed(0)
net = B.vit_b16()
model = mp.get_peft_model(net, mp.get_config(method, **kw), modules_to_save=None if method in ("linear_probe", "partial", "full_finetune") else ["classification_head"]).to(device)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
x = torch.randn(batch, 3, 224, 224, device=device); y = torch.randint(0, 2, (batch,), device=device)
def step():
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x)[0], y); loss.backward(); opt.step()
step()
if device == "cuda":
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base_mem = torch.cuda.memory_allocated()
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
times = []
for _ in range(steps):
    if device == "cuda": torch.cuda.synchronize()
    t = time.perf_counter(); step()
    if device == "cuda": torch.cuda.synchronize()
    times.append(time.perf_counter() - t)
times.sort()
# training-state bytes, counted tensor by tensor (device independent): parameters + gradients + optimizer
# state + the activations autograd saves for backward (unique storages, as packed by saved_tensors_hooks)
saved = {{}}
param_ptrs = {{p.untyped_storage().data_ptr() for p in model.parameters()}}
def pack(t):
    ptr = t.untyped_storage().data_ptr()
    if ptr not in param_ptrs:  # parameters saved for backward are already counted as parameters
        saved[ptr] = t.untyped_storage().nbytes()
    return t
opt.zero_grad(set_to_none=True)
with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
    loss = F.cross_entropy(model(x)[0], y)
loss.backward(); opt.step()
params_b = sum(p.numel() * p.element_size() for p in model.parameters())
grads_b = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
opt_b = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
res = {{"step_s": times[len(times)//2], "trainable": model.trainable_parameters()[0], "params_bytes": params_b,
       "grads_bytes": grads_b, "optimizer_bytes": opt_b, "saved_activation_bytes": sum(saved.values())}}
res["train_state_bytes"] = params_b + grads_b + opt_b + res["saved_activation_bytes"]
if device == "cuda":
    res["peak_mem_bytes"] = torch.cuda.max_memory_allocated()
else:
    res["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print("RESULT" + json.dumps(res))
"""


def bench_train(device: str, batch: int, steps: int) -> dict:
    child = TRAIN_CHILD.format(bench_dir=str(Path(__file__).parent))
    rows = {}
    for method, kw in [
        ("full_finetune", {}),
        ("lora", {"r": 4, "alpha": 32}),
        ("adapter", {"bottleneck": 64}),
        ("ssf", {}),
        ("bitfit", {}),
        ("linear_probe", {}),
    ]:
        proc = subprocess.run(
            [sys.executable, "-c", child, json.dumps([method, kw, device, batch, steps])],
            capture_output=True,
            text=True,
        )
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
        if not line:
            rows[method] = {"error": proc.stderr[-400:]}
            continue
        rows[method] = json.loads(line[0][6:])
        print(method, rows[method], flush=True)
    ref = rows["full_finetune"]
    mem_key = "peak_mem_bytes" if device == "cuda" else "peak_rss_bytes"
    for r in rows.values():
        if "step_s" in r:
            r["step_ratio_vs_full"] = round(r["step_s"] / ref["step_s"], 3)
            r["memory_ratio_vs_full"] = round(r[mem_key] / ref[mem_key], 3)
            r["train_state_ratio_vs_full"] = round(r["train_state_bytes"] / ref["train_state_bytes"], 3)
    return {"batch": batch, "steps": steps, "memory_measure": mem_key, "methods": rows}


# ---------------------------------------------------------------------------------------------
def bench_peft(device: str, batch: int, reps: int) -> dict:
    try:
        import peft
    except ImportError:
        return {"skipped": "Hugging Face peft is not installed (pip install peft)"}
    torch.manual_seed(0)
    base = vit_b16()
    ours = mp.get_peft_model(copy.deepcopy(base), mp.LoraConfig(r=8, alpha=16, target_modules=["qkv", "out_proj"])).to(
        device
    )
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["qkv", "out_proj"])
    ).to(device)
    # identical adapter weights: copy ours into theirs
    with torch.no_grad():
        for path, layer in ours.adapter_layers():
            ad = layer.adapters["default"]
            mod = theirs.base_model.model.get_submodule(path)
            nn.init.normal_(ad.lora_B, std=0.02)
            mod.lora_A["default"].weight.copy_(ad.lora_A)
            mod.lora_B["default"].weight.copy_(ad.lora_B)
    x = torch.randn(batch, 3, 224, 224, device=device)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        diff = (ours(x)[0] - theirs(x)[0]).abs().max().item()
    ours.train(), theirs.train()
    opts = {
        k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
        for k, m in (("ours", ours), ("peft", theirs))
    }

    def step(m, opt):
        opt.zero_grad(set_to_none=True)
        m(x)[0].square().mean().backward()
        opt.step()

    med = _interleaved(
        {"ours": lambda: step(ours, opts["ours"]), "peft": lambda: step(theirs, opts["peft"])}, device, reps
    )
    out = {
        "peft_version": peft.__version__,
        "max_abs_output_diff": diff,
        "median_step_s": med,
        "step_ratio_ours_over_peft": round(med["ours"] / med["peft"], 3),
        "trainable_ours": ours.trainable_parameters()[0],
        "trainable_peft": sum(p.numel() for p in theirs.parameters() if p.requires_grad),
    }
    print("peft comparison:", out, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", default="params,latency,train,peft")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default 8 on CPU, 64 on GPU)")
    ap.add_argument("--reps", type=int, default=None)
    args = ap.parse_args()
    batch = args.batch or (64 if args.device == "cuda" else 8)
    reps = args.reps or (30 if args.device == "cuda" else 7)
    only = set(args.only.split(","))
    results = {"machine": machine(), "device": args.device, "command": " ".join(sys.argv)}
    if args.out and Path(args.out).is_file() and only != {"params", "latency", "train", "peft"}:
        # a partial run updates its sections of an existing result file and keeps the others
        previous = json.loads(Path(args.out).read_text())
        earlier = {k: previous["command"] for k in ("params", "latency", "train", "peft") if k in previous}
        results = {
            **previous,
            **results,
            "sections_from_command": {**earlier, **previous.get("sections_from_command", {})},
        }
    for section in only:
        results.setdefault("sections_from_command", {})[section] = " ".join(sys.argv)
    if "params" in only:
        results["params"] = bench_params()
    if "latency" in only:
        results["latency"] = bench_latency(args.device, batch, reps)
    if "train" in only:
        results["train"] = bench_train(args.device, batch, steps=max(3, reps // 2))
    if "peft" in only:
        results["peft"] = bench_peft(args.device, batch, reps)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
        print("wrote", args.out)


if __name__ == "__main__":
    main()
