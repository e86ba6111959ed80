"""bag_of_bricks: preprocessor, torchvision backbones, heads and the ready-made collections."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torchvision
from torch import nn

from torchbricks_fx import BrickCollection, BrickError, Stage, compile_stage
from torchbricks_fx.bag_of_bricks import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Backbone,
    BackboneResnet,
    ImageClassifier,
    Preprocessor,
    SegmentationHead,
    backbone_brick,
    backbone_names,
    classification_head_bricks,
    image_classification_bricks,
    resnet_to_brick,
    segmentation_bricks,
    segmentation_head_bricks,
)
from torchbricks_fx.bricks import BrickNotTrainable, BrickTrainable

SIZE = 32


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    """weights=None must never reach the network."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a weights download was attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)


def images(n: int = 2, size: int = SIZE) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------------------ preprocessor
def test_preprocessor_matches_torchvision_normalize() -> None:
    x = images()
    expected = torchvision.transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)(x)
    preprocessor = Preprocessor()
    assert isinstance(preprocessor, nn.Module)
    torch.testing.assert_close(preprocessor(x), expected)


def test_preprocessor_scales_uint8_input() -> None:
    pixels = (images() * 255).round().to(torch.uint8)
    normalized = Preprocessor(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), uint8_input=True)(pixels)
    assert normalized.dtype == torch.float32
    torch.testing.assert_close(normalized, (pixels.float() / 255 - 0.5) / 0.5)


def test_preprocessor_refuses_unscaled_integers() -> None:
    with pytest.raises(BrickError, match="uint8_input=True"):
        Preprocessor()(torch.zeros(1, 3, 4, 4, dtype=torch.uint8))


def test_preprocessor_uint8_input_refuses_float_images() -> None:
    """Float images are already in [0, 1]: dividing them by 255 again would silently give ~0."""
    preprocessor = Preprocessor(uint8_input=True)
    with pytest.raises(BrickError, match=r"uint8_input=True\) got torch\.float32.*uint8.*uint8_input=False"):
        preprocessor(images())
    with pytest.raises(BrickError, match=r"torch\.int64"):
        preprocessor((images() * 255).long())


def test_preprocessor_refuses_images_with_other_channels_naming_both() -> None:
    with pytest.raises(BrickError, match=r"normalizes 2 channels .* images of shape \(2, 3, 4, 4\)"):
        Preprocessor(mean=(0.1, 0.2), std=(0.2, 0.2))(torch.rand(2, 3, 4, 4))
    one_value = Preprocessor(mean=(0.5,), std=(0.5,))(torch.ones(2, 3, 4, 4))  # one value for every channel
    assert torch.equal(one_value, torch.ones(2, 3, 4, 4))


def test_preprocessor_configuration_errors() -> None:
    with pytest.raises(BrickError, match=r"one value per channel.*\(got 2 and 3\)"):
        Preprocessor(mean=(0.5, 0.5), std=(0.5, 0.5, 0.5))
    with pytest.raises(BrickError, match="positive"):
        Preprocessor(mean=(0.5,), std=(0.0,))


@pytest.mark.parametrize(("mean", "std"), [(0.5, 0.25), ((0.5,), 0.25), (0.5, (0.25, 0.5, 0.2)),
                                           (torch.tensor([0.4, 0.5, 0.6]), torch.tensor(0.25))])
def test_preprocessor_takes_mean_and_std_as_normalize_does(mean: object, std: object) -> None:
    """Scalars, one value for every channel, or one per channel, as torchvision's Normalize takes them."""
    x = images()
    expected = torchvision.transforms.Normalize(mean, std)(x)  # type: ignore[arg-type]
    torch.testing.assert_close(Preprocessor(mean, std)(x), expected, rtol=0, atol=0)  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_preprocessor_normalizes_in_the_input_dtype_as_normalize_does(dtype: torch.dtype) -> None:
    x = images().to(dtype)
    expected = torchvision.transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)(x)
    normalized = Preprocessor()(x)
    assert normalized.dtype == dtype
    torch.testing.assert_close(normalized, expected, rtol=0, atol=0)


