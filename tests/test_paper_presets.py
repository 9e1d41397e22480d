"""Paper presets (monai_peft.paper_presets): the parameter count of every preset on MONAI ViT-B/16 and ResNet-50,
asserted against a closed-form count and against the paper's printed number; docs/methods/presets.md is current."""

from __future__ import annotations

from pathlib import Path

import pytest

import monai_peft as mp
from monai_peft.paper_presets import (
    BACKBONES,
    count_preset,
    get_paper_preset,
    paper_presets,
    preset_table_markdown,
    replace_table,
)

C, L, MLP, N = 768, 12, 3072, 196  # ViT-B/16 at 224: width, depth, MLP width, patches
BN_CHANNELS = 26_560  # ResNet-50: every BatchNorm's channels (stem 64, layer1-4 with projection shortcuts)
HEAD3 = 2048 * 3 + 3  # the 3-class head in Dutt et al.'s ResNet-50 counts

#: Closed-form counts (method only, no head), written from the architectures, independently of the code.
EXPECTED: dict[tuple[str, str, str], int | None] = {
    ("lora", "med-peft", "vit_b16"): L * 2 * 4 * (C + C),  # q and v slices, r = 4: 147,456
    ("lora", "med-peft-100pct", "vit_b16"): L * 2 * 32 * (C + C),
    ("lora", "dutt2023", "vit_b16"): L * 2 * 16 * (C + C),  # 589,824
    ("adaptformer", "chen2022", "vit_b16"): L * (C * 64 + 64 + 64 * C + C),  # 1,189,632
    ("adaptformer", "dutt2023", "vit_b16"): L * (C * 5 + 5 + 5 * C + C),  # 101,436
    ("adapter", "houlsby2019", "vit_b16"): L * 2 * (C * 64 + 64 + 64 * C + C) + (2 * L + 1) * 2 * C,
    ("adapter", "houlsby2019", "resnet50"): None,  # no LayerNorm to tune
    ("ssf", "dutt2023", "vit_b16"): 2 * (L * (3 * C + C + MLP + C + 2 * C) + C + C),  # 205,824
    ("ssf", "dutt2023", "resnet50"): 2 * BN_CHANNELS,  # one SSF per conv -> BN pair: 53,120
    ("bitfit", "dutt2023", "vit_b16"): L * (3 * C + C + MLP + C + 2 * C) + C + C,  # 102,912
    ("bitfit", "dutt2023", "resnet50"): BN_CHANNELS + (256 + 512 + 1024 + 2048),  # + MONAI shortcut conv biases
    ("norm_tuning", "dutt2023", "vit_b16"): (2 * L + 1) * 2 * C,  # 38,400
    ("norm_tuning", "dutt2023", "resnet50"): 2 * BN_CHANNELS,
    ("attention_tuning", "dutt2023", "vit_b16"): L * (C * 3 * C + 3 * C + C * C + C) + N * C,
    ("ept", "zu2024", "vit_b16"): L * (N + 1) * 100,  # 236,400
    ("dka", "dka-vit", "vit_b16"): L * 16 * (2 * C + 51**2 + 5**2),  # 799,104
    ("dka", "dka-convnext", "vit_b16"): L * (16 * (2 * C + 11**2 + 5**2) + 2 * 16),  # + BatchNorm(m)
    ("dka", "dka-swin", "vit_b16"): L * 16 * (2 * C + 27**2 + 5**2),  # 31 clamped to 2 x 14 - 1 = 27
    ("linear_probe", "dutt2023", "vit_b16"): C * 2 + 2,
    ("linear_probe", "dutt2023", "resnet50"): 2048 * 2 + 2,
    ("full_finetune", "dutt2023", "resnet50"): 23_511_872,
}


@pytest.fixture(scope="module")
def counts():
    cache: dict = {}

    def get(method: str, name: str, backbone: str):
        key = (method, name, backbone)
        if key not in cache:
            cache[key] = count_preset(get_paper_preset(method, name), backbone)
        return cache[key]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("key", sorted(EXPECTED), ids=lambda k: "-".join(k))
def test_preset_count_matches_the_closed_form(key, counts) -> None:
    assert counts(*key).params == EXPECTED[key]


PAPER_CASES = [(p.method, p.name, b) for p in paper_presets() for b, c in p.paper.items() if c.value is not None]


@pytest.mark.slow
@pytest.mark.parametrize("key", PAPER_CASES, ids=lambda k: "-".join(k))
def test_preset_count_reproduces_the_papers_number(key, counts) -> None:
    method, name, backbone = key
    paper = get_paper_preset(method, name).paper[backbone]
    count = counts(method, name, backbone)
    assert count.head == (2048 * paper.head_classes + paper.head_classes if paper.head_classes else 0)
    assert abs(count.with_head - paper.value) <= paper.tolerance, (count, paper)


def test_med_peft_stays_below_one_percent(counts) -> None:
    count = counts("lora", "med-peft", "vit_b16")
    full = counts("full_finetune", "dutt2023", "vit_b16").params
    assert count.params / full < 0.01
    assert 0.01 < counts("lora", "med-peft-100pct", "vit_b16").params / full < 0.015


def test_bitfit_resnet50_without_monai_shortcut_biases_is_the_papers(counts) -> None:
    count = counts("bitfit", "dutt2023", "resnet50")
    assert count.params - 3840 + HEAD3 == 32_707  # Dutt et al.: 32.7 K


@pytest.mark.slow
def test_the_presets_document_is_current(counts) -> None:
    doc = Path(__file__).resolve().parents[1] / "docs" / "methods" / "presets.md"
    table = preset_table_markdown(
        {(p.method, p.name, b): counts(p.method, p.name, b) for p in paper_presets() for b in BACKBONES}
    )
    text = doc.read_text()
    assert replace_table(text, table) == text, "run python benchmarks/preset_table.py"


def test_every_preset_builds_its_config_and_names_real_fields() -> None:
    for preset in paper_presets():
        cfg = mp.get_config(preset.method, preset=preset.name)
        for field, value in preset.values.items():
            assert getattr(cfg, field) == value, (preset.name, field)
        assert set(preset.paper) <= set(BACKBONES)
