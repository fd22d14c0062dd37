"""The pre-training stage (K2_SPEC §3): tokenizer -> packed corpus -> MuonClip training -> RUN/final.

    openk2 pretrain --recipe recipes/speedrun.toml [--set key=value ...] --out RUN [--resume]

RUN/ receives: tokenizer/ (trained on the corpus unless data.tokenizer names one),
metrics.jsonl, checkpoints/, final/ (HF model folder with the tokenizer) and
summary.json (losses, the unigram baseline, bits per byte).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from openk2.config import ConfigError, preset
from openk2.data.corpus import PackedLoader, bits_per_byte, build_datasets, iter_texts, unigram_loss
from openk2.data.tokenizer import K2Tokenizer, train_tokenizer
from openk2.model import K2ForCausalLM, build_model, load_model, save_model
from openk2.optim import OptimConfig
from openk2.recipe import model_overrides
from openk2.train.trainer import TrainSettings, train


class LoaderBatches:
    """Adapts PackedLoader (rows only) to the trainer's (tokens, mask) micro-batches."""

    def __init__(self, loader: PackedLoader):
        self.loader = loader

    def __iter__(self) -> Iterator[tuple[torch.Tensor, None]]:
        while True:
            yield next(self.loader), None

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)


def prepare_tokenizer(recipe: dict, run_dir: Path, log: Callable[[str], None], vocab_size: int) -> K2Tokenizer:
    """data.tokenizer if given; else RUN/tokenizer if an earlier attempt trained one; else train."""
    data = recipe["data"]
    if data["tokenizer"]:
        return K2Tokenizer.load(data["tokenizer"])
    folder = run_dir / "tokenizer"
    if (folder / "tokenizer.json").is_file():
        return K2Tokenizer.load(folder)
    log(f"training a {vocab_size:,}-token BPE tokenizer on data.source={data['source']!r}")
    texts = iter_texts(data["source"], seed=recipe["train"]["seed"], skip_bad_lines=data["skip_bad_lines"])
    tokenizer = train_tokenizer(texts, vocab_size)
    tokenizer.save(folder)
    return tokenizer


def model_for(recipe: dict, vocab_size: int, seed: int, device: str) -> K2ForCausalLM:
    """[model] init_from (an HF folder) or preset + overrides, sized to the tokenizer."""
    section = recipe["model"]
    if section["init_from"]:
        model = load_model(section["init_from"], dtype=torch.float32, device=device)
        if model.config.vocab_size < vocab_size:
            raise ConfigError(f"model.init_from={section['init_from']!r} has vocab_size {model.config.vocab_size}, "
                              f"smaller than the tokenizer's {vocab_size}")
        return model
    overrides = model_overrides(recipe)
    if overrides.get("vocab_size", vocab_size) < vocab_size:
        raise ConfigError(f"model.vocab_size={overrides['vocab_size']} is smaller than the tokenizer's {vocab_size}")
    overrides.setdefault("vocab_size", vocab_size)
    config = preset(section["preset"], **overrides)
    return build_model(config, device=device, seed=seed)


def pretrain(recipe: dict, run_dir: str | Path, resume: bool = False, log: Callable[[str], None] = print,
             show_progress: bool = True) -> dict[str, Any]:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    settings = TrainSettings.from_recipe(recipe["train"])
    seed = recipe["train"]["seed"]
    if recipe["train"]["threads"]:
        torch.set_num_threads(recipe["train"]["threads"])
    torch.manual_seed(seed)
    (run_dir / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")

    default_vocab = model_overrides(recipe).get("vocab_size") or preset(recipe["model"]["preset"]).vocab_size
    tokenizer = prepare_tokenizer(recipe, run_dir, log, default_vocab)
    data = recipe["data"]
    train_rows, val_rows, info = build_datasets(
        data["source"], tokenizer, settings.seq_len, seed=seed, val_fraction=data["val_fraction"],
        skip_bad_lines=data["skip_bad_lines"])
    if info.skipped_lines:
        log(f"skipped {info.skipped_lines} malformed record(s)")
    log(f"data: {info.train.tokens:,} train tokens in {len(train_rows):,} rows, {info.val.tokens:,} validation tokens")
    model = model_for(recipe, tokenizer.vocab_size, seed, settings.device)
    val_rows = val_rows[: settings.eval_batches * settings.micro_batch_size]
    val_batches = [(rows, None) for rows in val_rows.split(settings.micro_batch_size)]
    batches = LoaderBatches(PackedLoader(train_rows, settings.micro_batch_size, seed=seed))

    def save_final(trained: K2ForCausalLM) -> None:
        save_model(trained, run_dir / "final")
        tokenizer.save(run_dir / "final")

    summary = train(run_dir, model, OptimConfig.from_dict(recipe["optim"]), settings, batches, val_batches,
                    resume=resume, log=log, on_final=save_final, show_progress=show_progress)
    baseline = unigram_loss(train_rows, val_rows, tokenizer.vocab_size)
    summary.update(
        unigram_val_loss=baseline,
        unigram_bits_per_byte=bits_per_byte(baseline, info.val.tokens, info.val.bytes),
        val_bits_per_byte=(bits_per_byte(summary["val_loss"], info.val.tokens, info.val.bytes)
                           if summary["val_loss"] is not None else None),
        train_tokens_available=info.train.tokens,
        parameters=sum(p.numel() for p in model.parameters()),
    )
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
