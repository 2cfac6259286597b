"""Next-token prediction with a GPT: the decoder-only language model."""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import TYPE_CHECKING, Any

import torch
from tokenizers import Tokenizer

from minitx.config import (
    ARCHITECTURE_KEYS,
    ConfigError,
    GuardConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    TrainerConfig,
    fail,
)
from minitx.datamodules import TokenDataModule, token_data_module
from minitx.hf import crop_positions
from minitx.model import GPT
from minitx.tasks.base import Prepared, Task, document_eot, register_task, token_stream
from minitx.tokenizer import EOT, is_char_level, token_bytes

if TYPE_CHECKING:
    from minitx.checkpoint import Loaded

log = logging.getLogger("minitx")
# what a model started from model.init_from takes from it (block_size may be smaller: the position table is cropped)
INHERITED_KEYS = tuple(key for key in ARCHITECTURE_KEYS if key != "block_size")


@register_task
class CausalLM(Task):
    """Next-token prediction with a GPT. Logs train/loss, val/loss, val/ppl, val/bpb (bits per UTF-8 byte of the
    targets; byte-level BPE and char tokenizers), val/bpc (char tokenizers), lr; ends with a sample continuing
    sample.prompt."""

    task = "causal_lm"
    causal = True

    @classmethod
    def logit_share(cls, config: TrainConfig) -> float:
        return 1.0

    @classmethod
    def check_config(cls, config: TrainConfig) -> None:
        """With model.init_from, the architecture is the source's (logged); model.block_size may only shrink."""
        from minitx.checkpoint import read_model_config

        source = config.model.init_from
        if not source:
            return
        saved, task = read_model_config(source, "model.init_from")
        if task != "causal_lm":
            fail("model.init_from", source, f"a {task} model; task=causal_lm continues a causal_lm model")
        if config.model.block_size > saved.block_size:
            raise ConfigError(f"model.block_size={config.model.block_size} exceeds the {saved.block_size} positions "
                              f"of model.init_from={source!r}; set model.block_size<={saved.block_size}")
        config.model = dataclasses.replace(config.model, **{k: getattr(saved, k) for k in INHERITED_KEYS})
        log.info("model.init_from=%s: %s, block_size=%d (of %d positions)", source,
                 ", ".join(f"{k}={getattr(saved, k)}" for k in INHERITED_KEYS), config.model.block_size,
                 saved.block_size)

    @classmethod
    def prepare(cls, config: TrainConfig) -> Prepared:
        """The token streams; with model.init_from, tokenized by the source's tokenizer (tokenizer.* is unused)."""
        from minitx.checkpoint import load

        if not config.model.init_from:
            return token_stream(config, encoder=False)
        init = load(config.model.init_from, key="model.init_from")
        if init.tokenizer.token_to_id(EOT) is None:
            fail("model.init_from", config.model.init_from, f"its tokenizer has no {EOT}, which separates documents")
        return dataclasses.replace(token_stream(config, encoder=False, tokenizer=init.tokenizer), pretrained=init)

    @classmethod
    def build(cls, config: TrainConfig, model_cfg: ModelConfig, prepared: Prepared,
              run_config: dict[str, Any]) -> tuple[Task, TokenDataModule]:
        tokenizer = prepared.tokenizer
        module = cls(model_cfg, config.optim, config.trainer, tokenizer.to_str(), is_char_level(tokenizer),
                     config.guard, run_config, document_eot(config, tokenizer))
        init: Loaded | None = prepared.pretrained
        if init is not None:  # its weights, the position table cropped to model.block_size
            module.model.load_state_dict(crop_positions(init.model.state_dict(), model_cfg.block_size))
            prepared.pretrained = None  # copied: let the source model's memory go for the rest of the run
        return module, token_data_module(prepared.data, config.data, model_cfg.block_size, config.seed)

    def __init__(self, model_cfg: ModelConfig, optim_cfg: OptimConfig, trainer_cfg: TrainerConfig, tokenizer_json: str,
                 char_level: bool, guard: GuardConfig | None = None, run_config: dict[str, Any] | None = None,
                 document_eot: int | None = None):
        super().__init__(model_cfg, optim_cfg, trainer_cfg, tokenizer_json, guard, run_config)
        self.char_level = char_level
        self.document_eot = document_eot
        self.model = GPT(model_cfg)
        # UTF-8 bytes per token id, for val/bpb; derived from the tokenizer, so not saved in checkpoints
        table = token_bytes(Tokenizer.from_str(tokenizer_json))
        if table is None:
            log.info("val/bpb is not logged: this tokenizer's tokens do not count the text's bytes one by one "
                     "(minitx-eval counts them from the text)")
        self.register_buffer("token_bytes", None if table is None else torch.from_numpy(table), persistent=False)

    def train_loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return self.model(x, y, self.doc_ids(x))[1]

    def val_metrics(self, batch: tuple[torch.Tensor, torch.Tensor],
                    batch_idx: int) -> dict[str, tuple[torch.Tensor, int]]:
        n = batch[1].numel()
        # <|endoftext|> targets are scored and stand for 0 bytes, as minitx-eval counts them
        metrics = {"loss": (self.train_loss(batch) * n, n)}
        if self.token_bytes is not None:
            metrics["bytes_per_token"] = (self.token_bytes[batch[1]].sum(), n)
        return metrics

    def derived_metrics(self, means: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """ppl = e^loss; bpb = loss_sum / (ln 2 × bytes_sum), both sums over the same targets; bpc = loss / ln 2."""
        derived = {"ppl": means["loss"].exp()}
        if "bytes_per_token" in means:
            derived["bpb"] = means["loss"] / (math.log(2) * means["bytes_per_token"])
        if self.char_level:
            derived["bpc"] = means["loss"] / math.log(2)
        return derived

    def show(self, config: TrainConfig, tokenizer: Tokenizer) -> None:
        """A sample of sample.max_new_tokens tokens continuing sample.prompt (from <|endoftext|> when empty)."""
        from minitx.generation import generate
        from minitx.tokenizer import EOT, stream_decode

        if config.sample.max_new_tokens <= 0:
            return
        self.model.eval()
        prompt = tokenizer.encode(config.sample.prompt).ids or [tokenizer.token_to_id(EOT)]
        self.check_kernel_for(len(prompt), config.sample.max_new_tokens)
        generator = torch.Generator(device=next(self.model.parameters()).device).manual_seed(config.seed)
        print(f"sample:\n{config.sample.prompt}", end="", flush=True)
        for piece in stream_decode(tokenizer, generate(self.model, prompt, config.sample.max_new_tokens,
                                                       temperature=0.8, top_k=200, generator=generator)):
            print(piece, end="", flush=True)
        print(flush=True)

    def samples(self, config: TrainConfig, tokenizer: Tokenizer) -> list[dict[str, str]]:
        """Each prompt continued by sample.table_tokens tokens, drawn as the end-of-training sample is (seeded)."""
        from minitx.generation import generate

        rows = []
        generator = torch.Generator(device=next(self.model.parameters()).device).manual_seed(config.seed)
        for prompt in config.sample.table_prompts:
            ids = (tokenizer.encode(prompt).ids or [tokenizer.token_to_id(EOT)])[-self.model_cfg.block_size:]
            new = list(generate(self.model, ids, config.sample.table_tokens, temperature=0.8, top_k=200,
                                generator=generator))
            rows.append({"prompt": prompt, "continuation": tokenizer.decode(new)})
        return rows
