"""Render the JSON written by ``bench_core.py --out`` as the Markdown tables of docs/benchmarks.md.

Usage::

    python benchmarks/render_core.py docs/benchmarks/core_cpu.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _mb(n: float) -> str:
    return f"{n / 1e6:.3f}"


def render_params(rows: list[dict]) -> str:
    nets = list(dict.fromkeys(r["network"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by = {(r["network"], r["method"]): r for r in rows}
    head = "| method | " + " | ".join(f"{n}: trainable (% of base) | file MB" for n in nets) + " |"
    lines = [head, "|---|" + "---|---|" * len(nets)]
    for m in methods:
        cells = []
        for n in nets:
            r = by.get((n, m))
            if r is None:
                cells += ["–", "–"]
            elif "error" in r:
                cells += ["not applicable", "–"]
            else:
                cells += [f"{r['trainable']:,d} ({r['trainable_pct_of_base']:.4g} %)", _mb(r["adapter_file_bytes"])]
        lines.append(f"| `{m}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_latency(lat: dict) -> str:
    lines = [
        f"Batch {lat['batch']}, median of interleaved repetitions.",
        "",
        "| model | median s / batch | ratio vs base |",
        "|---|---|---|",
    ]
    for k, v in lat["median_s"].items():
        lines.append(f"| {k} | {v:.4f} | {lat['ratio_vs_base'][k]:.3f} |")
    return "\n".join(lines)


def render_train(tr: dict) -> str:
    mem = "peak GPU memory (MB)" if tr["memory_measure"] == "peak_mem_bytes" else "peak process RSS (MB)"
    lines = [
        f"Batch {tr['batch']}, median of {tr['steps']} steps after one warm-up step, one fresh process per method.",
        "",
        f"| method | trainable | step s | step ratio vs full FT | {mem} | ratio vs full FT | training state MB "
        "(params + grads + optimizer + saved activations) | ratio vs full FT |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m, r in tr["methods"].items():
        if "error" in r:
            lines.append(f"| `{m}` | error | | | | | | |")
            continue
        lines.append(
            f"| `{m}` | {r['trainable']:,d} | {r['step_s']:.3f} | {r['step_ratio_vs_full']:.3f} | "
            f"{r[tr['memory_measure']] / 1e6:.0f} | {r['memory_ratio_vs_full']:.3f} | "
            f"{r['train_state_bytes'] / 1e6:.0f} ({r['params_bytes'] / 1e6:.0f} + {r['grads_bytes'] / 1e6:.0f} + "
            f"{r['optimizer_bytes'] / 1e6:.0f} + {r['saved_activation_bytes'] / 1e6:.0f}) | {r['train_state_ratio_vs_full']:.3f} |"
        )
    return "\n".join(lines)


def render_peft(p: dict) -> str:
    if "skipped" in p:
        return f"Skipped: {p['skipped']}"
    return "\n".join(
        [
            f"Hugging Face peft {p['peft_version']}; LoRA r = 8, α = 16 on `qkv` and `out_proj` of every block, identical adapter weights.",
            "",
            "| figure | value |",
            "|---|---|",
            f"| max abs output difference | {p['max_abs_output_diff']:.3g} |",
            f"| trainable (monai_peft / peft) | {p['trainable_ours']:,d} / {p['trainable_peft']:,d} |",
            f"| median train step s (monai_peft / peft) | {p['median_step_s']['ours']:.4f} / {p['median_step_s']['peft']:.4f} |",
            f"| step time ratio monai_peft / peft | {p['step_ratio_ours_over_peft']:.3f} |",
        ]
    )


def main() -> None:
    data = json.loads(Path(sys.argv[1]).read_text())
    print(f"Machine: {data['machine']}; device {data['device']}\n")
    for section, command in data.get("sections_from_command", {"all": data["command"]}).items():
        print(f"- {section}: `{command}`")
    print()
    for key, fn in (
        ("params", render_params),
        ("latency", render_latency),
        ("train", render_train),
        ("peft", render_peft),
    ):
        if key in data:
            print(f"### {key}\n\n{fn(data[key])}\n")


if __name__ == "__main__":
    main()