def test_preprocessor_constants_follow_the_module_but_stay_out_of_checkpoints() -> None:
    preprocessor = Preprocessor().to(torch.float64)
    assert preprocessor.mean.dtype == torch.float64
    assert preprocessor(images().double()).dtype == torch.float64
    assert preprocessor.state_dict() == {}


# ------------------------------------------------------------------------------------------------ seed cell
def test_seed_cell_13_runs_with_the_new_import_root() -> None:
    from torchmetrics.classification import MulticlassAccuracy

    from torchbricks_fx.bricks import BrickLoss, BrickMetricSingle

    num_classes = 10
    resnet = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    resnet_brick = resnet_to_brick(resnet=resnet, input_name="normalized", output_name="features")
    n_features = resnet_brick.model.n_backbone_features
    bricks = {
        "preprocessor": BrickNotTrainable(Preprocessor(), input_names=["raw"], output_names=["normalized"]),
        "backbone": resnet_brick,
        "head": BrickTrainable(ImageClassifier(num_classes=num_classes, n_features=n_features),
                               input_names=["features"], output_names=["logits", "probabilities", "class_prediction"]),
        "accuracy": BrickMetricSingle(MulticlassAccuracy(num_classes=num_classes),
                                      input_names=["class_prediction", "targets"]),
        "loss": BrickLoss(model=nn.CrossEntropyLoss(), input_names=["logits", "targets"], output_names=["loss_ce"]),
    }
    collection = BrickCollection(bricks)
    named_inputs = {"raw": images(), "targets": torch.ones(2, dtype=torch.int64)}
    for _ in range(2):
        named_outputs = collection(named_inputs=named_inputs, stage=Stage.TRAIN)
    metrics = collection.summarize(stage=Stage.TRAIN, reset=True)
    assert set(metrics) == {"MulticlassAccuracy"}
    assert {"logits", "probabilities", "class_prediction", "loss_ce"} <= set(named_outputs)
    assert set(collection.extract_losses(named_outputs)) == {"loss_ce"}


# ------------------------------------------------------------------------------------------------ backbones
@pytest.mark.parametrize(("name", "n_features"), [("resnet18", 512), ("resnet50", 2048)])
def test_backbone_resnet_is_the_resnet_before_pooling(name: str, n_features: int) -> None:
    resnet = torchvision.models.get_model(name, weights=None).eval()
    backbone = BackboneResnet(resnet).eval()
    assert backbone.n_backbone_features == n_features
    x = images()
    features = backbone(x)
    assert features.shape == (2, n_features, 1, 1)
    resnet.fc = nn.Identity()
    torch.testing.assert_close(torch.flatten(features, 1), resnet(x))


@pytest.mark.parametrize(("name", "n_features"), [("resnet18", 512), ("resnet50", 2048)])
def test_backbone_resnet_width_comes_from_layer4_not_fc(name: str, n_features: int) -> None:
    """A user who already dropped the classifier (resnet.fc = nn.Identity()) can still wrap the ResNet."""
    resnet = torchvision.models.get_model(name, weights=None, num_classes=7)
    resnet.fc = nn.Identity()
    brick = resnet_to_brick(resnet, input_name="normalized", output_name="features")
    assert brick.model.n_backbone_features == n_features
    assert brick.model.eval()(images()).shape[1] == n_features


def _group_norm(channels: int) -> nn.Module:
    return nn.GroupNorm(8, channels)


