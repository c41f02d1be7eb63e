"""Networks: pooling formulas and gradients, output shapes, cirtorch naming, padded batches, weights."""

from __future__ import annotations

import math
from urllib.error import URLError

import pytest
import torch
import torch.nn.functional as F

from amldist.batching import bucket_by_shape, embed_in_buckets, pad_batch
from amldist.errors import UserError
from amldist.nets import NetMeta, create_net, freeze_batchnorm, gem, l2_normalize, mac, spoc
from amldist.nets.backbones import hub_checkpoint_path
from amldist.training.optim import calibrate_batchnorm


def _randomise_batchnorm(net: torch.nn.Module, seed: int = 0) -> None:
    """Random running statistics, so eval-mode BN is not the identity and padding errors would show."""
    generator = torch.Generator().manual_seed(seed)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(torch.rand(module.num_features, generator=generator) * 0.2 - 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)


# ---- pooling -------------------------------------------------------------------------------------

def test_gem_matches_hand_computation_and_cirtorch_formula():
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # (1, 1, 2, 2)
    assert gem(x, 3.0).item() == pytest.approx(25.0 ** (1 / 3))  # ((1 + 8 + 27 + 64) / 4)^(1/3)
    y = torch.rand(2, 5, 4, 3) * 2
    p = torch.tensor([2.5])
    cirtorch = F.avg_pool2d(y.clamp(min=1e-6).pow(p), (4, 3)).pow(1.0 / p).flatten(1)
    torch.testing.assert_close(gem(y, p), cirtorch)
    # eps clamps non-positive activations before the power
    assert gem(torch.full((1, 1, 2, 2), -1.0), 3.0).item() == pytest.approx(1e-6, rel=1e-4)


def test_gem_gradients_match_gradcheck_and_analytic_form():
    x = (torch.rand(2, 3, 4, 5, dtype=torch.float64) + 0.1).requires_grad_()
    p = torch.tensor([2.7], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: gem(a, b), (x, p))
    # d/dp (mean x^p)^(1/p) = f * (mean(x^p ln x) / (p m) - ln(m) / p^2), m = mean x^p
    values = torch.tensor([0.5, 1.5, 2.0, 3.0], dtype=torch.float64)
    p0 = torch.tensor([3.0], dtype=torch.float64, requires_grad=True)
    out = gem(values.view(1, 1, 2, 2), p0)
    out.sum().backward()
    m = (values ** 3).mean().item()
    f = m ** (1 / 3)
    expected = f * ((values ** 3 * values.log()).mean().item() / (3 * m) - math.log(m) / 9)
    assert p0.grad.item() == pytest.approx(expected, rel=1e-9)


def test_mac_and_spoc_and_their_masks():
    x = torch.randn(2, 3, 4, 5)
    torch.testing.assert_close(mac(x), x.amax(dim=(2, 3)))
    torch.testing.assert_close(spoc(x), x.mean(dim=(2, 3)))
    mask = torch.zeros(2, 1, 4, 5, dtype=torch.bool)
    mask[0, :, :2, :3] = True
    mask[1, :, :4, :1] = True
    torch.testing.assert_close(mac(x, mask)[0], x[0, :, :2, :3].amax(dim=(1, 2)))
    torch.testing.assert_close(spoc(x, mask)[1], x[1, :, :, :1].mean(dim=(1, 2)))
    torch.testing.assert_close(gem(x.abs(), 3.0, mask=mask)[0], gem(x.abs()[:1, :, :2, :3], 3.0)[0])


def test_l2_normalize_is_cirtorch_l2n():
    x = torch.tensor([[3.0, 4.0]])
    torch.testing.assert_close(l2_normalize(x), x / (5.0 + 1e-6))


# ---- architectures ------------------------------------------------------------------------------

@pytest.mark.parametrize("architecture, projection_dim, expected_dim", [
    ("small_cnn", None, 128), ("resnet18", None, 512), ("mobilenet_v2", 512, 512),
    ("efficientnet_b3", 2048, 2048), ("small_cnn", 64, 64),
])
def test_output_is_l2_normalised_batch_first(architecture, projection_dim, expected_dim):
    net = create_net(architecture, projection_dim=projection_dim, pretrained=False).eval()
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        out = net(x)
        pooled = net.pool(net.features(x))  # (B, D)
    assert out.shape == (2, expected_dim) and net.meta.outputdim == expected_dim
    # unit norm up to L2N's eps (random-init MobileNet/EfficientNet activations are tiny, so compare exactly)
    norms = pooled.norm(dim=1)
    torch.testing.assert_close(out.norm(dim=1), norms / (norms + 1e-6), atol=1e-6, rtol=1e-6)
    if norms.min() > 0.5:
        torch.testing.assert_close(out.norm(dim=1), torch.ones(2), atol=1e-5, rtol=0)


