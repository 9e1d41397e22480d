"""Conv-Adapter (four placements) and TSA (parallel 1x1 adapters, exact merge) on 2D and 3D CNNs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from monai.networks import nets
from torch import nn

import monai_peft as mp
from monai_peft.methods.base import AdapterLayer
from monai_peft.methods.conv_adapters import (
    PLACEMENTS,
    ConvAdapterConfig,
    ConvAdapterModule,
    TSAConfig,
    TSAConv,
    grouped_width,
)
from tests.helpers import first, grad_report, randomize_adapter_params, tiny_resnet, tiny_vit


def bottleneck_resnet(spatial_dims: int = 2) -> nets.ResNet:
    return nets.ResNet(
        block="bottleneck",
        layers=[1, 1, 1, 1],
        block_inplanes=[8, 16, 16, 16],
        spatial_dims=spatial_dims,
        n_input_channels=1,
        num_classes=3,
    )


NETS = [
    pytest.param(lambda: tiny_resnet(2), (2, 1, 16, 16), id="basic-2d"),
    pytest.param(lambda: tiny_resnet(3), (2, 1, 16, 16, 16), id="basic-3d"),
    pytest.param(lambda: bottleneck_resnet(2), (2, 1, 16, 16), id="bottleneck-2d"),
    pytest.param(lambda: bottleneck_resnet(3), (2, 1, 16, 16, 16), id="bottleneck-3d"),
]
CONFIGS = {
    **{p: ConvAdapterConfig(placement=p, pointwise_init="zeros") for p in PLACEMENTS},
    "tsa": TSAConfig(init_scale=0.0),
}
# every placement on a 2D basic and a 3D bottleneck network, the default ones on the other two
IDENTITY_CASES = [
    pytest.param(net.values[0], net.values[1], CONFIGS[key], id=f"{net.id}-{key}")
    for net in NETS
    for key in CONFIGS
    if net.id in ("basic-2d", "bottleneck-3d") or key in ("conv_parallel", "tsa")
]


def loss_of(out: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, torch.arange(out.shape[0]) % out.shape[1])


# ------------------------------------------------------------------------------------------------
# generic behaviour
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make,shape,cfg", IDENTITY_CASES)
def test_zero_init_is_identity_shapes_and_gradients(make, shape, cfg):
    net = make().eval()
    x = torch.randn(shape)
    with torch.no_grad():
        ref = net(x)
    model = mp.get_peft_model(net, cfg, modules_to_save=["fc"])
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    model.train()
    loss_of(model(x)).backward()
    trainable, with_grad, missing = grad_report(model)
    assert all(".adapters.default." in n or n.startswith("base_model.fc.") for n in trainable)
    assert with_grad == trainable and not missing


@pytest.mark.parametrize("cfg", [ConvAdapterConfig(), ConvAdapterConfig(placement="residual_parallel"), TSAConfig()])
@pytest.mark.parametrize("make,shape", NETS[:2])
def test_save_load_round_trip_is_bit_exact(make, shape, cfg, tmp_path):
    net = make()
    fresh = copy.deepcopy(net)
    x = torch.randn(shape)
    model = mp.get_peft_model(net, cfg)
    randomize_adapter_params(model)
    model.train()
    model(x)  # BatchNorm statistics move and are saved with the adapter
    model.save_adapter(tmp_path)
    model.eval().requires_grad_(False)
    with torch.no_grad():
        expected = model(x)
    loaded = mp.PeftModel.from_pretrained(fresh, tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)


TRAIN_CASES = [
    pytest.param(NETS[0].values[0], NETS[0].values[1], ConvAdapterConfig(), id="basic-2d-conv_adapter"),
    pytest.param(NETS[1].values[0], NETS[1].values[1], ConvAdapterConfig(), id="basic-3d-conv_adapter"),
    pytest.param(
        NETS[0].values[0], NETS[0].values[1], ConvAdapterConfig(placement="residual_sequential"), id="basic-2d-ca-rs"
    ),
    pytest.param(NETS[0].values[0], NETS[0].values[1], TSAConfig(), id="basic-2d-tsa"),
    pytest.param(NETS[1].values[0], NETS[1].values[1], TSAConfig(), id="basic-3d-tsa"),
]


@pytest.mark.parametrize("make,shape,cfg", TRAIN_CASES)
def test_a_few_steps_reduce_the_loss(make, shape, cfg):
    model = mp.get_peft_model(make(), cfg, modules_to_save=None)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    x = torch.randn(shape)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = loss_of(model(x))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = loss_of(model(x)).item()
    assert min(final, min(losses[1:])) < losses[0] - 1e-3, (losses, final)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


# ------------------------------------------------------------------------------------------------
# Conv-Adapter specifics
# ------------------------------------------------------------------------------------------------
def test_conv_adapter_structure_stride_reduction_and_alpha():
    net = bottleneck_resnet(2)
    model = mp.get_peft_model(net, ConvAdapterConfig(reduction=4))
    paths = [p for p, _ in model.adapter_layers()]
    assert paths == ["layer1.0.conv2", "layer2.0.conv2", "layer3.0.conv2", "layer4.0.conv2"]  # the 3x3 conv
    a = net.layer2[0].conv2.adapters["default"]
    assert isinstance(a, ConvAdapterModule)
    c = net.layer2[0].conv2.base_layer.in_channels
    assert a.gconv.stride == (2, 2) and a.gconv.out_channels == c // 4 and a.gconv.groups == c // 4
    assert a.gconv.kernel_size == (3, 3) and a.pw.kernel_size == (1, 1)
    assert torch.equal(a.alpha, torch.ones(net.layer2[0].conv2.base_layer.out_channels))
    # default (paper) init: alpha = 1 and a random PW: not an identity
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        with model.disable_adapter():
            ref = model(x)
        assert not torch.allclose(model.eval()(x), ref)
    # basic blocks: the strided first 3x3 conv (reference code), 3D kernels in 3D
    m3 = mp.get_peft_model(tiny_resnet(3), ConvAdapterConfig())
    assert [p for p, _ in m3.adapter_layers()][:2] == ["layer1.0.conv1", "layer2.0.conv1"]
    a3 = m3.base_model.layer2[0].conv1.adapters["default"]
    assert a3.gconv.kernel_size == (3, 3, 3) and a3.gconv.stride == (2, 2, 2)


def test_residual_placements_wrap_blocks_with_block_stride():
    model = mp.get_peft_model(tiny_resnet(2), ConvAdapterConfig(placement="residual_parallel"))
    assert [p for p, _ in model.adapter_layers()] == ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    a = model.base_model.layer2[0].adapters["default"]
    assert a.gconv.stride == (2, 2) and a.gconv.in_channels == 8 and a.pw.out_channels == 16
    seq = mp.get_peft_model(tiny_resnet(2), ConvAdapterConfig(placement="residual_sequential"))
    s = seq.base_model.layer2[0].adapters["default"]
    assert s.gconv.stride == (1, 1) and s.gconv.in_channels == 16 and s.pw.out_channels == 16


def test_conv_adapter_equations():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, stride=2, padding=2, dilation=2)
    x = torch.randn(2, 8, 11, 11)
    par = mp.get_peft_model(nn.Sequential(copy.deepcopy(conv)), ConvAdapterConfig(target_modules=["0"], reduction=2))
    randomize_adapter_params(par)
    a = par.base_model[0].adapters["default"]
    assert a.gconv.padding == (1, 1)  # centred on the dilated kernel's centre tap
    expected = conv(x) + a.alpha.view(1, -1, 1, 1) * a.pw(F.relu(a.gconv(x)))
    torch.testing.assert_close(par(x), expected)
    seq = mp.get_peft_model(
        nn.Sequential(copy.deepcopy(conv)), ConvAdapterConfig(target_modules=["0"], placement="conv_sequential")
    )
    randomize_adapter_params(seq)
    s = seq.base_model[0].adapters["default"]
    y = conv(x)
    torch.testing.assert_close(seq(x), y + s.alpha.view(1, -1, 1, 1) * s.pw(F.relu(s.gconv(y))))


def test_grouped_width():
    assert grouped_width(64, 8) == 8 and grouped_width(64, 4) == 16 and grouped_width(8, 8) == 1
    assert grouped_width(48, 5) == 8  # 48 / 5 = 9.6 -> 9 does not divide 48 -> 8
    assert grouped_width(7, 2) == 1 and grouped_width(3, 0.5) == 3


def test_conv_adapter_refusals():
    with pytest.raises(
        mp.MethodNotApplicableError, match=r"conv_adapter found nothing.*no convolution.*TransformerBlock"
    ):
        mp.get_peft_model(tiny_vit(2), ConvAdapterConfig())
    with pytest.raises(mp.MethodNotApplicableError, match="cannot run beside 0: its padding"):
        mp.get_peft_model(
            nn.Sequential(nn.Conv2d(4, 4, 3, padding=0)), ConvAdapterConfig(target_modules=["0"], kernel_size=1)
        )
    with pytest.raises(mp.MethodNotApplicableError, match="ConvTranspose2d"):
        mp.get_peft_model(nn.Sequential(nn.ConvTranspose2d(4, 4, 2, stride=2)), ConvAdapterConfig(target_modules=["0"]))
    with pytest.raises(mp.ConfigError, match="placement"):
        ConvAdapterConfig(placement="somewhere")
    with pytest.raises(mp.AdapterError, match="cannot be merged"):
        mp.get_peft_model(tiny_resnet(2), ConvAdapterConfig()).merge_adapter()


# ------------------------------------------------------------------------------------------------
# TSA specifics
# ------------------------------------------------------------------------------------------------
def test_tsa_default_targets_are_the_convs_of_the_blocks():
    model = mp.get_peft_model(tiny_resnet(2), TSAConfig())
    paths = [p for p, _ in model.adapter_layers()]
    assert "conv1" not in paths and all(p.startswith("layer") for p in paths)
    assert "layer2.0.downsample.0" not in paths and "layer1.0.conv2" in paths and len(paths) == 8
    everything = mp.get_peft_model(tiny_resnet(2), TSAConfig(blocks_only=False, shortcuts=True))
    assert {"conv1", "layer2.0.downsample.0"} <= {p for p, _ in everything.adapter_layers()}
    layer = model.base_model.layer2[0].conv1
    a = layer.adapters["default"].alpha
    assert a.shape == (16, 8, 1, 1) and torch.equal(a[:, :, 0, 0], 1e-4 * torch.eye(16, 8))
    # the standard case is exactly TSA's conv1x1(h; alpha) with the conv's stride
    x = torch.randn(2, 8, 9, 9)
    conv = layer.base_layer
    torch.testing.assert_close(layer(x), conv(x) + F.conv2d(x, a, stride=2), rtol=0, atol=0)


def test_tsa_counts_and_refusals():
    model = mp.get_peft_model(tiny_resnet(2), TSAConfig())
    expected = sum(m.in_channels * m.out_channels for _, layer in model.adapter_layers() for m in [layer.base_layer])
    assert model.trainable_parameters()[0] == expected
    with pytest.raises(mp.MethodNotApplicableError, match="tsa adds 1x1 adapters.*no convolutional backbone"):
        mp.get_peft_model(tiny_vit(2), TSAConfig())
    # explicit: a ViT's patch embedding (kernel 8, stride 8) is a valid, mergeable target
    vit = mp.get_peft_model(tiny_vit(2), TSAConfig(target_modules=["patch_embedding.patch_embeddings"]))
    randomize_adapter_params(vit)
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        y = first(vit(x))
        vit.merge_adapter()
        torch.testing.assert_close(first(vit(x)), y, rtol=1e-5, atol=1e-5)


CONVS = [
    pytest.param(nn.Conv2d(4, 6, 3, padding=1), (2, 4, 9, 9), True, id="3x3-same"),
    pytest.param(nn.Conv2d(4, 6, 3, stride=2, padding=1), (2, 4, 9, 9), True, id="3x3-stride2"),
    pytest.param(nn.Conv2d(4, 6, 7, stride=2, padding=3), (2, 4, 16, 16), True, id="7x7-stem"),
    pytest.param(nn.Conv2d(4, 6, 3, padding=2, dilation=2), (2, 4, 10, 10), True, id="dilated"),
    pytest.param(nn.Conv2d(4, 6, 3, padding=0), (2, 4, 10, 10), True, id="valid"),
    pytest.param(nn.Conv2d(4, 6, 2, stride=2), (2, 4, 9, 9), True, id="2x2-stride2-odd-input"),
    pytest.param(nn.Conv2d(4, 6, 4, padding="same"), (2, 4, 9, 9), True, id="even-same"),
    pytest.param(nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"), (2, 4, 9, 9), True, id="reflect-aligned"),
    pytest.param(
        nn.Conv2d(4, 6, 3, padding=2, padding_mode="replicate"), (2, 4, 9, 9), False, id="replicate-misaligned"
    ),
    pytest.param(nn.Conv2d(4, 8, 3, padding=1, groups=2), (2, 4, 9, 9), False, id="grouped"),
    pytest.param(nn.Conv1d(3, 5, 5, stride=3, padding=2), (2, 3, 17), True, id="conv1d"),
    pytest.param(nn.Conv3d(3, 5, 3, stride=(1, 2, 2), padding=1), (1, 3, 6, 7, 8), True, id="conv3d"),
    pytest.param(nn.Conv3d(3, 5, (3, 1, 3), padding=(1, 0, 0)), (1, 3, 5, 5, 5), True, id="conv3d-anisotropic-valid"),
    pytest.param(nn.ConvTranspose2d(4, 6, 2, stride=2), (2, 4, 5, 5), True, id="convT-2x2"),
    pytest.param(
        nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1), (2, 4, 5, 5), True, id="convT-3x3"
    ),
    pytest.param(nn.ConvTranspose3d(3, 4, 3, stride=2, padding=1), (1, 3, 3, 4, 4), True, id="convT3d"),
    pytest.param(nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, groups=2), (1, 4, 4, 4), False, id="convT-grouped"),
]


def _one_tap_reference(conv: nn.Module, alpha: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The adapter term as a zero-padded convolution whose kernel holds alpha at the centre tap only."""
    dims = len(conv.kernel_size)
    kernel = torch.zeros(*alpha.shape[:2], *conv.kernel_size)
    kernel[(slice(None), slice(None)) + tuple((k - 1) // 2 for k in conv.kernel_size)] = alpha.flatten(2)[..., 0]
    if isinstance(conv, nn.modules.conv._ConvTransposeNd):
        fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[dims]
        return fn(x, kernel, None, conv.stride, conv.padding, conv.output_padding, 1, conv.dilation)
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
    return fn(x, kernel, None, conv.stride, conv.padding, conv.dilation, 1)


@pytest.mark.parametrize("conv,shape,foldable", CONVS)
def test_tsa_on_any_convolution_reads_the_centre_tap_and_merges_exactly(conv, shape, foldable):
    torch.manual_seed(0)
    x = torch.randn(shape)
    model = mp.get_peft_model(nn.Sequential(copy.deepcopy(conv)), TSAConfig(target_modules=["0"]))
    layer = model.base_model[0]
    assert isinstance(layer, TSAConv)
    randomize_adapter_params(model, std=0.2)
    model.eval()
    with torch.no_grad():
        y = model(x)
        alpha = layer.adapters["default"].alpha
        torch.testing.assert_close(y, conv(x) + _one_tap_reference(conv, alpha, x), rtol=1e-5, atol=1e-5)
        if foldable:
            model.merge_adapter()
            torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)
            model.unmerge_adapter()
            torch.testing.assert_close(layer.base_layer.weight, conv.weight)
            torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)
        else:
            with pytest.raises(mp.AdapterError, match=r"cannot be merged exactly.*0 \((groups|padding_mode)"):
                model.merge_adapter()
            torch.testing.assert_close(model(x), y, rtol=0, atol=0)  # nothing was folded