@pytest.mark.parametrize(("make", "n_features"), [
    (lambda: torchvision.models.resnet50(norm_layer=torchvision.ops.misc.FrozenBatchNorm2d), 2048),
    (lambda: nn.SyncBatchNorm.convert_sync_batchnorm(torchvision.models.resnet18()), 512),
    (lambda: torchvision.models.resnet18(norm_layer=_group_norm), 512),
], ids=["frozen_bn", "sync_bn", "group_norm"])
def test_resnet_to_brick_accepts_resnets_with_other_norm_layers(make: object, n_features: int) -> None:
    """torchbricks wraps any torchvision ResNet whatever its norm layer (FrozenBatchNorm2d for detection
    backbones, SyncBatchNorm after convert_sync_batchnorm, GroupNorm)."""
    assert callable(make)
    brick = resnet_to_brick(make(), input_name="normalized", output_name="features")
    assert brick.model.n_backbone_features == n_features == brick.model.eval()(images()).shape[1]


def test_resnet_width_is_layer4s_output_even_with_one_block_per_layer_or_a_custom_last_block() -> None:
    one_block = torchvision.models.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1])
    brick = resnet_to_brick(one_block, input_name="normalized", output_name="features")
    assert brick.model.n_backbone_features == 512 == brick.model.eval()(images()).shape[1]
    custom = torchvision.models.resnet18()
    custom.layer4[-1] = nn.Sequential(nn.Conv2d(512, 96, 1), nn.ReLU())  # neither conv2 nor conv3: measured
    brick = resnet_to_brick(custom, input_name="normalized", output_name="features")
    assert brick.model.training  # measuring did not leave it in eval mode
    assert brick.model.n_backbone_features == 96 == brick.model.eval()(images()).shape[1]
    evaluated = torchvision.models.resnet18().eval()
    evaluated.layer4[-1] = nn.Sequential(nn.Conv2d(512, 96, 1), nn.ReLU()).eval()
    resnet_to_brick(evaluated.double(), input_name="normalized", output_name="features")  # measured in float64
    assert not any(module.training for module in evaluated.modules())  # each module's mode put back


def test_resnet_to_brick_shares_the_resnet_weights() -> None:
    resnet = torchvision.models.resnet18(weights=None)
    brick = resnet_to_brick(resnet, input_name="normalized", output_name="features")
    assert isinstance(brick, BrickTrainable)
    assert brick.input_names == ["normalized"] and brick.output_names == ["features"]
    assert brick.model.layer4 is resnet.layer4


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "regnet_x_400mf", "shufflenet_v2_x0_5", "squeezenet1_1"])
def test_backbone_brick_returns_feature_maps(name: str) -> None:
    brick = backbone_brick(name, input_name="normalized", output_name="features")
    model = brick.model.eval()
    assert isinstance(model, Backbone)
    features = model(images(size=64))
    assert features.dim() == 4
    assert features.shape[:2] == (2, model.n_backbone_features)


def test_every_listed_backbone_has_a_family() -> None:
    names = backbone_names()
    assert {"resnet18", "resnext50_32x4d", "mobilenet_v2", "convnext_tiny", "swin_t", "vgg11"} <= set(names)
    assert not {"vit_b_16", "googlenet", "inception_v3"} & set(names)


def test_unknown_backbone_lists_the_valid_ones() -> None:
    with pytest.raises(BrickError, match=r"Unknown backbone 'resnet19'.*resnet18.*resnet34"):
        backbone_brick("resnet19")
    with pytest.raises(BrickError, match=r"Unknown backbone 'vit_b_16'"):
        backbone_brick("vit_b_16")


def test_frozen_backbone() -> None:
    brick = backbone_brick("resnet18", trainable=False)
    assert isinstance(brick, BrickNotTrainable)
    assert not any(p.requires_grad for p in brick.parameters())


def test_backbone_forwards_model_arguments() -> None:
    brick = backbone_brick("mobilenet_v3_small", width_mult=0.5)
    assert brick.model.n_backbone_features < 576


# ------------------------------------------------------------------------------------------------ heads
def test_image_classifier_outputs() -> None:
    head = ImageClassifier(num_classes=4, n_features=8)
    logits, probabilities, prediction = head(torch.randn(3, 8, 2, 2))
    assert logits.shape == probabilities.shape == (3, 4)
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(3))
    assert torch.equal(prediction, logits.argmax(dim=1))
    flat = ImageClassifier(num_classes=4, n_features=8, use_average_pooling=False)
    assert flat(torch.randn(3, 8))[0].shape == (3, 4)