@pytest.mark.parametrize("architecture, projection_dim, expected_dim", [
    ("vgg16", None, 512), ("resnet50", None, 2048), ("resnet101", None, 2048), ("mobilenet_v2", None, 1280),
    ("efficientnet_b3", None, 1536), ("mobilenet_v2", 2048, 2048), ("efficientnet_b3", 512, 512),
])
def test_big_networks_have_the_right_dimension(architecture, projection_dim, expected_dim):
    with torch.device("meta"):  # shapes only: no memory, no time
        net = create_net(architecture, projection_dim=projection_dim, pretrained=False).eval()
        out = net(torch.empty(1, 3, 96, 80))
    assert out.shape == (1, expected_dim)


def test_parameter_names_match_cirtorch_and_aml():
    with torch.device("meta"):
        vgg = create_net("vgg16", pretrained=False).state_dict()
        resnet = create_net("resnet101", pretrained=False, whitening=True).state_dict()
        student = create_net("mobilenet_v2", projection_dim=512, pretrained=False).state_dict()
    # vgg16: torchvision features without the last max-pool; the last conv is features.28
    assert "features.28.weight" in vgg and not any(k.startswith("features.30") for k in vgg)
    assert vgg["pool.p"].shape == (1,)
    # resnet: children()[:-2] -> conv1 bn1 relu maxpool layer1..4 as features.0..7
    assert {"features.0.weight", "features.1.running_mean", "features.4.0.conv1.weight",
            "features.7.2.bn3.weight", "whiten.weight", "whiten.bias"} <= set(resnet)
    # aml's mobilenet_v2 student: torchvision features as features.0, then the 1x1 conv as features.1
    assert student["features.1.weight"].shape == (512, 1280, 1, 1)
    assert "features.0.18.0.weight" in student and "features.1.bias" not in student


def test_meta_round_trips_through_cirtorch_dict():
    net = create_net("small_cnn", projection_dim=32, pretrained=False)
    meta = net.meta.to_dict()
    assert {"architecture", "local_whitening", "pooling", "regional", "whitening", "mean", "std",
            "outputdim"} <= set(meta)
    assert meta["outputdim"] == 32 and meta["local_whitening"] is False
    again = NetMeta.from_dict({**meta, "Lw": {"x": 1}})
    assert again.projection_dim == 32 and again.extra == {"Lw": {"x": 1}}
    assert again.to_dict() == {**meta, "Lw": {"x": 1}}
    with pytest.raises(UserError, match="pooling"):
        NetMeta.from_dict({"architecture": "vgg16", "mean": [0, 0, 0], "std": [1, 1, 1]})


def test_param_groups_follow_cirtorch():
    net = create_net("small_cnn", projection_dim=16, pretrained=False, whitening=True)
    groups = net.param_groups(lr=1e-3, weight_decay=1e-6)
    features, pool, whiten = groups
    assert features["lr"] == 1e-3 and features["weight_decay"] == 1e-6
    assert pool["params"] == [net.pool.p] and pool["lr"] == pytest.approx(1e-2) and pool["weight_decay"] == 0
    assert whiten["params"] == list(net.whiten.parameters())
    grouped = [id(p) for group in groups for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in net.parameters())


def test_projection_learns_at_its_own_rate_only_when_asked():
    net = create_net("small_cnn", projection_dim=16, pretrained=False)
    assert len(net.param_groups(lr=1e-3, weight_decay=1e-6)) == 2  # aml's groups: features, pool
    features, head, pool = net.param_groups(lr=1e-3, weight_decay=1e-6, projection_lr_multiplier=10.0)
    assert head["params"] == [net.features[-2].weight] and head["lr"] == pytest.approx(1e-2)
    assert features["lr"] == 1e-3 and all(p is not net.features[-2].weight for p in features["params"])
    grouped = [id(p) for group in (features, head, pool) for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in net.parameters())
    alone = create_net("small_cnn", pretrained=False)  # no projection: nothing to split off
    assert len(alone.param_groups(lr=1e-3, weight_decay=1e-6, projection_lr_multiplier=10.0)) == 2