def test_tsa_transposed_output_size_argument():
    conv = nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1)
    model = mp.get_peft_model(nn.Sequential(conv), TSAConfig(target_modules=["0"]))
    randomize_adapter_params(model)
    layer = model.base_model[0]
    x = torch.randn(1, 2, 5, 5)
    y = layer(x, output_size=[10, 10])
    assert y.shape == (1, 3, 10, 10)
    with torch.no_grad():
        model.merge_adapter()
        torch.testing.assert_close(layer(x, output_size=[10, 10]), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make,shape", [NETS[0], NETS[3]])
def test_tsa_merge_and_unload_on_resnets(make, shape):
    net = make()
    original = set(net.state_dict())
    x = torch.randn(shape)
    model = mp.get_peft_model(net, TSAConfig())
    randomize_adapter_params(model)
    model.eval()
    with torch.no_grad():
        y = model(x)
        model.merge_adapter()
        torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)
        plain = model.merge_and_unload()
        assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
        assert set(plain.state_dict()) == original
        torch.testing.assert_close(plain(x), y, rtol=1e-5, atol=1e-5)


def test_resnet50_counts():
    """TSA on ResNet-50 layer1-4 without shortcut projections: Dutt et al.'s 10.6 M (Table 2)."""
    from monai_peft.methods.conv_adapters import ConvAdapterTuner, TSATuner

    def count(cfg, tuner_cls):
        with torch.device("meta"):
            net = nets.ResNet(
                block="bottleneck",
                layers=[3, 4, 6, 3],
                block_inplanes=[64, 128, 256, 512],
                spatial_dims=2,
                n_input_channels=3,
                num_classes=1000,
            )
        tuner_cls(cfg).inject(net, "default")
        return sum(
            {
                id(p): p.numel() for m in net.modules() if isinstance(m, AdapterLayer) for p in m.adapters.parameters()
            }.values()
        )

    assert count(TSAConfig(), TSATuner) == 10_616_832
    assert count(TSAConfig(shortcuts=True), TSATuner) == 13_385_728
    # Conv-Adapter, gamma = 8, beside the 3x3 conv of the 16 bottlenecks (width C): GConv C/8 filters of
    # 8 channels x 3 x 3 + C/8 biases; PW C x C/8 + C biases; alpha C
    widths = [64] * 3 + [128] * 4 + [256] * 6 + [512] * 3
    expected = sum((c // 8) * 8 * 9 + c // 8 + (c // 8) * c + c + c for c in widths)
    assert count(ConvAdapterConfig(), ConvAdapterTuner) == expected == 199_192