def test_image_classifier_without_pooling_flattens_like_torchbricks() -> None:
    """Already pooled maps (N, C, 1, 1) must give (N, num_classes) logits, not (N, C, 1, num_classes)."""
    head = ImageClassifier(num_classes=4, n_features=8, use_average_pooling=False)
    features = torch.randn(3, 8, 1, 1)
    logits, probabilities, prediction = head(features)
    assert logits.shape == probabilities.shape == (3, 4)
    assert prediction.shape == (3,)
    torch.testing.assert_close(logits, ImageClassifier.forward(head, features.flatten(1))[0])


def test_head_arguments_are_checked() -> None:
    with pytest.raises(BrickError, match="num_classes must be a positive integer"):
        ImageClassifier(num_classes=0, n_features=8)
    with pytest.raises(BrickError, match="n_features"):
        SegmentationHead(num_classes=2, n_features=-1)


def test_segmentation_head_upsamples_to_the_image() -> None:
    head = SegmentationHead(num_classes=5, n_features=8)
    logits, prediction = head(torch.randn(2, 8, 3, 4), torch.zeros(2, 3, 24, 32))
    assert logits.shape == (2, 5, 24, 32)
    assert prediction.shape == (2, 24, 32)


# ------------------------------------------------------------------------------------------------ collections
def test_image_classification_bricks_all_stages() -> None:
    collection = image_classification_bricks(num_classes=4, backbone="resnet18")
    collection.check()
    assert collection.plan(Stage.INFERENCE).required_inputs == ("raw",)
    assert collection.plan(Stage.TRAIN).required_inputs == ("raw", "targets")
    named_inputs = {"raw": images(4), "targets": torch.tensor([0, 1, 2, 3])}
    outputs = collection(named_inputs, Stage.TRAIN)
    assert outputs["logits"].shape == (4, 4)
    assert outputs["loss_ce"].requires_grad
    outputs["loss_ce"].backward()
    assert set(collection.summarize(Stage.TRAIN)) == {"accuracy", "f1"}


def test_classification_accuracy_is_the_fraction_correct() -> None:
    """"accuracy" is correct / total (micro), not the mean per-class recall (torchmetrics' macro default)."""
    metrics = classification_head_bricks(num_classes=3, n_features=8)["metrics"]
    # 3 of 4 right; the per-class recalls are 0 (class 0) and 1 (class 1): macro would give 0.5.
    metrics.metrics["VALIDATION"].update(torch.tensor([1, 1, 1, 1]), torch.tensor([0, 1, 1, 1]))
    assert float(metrics.summarize(Stage.VALIDATION, reset=True)["accuracy"]) == pytest.approx(0.75)


def test_image_classification_bricks_eager_equals_compiled() -> None:
    collection = image_classification_bricks(num_classes=4, backbone="mobilenet_v3_small")
    named_inputs = {"raw": images(4), "targets": torch.tensor([0, 1, 2, 3])}
    eager = collection(named_inputs, Stage.VALIDATION)
    eager_metrics = collection.summarize(Stage.VALIDATION, reset=True)
    compiled = compile_stage(collection, Stage.VALIDATION)(named_inputs)
    for name, value in compiled.items():
        torch.testing.assert_close(value, eager[name])
    torch.testing.assert_close(collection.summarize(Stage.VALIDATION, reset=True), eager_metrics)
    inference = compile_stage(collection, Stage.INFERENCE, outputs=["class_prediction"])
    assert set(inference.pruned) == {"loss", "metrics"}
    assert inference({"raw": images(4)})["class_prediction"].shape == (4,)


def test_image_classification_bricks_uint8_input() -> None:
    collection = image_classification_bricks(num_classes=2, uint8_input=True)
    pixels = (images() * 255).to(torch.uint8)
    assert collection({"raw": pixels}, Stage.INFERENCE)["logits"].shape == (2, 2)


