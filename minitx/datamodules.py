"""The Lightning side of the data: data modules that serve minitx.data's prepared token streams and labelled rows
to a Trainer. Kept apart so that inference code (minitx-sample, minitx-eval) can read data without Lightning."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Subset

from minitx.config import DataConfig
from minitx.data import (
    FixedWindows,
    LabelledData,
    PreparedData,
    RandomRows,
    RandomWindows,
    pad_batch,
    stream_position,
    val_share,
    world_size,
)


class TokenDataModule(L.LightningDataModule):
    """Serves prepared token streams to Lightning; batches are built whole, so loaders use batch_size=None."""

    def __init__(self, data: PreparedData, cfg: DataConfig, block_size: int, seed: int):
        super().__init__()
        self.data, self.cfg, self.block_size, self.seed = data, cfg, block_size, seed

    def train_dataloader(self) -> RandomWindows:
        windows = RandomWindows(self.data.train, self.block_size, self.cfg.batch_size, self.seed,
                                *stream_position(self.trainer), pin_memory=torch.cuda.is_available(),
                                world_size=world_size(self.trainer))
        return windows  # an endless iterable of whole batches: a DataLoader around it would only add per-step cost

    def val_dataloader(self) -> DataLoader:
        windows = FixedWindows(self.data.val, self.block_size, self.cfg.batch_size, self.cfg.val_batches)
        share = val_share(len(windows), self.trainer, f"data.val_batches={self.cfg.val_batches}",
                          "set it to at least the number of processes")
        return DataLoader(Subset(windows, share), batch_size=None, pin_memory=torch.cuda.is_available())


def token_data_module(data: PreparedData, cfg: DataConfig, block_size: int, seed: int) -> TokenDataModule:
    """The data module of a token-stream task: a streamed corpus's (data.streaming) or a cached stream's."""
    if cfg.streaming:
        from minitx.streaming import StreamDataModule

        return StreamDataModule(data, cfg, block_size, seed)  # type: ignore[arg-type]
    return TokenDataModule(data, cfg, block_size, seed)


class LabelledDataModule(L.LightningDataModule):
    def __init__(self, data: LabelledData, cfg: DataConfig, pad_id: int, seed: int):
        super().__init__()
        self.data, self.cfg, self.pad_id, self.seed = data, cfg, pad_id, seed

    def train_dataloader(self) -> DataLoader:
        rows = RandomRows(self.data, self.cfg.batch_size, self.pad_id, self.seed, *stream_position(self.trainer),
                          world_size=world_size(self.trainer))
        return DataLoader(rows, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        """Every validation row, in order, in fixed batches (this process's share of them)."""
        size, data = self.cfg.batch_size, self.data
        starts = range(0, len(data.val), size)
        share = val_share(len(starts), self.trainer, f"data.batch_size={size}",
                          f"lower it so that the {len(data.val)} validation rows make a batch per process")
        batches = [pad_batch(data.val[i : i + size], data.val_labels[i : i + size], self.pad_id)
                   for i in (starts[k] for k in share)]
        return DataLoader(batches, batch_size=None)
