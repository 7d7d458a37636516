"""The shared training loop's moving average of the weights (TrainConfig.ema)."""

import math

import torch

from ocula.engine.batches import ArrayBatches
from ocula.engine.callbacks import Callback
from ocula.engine.trainer import TrainConfig, Trainer
from ocula.modelfile import ModelInfo, read_model_file


class Steps(Callback):
    """The weights after every optimizer step."""

    def __init__(self):
        self.weights = []

    def on_batch_end(self, trainer, loss):
        self.weights.append({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})


def run(tmp_path, ema: float, callbacks=None):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 4, generator=g), torch.randint(2, (64,), generator=g)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    config = TrainConfig(epochs=3, batch_size=16, lr=0.1, optimizer="sgd", schedule="constant", ema=ema,
                         monitor="val_epoch", mode="max", threads=1)
    seen = []

    def evaluate(m):
        seen.append(m)
        return {"epoch": len(seen)}  # rises every epoch: the last epoch's model is the best

    trainer = Trainer(model, config, info=ModelInfo("classify", "none", {}), progress=False, run_dir=tmp_path,
                      loss_fn=lambda m, a, b: torch.nn.functional.cross_entropy(m(a), b),
                      train_batches=ArrayBatches(x, y, 16), evaluate_fn=evaluate, callbacks=callbacks)
    trainer.fit()
    return trainer, seen


def test_the_moving_average_is_evaluated_and_kept_without_changing_the_steps(tmp_path):
    steps = Steps()
    plain, _ = run(tmp_path / "plain", ema=0.0, callbacks=[steps])
    averaged, seen = run(tmp_path / "ema", ema=0.9)
    assert plain.ema is None and plain.kept_model is plain.model
    for k, v in plain.model.state_dict().items():  # averaging does not touch the training itself
        assert torch.equal(v, averaged.model.state_dict()[k])
    torch.manual_seed(0)
    expected = torch.nn.Linear(4, 2).state_dict()  # the weights training started from
    for i, w in enumerate(steps.weights, 1):  # the decay ramps up over 1 / (1 - 0.9) = 10 steps
        d = 0.9 * (1 - math.exp(-i / 10))
        expected = {k: d * expected[k] + (1 - d) * w[k] for k in w}
    kept = averaged.kept_model.state_dict()
    for k, v in expected.items():
        assert torch.allclose(kept[k], v, atol=1e-6)
        assert not torch.allclose(kept[k], averaged.model.state_dict()[k], atol=1e-3)
    assert all(m is averaged.ema.module for m in seen)
    custom, _ = run(tmp_path / "custom", ema=0.9, callbacks=[Steps()])  # given callbacks still get the average
    assert all(torch.allclose(custom.kept_model.state_dict()[k], v, atol=1e-6) for k, v in expected.items())
    _, best, _ = read_model_file(tmp_path / "ema" / "best.ocula")
    assert all(torch.equal(best[k], kept[k]) for k in kept)
