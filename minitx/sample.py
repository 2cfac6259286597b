"""`minitx-sample ckpt=<path> prompt="..." ...`: stream text from a checkpoint (a GPT's continuation, an encoder's
[MASK] fills or a classifier's label probabilities).

Arguments are `key=value` pairs read literally (no YAML parsing), so a prompt keeps its spaces and quotes;
`minitx-sample --help` lists the keys and their defaults (SampleConfig below, their one home).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from minitx.cli import parse_key_values, resolve_device, run_command
from minitx.config import fail

USAGE = """usage: minitx-sample ckpt=<a .ckpt written by minitx-train, an export dir, or hf:<dir>> [key=value ...]
  minitx-sample ckpt=outputs/default/<run>/checkpoints/best.ckpt prompt="def " max_new_tokens=300"""


@dataclass
class SampleConfig:
    ckpt: str | None = None  # a .ckpt written by minitx-train, a minitx-export directory, or hf:<dir> (required)
    prompt: str = ""  # empty: start from <|endoftext|>
    max_new_tokens: int = 500
    num_samples: int = 1  # > 1: decoded together in one batch (with use_cache), printed one after another
    stop: str = ""  # end a sample at the first occurrence of this text (left out), e.g. <|endoftext|>; "": off
    temperature: float = 0.8  # <= 0: greedy
    top_k: int = 200  # 0: off
    top_p: float = 1.0  # nucleus sampling; 1.0: off
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda
    attention: str | None = None  # sample with naive | sdpa | flex | flex_eager | flash (unset: as trained)
    attention_check: bool = True  # check the kernel against naive at the shapes sampling uses first; fall back if wrong
    use_cache: bool = True  # KV cache; false recomputes the whole context each token
    compile: bool = False  # a compiled one-token decoding step (compile_aot says which kind)
    compile_aot: bool = True  # by AOTInductor, kept in <ckpt>.decode/: built once, loads in < 1 s; false: torch.compile
    compile_autotune: bool = True  # with compile_aot: time GEMM kernels for these weights (slower build, faster steps)
    candidates: int = 5  # masked-LM checkpoints: how many fills to show for each [MASK]

    def validate(self) -> SampleConfig:
        if not self.ckpt:
            fail("ckpt", self.ckpt, "required: minitx-sample ckpt=<path to a .ckpt written by minitx-train>")
        if self.max_new_tokens < 0:
            fail("max_new_tokens", self.max_new_tokens, "must be >= 0")
        if self.num_samples <= 0:
            fail("num_samples", self.num_samples, "must be > 0")
        if self.top_k < 0:
            fail("top_k", self.top_k, "must be >= 0 (0 turns it off)")
        if not 0.0 < self.top_p <= 1.0:
            fail("top_p", self.top_p, "must be in (0, 1]")
        from minitx.attention import KERNELS

        if self.attention is not None and self.attention not in KERNELS:
            fail("attention", self.attention, f"unknown kernel; choose one of {sorted(KERNELS)}")
        if self.device not in ("auto", "cpu", "cuda"):
            fail("device", self.device, "choose auto, cpu or cuda")
        if self.compile and not self.use_cache:
            fail("compile", self.compile, "compiles the cached decoding step: needs use_cache=true")
        return self


def parse_args(argv: list[str]) -> SampleConfig:
    return parse_key_values(SampleConfig, argv).validate()


def sample(cfg: SampleConfig, out: TextIO = sys.stdout) -> None:
    """Stream a sample to `out`, each piece as it is decoded: memory stays bounded; or decode `num_samples` in one
    batch and print them one after another."""
    import torch
    from tokenizers.decoders import DecodeStream

    from minitx.attention import kernel_unavailable
    from minitx.checkpoint import load
    from minitx.generation import STATIC_KERNELS, CompiledDecoding, generate, generate_batch, show_fills, show_labels
    from minitx.kernel_check import checked_kernel, sampling_cases
    from minitx.tokenizer import EOT, stream_decode, unknown_chars

    device = resolve_device(cfg.device)
    loaded = load(cfg.ckpt, device)
    if cfg.attention is not None:
        if reason := kernel_unavailable(cfg.attention, device, training=False):
            fail("attention", cfg.attention, reason)
        loaded.model.transformer.set_attention(cfg.attention, loaded.config.sdpa_backend)
    tokenizer = loaded.tokenizer
    unknown = unknown_chars(tokenizer, cfg.prompt)
    if unknown:
        fail("prompt", cfg.prompt, f"characters the tokenizer has never seen: {unknown}")
    prompt = tokenizer.encode(cfg.prompt, add_special_tokens=False).ids or [tokenizer.token_to_id(EOT)]
    kernel = loaded.model.transformer.blocks[0].attn.attention
    if cfg.attention_check and kernel != "naive":
        length = len(prompt) + (loaded.task == "classify")  # a classifier puts [CLS] first
        cases = sampling_cases(loaded.config, kernel, loaded.task == "causal_lm", length, cfg.max_new_tokens,
                               cfg.use_cache, next(loaded.model.parameters()).dtype, device)
        checked = checked_kernel(kernel, cases)
        if checked != kernel:
            loaded.model.transformer.set_attention(checked, loaded.config.sdpa_backend)
    if loaded.task == "masked_lm":
        show_fills(loaded.model, tokenizer, cfg.prompt, cfg.candidates, out)
        return
    if loaded.task == "classify":
        show_labels(loaded.model, tokenizer, cfg.prompt, loaded.labels or [], out)
        return
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    compiled = None
    if cfg.compile:
        kernel = loaded.model.transformer.blocks[0].attn.attention
        if kernel not in STATIC_KERNELS:
            fail("compile", cfg.compile, f"the compiled step attends with {' or '.join(STATIC_KERNELS)}, not "
                 f"{kernel!r}: add attention=sdpa")
        if cfg.compile_aot:
            from minitx.packaged_decoding import PackagedDecoding

            compiled = PackagedDecoding(loaded.model, package_dir(cfg.ckpt), cfg.compile_autotune)
        else:
            compiled = CompiledDecoding(loaded.model)
    if cfg.num_samples > 1 and cfg.use_cache:  # one batch; each sample printed whole once every row has ended
        texts = [""] * cfg.num_samples
        streams = [DecodeStream(skip_special_tokens=False) for _ in texts]

        def reached_stop(row: int, token: int) -> bool:
            before = len(texts[row])
            texts[row] += streams[row].step(tokenizer, token) or ""
            return bool(cfg.stop) and texts[row].find(cfg.stop, max(0, before - len(cfg.stop) + 1)) >= 0

        generate_batch(loaded.model, [prompt] * cfg.num_samples, cfg.max_new_tokens, cfg.temperature,
                       cfg.top_k or None, cfg.top_p, generator, should_stop=reached_stop,
                       compiled=compiled)
        for i, text in enumerate(texts):
            print(f"--- sample {i + 1} ---", file=out)
            print(cfg.prompt + "".join(until_stop([text], cfg.stop)), file=out, flush=True)
        return
    for i in range(cfg.num_samples):
        if cfg.num_samples > 1:
            print(f"--- sample {i + 1} ---", file=out)
        print(cfg.prompt, end="", file=out, flush=True)
        ids = generate(loaded.model, prompt, cfg.max_new_tokens, cfg.temperature, cfg.top_k or None, cfg.top_p,
                       generator, use_cache=cfg.use_cache, compiled=compiled)
        for piece in until_stop(stream_decode(tokenizer, ids), cfg.stop):
            print(piece, end="", file=out, flush=True)
        print(file=out, flush=True)


def package_dir(ckpt: str) -> Path:
    """Where built decoding steps are kept: beside the checkpoint file or directory, `<name>.decode/`."""
    source = Path(ckpt.removeprefix("hf:"))
    return source.with_name(source.name + ".decode")


def until_stop(pieces: Iterable[str], stop: str) -> Iterator[str]:
    """The text of `pieces` up to the first `stop` (left out), streamed: only a tail that could begin `stop` is
    held back. Ending early ends the decoding that feeds `pieces`."""
    if not stop:
        yield from pieces
        return
    held = ""
    for piece in pieces:
        held += piece
        if (cut := held.find(stop)) >= 0:
            yield held[:cut]
            return
        if (safe := len(held) - len(stop) + 1) > 0:
            yield held[:safe]
            held = held[safe:]
    yield held


def main(argv: list[str] | None = None) -> None:
    """The minitx-sample console script."""
    run_command(SampleConfig, USAGE, sample, argv)


if __name__ == "__main__":
    main()
