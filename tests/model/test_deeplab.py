"""DeepLabV3+ outputs, output stride, backbones and their initialisation."""

import pytest
import torch
import torch.nn.functional as F

from model.backbones import BackboneInitError, build_backbone
from model.deeplab import DeepLabV3Plus, PaddedConv2d, StemMaxPool2d, resize_bilinear


@pytest.mark.parametrize("backbone", ["resnet18", "resnet18_slim", "resnet50"])
def test_backbones_have_output_stride_16(backbone):
    encoder = build_backbone(backbone)
    low, high = encoder(torch.randn(1, 3, 64, 64))
    assert low.shape[-2:] == (16, 16) and high.shape[-2:] == (4, 4)
    assert low.shape[1] == encoder.low_channels and high.shape[1] == encoder.high_channels


def test_forward_returns_what_is_asked():
    model = DeepLabV3Plus(5, "resnet18_slim", aspp_channels=16, decoder_channels=16, low_level_channels=8,
                          reconstruction=True)  # fmt: skip
    x = torch.randn(3, 3, 36, 44)
    out = model(x)
    assert out.logits.shape == (3, 5, 36, 44) and out.logits_fp is None and out.reconstruction is None
    out = model(x, perturb_from=1, need_features=True, need_reconstruction=True)
    assert out.logits_fp.shape == (2, 5, 36, 44)
    assert out.features.shape == (3, 16, 9, 11)
    assert out.reconstruction.shape == (3, 3, 36, 44)
    head = {id(p) for p in model.head_parameters()}
    assert not head & {id(p) for p in model.backbone.parameters()}
    assert len(head) + sum(1 for _ in model.backbone.parameters()) == sum(1 for _ in model.parameters())


def test_imagenet_init_without_network_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached weights
    monkeypatch.setattr("torch.hub.download_url_to_file", _offline)
    with pytest.raises(BackboneInitError, match="model.init=none"):
        build_backbone("resnet50", "imagenet")


def _offline(*args, **kwargs):
    raise OSError("network is unreachable")


def test_local_file_init(tmp_path):
    source = build_backbone("resnet18_slim")
    path = tmp_path / "encoder.pth"
    torch.save(source.state_dict(), path)
    loaded = build_backbone("resnet18_slim", str(path))
    assert torch.equal(loaded.stem[0].weight, source.stem[0].weight)
    with pytest.raises(BackboneInitError, match="no such file"):
        build_backbone("resnet18_slim", str(tmp_path / "missing.pth"))
    with pytest.raises(BackboneInitError, match="does not fit"):
        build_backbone("resnet50", str(path))
    (tmp_path / "notes.pth").write_text("not weights")
    with pytest.raises(BackboneInitError, match="not a torch weights file"):
        build_backbone("resnet18_slim", str(tmp_path / "notes.pth"))


def _tiny(**kwargs) -> DeepLabV3Plus:
    return DeepLabV3Plus(5, "resnet18_slim", aspp_channels=16, decoder_channels=16, low_level_channels=8, **kwargs)


def test_no_dropout_after_aspp():
    model = _tiny()
    assert not [m for m in model.aspp.modules() if isinstance(m, torch.nn.Dropout | torch.nn.Dropout2d)]
    assert "aspp.project.0.0.weight" in model.state_dict()  # checkpoints made with the dropout still load
    model.train()
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    first = model(x).logits
    torch.manual_seed(1)
    assert torch.equal(first, model(x).logits)  # train mode, no perturbation: nothing random


def test_clean_and_perturbed_features_are_decoded_in_one_call(monkeypatch):
    model = _tiny(fp_dropout=0.0).train()
    calls = []
    decode = model._decode
    monkeypatch.setattr(model, "_decode", lambda low, high: calls.append(low.shape[0]) or decode(low, high))
    x = torch.randn(3, 3, 32, 32)
    out = model(x, perturb_from=1)
    assert calls == [6]  # one decode of 2 x 3 rows: clean and perturbed share BatchNorm's batch statistics
    # With a dropout of 0 the perturbed half is the clean half: the same batch statistics give the same logits.
    torch.testing.assert_close(out.logits_fp, out.logits[1:])
    running = model.fuse[0][1].num_batches_tracked.item()
    model(x, perturb_from=1)
    assert model.fuse[0][1].num_batches_tracked.item() == running + 1  # running statistics: once a step


