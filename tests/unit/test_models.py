"""Model shapes, gradients, fusion rules and pretrained weights, on tiny CPU inputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.models import resnet18

from config.load import validate_config
from models import (
    FUSIONS,
    AudioModel,
    FusionOutput,
    ImageModel,
    build_model,
    consistency_loss,
    emotion_agreement,
)

B, M, T, S = 4, 16, 24, 32  # batch, mel bands, frames, image side: tiny on purpose


def config(**model: object) -> object:
    return validate_config({"model": dict(model)})


def inputs(b: int = B, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    audio = torch.randn(b, 1, M, T, generator=g)  # (B, 1, M, T)
    image = torch.rand(b, 3, S, S, generator=g)  # (B, 3, S, S)
    return audio, image


VARIANTS = [
    ("early", "learned"),
    ("mid", "learned"),
    *(("late", r) for r in ("learned", "mean", "max")),
]


@pytest.mark.parametrize(("fusion", "rule"), VARIANTS)
def test_forward_shapes_and_gradients_reach_both_branches(fusion: str, rule: str) -> None:
    torch.manual_seed(0)
    model = build_model(fusion, config(late_fusion_rule=rule))
    audio, image = inputs()
    audio.requires_grad_(True)
    image.requires_grad_(True)
    out = model(audio, image)
    assert isinstance(out, FusionOutput)
    assert out.logit.shape == (B,) and out.score.shape == (B,)
    assert out.audio_emb.shape == (B, 128) and out.image_emb.shape == (B, 128)
    assert torch.allclose(out.score, torch.sigmoid(out.logit))
    assert ((out.score > 0) & (out.score < 1)).all()

    label = torch.tensor([0.0, 1.0, 0.0, 1.0])
    loss = F.binary_cross_entropy_with_logits(out.logit, label)
    loss = loss + 0.1 * consistency_loss(out.audio_emb, out.image_emb, label)
    loss.backward()
    assert audio.grad is not None and audio.grad.abs().sum() > 0
    assert image.grad is not None and image.grad.abs().sum() > 0
    if fusion != "early":  # the two encoders' own weights learn
        for branch in (model.audio, model.image):
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in branch.parameters())


def test_bce_alone_reaches_both_branches_of_mid_and_late() -> None:
    for fusion in ("mid", "late"):
        torch.manual_seed(0)
        model = build_model(fusion, config(late_fusion_rule="mean"))
        F.binary_cross_entropy_with_logits(model(*inputs()).logit, torch.ones(B)).backward()
        assert model.audio.proj.weight.grad.abs().sum() > 0
        assert model.image.proj.weight.grad.abs().sum() > 0


def test_embedding_size_follows_the_config() -> None:
    model = build_model("mid", config(embedding_dim=32))
    out = model(*inputs())
    assert out.audio_emb.shape == (B, 32) and out.image_emb.shape == (B, 32)


def test_late_fusion_rules_combine_the_three_predictions() -> None:
    torch.manual_seed(0)
    audio, image = inputs()
    for rule in ("mean", "max"):
        model = build_model("late", config(late_fusion_rule=rule)).eval()
        with torch.no_grad():
            out = model(audio, image)
            agree, _, _ = model.emotions(out.audio_emb, out.image_emb)
            p = torch.sigmoid(model.head_logits(out.audio_emb, out.image_emb, agree))  # (B, 3)
        expected = p.mean(dim=1) if rule == "mean" else p.max(dim=1).values
        assert torch.allclose(out.score, expected, atol=1e-6), rule


def test_late_learned_rule_starts_as_a_soft_or_of_the_heads() -> None:
    model = build_model("late", config()).eval()
    with torch.no_grad():
        out = model(*inputs())
        agree, _, _ = model.emotions(out.audio_emb, out.image_emb)
        logits = model.head_logits(out.audio_emb, out.image_emb, agree)
    # one head saying "fake" is enough: the combined logit is never far below the largest head
    assert (out.logit >= logits.max(dim=1).values - math.log(3) - 1e-5).all()
    assert (out.logit <= logits.max(dim=1).values + 1e-5).all()


def test_emotion_heads_classify_each_modality_and_their_agreement_is_a_probability() -> None:
    audio, image = inputs()
    for fusion in ("early", "mid", "late"):
        model = build_model(fusion, config(), n_emotions=4).eval()
        with torch.no_grad():
            out = model(audio, image)
        assert out.audio_emotion.shape == (B, 4) and out.image_emotion.shape == (B, 4), fusion
    same = torch.tensor([[9.0, 0.0, 0.0, 0.0]])
    other = torch.tensor([[0.0, 9.0, 0.0, 0.0]])
    assert emotion_agreement(same, same).item() > 0.99
    assert emotion_agreement(same, other).item() < 0.01
    assert build_model("mid", config()).eval()(audio, image).audio_emotion.numel() == 0


def test_late_mean_rule_is_finite_for_extreme_logits() -> None:
    model = build_model("late", config(late_fusion_rule="mean")).eval()
    with torch.no_grad():
        model.audio_head[-1].bias.fill_(200.0)  # p_audio = 1
        model.image_head[-1].bias.fill_(-200.0)  # p_image = 0
        model.consistency_head.linear.weight.zero_()
        model.consistency_head.linear.bias.zero_()  # p_consistency = 0.5
        out = model(*inputs())
    assert torch.isfinite(out.logit).all()
    assert torch.allclose(out.score, torch.full((B,), 0.5), atol=1e-4)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_a_few_steps_on_one_batch_lower_the_loss(fusion: str) -> None:
    torch.manual_seed(0)
    model = build_model(fusion, config())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    audio, image = inputs()
    label = torch.tensor([0.0, 1.0, 0.0, 1.0])
    losses = []
    for _ in range(3):
        out = model(audio, image)
        loss = F.binary_cross_entropy_with_logits(out.logit, label)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("fusion", FUSIONS)
def test_eval_mode_scores_a_single_sample(fusion: str) -> None:
    model = build_model(fusion, config()).eval()
    with torch.no_grad():
        out = model(*inputs(b=1))
    assert out.score.shape == (1,)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_models_compute_in_channels_last_and_score_as_in_the_default_layout(fusion: str) -> None:
    """build_model lays the convolution weights out channels-last (the CPU's fast layout) and the
    forward gives the inputs the same layout; the scores are those of the same weights in torch's
    default layout, whatever layout the inputs arrive in."""
    torch.manual_seed(0)
    model = build_model(fusion, config(), n_emotions=3).eval()
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    plain = build_model(fusion, config(), n_emotions=3).eval()
    plain.load_state_dict(model.state_dict())
    plain = plain.to(memory_format=torch.contiguous_format)
    audio, image = inputs()
    with torch.no_grad():
        fast = model(audio, image)
        again = model(audio, image.contiguous(memory_format=torch.channels_last))
        slow = plain(audio, image)
    for a, b in [(fast, again), (fast, slow)]:
        torch.testing.assert_close(a.logit, b.logit, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a.audio_emb, b.audio_emb, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a.image_emb, b.image_emb, rtol=1e-4, atol=1e-4)


def test_encoders_give_emotion_embeddings() -> None:
    audio, image = inputs()
    assert AudioModel(128)(audio).shape == (B, 128)
    assert ImageModel(128)(image).shape == (B, 128)
    assert AudioModel(16)(torch.randn(2, 1, 3, 5)).shape == (2, 16)  # tiny log-mels still work


@pytest.mark.parametrize("scale", [2, 4])
def test_early_fusions_face_emotion_is_read_the_same_on_a_larger_copy_of_the_picture(
    scale: int,
) -> None:
    """Early fusion's face emotion encoder sees the picture at most 64 px wide: a 64-px face and
    the same face shown 2x or 4x larger give the same emotion embedding and logits (the joint
    trunk and its decision still see every pixel)."""
    torch.manual_seed(0)
    model = build_model("early", config(), n_emotions=4).eval()
    audio = torch.randn(2, 1, M, T)
    face = torch.rand(2, 3, 64, 64)
    larger = face.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    with torch.no_grad():
        small, large = model(audio, face), model(audio, larger)
    torch.testing.assert_close(large.image_emb, small.image_emb, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(large.image_emotion, small.image_emotion, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(large.audio_emb, small.audio_emb)


def test_bad_inputs_are_refused_with_their_shapes() -> None:
    model = build_model("mid", config())
    audio, image = inputs()
    with pytest.raises(ValueError, match=r"audio must be \(B, 1"):
        model(audio.squeeze(1), image)
    with pytest.raises(ValueError, match=r"image must be \(B, 3, S, S\)"):
        model(audio, image[:, :1])
    with pytest.raises(ValueError, match="batch sizes differ"):
        model(audio[:2], image)
    with pytest.raises(ValueError, match="unknown fusion 'hybrid'"):
        build_model("hybrid", config())


def test_pretrained_resnet_weights_fill_the_image_branch() -> None:
    torch.manual_seed(1)
    weights = resnet18(weights=None).state_dict()  # stands in for a local weights file
    model = build_model("mid", config(), image_weights=weights)
    assert torch.equal(
        model.image.backbone.layer4[1].conv2.weight, weights["layer4.1.conv2.weight"]
    )
    assert torch.equal(model.image.backbone.conv1.weight, weights["conv1.weight"])


def test_pretrained_weights_fill_early_fusions_stem_and_joint_trunk() -> None:
    torch.manual_seed(1)
    weights = resnet18(weights=None).state_dict()
    model = build_model("early", config(), image_weights=weights).eval()
    assert torch.equal(model.image_stem[0].weight, weights["conv1.weight"])
    assert torch.equal(model.joint[2][1].conv2.weight, weights["layer4.1.conv2.weight"])
    # the joint trunk's first block reads the image stem's 64 channels and the audio stem's 32;
    # the image part holds the pretrained weights, the audio part starts at zero
    first = model.joint[0][0].conv1.weight
    assert first.shape[1] == 64 + model.audio_stem[-1][0].weight.shape[0]
    assert torch.equal(first[:, :64], weights["layer2.0.conv1.weight"])
    assert not first[:, 64:].any()
    # so until training moves them, the trunk computes what the pretrained ResNet18 does
    reference = resnet18(weights=None)
    reference.load_state_dict(weights)
    reference.eval()
    feats = torch.rand(2, 64, 8, 8)
    with torch.no_grad():
        joined = model.joint(torch.cat([feats, torch.rand(2, 32, 8, 8)], dim=1))
        plain = torch.flatten(
            reference.avgpool(reference.layer4(reference.layer3(reference.layer2(feats)))), 1
        )
    torch.testing.assert_close(joined, plain)


def test_early_fusion_from_scratch_uses_the_audio_channels_from_the_start() -> None:
    torch.manual_seed(1)
    model = build_model("early", config())
    first = model.joint[0][0].conv1.weight
    assert first[:, 64:].abs().sum() > 0  # ResNet's own initialisation, not zeros
    model.eval()
    audio, image = inputs()
    with torch.no_grad():
        a = model(audio, image).logit
        b = model(torch.flip(audio, dims=[0]), image).logit
    assert not torch.allclose(a, b)  # the decision depends on the voice too


def test_foreign_weights_are_refused() -> None:
    weights = resnet18(weights=None).state_dict()
    del weights["layer2.0.conv1.weight"]
    with pytest.raises(ValueError, match="not ResNet18 weights.*layer2.0.conv1.weight"):
        build_model("mid", config(), image_weights=weights)
    weights = resnet18(weights=None, num_classes=10).state_dict()  # the classifier is dropped
    build_model("late", config(), image_weights=weights)
    weights["conv1.weight"] = torch.zeros(64, 4, 7, 7)
    with pytest.raises(ValueError, match=r"conv1.weight has shape \(64, 4, 7, 7\)"):
        build_model("late", config(), image_weights=weights)
