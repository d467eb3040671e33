"""The lifecycle is engine-neutral: any Engine subclass gets preparing, evaluation, records, checkpoints,
resume and the summary from it, by implementing one method."""

import json

import torch

from mixrecipe import lifecycle
from mixrecipe.config import load_config
from mixrecipe.engine import Engine, batch_to_device
from mixrecipe.loss import mixup_cross_entropy

QUICK = ["epochs=2", "data.train_subset=128", "batch_size=32", "preview=false", "progress=false"]


class PlainEngine(Engine):
    """The smallest engine: ERM over the run's loader, with the run's optimizer and schedule."""

    name = "plain"
    epochs_trained: list = []

    def train_epoch(self, epoch):
        s = self.state
        s.model.train()
        total = seen = 0.0
        for i, (x, y) in enumerate(s.train_loader):
            if s.scheduler is not None:
                s.scheduler.step_update(epoch * s.steps_per_epoch + i)
            x, y = batch_to_device(x, y, s)
            x = x.float() / 255.0
            loss = mixup_cross_entropy(s.model(x), y, 1.0)
            s.optimizer.zero_grad()
            loss.backward()
            s.optimizer.step()
            total, seen = total + loss.item() * len(y), seen + len(y)
        self.epochs_trained.append(epoch)
        return {"train_loss": total / seen, "lr": s.optimizer.param_groups[0]["lr"], "images_per_s": 1.0}


def test_a_new_engine_gets_the_whole_run_from_the_lifecycle(tmp_path, monkeypatch):
    monkeypatch.setitem(lifecycle.ENGINES, "torch", f"{__name__}:PlainEngine")
    PlainEngine.epochs_trained.clear()
    summary = lifecycle.run(load_config(None, [f"output={tmp_path}", "mixup.alpha=0", *QUICK]))
    assert PlainEngine.epochs_trained == [0, 1] and summary["engine"] == "plain"
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and 0 <= records[-1]["val_top1"] <= 100
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["engine"] == "plain" and state["epoch"] == 2
    # Resuming a finished run trains nothing and reports the same numbers.
    again = lifecycle.run(load_config(None, [f"output={tmp_path}", "mixup.alpha=0", "resume=true", *QUICK]))
    assert PlainEngine.epochs_trained == [0, 1] and again["test_top1"] == summary["test_top1"]
