"""The numpy forward pass is the torch model's: logits to float rounding, the same predictions and
losses, for every norm, activation and replica count; the weights file reads back exactly."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.errors import PipelineError
from pipeline.nn import inference
from pipeline.data import Split, as_images
from pipeline.nn.model import StackedBatchNorm, StackedMlp
from pipeline.nn.training import score
from tests.conftest import tiny_mnist_arrays, tiny_params

NORMS, ACTIVATIONS = ("batch", "layer", "none"), ("relu", "tanh", "sigmoid", "gelu")
CASES = [(norm, activation) for norm in NORMS for activation in ACTIVATIONS]


def trained_like(norm: str, activation: str, seeds: list[int], **choices) -> tuple[StackedMlp, object]:
    """A stack whose every parameter and running statistic is drawn away from its initial value
    (a freshly initialised net has zero biases and unit norms, which would hide a mistake)."""
    train = {"norm": norm, "activation": activation, "hidden_sizes": [24, 16], **choices}
    config = tiny_params(seeds=seeds, train=train).variant("batchnorm").model_copy(update={"norm": norm})
    model = StackedMlp(config)
    generator = torch.Generator().manual_seed(len(seeds))
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            noise = 0.2 * torch.randn(tensor.shape, generator=generator) * (float(tensor.std()) or 1.0)
            tensor.copy_(5 * noise.abs() + 0.5 if name.endswith("running_var") else tensor + noise)
    return model.eval(), config


def arrays_of(model: StackedMlp) -> dict[str, np.ndarray]:
    return {name: tensor.numpy() for name, tensor in model.state_dict().items()}


@pytest.fixture(scope="module")
def test_split() -> Split:
    arrays = tiny_mnist_arrays(train=10, test=300)
    return Split(torch.from_numpy(arrays["t10k-images-idx3-ubyte"]).flatten(1),
                 torch.from_numpy(arrays["t10k-labels-idx1-ubyte"]).long())


@pytest.mark.parametrize("seeds", [[0], [3, 1, 4]], ids=["K=1", "K=3"])
@pytest.mark.parametrize(("norm", "activation"), CASES)
def test_numpy_logits_and_losses_are_the_torch_models(test_split, norm, activation, seeds):
    model, config = trained_like(norm, activation, seeds)
    images = as_images(test_split.pixels)
    with torch.inference_mode():
        expected = model(images)  # [K, n, 10]
    got = inference.logits(config, arrays_of(model), images.numpy())
    assert got.dtype == np.float32 and got.shape == tuple(expected.shape)
    # Equal to float32 rounding (numpy's BLAS sums in another order than torch's)
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-5)
    assert np.array_equal(got.argmax(-1), expected.argmax(-1).numpy())
    torch_loss = F.cross_entropy(expected.transpose(1, 2), test_split.labels.expand(len(seeds), -1), reduction="none")
    np.testing.assert_allclose(inference.cross_entropy(got, test_split.labels.numpy()), torch_loss.numpy(),
                               rtol=1e-5, atol=1e-5)


def test_batch_norm_uses_its_running_statistics_and_a_bias_before_it(test_split):
    model, config = trained_like("batch", "relu", [0, 1], bias_before_bn=True)
    assert "layers.0.bias" in model.state_dict() and isinstance(model.layers[1], StackedBatchNorm)
    images = as_images(test_split.pixels[:7])  # a batch's own statistics would differ from the running ones
    with torch.inference_mode():
        expected = model(images).numpy()
    np.testing.assert_allclose(inference.logits(config, arrays_of(model), images.numpy()), expected,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("norm", "activation"), [("batch", "relu"), ("layer", "gelu"), ("none", "sigmoid")])
def test_evaluate_scores_as_the_training_loop_does(test_split, norm, activation):
    model, config = trained_like(norm, activation, [5, 6, 7])
    result = inference.evaluate(config, arrays_of(model), test_split.pixels.numpy(), test_split.labels.numpy(),
                                batch_size=128)  # 300 images: three batches, the last partial
    expected = score(model, test_split, batch_size=300)
    assert result.acc.tolist() == expected.acc.tolist()
    np.testing.assert_allclose(result.loss, expected.loss.numpy(), rtol=1e-6)
    with torch.inference_mode():
        predicted = model(as_images(test_split.pixels)).argmax(-1).numpy()
    for replica in range(3):
        counts = np.zeros((10, 10), dtype=np.int64)
        np.add.at(counts, (test_split.labels.numpy(), predicted[replica]), 1)
        assert np.array_equal(result.confusion[replica], counts)
    assert result.confusion.sum() == 3 * len(test_split)


def test_a_diverged_replica_has_a_nan_loss_and_the_others_are_untouched(test_split):
    model, config = trained_like("none", "relu", [0, 1])
    arrays = arrays_of(model)
    arrays["layers.0.weight"] = arrays["layers.0.weight"].copy()
    arrays["layers.0.weight"][1] = np.nan
    result = inference.evaluate(config, arrays, test_split.pixels.numpy(), test_split.labels.numpy(), 100)
    assert np.isnan(result.loss[1]) and np.isfinite(result.loss[0])
    assert result.acc[0] == score(model, test_split, 300).acc[0].item()


def test_weights_file_reads_back_exactly_with_the_same_bytes_every_time(tmp_path):
    model, config = trained_like("batch", "tanh", [2, 9])
    first, second = tmp_path / "first.npz", tmp_path / "second.npz"
    for path in (first, second):
        inference.save_weights(path, config.model_dump(), arrays_of(model))
    assert first.read_bytes() == second.read_bytes()
    loaded_config, arrays = inference.load_weights(first)
    assert loaded_config == config
    assert sorted(arrays) == sorted(model.state_dict())
    assert all(np.array_equal(arrays[name], tensor.numpy()) for name, tensor in model.state_dict().items())


def test_a_missing_or_damaged_weights_file_is_one_clear_error(tmp_path):
    path = tmp_path / "weights.npz"
    with pytest.raises(PipelineError, match=rf"^{path}: not found; run the train stage$"):
        inference.load_weights(path)
    model, config = trained_like("none", "relu", [0])
    inference.save_weights(path, config.model_dump(), arrays_of(model))
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(PipelineError, match=rf"^{path}: corrupt or truncated weights \(\w+\); rerun"):
        inference.load_weights(path)
