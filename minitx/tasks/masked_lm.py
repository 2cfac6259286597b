"""BERT-style masked-LM pretraining of a bidirectional encoder on packed windows of the corpus."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from minitx.config import ConfigError, GuardConfig, ModelConfig, OptimConfig, TrainConfig, TrainerConfig
from minitx.datamodules import TokenDataModule, token_data_module
from minitx.model import Encoder
from minitx.tasks.base import Prepared, Task, document_eot, register_task, token_stream

if TYPE_CHECKING:
    from tokenizers import Tokenizer


def mask_tokens(x: torch.Tensor, generator: torch.Generator, mask_id: int, special_ids: torch.Tensor, vocab_size: int,
                p: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: choose a fraction p of the non-special positions; 80% of them become [MASK], 10% a random
    non-special token, 10% stay as they are. Labels are the original tokens there and -100 (ignored) everywhere else.
    `special_ids` (distinct) are the special tokens' ids: a loaded tokenizer.json has them at its end, not at 0..5."""
    shape, device = x.shape, x.device
    ordinary = torch.ones(vocab_size, dtype=torch.bool, device=device)
    ordinary[special_ids] = False
    eligible = ordinary[x]
    chosen = (torch.rand(shape, generator=generator, device=device) < p) & eligible
    action = torch.rand(shape, generator=generator, device=device)
    nth = torch.randint(vocab_size - len(special_ids), shape, generator=generator, device=device)
    random_tokens = torch.searchsorted(ordinary.cumsum(0), nth + 1)  # the nth non-special id (no host sync)
    # a batch with no chosen position has no loss (0/0): choose one eligible position then (drawn last, so the
    # masks of every other batch stay as they were; no host sync)
    pick = (torch.rand(shape, generator=generator, device=device) * eligible).flatten().argmax()
    fallback = torch.zeros(shape.numel(), dtype=torch.bool, device=device)
    fallback[pick] = eligible.flatten()[pick] & ~chosen.any()
    chosen = chosen | fallback.view(shape)
    inputs = torch.where(chosen & (action < 0.8), mask_id, x)
    inputs = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_tokens, inputs)
    return inputs, torch.where(chosen, x, -100)


@register_task
class MaskedLM(Task):
    """BERT-style masked-LM pretraining of an Encoder on packed windows of the token stream. Masks are drawn on
    the fly from (seed, batch number), and for validation from the batch index alone, so every run and every
    resume sees the same masks. Logs val/loss, val/mlm_acc and val/majority_acc (always guessing the most common
    token: the baseline mlm_acc has to beat); ends with the top fills for each [MASK] in sample.prompt."""

    task = "masked_lm"
    VAL_SEED = 20260101

    @classmethod
    def logit_share(cls, config: TrainConfig) -> float:
        return config.data.mlm_probability  # only masked positions go through the head

    @classmethod
    def prepare(cls, config: TrainConfig) -> Prepared:
        return token_stream(config, encoder=True)

    @classmethod
    def build(cls, config: TrainConfig, model_cfg: ModelConfig, prepared: Prepared,
              run_config: dict[str, Any]) -> tuple[Task, TokenDataModule]:
        from minitx.tokenizer import MASK, special_ids

        tokenizer, data = prepared.tokenizer, prepared.data
        majority = int(np.bincount(np.asarray(data.val.tokens)).argmax())
        module = cls(model_cfg, config.optim, config.trainer, tokenizer.to_str(), tokenizer.token_to_id(MASK),
                     special_ids(tokenizer), config.seed, majority, config.guard, run_config,
                     document_eot=document_eot(config, tokenizer), mlm_probability=config.data.mlm_probability)
        return module, token_data_module(data, config.data, model_cfg.block_size, config.seed)

    def __init__(self, model_cfg: ModelConfig, optim_cfg: OptimConfig, trainer_cfg: TrainerConfig, tokenizer_json: str,
                 mask_id: int, special_ids: list[int], seed: int, majority_token: int, guard: GuardConfig | None = None,
                 run_config: dict[str, Any] | None = None, document_eot: int | None = None,
                 mlm_probability: float = 0.15):
        super().__init__(model_cfg, optim_cfg, trainer_cfg, tokenizer_json, guard, run_config)
        self.mask_id, self.seed, self.majority_token = mask_id, seed, majority_token
        # never masked, never drawn as replacements; a buffer to follow the model's device, not saved in checkpoints
        self.register_buffer("special_ids", torch.tensor(sorted(set(special_ids)), dtype=torch.long), persistent=False)
        self.document_eot = document_eot
        self.mlm_probability = mlm_probability
        self.model = Encoder(model_cfg)

    def masked_loss(self, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        inputs, labels = mask_tokens(x, generator, self.mask_id, self.special_ids, self.model_cfg.vocab_size,
                                     self.mlm_probability)
        hidden = self.model(inputs, doc_ids=self.doc_ids(x))  # (through forward: FSDP gathers the root's weights)
        chosen = labels != -100
        logits = self.model.mlm_logits(hidden[chosen])  # only masked positions go through the head and the loss
        targets = labels[chosen]  # (no position chosen only when none can be: then 0, not NaN)
        return F.cross_entropy(logits, targets, reduction="sum") / max(targets.numel(), 1), logits, targets

    def train_loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        generator = torch.Generator(device=batch[0].device).manual_seed(self.seed * 1_000_003 + self.batches_seen)
        return self.masked_loss(batch[0], generator)[0]

    def val_metrics(self, batch: tuple[torch.Tensor, torch.Tensor],
                    batch_idx: int) -> dict[str, tuple[torch.Tensor, int]]:
        generator = torch.Generator(device=batch[0].device).manual_seed(self.VAL_SEED + batch_idx)
        loss, logits, labels = self.masked_loss(batch[0], generator)
        n = labels.numel()  # masked positions
        return {"loss": (loss * n, n), "mlm_acc": ((logits.argmax(-1) == labels).sum(), n),
                "majority_acc": ((labels == self.majority_token).sum(), n)}

    def show(self, config: TrainConfig, tokenizer: Tokenizer) -> None:
        """The most likely fills for each [MASK] in sample.prompt (nothing without one)."""
        from minitx.generation import show_fills
        from minitx.tokenizer import MASK

        prompt = config.sample.prompt
        if MASK not in prompt:
            return
        length = len(tokenizer.encode(prompt, add_special_tokens=False).ids)
        if length > self.model_cfg.block_size:
            raise ConfigError(f"sample.prompt={prompt!r} is {length} tokens, more than model.block_size="
                              f"{self.model_cfg.block_size}")
        self.model.eval()
        self.check_kernel_for(length, 0)
        print(f"fill-mask: {prompt}", flush=True)
        show_fills(self.model, tokenizer, prompt)

    def samples(self, config: TrainConfig, tokenizer: Tokenizer) -> list[dict[str, str]]:
        """The five most likely fills of each [MASK] in each prompt that has one and fits model.block_size."""
        from minitx.config import MinitxError
        from minitx.generation import fill_mask

        rows = []
        for prompt in config.sample.table_prompts:
            try:
                fills = fill_mask(self.model, tokenizer, prompt)
            except MinitxError:  # no [MASK], or too long: nothing to fill
                continue
            rows.append({"prompt": prompt, "fills": " | ".join(
                "  ".join(f"{token!r} {p:.3f}" for token, p in candidates) for candidates in fills)})
        return rows