@pytest.mark.parametrize("source", ["decoder", "encoder"])
def test_reconstruction_head_reads_the_features_it_was_built_for(source, monkeypatch):
    model = _tiny(reconstruction=True, reconstruct_from=source).train()
    calls = []
    decode = model._decode
    monkeypatch.setattr(model, "_decode", lambda low, high: calls.append(low.shape[0]) or decode(low, high))
    x = torch.randn(2, 3, 48, 40)
    out = model(x, need_reconstruction=True, need_logits=False)
    assert out.reconstruction.shape == (2, 3, 48, 40) and out.logits is None
    # The encoder head needs no decoder: the masked forward stops after the encoder.
    assert calls == ([2] if source == "decoder" else [])
    assert out.encoder_features.shape == (2, model.backbone.high_channels, 3, 3)
    calls.clear()
    out = model(x, need_features=True, need_reconstruction=True, need_logits=False)
    assert calls == [2] and out.features.shape[-2:] == (12, 10)  # decoder features asked for: one decode
    expected_in = model.backbone.high_channels if source == "encoder" else 16
    assert model.reconstruction_head.proj.in_channels == expected_in


def test_unknown_reconstruction_source_is_refused():
    with pytest.raises(ValueError, match="decoder or encoder"):
        _tiny(reconstruction=True, reconstruct_from="aspp")


def test_slim_width_sets_every_stage_and_other_backbones_refuse_it():
    encoder = build_backbone("resnet18_slim", width=16)
    low, high = encoder(torch.randn(1, 3, 48, 48))
    assert (encoder.low_channels, encoder.high_channels) == (16, 128)
    assert low.shape[-2:] == (12, 12) and high.shape[-2:] == (3, 3)  # output stride 16 at any width
    assert (
        sum(p.numel() for p in encoder.parameters())
        < sum(p.numel() for p in build_backbone("resnet18_slim").parameters()) / 3
    )
    with pytest.raises(ValueError, match="resnet18_slim only"):
        build_backbone("resnet18", width=16)


RESIZES = [((12, 12), (48, 48)), ((3, 5), (12, 20)), ((1, 1), (4, 3)), ((9, 11), (36, 44)), ((20, 16), (7, 5)),
           ((6, 6), (6, 6))]  # fmt: skip


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize(("size_in", "size_out"), RESIZES)
def test_resize_bilinear_matches_the_library_kernel(size_in, size_out, align_corners):
    x = torch.randn(2, 3, *size_in, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 3, *size_out, dtype=torch.float64)
    ours = resize_bilinear(x, size_out, align_corners)
    (ours_grad,) = torch.autograd.grad(ours, x, grad)
    theirs = F.interpolate(x, size=size_out, mode="bilinear", align_corners=align_corners)
    (theirs_grad,) = torch.autograd.grad(theirs, x, grad)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    torch.testing.assert_close(ours_grad, theirs_grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("dilation", "size"), [(4, 3), (6, 3), (3, 3), (2, 3), (1, 1), (6, (2, 8)), (2, (3, 2))])
def test_padded_conv_equals_the_dilated_convolution(dilation, size):
    """Where the dilation reaches past the map, only the centre tap reads pixels: the 1x1 form is exact."""
    h, w = (size, size) if isinstance(size, int) else size
    conv = PaddedConv2d(4, 5, 3, padding=dilation, dilation=dilation, bias=False).double()
    x = torch.randn(2, 4, h, w, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 5, h, w, dtype=torch.float64)
    ours = conv(x)
    ours_grads = torch.autograd.grad(ours, (x, conv.weight), grad)
    theirs = F.conv2d(x, conv.weight, padding=dilation, dilation=dilation)
    theirs_grads = torch.autograd.grad(theirs, (x, conv.weight), grad)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    for a, b in zip(ours_grads, theirs_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_fast_paths_leave_the_step_unchanged(monkeypatch):
    """The testbed's model (3x3 stride-16 maps): logits and every parameter's gradient equal those of the
    library's resizing, dilated convolutions and max pooling."""

    def run():
        torch.manual_seed(0)
        model = DeepLabV3Plus(9, "resnet18_slim", width=16, aspp_channels=32, decoder_channels=32,
                              low_level_channels=12, dilations=(2, 4, 6)).double()  # fmt: skip
        x = torch.randn(4, 3, 48, 48, dtype=torch.float64)
        out = model(x, perturb_from=2)
        loss = out.logits.square().mean() + out.logits_fp.sin().mean()
        loss.backward()
        return out.logits.detach(), {n: p.grad for n, p in model.named_parameters()}

    fast_logits, fast_grads = run()
    monkeypatch.setattr(PaddedConv2d, "forward", torch.nn.Conv2d.forward)
    monkeypatch.setattr(StemMaxPool2d, "forward", torch.nn.MaxPool2d.forward)
    monkeypatch.setattr(
        "model.deeplab.resize_bilinear",
        lambda x, size, align_corners: F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners),
    )
    slow_logits, slow_grads = run()
    torch.testing.assert_close(fast_logits, slow_logits, rtol=0, atol=1e-10)
    assert fast_grads.keys() == slow_grads.keys()
    for name in fast_grads:
        torch.testing.assert_close(fast_grads[name], slow_grads[name], rtol=0, atol=1e-10, msg=name)
