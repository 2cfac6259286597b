"""Export to transformers and minitx's own safe format, and import from transformers: the same logits on both sides
(transformers' GPT-2 is the independent reference), or a one-line refusal."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import make_text
from tokenizers import Tokenizer

import minitx
from minitx.checkpoint import CHECKPOINT_KEY
from minitx.config import ModelConfig
from minitx.export import main as export_main
from minitx.generation import generate
from minitx.model import GPT, Encoder
from minitx.tokenizer import ENCODER_TOKENS, SPECIAL_TOKENS, train_bpe_tokenizer

transformers = pytest.importorskip("transformers")

TINY = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32)
VARIANTS = {  # name -> (task, settings, exported as GPT-2 or refused naming this setting)
    "gpt": ("causal_lm", {}, None),
    "gpt-bias": ("causal_lm", {"bias": True}, None),
    "gpt-gelu_tanh": ("causal_lm", {"activation": "gelu_tanh"}, None),
    "rope": ("causal_lm", {"pos_emb": "rope"}, "model.pos_emb='rope'"),
    "rmsnorm": ("causal_lm", {"norm": "rmsnorm"}, "model.norm='rmsnorm'"),
    "relu2": ("causal_lm", {"activation": "relu2"}, "model.activation='relu2'"),
    "window": ("causal_lm", {"attention_window": 8}, "model.attention_window=8"),
    "masked_lm": ("masked_lm", {}, "task='masked_lm'"),
    "classify": ("classify", {"pos_emb": "rope", "norm": "rmsnorm"}, "task='classify'"),
}


@pytest.fixture(scope="module")
def tokenizers_() -> dict[str, Tokenizer]:
    texts = make_text(300).splitlines()
    return {"causal": train_bpe_tokenizer(texts, 300), "encoder": train_bpe_tokenizer(texts, 300,
                                                                                       SPECIAL_TOKENS + ENCODER_TOKENS)}


def write_checkpoint(path: Path, task: str, settings: dict, tokenizer: Tokenizer, seed: int = 0) -> Path:
    """A checkpoint as minitx-train writes one (the parts a loader reads), from a randomly initialised model with
    random norm weights and biases, so that every tensor's mapping matters."""
    torch.manual_seed(seed)
    config = dataclasses.replace(TINY, vocab_size=tokenizer.get_vocab_size(), **settings).validate()
    labels = ["neg", "pos"] if task == "classify" else None
    model = GPT(config) if task == "causal_lm" else Encoder(config, len(labels or []))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    meta = {"task": task, "model": dataclasses.asdict(config), "tokenizer": tokenizer.to_str(), "labels": labels,
            "pooling": "cls"}
    torch.save({CHECKPOINT_KEY: meta, "global_step": 7, "state_dict": {"model." + k: v for k, v in
                                                                       model.state_dict().items()}}, path)
    return path


def run_export(*args: str) -> None:
    export_main(list(args))


def outputs(loaded: minitx.checkpoint.Loaded, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if loaded.task == "causal_lm":
            return loaded.model(ids)[0]
        hidden = loaded.model(ids)
        return loaded.model.class_logits(hidden) if loaded.task == "classify" else loaded.model.mlm_logits(hidden)


@pytest.fixture(scope="module")
def gpt_ckpt(tmp_path_factory: pytest.TempPathFactory, tokenizers_: dict[str, Tokenizer]) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("gpt") / "best.ckpt", "causal_lm", {}, tokenizers_["causal"])