def test_segmentation_bricks() -> None:
    collection = segmentation_bricks(num_classes=3, backbone="resnet18", target_name="masks")
    collection.check()
    masks = torch.randint(0, 3, (2, SIZE, SIZE), generator=torch.Generator().manual_seed(0))
    outputs = compile_stage(collection, Stage.TRAIN)({"raw": images(), "masks": masks})
    assert outputs["logits"].shape == (2, 3, SIZE, SIZE)
    assert outputs["class_prediction"].shape == (2, SIZE, SIZE)
    outputs["loss_segmentation"].backward()
    metrics = collection.summarize(Stage.TRAIN)
    assert set(metrics) == {"jaccard", "pixel_accuracy"}
    assert 0 <= float(metrics["jaccard"]) <= 1


def test_segmentation_ignore_index() -> None:
    collection = segmentation_bricks(num_classes=3, ignore_index=255)
    masks = torch.full((2, SIZE, SIZE), 255)
    masks[:, :4] = 1
    outputs = collection({"raw": images(), "masks": masks}, Stage.VALIDATION)
    assert torch.isfinite(outputs["loss_segmentation"])
    assert 0 <= float(collection.summarize(Stage.VALIDATION, reset=True)["pixel_accuracy"]) <= 1


def test_segmentation_metrics_skip_ignored_pixels_with_the_default_ignore_index() -> None:
    """Masks with -100 (the loss's default ignore value) must not break the metrics, and ignored pixels must
    not count: a prediction right on every labelled pixel has pixel accuracy 1."""
    group = segmentation_head_bricks(num_classes=3, n_features=8)
    masks = torch.randint(0, 3, (2, 8, 8), generator=torch.Generator().manual_seed(0))
    predictions = masks.clone()
    masks[:, :3] = -100
    predictions[:, :3] = 0
    group["metrics"].metrics["VALIDATION"].update(predictions, masks)
    metrics = group["metrics"].summarize(Stage.VALIDATION, reset=True)
    assert float(metrics["pixel_accuracy"]) == pytest.approx(1.0)
    assert float(metrics["jaccard"]) == pytest.approx(1.0)


def test_head_groups_nest_under_different_keys() -> None:
    """A multi-task model: one backbone, two classification heads and a segmentation head, each group nested
    under its own key and reading the shared features with "../features"."""
    base = image_classification_bricks(num_classes=4, backbone="resnet18")
    n_features = base["backbone"].model.n_backbone_features
    collection = BrickCollection({
        "preprocessor": base["preprocessor"],
        "backbone": base["backbone"],
        "coarse": classification_head_bricks(2, n_features, features_name="../features", target_name="coarse_targets"),
        "fine": classification_head_bricks(4, n_features, features_name="../features", target_name="targets"),
        "segment": segmentation_head_bricks(3, n_features, features_name="../features", image_name="../normalized"),
    })
    collection.check()
    plan = collection.plan(Stage.TRAIN)
    assert set(plan.required_inputs) == {"raw", "coarse_targets", "targets", "masks"}
    named_inputs = {"raw": images(), "coarse_targets": torch.tensor([0, 1]), "targets": torch.tensor([3, 2]),
                    "masks": torch.zeros(2, SIZE, SIZE, dtype=torch.int64)}
    outputs = compile_stage(collection, Stage.TRAIN)(named_inputs)
    assert outputs["coarse/logits"].shape == (2, 2)
    assert outputs["fine/logits"].shape == (2, 4)
    assert outputs["segment/logits"].shape == (2, 3, SIZE, SIZE)
    total = outputs["coarse/loss_ce"] + outputs["fine/loss_ce"] + outputs["segment/loss_segmentation"]
    total.backward()
    inference = collection.plan(Stage.INFERENCE)
    assert inference.required_inputs == ("raw",)


def test_importing_the_package_does_not_import_torchvision() -> None:
    code = ("import sys, torchbricks_fx, torchbricks_fx.bag_of_bricks; "
            "print('torchvision' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert result.stdout.strip() == "False"