def test_freeze_batchnorm_keeps_running_statistics():
    net = create_net("small_cnn", pretrained=False)
    net.train()
    freeze_batchnorm(net)
    batchnorms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert batchnorms and all(not m.training for m in batchnorms)
    assert net.training and net.features[0].training
    before = [m.running_mean.clone() for m in batchnorms]
    net(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(torch.equal(a, m.running_mean) for a, m in zip(before, batchnorms))
    assert net.features[1].weight.grad is not None  # affine weights still train


def test_bad_names_are_user_errors():
    with pytest.raises(UserError, match="unknown architecture"):
        create_net("alexnet", pretrained=False)
    with pytest.raises(UserError, match="unknown pooling"):
        create_net("small_cnn", pooling="rmac", pretrained=False)
    with pytest.raises(UserError, match="projection"):
        create_net("small_cnn", projection_dim=0, pretrained=False)


# ---- padded batches -----------------------------------------------------------------------------

SIZES = [(64, 80), (60, 80), (64, 75), (57, 71), (64, 64), (41, 64), (64, 80)]


@pytest.mark.parametrize("architecture", ["small_cnn", "resnet18", "mobilenet_v2", "efficientnet_lite0",
                                          "efficientnet_b3"])
def test_padded_batches_match_one_at_a_time(architecture):
    """The EfficientNets pad as TensorFlow does (by an amount that depends on the size: odd and even
    sides here) and efficientnet_b3 averages spatially in its squeeze-excitations. Float32 rounding
    through EfficientNet-B3's 26 blocks reaches 2e-5 (float64: below 1e-13), a thousandth of the leak."""
    torch.manual_seed(0)
    net = create_net(architecture, pretrained=False).eval()
    images = [torch.randn(3, h, w) for h, w in SIZES]
    tolerance = 1e-4 if architecture == "efficientnet_b3" else 1e-5
    if architecture in ("small_cnn", "resnet18"):
        _randomise_batchnorm(net)
    else:  # from scratch their output ignores the input until BN fits the data
        calibrate_batchnorm(net, iter(images))
        net.eval()
    with torch.no_grad():
        single = torch.cat([net(image[None]) for image in images])  # (N, D)
        bucketed = embed_in_buckets(net, images, max_batch=4, max_pad_frac=0.5)
        batch, valid_hw = pad_batch(images)
        padded = net(batch, valid_hw)  # one batch, up to 45% padding
        # host ints, as the training step passes them
        as_pairs = net(batch, [tuple(size) for size in valid_hw.tolist()])
        unmasked = net(batch)  # the padding leaks in without valid_hw
    assert (single[0] - single[1]).abs().max() > 1e-3  # distinct images, distinct embeddings
    assert (padded - single).abs().max().item() < tolerance
    assert torch.equal(as_pairs, padded)
    assert (bucketed - single).abs().max().item() < tolerance
    assert (unmasked - single).abs().max().item() > 1e-3


def _same_padded_net() -> torch.nn.Module:
    """TensorFlow-'SAME' strided convolutions (odd and even kernels' padding), linear end to end (SPoC),
    so float32 gradients compare tightly: EfficientNet's ReLU6 cuts gradients where rounding falls."""
    from amldist.nets import NetMeta, RetrievalNet, SPoC
    from amldist.nets.padding import SamePadConv2d

    features = torch.nn.Sequential(SamePadConv2d(3, 8, 3, stride=2),
                                   SamePadConv2d(8, 8, 5, stride=2, groups=8), torch.nn.Conv2d(8, 16, 1),
                                   SamePadConv2d(16, 16, 3, stride=1))
    return RetrievalNet(features, SPoC(), NetMeta("small_cnn", "spoc", 16))


@pytest.mark.parametrize("architecture", ["small_cnn", "same_padded"])
def test_padded_batch_gradients_match_one_at_a_time(architecture):
    torch.manual_seed(1)
    if architecture == "same_padded":
        net = _same_padded_net().eval()
    else:
        net = create_net(architecture, projection_dim=16, pretrained=False).eval()
    images = [torch.randn(3, h, w) for h, w in SIZES[:4]]
    sum(net(image[None]).sum() for image in images).backward()
    single = net.features[0].weight.grad.clone()
    net.zero_grad()
    net(*pad_batch(images)).sum().backward()
    torch.testing.assert_close(net.features[0].weight.grad, single, atol=1e-5, rtol=1e-4)


def test_traced_same_padding_follows_every_input_size():
    """An export traces SamePadConv2d once; Python arithmetic on the traced size would fix the example's
    padding in the graph, so odd and even sizes of every stride must still get their own."""
    import warnings

    torch.manual_seed(3)
    net = _same_padded_net().eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the tracer's notes on sizes; the comparison below is the check
        traced = torch.jit.trace(net.features, torch.randn(1, 3, 12, 16), check_trace=False)
        for h, w in [(12, 16), (13, 17), (7, 30), (1, 2), (33, 9)]:
            x = torch.randn(1, 3, h, w)
            expected = net.features(x)
            assert torch.equal(traced(x), expected), (h, w)


def test_pad_batch_layout():
    images = [torch.ones(3, 2, 4), 2 * torch.ones(3, 3, 1)]
    batch, valid_hw = pad_batch(images)
    assert batch.shape == (2, 3, 3, 4)
    assert valid_hw.tolist() == [[2, 4], [3, 1]] and valid_hw.dtype == torch.long
    assert batch[0, :, :2, :].eq(1).all() and batch[0, :, 2:, :].eq(0).all()
    assert batch[1, :, :, :1].eq(2).all() and batch[1, :, :, 1:].eq(0).all()
    with pytest.raises(UserError):
        pad_batch([])
    with pytest.raises(UserError):
        pad_batch([torch.ones(3, 2, 2), torch.ones(1, 2, 2)])


def test_buckets_cover_every_image_once_with_little_padding():
    generator = torch.Generator().manual_seed(3)
    shapes = []
    for _ in range(300):  # longest side 362, the other side random, as resized training images
        other = int(torch.randint(180, 363, (1,), generator=generator))
        shapes.append((362, other) if torch.rand(1, generator=generator) < 0.5 else (other, 362))
    shapes += [(362, 272)] * 5
    buckets = bucket_by_shape(shapes, max_batch=8, max_pad_frac=0.1)
    assert sorted(i for bucket in buckets for i in bucket) == list(range(len(shapes)))
    for bucket in buckets:
        assert 1 <= len(bucket) <= 8
        height = max(shapes[i][0] for i in bucket)
        width = max(shapes[i][1] for i in bucket)
        assert all(shapes[i][0] * shapes[i][1] >= 0.9 * height * width for i in bucket)
    same = [b for b in buckets if set(range(300, 305)) & set(b)]
    assert len(same) == 1  # equal shapes share a bucket
    assert len(buckets) < len(shapes) / 4  # and buckets are mostly full
    assert bucket_by_shape([(10, 10), (10, 20)], max_batch=4, max_pad_frac=0.0) == [[0], [1]]
    with pytest.raises(UserError):
        bucket_by_shape(shapes, max_batch=0)


# ---- ImageNet weights ---------------------------------------------------------------------------

def test_imagenet_weights_come_from_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url",
                        lambda *a, **k: pytest.fail("must not download when the file is cached"))
    import torchvision

    reference = torchvision.models.resnet18(weights=None)
    cached, _ = hub_checkpoint_path("resnet18")
    cached.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), cached)
    net = create_net("resnet18", pretrained=True)
    torch.testing.assert_close(net.features[0].weight, reference.conv1.weight)
    torch.testing.assert_close(net.features[7][1].bn2.running_var, reference.layer4[1].bn2.running_var)