def test_export_to_transformers_computes_the_same_model(gpt_ckpt: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel, pipeline

    out = tmp_path / "my-model"
    run_export(f"ckpt={gpt_ckpt}", f"out={out}")
    ours = minitx.load(gpt_ckpt)
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(theirs, GPT2LMHeadModel)
    ids = torch.randint(0, ours.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (theirs(ids).logits - ours.model(ids)[0]).abs().max().item()
    assert diff < 1e-4, diff

    prompt = ids[0, :5].tolist()
    greedy = list(generate(ours.model, prompt, 20, temperature=0.0))
    hf_greedy = theirs.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                                pad_token_id=theirs.config.eos_token_id)[0, 5:].tolist()
    assert greedy == hf_greedy

    text = "the quick brown fox<|endoftext|>def f(x):\n    return x"
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer(text)["input_ids"] == ours.tokenizer.encode(text).ids
    assert tokenizer.eos_token == tokenizer.bos_token == "<|endoftext|>" and tokenizer.unk_token == "[UNK]"
    generated = pipeline("text-generation", model=str(out))("the ", max_new_tokens=5, do_sample=False)
    assert generated[0]["generated_text"].startswith("the ") and len(generated[0]["generated_text"]) > len("the ")


@pytest.mark.parametrize("name", VARIANTS)
def test_every_variant_exports_exactly_or_is_refused(name: str, tmp_path: Path, tokenizers_: dict[str, Tokenizer],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import GPT2LMHeadModel

    task, settings, refused = VARIANTS[name]
    tokenizer = tokenizers_["causal" if task == "causal_lm" else "encoder"]
    ckpt = write_checkpoint(tmp_path / "best.ckpt", task, settings, tokenizer, seed=1)
    ours = minitx.load(ckpt)
    ids = torch.randint(0, ours.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))

    own = tmp_path / "own"  # minitx's own format: every variant, exactly
    run_export(f"ckpt={ckpt}", f"out={own}", "format=safetensors")
    assert not list(own.glob("*.ckpt")) and not list(own.glob("*.bin"))  # no pickle
    back = minitx.load(own)
    assert (back.task, back.labels, back.step, back.config) == (ours.task, ours.labels, ours.step, ours.config)
    assert back.model.lm_head.weight is back.model.transformer.tok_emb.weight  # re-tied
    assert torch.equal(outputs(back, ids), outputs(ours, ids))

    hf = tmp_path / "hf"
    if refused:
        with pytest.raises(SystemExit) as e:
            run_export(f"ckpt={ckpt}", f"out={hf}")
        assert e.value.code == 2
        assert capsys.readouterr().err == (f"error: {refused}: no transformers architecture matches it exactly; "
                                           "export with format=safetensors\n")
        assert not hf.exists()
        return
    run_export(f"ckpt={ckpt}", f"out={hf}")
    with torch.no_grad():
        diff = (GPT2LMHeadModel.from_pretrained(hf).eval()(ids).logits - outputs(ours, ids)).abs().max().item()
    assert diff < 1e-4, diff
    expected = {"gelu_tanh": "gelu_new"}.get(ours.config.activation, "gelu")
    assert json.loads((hf / "config.json").read_text())["activation_function"] == expected


def random_gpt2(folder: Path, tokenizer: Tokenizer, bin_weights: bool = False, **settings: object) -> Path:
    """A randomly initialised GPT2LMHeadModel saved as transformers saves one, with a tokenizer.json."""
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    torch.manual_seed(2)
    eos = tokenizer.token_to_id("<|endoftext|>")
    config = GPT2Config(vocab_size=tokenizer.get_vocab_size(), n_positions=48, n_embd=32, n_layer=2, n_head=2,
                        activation_function="gelu_new", bos_token_id=eos, eos_token_id=eos, **settings)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    if bin_weights:  # the older pickle layout (transformers 5 writes safetensors whatever safe_serialization says)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>").save_pretrained(folder)
    return folder


@pytest.mark.parametrize("bin_weights", [False, True])
def test_a_transformers_gpt2_imports_with_the_same_logits(tmp_path: Path, tokenizers_: dict[str, Tokenizer],
                                                          bin_weights: bool) -> None:
    from transformers import GPT2LMHeadModel

    folder = random_gpt2(tmp_path / "gpt2", tokenizers_["causal"], bin_weights)
    loaded = minitx.load(f"hf:{folder}")
    assert loaded.task == "causal_lm" and loaded.config.activation == "gelu_tanh" and loaded.config.bias
    assert loaded.tokenizer.to_str() == Tokenizer.from_file(str(folder / "tokenizer.json")).to_str()
    ids = torch.randint(0, loaded.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (GPT2LMHeadModel.from_pretrained(folder).eval()(ids).logits - loaded.model(ids)[0]).abs().max().item()
    assert diff < 1e-4, diff


def test_gpt2_weights_without_the_transformer_prefix_import(tmp_path: Path, tokenizers_: dict[str, Tokenizer]) -> None:
    """openai-community/gpt2's own files name the weights 'h.0.attn.c_attn.weight', 'wte.weight', ... (no
    'transformer.' prefix, no lm_head): the layout save_pretrained writes, renamed."""
    from safetensors.torch import load_file, save_file
    from transformers import GPT2LMHeadModel

    folder = random_gpt2(tmp_path / "gpt2", tokenizers_["causal"])
    reference = GPT2LMHeadModel.from_pretrained(folder).eval()
    state = load_file(str(folder / "model.safetensors"))
    bare = {k.removeprefix("transformer."): v for k, v in state.items() if not k.startswith("lm_head.")}
    assert "h.0.attn.c_attn.weight" in bare and "wte.weight" in bare
    save_file(bare, str(folder / "model.safetensors"), metadata={"format": "pt"})
    loaded = minitx.load(f"hf:{folder}")
    ids = torch.randint(0, loaded.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        diff = (reference(ids).logits - loaded.model(ids)[0]).abs().max().item()
    assert diff < 1e-4, diff


@pytest.mark.parametrize(("change", "error"), [
    ({"activation_function": "silu"}, "activation_function='silu': minitx has no such activation"),
    ({"model_type": "llama"}, "model_type='llama': only GPT-2's layout"),
    ({"n_inner": 100}, "n_inner=100: minitx's GPT computes 128 only"),
    ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon=1e-06: minitx's GPT computes 1e-05 only"),
    ({"tie_word_embeddings": False}, "tie_word_embeddings=False: minitx's GPT computes True only"),
    ({"scale_attn_weights": False}, "scale_attn_weights=False: minitx's GPT computes True only"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=True: minitx's GPT computes False"),
    ({"n_head": 3}, "config.json n_embd=32 is not divisible by n_head=3"),
    ({"n_positions": 0}, "config.json n_positions=0: "),
])
def test_import_refuses_what_minitx_does_not_compute(tmp_path: Path, tokenizers_: dict[str, Tokenizer],
                                                     change: dict, error: str) -> None:
    from minitx.checkpoint import CheckpointError

    folder = random_gpt2(tmp_path / "gpt2", tokenizers_["causal"])
    config = json.loads((folder / "config.json").read_text()) | change
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="^" + re.escape(f"model.init_from='hf:{folder}': {error}")):
        minitx.checkpoint.load(f"hf:{folder}", key="model.init_from")


def test_unreadable_sources_fail_as_one_line(gpt_ckpt: Path, tmp_path: Path, tokenizers_: dict[str, Tokenizer]) -> None:
    """A damaged file in an import or export directory, or a run directory given for its checkpoint: one line naming
    the setting and the file, never a JSONDecodeError, SafetensorError, UnpicklingError or KeyError."""
    from minitx.checkpoint import CheckpointError

    def error(source: str) -> str:
        with pytest.raises(CheckpointError) as e:
            minitx.checkpoint.load(source, key="ckpt")
        message = str(e.value)
        assert "\n" not in message and message.startswith(f"ckpt={source!r}: "), message
        return message[len(f"ckpt={source!r}: "):]

    hf = random_gpt2(tmp_path / "gpt2", tokenizers_["causal"])
    (hf / "config.json").write_text("{not json")
    assert error(f"hf:{hf}").startswith("config.json is not JSON")
    hf = random_gpt2(tmp_path / "gpt2-corrupt", tokenizers_["causal"])
    (hf / "model.safetensors").write_bytes((hf / "model.safetensors").read_bytes()[:200])
    assert error(f"hf:{hf}").startswith("model.safetensors is truncated or corrupt")
    hf = random_gpt2(tmp_path / "gpt2-pickle", tokenizers_["causal"], bin_weights=True)
    torch.save({"wte.weight": torch.zeros(1), "code": argparse.Namespace()}, hf / "pytorch_model.bin")
    assert error(f"hf:{hf}").startswith("pytorch_model.bin refused: its pickle holds objects other than tensors")

    own = tmp_path / "own"
    run_export(f"ckpt={gpt_ckpt}", f"out={own}", "format=safetensors")
    weights = (own / "model.safetensors").read_bytes()
    (own / "model.safetensors").write_bytes(weights[:300])
    assert error(str(own)).startswith("model.safetensors is truncated or corrupt")
    (own / "model.safetensors").write_bytes(weights)
    (own / "minitx_config.json").write_text("[1, 2]")
    assert error(str(own)) == "no model settings (a 'model' entry) in its minitx metadata"

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    assert error(str(run)) == f"a training run directory; use {run / 'checkpoints' / 'best.ckpt'}"


def test_overwrite_replaces_the_other_format(gpt_ckpt: Path, tmp_path: Path) -> None:
    """Both formats write model.safetensors: overwriting one with the other leaves a directory of the new format
    only."""
    from minitx.checkpoint import CheckpointError

    out = tmp_path / "out"
    run_export(f"ckpt={gpt_ckpt}", f"out={out}", "format=safetensors")
    run_export(f"ckpt={gpt_ckpt}", f"out={out}", "format=transformers", "overwrite=true")
    assert not (out / "minitx_config.json").exists() and (out / "config.json").is_file()
    with pytest.raises(CheckpointError, match=r"a directory without minitx_config\.json"):
        minitx.load(out)
    expected = minitx.load(gpt_ckpt)
    ids = torch.randint(0, expected.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(5))
    assert (outputs(minitx.load(f"hf:{out}"), ids) - outputs(expected, ids)).abs().max() < 1e-4

    run_export(f"ckpt={gpt_ckpt}", f"out={out}", "format=safetensors", "overwrite=true")
    assert not any((out / name).exists() for name in ("config.json", "tokenizer_config.json",
                                                      "special_tokens_map.json"))
    assert torch.equal(outputs(minitx.load(out), ids), outputs(expected, ids))


def test_document_mask_travels_from_the_run_config_into_exports(tmp_path: Path,
                                                               tokenizers_: dict[str, Tokenizer]) -> None:
    ckpt = write_checkpoint(tmp_path / "masked.ckpt", "causal_lm", {}, tokenizers_["causal"])
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint[CHECKPOINT_KEY]["config"] = {"data": {"document_mask": True}}
    torch.save(checkpoint, ckpt)
    assert minitx.load(ckpt).document_mask
    run_export(f"ckpt={ckpt}", f"out={tmp_path / 'own'}", "format=safetensors")
    assert minitx.load(tmp_path / "own").document_mask
    run_export(f"ckpt={tmp_path / 'own'}", f"out={tmp_path / 'own2'}", "format=safetensors")
    assert minitx.load(tmp_path / "own2").document_mask
    assert not minitx.load(write_checkpoint(tmp_path / "plain.ckpt", "causal_lm", {}, tokenizers_["causal"])
                           ).document_mask


def test_import_needs_a_tokenizer_json(tmp_path: Path, tokenizers_: dict[str, Tokenizer]) -> None:
    from minitx.config import MinitxError

    folder = random_gpt2(tmp_path / "gpt2", tokenizers_["causal"])
    (folder / "tokenizer.json").unlink()
    with pytest.raises(MinitxError, match=r"no tokenizer\.json there"):
        minitx.load(f"hf:{folder}")


def test_training_continues_from_an_imported_gpt2(tmp_path: Path, tokenizers_: dict[str, Tokenizer],
                                                  caplog: pytest.LogCaptureFixture) -> None:
    from test_train import TINY as TRAIN_TINY
    from test_train import compose_config
    from transformers import GPT2LMHeadModel

    from minitx.config import ConfigError
    from minitx.tasks.causal_lm import CausalLM
    from minitx.train import parse_config, train

    folder = random_gpt2(tmp_path / "gpt2", tokenizers_["causal"])
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_text(400, seed=3))
    overrides = [*TRAIN_TINY, f"data.path={corpus}", f"model.init_from=hf:{folder}", "trainer.max_steps=30",
                 "trainer.val_check_interval=30", "sample.max_new_tokens=5", "logger=csv"]
    with caplog.at_level("INFO", logger="minitx"):
        config = parse_config(compose_config(*overrides))
    assert (config.model.n_embd, config.model.bias, config.model.activation, config.model.block_size) == (
        32, True, "gelu_tanh", 32)  # the architecture is the import's; block_size kept (<= its 48 positions)
    assert "logit_softcap=0.0, block_size=32 (of 48 positions)" in caplog.text, caplog.text

    # before training, the module computes the import's logits for every T <= block_size: the position table is
    # cropped to its first 32 rows
    prepared = CausalLM.prepare(config)
    module, _ = CausalLM.build(config, config.model, prepared, {})
    assert prepared.pretrained is None  # copied, then let go
    reference = GPT2LMHeadModel.from_pretrained(folder).eval()
    ids = torch.randint(0, config.model.vocab_size, (2, 32), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        for t in (1, 17, 32):
            diff = (reference(ids[:, :t]).logits - module.model.eval()(ids[:, :t])[0]).abs().max().item()
            assert diff < 1e-4, (t, diff)

    train(config, tmp_path / "run")
    with open(tmp_path / "run" / "csv" / "metrics.csv") as f:
        losses = [float(r["val/loss"]) for r in csv.DictReader(f) if r["val/loss"]]
    assert losses[-1] < losses[0] - 0.5, losses
    tuned, imported = minitx.load(tmp_path / "run" / "checkpoints" / "last.ckpt"), minitx.load(f"hf:{folder}")
    assert tuned.tokenizer.to_str() == imported.tokenizer.to_str()
    before, after = (m.model.transformer.blocks[1].mlp.fc.weight.flatten() for m in (imported, tuned))
    assert torch.cosine_similarity(before, after, dim=0) > 0.5  # trained on from the import, not from scratch

    # and back: the trained checkpoint (bias=true, gelu_tanh) exports exactly
    run_export(f"ckpt={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}", f"out={tmp_path / 'back'}")
    ids = torch.randint(0, tuned.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        diff = (GPT2LMHeadModel.from_pretrained(tmp_path / "back")(ids).logits - tuned.model(ids)[0]).abs().max()
    assert diff < 1e-4, diff

    with pytest.raises(ConfigError, match=r"^model.block_size=64 exceeds the 48 positions of model.init_from="):
        parse_config(compose_config(*overrides, "model.block_size=64"))


@pytest.mark.parametrize("kind", ["ckpt", "export dir"])
def test_init_from_a_minitx_model_takes_its_architecture(gpt_ckpt: Path, tmp_path: Path, kind: str,
                                                        tokenizers_: dict[str, Tokenizer]) -> None:
    from test_train import compose_config

    from minitx.config import ConfigError
    from minitx.train import parse_config

    source = gpt_ckpt
    if kind == "export dir":
        source = tmp_path / "own"
        run_export(f"ckpt={gpt_ckpt}", f"out={source}", "format=safetensors")
    config = parse_config(compose_config(f"model.init_from={source}", "model.block_size=16", "model.n_layer=5"))
    assert (config.model.n_layer, config.model.n_embd, config.model.block_size) == (2, 32, 16)
    mlm = write_checkpoint(tmp_path / "mlm.ckpt", "masked_lm", {}, tokenizers_["encoder"])
    with pytest.raises(ConfigError, match="a masked_lm model; task=causal_lm continues a causal_lm model"):
        parse_config(compose_config(f"model.init_from={mlm}"))


def test_loading_exports_and_imports_needs_no_lightning_hydra_or_transformers(gpt_ckpt: Path, tmp_path: Path,
                                                                            tokenizers_: dict[str, Tokenizer]) -> None:
    import subprocess
    import sys

    own = tmp_path / "own"
    run_export(f"ckpt={gpt_ckpt}", f"out={own}", "format=safetensors")
    folder = random_gpt2(tmp_path / "gpt2", tokenizers_["causal"])
    code = (f"import sys, minitx; minitx.load({str(own)!r}); minitx.load('hf:' + {str(folder)!r})\n"
            "print(sorted(k for k in sys.modules if k.split('.')[0] in ('lightning', 'hydra', 'transformers')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr[-2000:]


def test_export_help_and_one_line_errors(gpt_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_export("--help")
    shown = capsys.readouterr().out
    assert all(f"  {key}=" in shown for key in ("ckpt", "out", "format", "overwrite")), shown
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    cases = [
        ([f"ckpt={tmp_path / 'missing.ckpt'}", f"out={tmp_path / 'a'}"], "no such file"),
        ([f"out={tmp_path / 'a'}"], "ckpt=None: required"),
        ([f"ckpt={gpt_ckpt}", f"out={tmp_path / 'full'}"], "exists and is not empty; add overwrite=true"),
        ([f"ckpt={gpt_ckpt}", f"out={tmp_path / 'a'}", "format=onnx"], "format='onnx': choose one of"),
        ([f"ckpt={tmp_path}", f"out={tmp_path / 'a'}"], "a directory without minitx_config.json"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as e:
            run_export(*args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err
    run_export(f"ckpt={gpt_ckpt}", f"out={tmp_path / 'full'}", "overwrite=true")
    assert (tmp_path / "full" / "config.json").is_file()


def test_export_without_transformers_names_the_extra(gpt_ckpt: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)  # what an install without minitx[hf] has: no module
    with pytest.raises(SystemExit):
        run_export(f"ckpt={gpt_ckpt}", f"out={tmp_path / 'hf'}")
    assert capsys.readouterr().err == "error: format=transformers needs transformers: pip install 'minitx[hf]'\n"
    run_export(f"ckpt={gpt_ckpt}", f"out={tmp_path / 'own'}", "format=safetensors")  # needs only safetensors


def test_sample_reads_an_export_dir(gpt_ckpt: Path, tmp_path: Path) -> None:
    import io

    from minitx.sample import parse_args, sample

    own = tmp_path / "own"
    run_export(f"ckpt={gpt_ckpt}", f"out={own}", "format=safetensors")
    texts = []
    for source in (gpt_ckpt, own):
        out = io.StringIO()
        sample(parse_args([f"ckpt={source}", "prompt=the ", "max_new_tokens=10", "temperature=0"]), out)
        texts.append(out.getvalue())
    assert texts[0] == texts[1] and texts[0].startswith("the ")


def test_minitx_eval_scores_every_new_source(gpt_ckpt: Path, tmp_path: Path, tokenizers_: dict[str, Tokenizer]) -> None:
    """minitx-eval reads models through minitx.checkpoint.load: an export directory scores as its .ckpt does, and an
    imported GPT-2 as transformers' own model does."""
    from minitx.cli import parse_key_values
    from minitx.evaluate import EvalConfig, evaluate

    def score(*args: str) -> dict:
        return evaluate(parse_key_values(EvalConfig, [*args, f"data.path={tmp_path / 'heldout.txt'}"]).validate())

    (tmp_path / "heldout.txt").write_text(make_text(20, seed=4))
    run_export(f"ckpt={gpt_ckpt}", f"out={tmp_path / 'own'}", "format=safetensors")
    assert score(f"ckpt={tmp_path / 'own'}")["loss"] == score(f"ckpt={gpt_ckpt}")["loss"]
    folder = random_gpt2(tmp_path / "gpt2", tokenizers_["causal"])
    ours, theirs = score(f"ckpt=hf:{folder}"), score(f"ckpt=hf:{folder}", "backend=transformers")
    assert ours["tokens"] == theirs["tokens"] and ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
