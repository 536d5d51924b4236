"""Dynamic sparse training in a LightningModule: the Rewiring callback rewires every 25
optimizer steps with strategic synthesis and shrinks the sparse layers to 5% of their weights.
Needs the [lightning] extra; runs in seconds on scikit-learn's digits:
python examples/lightning_digits.py"""

import lightning as L
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import synthprune
from synthprune.lightning import Rewiring


class Classifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = synthprune.SparseMLP([64, 256, 256, 10], epsilon=5, seed=0)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_accuracy", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


digits = load_digits()
data = torch.utils.data.TensorDataset(torch.tensor(digits.data, dtype=torch.float32) / 16,
                                      torch.tensor(digits.target))
train, val = torch.utils.data.random_split(data, [1500, 297], generator=torch.Generator().manual_seed(0))
L.seed_everything(0, verbose=False)
rewiring = Rewiring(grow="synthesis", every=25, compress_to=0.05, seed=0)
trainer = L.Trainer(max_epochs=8, callbacks=[rewiring], logger=False, enable_progress_bar=False,
                    enable_model_summary=False, enable_checkpointing=False)
module = Classifier()
trainer.fit(module, torch.utils.data.DataLoader(train, batch_size=32, shuffle=True),
            torch.utils.data.DataLoader(val, batch_size=300))
metrics = trainer.callback_metrics
print(f"validation accuracy {metrics['val_accuracy']:.3f}; {rewiring.rewirer.step_count} rewiring steps; "
      f"sparse connections {int(metrics['rewiring/connections'])} "
      f"(of {sum(layer.n_in * layer.n_out for _, layer in synthprune.sparse_layers(module))} dense)")