def test_missing_weights_offline_is_one_line_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_network(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    with pytest.raises(UserError, match="--no-pretrained") as err:
        create_net("mobilenet_v2", pretrained=True)
    assert "\n" not in str(err.value)
    monkeypatch.setenv("AMLDIST_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *a, **k: pytest.fail("offline"))
    with pytest.raises(UserError, match="--no-pretrained"):
        create_net("resnet18", pretrained=True)


@pytest.mark.parametrize("key, value, message", [
    ("outputdim", "big", "meta['outputdim'] must be a whole number"),
    ("outputdim", float("nan"), "meta['outputdim'] must be a whole number"),
    ("projection_dim", "x", "meta['projection_dim'] must be a whole number"),
    ("mean", "abc", "meta['mean'] must be 3 finite numbers"),
    ("mean", "123", "meta['mean'] must be 3 finite numbers"),  # text is not three numbers
    ("mean", [0.5, "x", 0.5], "meta['mean'] must be 3 finite numbers"),
    ("std", [0.2, 0.2], "meta['std'] must be 3 numbers > 0"),
    ("std", [0.2, 0.0, 0.2], "meta['std'] must be 3 numbers > 0"),
])
def test_damaged_meta_values_are_user_errors(key, value, message):
    meta = create_net("mini_cnn", pretrained=False).meta.to_dict()
    meta[key] = value
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        NetMeta.from_dict(meta)
