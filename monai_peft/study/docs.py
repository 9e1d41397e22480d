"""Keep the study results quoted in ``docs/study.md`` equal to the committed results files.

A block of the page between::

    <!-- study-results: docs/study/<name> -->
    ...
    <!-- /study-results -->

is the Markdown table that :func:`monai_peft.study.report.markdown` renders from ``docs/study/<name>/summary.json``
and ``study.json`` (copied from a results folder with :func:`publish`). A block between
``<!-- study-claims: docs/study/<name> -->`` and ``<!-- /study-claims -->`` is :func:`render_claims`: the source
papers' claims of issue 12, each checked against the same summary (or marked as not tested by that grid). Usage from the repository root::

    python -m monai_peft.study.docs                 # rewrite every block of docs/study.md
    python -m monai_peft.study.docs --check         # exit 1 if a block differs from its results files
    python -m monai_peft.study.docs --publish runs/study_cpu_reduced docs/study/pneumoniamnist_cpu_reduced

so no figure on the page is typed by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from monai_peft.checkpoint import atomic_write_bytes
from monai_peft.errors import ConfigError

__all__ = ["MEDMNIST_V2_RESNET18_28", "PUBLISHED_FILES", "publish", "render_block", "render_claims", "update_doc"]

#: MedMNIST v2 (Yang et al., Scientific Data 2023, Table 3): ResNet-18 (28) on PneumoniaMNIST, test AUC / ACC.
MEDMNIST_V2_RESNET18_28 = {"auroc": 0.944, "accuracy": 0.854}

#: Files of a results folder that are committed under docs/study/<name>/ (cells/ and tune/ stay in runs/).
PUBLISHED_FILES = ("study.json", "summary.json", "summary.csv", "results.csv", "table.md", "fraction.png", "params.png")
_BLOCK = re.compile(
    r"(<!-- study-(?P<kind>results|claims): (?P<path>[^ ]+) -->\n)(?P<body>.*?)(<!-- /study-(?P=kind) -->)", re.S
)


def render_block(folder: str | Path) -> str:
    """The Markdown of a published results folder (``study.json`` + ``summary.json``), demoted by one level."""
    from monai_peft.study.report import markdown

    folder = Path(folder)
    try:
        head = json.loads((folder / "study.json").read_text())
        summary = json.loads((folder / "summary.json").read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{folder} is not a published study (needs study.json and summary.json): {exc}") from exc
    if summary.get("config_hash") != head.get("config_hash"):
        raise ConfigError(f"{folder}: summary.json and study.json come from different studies (config hashes differ).")
    if head["study"].get("task") == "segmentation":
        from monai_peft.study.seg_report import seg_markdown as markdown
    text = markdown(head["study"], summary["rows"], summary["expected_cells"], summary["finished_cells"])
    return "\n".join("#" + line if line.startswith("#") else line for line in text.splitlines()) + "\n"


def _fmt(row: dict) -> str:
    return f"{row['method']} {row['test_auroc_mean']:.3f} ± {row['test_auroc_std']:.3f}"


def _beats(a: dict, b: dict) -> str:
    """``a`` beats ``b``: supported / not supported, or inconclusive when the gap is within the larger seed std."""
    diff = a["test_auroc_mean"] - b["test_auroc_mean"]
    if abs(diff) <= max(a["test_auroc_std"], b["test_auroc_std"]):
        return "inconclusive (gap within the seed std)"
    return "supported" if diff > 0 else "**not supported**"


def _not_worse(pairs: list[tuple[dict, dict]]) -> str:
    """Verdict of "``a`` is not worse than ``ref``" over ``(a, ref)`` rows of several budgets."""
    worse = [a["budget_label"] for a, ref in pairs if _beats(ref, a) == "supported"]
    tied = [a["budget_label"] for a, ref in pairs if _beats(ref, a).startswith("inconclusive")]
    verdict = f"**not supported** at {', '.join(worse)}" if worse else "supported"
    return verdict + (f" (gap within the seed std at {', '.join(tied)})" if tied else "")


def _backbone_claims(backbone: str, mine: list[dict]) -> list[str]:
    """The claim rows of one backbone (see :func:`render_claims`)."""
    lines: list[str] = []
    budgets = list(dict.fromkeys(r["budget"] for r in mine))

    def at(budget: str, method_name: str | None = None) -> list[dict]:
        return [r for r in mine if r["budget"] == budget and (method_name is None or r["method_name"] == method_name)]

    def add(claim: str, comparison: str, verdict: str) -> None:
        lines.append(f"| {backbone} | {claim} | {comparison} | {verdict} |")

    claim = "at 1 %, the best PEFT method beats full fine-tuning"
    full, peft = at("f0.01", "full_finetune"), [r for r in at("f0.01") if r["method_name"] != "full_finetune"]
    if full and peft:
        best = max(peft, key=lambda r: r["val_auroc_mean"])
        ref = max(full, key=lambda r: r["val_auroc_mean"])
        label = " (best on validation)" if len(full) > 1 else ""
        add(claim, f"{_fmt(best)} (best on validation) vs {_fmt(ref)}{label}", _beats(best, ref))
    else:
        add(claim, "needs full_finetune and a PEFT method at 1 %", "not tested")

    claim = "LoRA matches or beats full fine-tuning"
    pairs = []
    for b in budgets:
        lora, full = at(b, "lora"), at(b, "full_finetune")
        if lora and full:
            pairs.append((max(lora, key=lambda r: r["val_auroc_mean"]), max(full, key=lambda r: r["val_auroc_mean"])))
    if pairs:
        parts = [
            f"{lo['budget_label']}: {_fmt(lo)} ({lo['trainable_percent']:.2f} %) vs {_fmt(fu)}" for lo, fu in pairs
        ]
        add(claim, "; ".join(parts), _not_worse(pairs))
    else:
        add(claim, "needs lora and full_finetune at the same budget", "not tested")

    claim = "DKA is not worse than the bottleneck adapter"
    pairs = [(at(b, "dka"), at(b, "adapter")) for b in budgets]
    pairs = [(d[0], a[0]) for d, a in pairs if d and a]
    if pairs:
        parts = [f"{d['budget_label']}: {_fmt(d)} vs {_fmt(a)}" for d, a in pairs]
        add(claim, "; ".join(parts), _not_worse(pairs))
    else:
        add(claim, "needs dka and adapter at the same budget", "not tested")

    claim = "adapters fall below the linear probe under 1 % of the data, and DKA fixes that"
    lp, ad, dk = at("f0.01", "linear_probe"), at("f0.01", "adapter"), at("f0.01", "dka")
    if lp and ad and dk:
        verdict = f"adapter below the probe: {_beats(lp[0], ad[0])}; DKA above the probe: {_beats(dk[0], lp[0])}"
        add(claim, f"1 %: {_fmt(ad[0])}, {_fmt(dk[0])}, {_fmt(lp[0])}", verdict)
    else:
        add(claim, "needs adapter, dka and linear_probe at 1 %", "not tested")

    claim = "EPT beats VPT in few-shot classification"
    pairs = [(at(b, "ept"), at(b, "vpt")) for b in budgets if b.startswith("k")]
    pairs = [(e[0], v[0]) for e, v in pairs if e and v]
    if pairs:
        parts = [f"{e['budget_label']}: {_fmt(e)} vs {_fmt(v)}" for e, v in pairs]
        add(claim, "; ".join(parts), "; ".join(f"{e['budget_label']}: {_beats(e, v)}" for e, v in pairs))
    else:
        add(claim, "needs ept and vpt at a K-shot budget", "not tested")

    claim = "at 100 %, the best PEFT method reaches AUROC ≥ 0.96 with ≤ 2 % trainable parameters"
    small = [r for r in at("f1") if r["method_name"] != "full_finetune" and r["trainable_percent"] <= 2.0]
    if small:
        best = max(small, key=lambda r: r["val_auroc_mean"])
        ok = best["test_auroc_mean"] >= 0.96
        text = f"{_fmt(best)} ({best['trainable_percent']:.2f} %; best on validation of those ≤ 2 %)"
        add(claim, text, "supported" if ok else "**not supported**")
    else:
        add(claim, "needs the 100 % budget", "not tested (no 100 % budget in this grid)")

    fractions = [b for b in budgets if b.startswith("f")]
    if fractions:
        largest = max(fractions, key=lambda b: float(b[1:]))
        top = max(at(largest), key=lambda r: r["val_auroc_mean"])
        ref = MEDMNIST_V2_RESNET18_28
        add(
            f"MedMNIST v2 ResNet-18 (28): test AUC {ref['auroc']}, ACC {ref['accuracy']} (trained on 100 %)",
            f"best on validation at {top['budget_label']}: {_fmt(top)}, accuracy {top['test_accuracy_mean']:.3f}",
            "at or above" if top["test_auroc_mean"] >= ref["auroc"] else "below",
        )
    return lines


def render_claims(*folders: str | Path) -> str:
    """A Markdown table: each claim of issue 12, the comparison on the published summary, and the verdict.

    ``folders`` are published results folders of the same data set (their rows are pooled: e.g. a companion study
    that runs one method with another learning-rate range). Comparisons use the seed means of test AUROC from
    their ``summary.json``. "Best" is the method with the highest seed
    mean of *validation* AUROC among those a claim compares, so that no verdict picks a method by its test score
    (every model was chosen on validation too).
    """
    rows = [row for folder in folders for row in json.loads((Path(folder) / "summary.json").read_text())["rows"]]
    lines = ["| backbone | claim | comparison (test AUROC, mean ± std over seeds) | our data |", "|---|---|---|---|"]
    for backbone in dict.fromkeys(r["backbone"] for r in rows):
        lines += _backbone_claims(backbone, [r for r in rows if r["backbone"] == backbone])
    return "\n".join(lines) + "\n"


def update_doc(doc: str | Path, root: str | Path = ".", *, check: bool = False) -> list[str]:
    """Rewrite (or, with ``check``, compare) every results block of ``doc``; returns the blocks that differed."""
    doc, root = Path(doc), Path(root)
    text = doc.read_text()
    stale: list[str] = []

    def repl(m: re.Match) -> str:
        if m.group("kind") == "results":
            body = render_block(root / m.group("path"))
        else:  # claims may pool several studies of the same data: "a+b"
            body = render_claims(*[root / p for p in m.group("path").split("+")])
        if body != m.group("body"):
            stale.append(m.group("path"))
        return m.group(1) + body + f"<!-- /study-{m.group('kind')} -->"

    new = _BLOCK.sub(repl, text)
    if not check and new != text:
        atomic_write_bytes(doc, new.encode())
    return stale


def publish(results: str | Path, dest: str | Path) -> list[Path]:
    """Copy the report files of a results folder to ``dest`` (see :data:`PUBLISHED_FILES`)."""
    results, dest = Path(results), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for name in PUBLISHED_FILES:
        src = results / name
        if src.is_file():
            fd, tmp = tempfile.mkstemp(dir=dest, prefix=f".{name}.", suffix=".tmp")
            os.close(fd)
            shutil.copyfile(src, tmp)
            os.chmod(tmp, 0o644)
            os.replace(tmp, dest / name)
            out.append(dest / name)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Render the study results blocks of docs/study.md")
    parser.add_argument("--doc", type=Path, default=Path("docs/study.md"))
    parser.add_argument("--check", action="store_true", help="do not write; exit 1 if a block is out of date")
    parser.add_argument("--publish", nargs=2, metavar=("RESULTS", "DEST"), help="copy a results folder's report first")
    args = parser.parse_args(argv)
    if args.publish:
        for p in publish(*args.publish):
            print(f"published {p}")
    return report_doc_update(args.doc, update_doc(args.doc, check=args.check), args.check, "monai_peft.study.docs")


def report_doc_update(doc: Path, stale: list[str], check: bool, module: str) -> int:
    """Print what a docs update did (or, with ``check``, what is out of date); the exit code of a docs CLI."""
    if check:
        if stale:
            print(f"{doc} is out of date for {stale}: run python -m {module}", file=sys.stderr)
            return 1
        print(f"{doc} is up to date")
        return 0
    print(f"{doc}: {'rewrote ' + ', '.join(stale) if stale else 'already up to date'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
