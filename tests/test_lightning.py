"""The Lightning callback with a real lightning.Trainer on digits: it rewires on schedule after
the optimizers exist, logs, compresses, and a ckpt_path= resume ends where an uninterrupted
fit does."""

import pytest
import torch
import torch.nn.functional as F

import synthprune

L = pytest.importorskip("lightning", reason="the [lightning] extra (make test installs it)")
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from synthprune.lightning import Rewiring  # noqa: E402

pytestmark = pytest.mark.slow


class DigitsModule(L.LightningModule):
    def __init__(self, kind: str = "mlp"):
        super().__init__()
        if kind == "mlp":
            self.net = synthprune.SparseMLP([64, 64, 64, 10], epsilon=3, seed=0)
        else:
            self.net = synthprune.sparsify(torch.nn.Sequential(
                torch.nn.Unflatten(1, (1, 8, 8)), torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(),
                torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(128, 10)), density=0.3, seed=0)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def _loader():
    digits = load_digits()
    data = torch.utils.data.TensorDataset(torch.tensor(digits.data, dtype=torch.float32) / 16,
                                          torch.tensor(digits.target))
    return torch.utils.data.DataLoader(data, batch_size=64)  # 29 batches, in order: a resume sees the same


def _trainer(tmp_path, epochs: int, callback: Rewiring, **kwargs):
    return L.Trainer(max_epochs=epochs, callbacks=[callback, *kwargs.pop("callbacks", [])], logger=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, **kwargs)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_the_callback_rewires_on_schedule_and_compresses(kind, tmp_path):
    callback = Rewiring(grow="gradient", every=10, compress_to=0.05 if kind == "mlp" else 0.1, seed=0)
    module = DigitsModule(kind)
    before = sum(layer.nnz for _, layer in synthprune.sparse_layers(module))
    trainer = _trainer(tmp_path, 3, callback)
    trainer.fit(module, _loader())
    layers = len(synthprune.sparse_layers(module))
    assert len(callback.reports) == 8 * layers  # optimizer steps 10, 20, ..., 80 of 87
    assert callback.rewirer.optimizer is trainer.optimizers[0]
    after = sum(layer.nnz for _, layer in synthprune.sparse_layers(module))
    assert after < before and trainer.callback_metrics["rewiring/connections"] == after


def test_once_per_epoch_by_default(tmp_path):
    callback = Rewiring(grow="synthesis", seed=0)
    _trainer(tmp_path, 3, callback).fit(DigitsModule(), _loader())
    assert [r.step for r in callback.reports] == [0, 0, 1, 1]  # after epochs 1 and 2, two layers each


def test_a_checkpoint_resume_ends_where_an_uninterrupted_fit_does(tmp_path):
    straight = DigitsModule()
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    _trainer(tmp_path, 4, Rewiring(grow="random", every=7, compress_to=0.05, seed=0), callbacks=[saver]).fit(
        straight, _loader())
    epoch_two = next((tmp_path / "ckpt").glob("epoch=1-*.ckpt"))  # written after the second epoch

    resumed = DigitsModule()
    callback = Rewiring(grow="random", every=7, compress_to=0.05, seed=0)
    _trainer(tmp_path / "again", 4, callback).fit(resumed, _loader(), ckpt_path=epoch_two)
    assert callback.rewirer.step_count == 16  # 8 before the checkpoint, 8 after: 7, 14, ..., 112 of 116
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
