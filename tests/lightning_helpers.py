"""A tiny LightningModule and data for the Lightning callback's tests (also run by the DDP script).

The module records what its steps see: each training batch with the callback's λ and partners of that
batch, and each validation batch, so the tests can check the mixing against the float64 reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

NUM_CLASSES = 3


class DictData(Dataset):
    """``{"image": (1, 8, 8), "label": int, "index": i}`` samples, the same for a given seed."""

    def __init__(self, n: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.rand(n, 1, 8, 8, generator=g)
        self.y = torch.randint(0, NUM_CLASSES, (n,), generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"image": self.x[i], "label": self.y[i], "index": i}


def module_class(pl):
    """A LightningModule class for the Lightning package ``pl`` (lightning.pytorch or pytorch_lightning)."""

    class Tiny(pl.LightningModule):
        """Linear classifier; ``training_step`` is the plain ``F.cross_entropy(logits, y)``."""

        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, NUM_CLASSES))
            self.train_seen, self.val_seen = [], []

        def forward(self, x):
            return self.net(x)

        def _cb(self):
            return next(cb for cb in self.trainer.callbacks if type(cb).__name__ == "MixupCallback")

        def training_step(self, batch, batch_idx):
            x, y = (batch["image"], batch["label"]) if isinstance(batch, dict) else batch[:2]
            cb = self._cb()
            self.train_seen.append({
                "x": x.detach().clone(), "y": y.detach().clone(),
                "index": batch["index"].clone() if isinstance(batch, dict) else batch[2].clone(),
                "lam": cb.lam.clone(), "perm": None if cb.perm is None else cb.perm.clone(),
                "dtype": x.dtype,
            })
            return F.cross_entropy(self(x), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch["image"], batch["label"]
            self.val_seen.append({"x": x.clone(), "y": y.clone(), "index": batch["index"].clone()})
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return Tiny


def trainer_kwargs(tmp_dir, **extra):
    """A quiet CPU trainer: no progress bar, no model summary, logs and checkpoints in ``tmp_dir``."""
    kw = dict(accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
              enable_checkpointing=False, logger=False, default_root_dir=str(tmp_dir), log_every_n_steps=1)
    kw.update(extra)
    return kw
