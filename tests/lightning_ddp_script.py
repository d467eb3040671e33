"""A 2-process DDP fit on CPU (gloo) with MixupCallback; run by tests/test_lightning.py.

    python tests/lightning_ddp_script.py OUT_DIR

Lightning's DDP launcher starts rank 1 by running this script again. Each rank writes
``OUT_DIR/rank<r>.pt``: what its training and validation steps saw.
"""

import gc
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lightning.pytorch as pl  # noqa: E402
from lightning_helpers import NUM_CLASSES, DictData, module_class, trainer_kwargs  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from mixrecipe.lightning import MixupCallback  # noqa: E402


def main(out: str) -> None:
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    model = module_class(pl)()
    cb = MixupCallback(num_classes=NUM_CLASSES)
    trainer = pl.Trainer(**trainer_kwargs(out, devices=2, strategy="ddp", max_epochs=1, callbacks=[cb],
                                          num_sanity_val_steps=0))
    # 14 samples on 2 ranks, batch 3: 3 batches per rank, the last of size 1.
    trainer.fit(model, DataLoader(DictData(14), batch_size=3), DataLoader(DictData(4, seed=1), batch_size=2))
    rank = trainer.global_rank
    torch.save({"train": model.train_seen, "val": model.val_seen, "state": cb.state_dict(),
                "world_size": trainer.world_size}, os.path.join(out, f"rank{rank}.pt"))
    # Clean shutdown: drop the DDP-wrapped module before destroying the process group.
    del trainer, model
    gc.collect()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
