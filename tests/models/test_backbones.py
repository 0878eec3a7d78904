"""Transfer-learning backbones: they build for gray and RGB images, take uint8, load a weights file made here (and
refuse a wrong one clearly), and the freeze/unfreeze phases pick the variables the optimizer updates."""
import numpy as np
import pytest
import tf_keras as keras

from pipelines.errors import PipelineError
from pipelines.models import BACKBONES, BackbonePhases, ModelOptions, build_model
from pipelines.models.backbones import BACKBONE_NAME, new_backbone


@pytest.mark.parametrize("name", BACKBONES)
def test_backbones_take_uint8_gray_or_rgb_and_output_probabilities(name):
    for channels in (1, 3):
        model = build_model(name, (32, 32, channels), 4, [0.5] * channels, [0.2] * channels)
        out = model(np.full((2, 32, 32, channels), 120, np.uint8)).numpy()
        assert out.shape == (2, 4) and np.allclose(out.sum(1), 1, atol=1e-5)


def test_resnet50_preprocessing_is_caffe_style_inside_the_model():
    model = build_model("resnet50", (32, 32, 3), 2, [0.5] * 3, [0.2] * 3)
    pre = keras.Model(model.input, model.get_layer("preprocess").output)
    pixel = np.array([[[[10, 20, 30]]]], np.uint8).repeat(32, 1).repeat(32, 2)
    assert np.allclose(pre(pixel).numpy()[0, 0, 0], [30 - 103.939, 20 - 116.779, 10 - 123.68], atol=1e-3)  # BGR


def test_a_weights_file_made_here_is_what_a_new_model_starts_from(tmp_path):
    trained = new_backbone("mobilenet_v2", 32, 32)
    rng = np.random.default_rng(0)  # as if trained: weights no initializer gives (the training test trains one)
    trained.set_weights([w + rng.normal(0, 0.01, w.shape).astype(w.dtype) for w in trained.get_weights()])
    path = tmp_path / "mobilenet_v2_notop.h5"
    trained.save_weights(str(path))

    model = build_model("mobilenet_v2", (32, 32, 3), 5, [0.5] * 3, [0.2] * 3,
                        ModelOptions(pretrained_weights=str(path)))
    loaded = model.get_layer(BACKBONE_NAME).get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(loaded, trained.get_weights()))
    assert len(loaded) == len(trained.get_weights())
    fresh = build_model("mobilenet_v2", (32, 32, 3), 5, [0.5] * 3, [0.2] * 3)
    assert not np.array_equal(fresh.get_layer(BACKBONE_NAME).get_weights()[0], loaded[0])


def test_a_missing_or_mismatched_weights_file_is_one_clear_error(tmp_path):
    with pytest.raises(PipelineError, match="no such file"):
        build_model("resnet50", (32, 32, 3), 2, [0.5] * 3, [0.2] * 3,
                    ModelOptions(pretrained_weights=str(tmp_path / "missing.h5")))
    other = tmp_path / "mobilenet.h5"
    new_backbone("mobilenet_v2", 32, 32).save_weights(str(other))
    with pytest.raises(PipelineError, match="does not fit train.model=efficientnet_b0"):
        build_model("efficientnet_b0", (32, 32, 3), 2, [0.5] * 3, [0.2] * 3,
                    ModelOptions(pretrained_weights=str(other)))
    with pytest.raises(PipelineError, match="at least 32x32"):
        build_model("mobilenet_v2", (28, 28, 1), 2, [0.5], [0.2])


def test_phases_train_the_head_then_the_top_layers_then_everything():
    model = build_model("mobilenet_v2", (32, 32, 3), 3, [0.5] * 3, [0.2] * 3)
    backbone = model.get_layer(BACKBONE_NAME)
    every = {v.ref() for v in model.trainable_variables}
    head = every - {v.ref() for v in backbone.trainable_variables}
    assert {v.name.split("/")[0] for v in model.trainable_variables if v.ref() in head} == {"logits"}

    top = BackbonePhases(freeze_epochs=2, unfreeze_layers=10)
    assert top.enter(0) and {v.ref() for v in top.variables(model)} == head
    assert not top.enter(1)  # same phase: the traced step stays
    assert top.enter(2)
    top_vars = {v.ref() for v in top.variables(model)}
    assert head < top_vars < every
    assert top_vars - head == {v.ref() for layer in backbone.layers[-10:] for v in layer.trainable_variables}

    whole = BackbonePhases(freeze_epochs=1, unfreeze_layers=0)
    whole.enter(1)
    assert {v.ref() for v in whole.variables(model)} == every
    assert all(layer.trainable for layer in backbone.layers)  # no flag changes: weights keep their order
