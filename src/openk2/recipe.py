"""Recipes: TOML files of sections (`[model]`, `[data]`, `[train]`, `[optim]`, ...) with
`--set section.key=value` overrides. Every key is known in advance; a typo is an error that
names the file, the key and the keys that exist.
"""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any

from openk2.config import ConfigError

# Default values of every recipe key, by section. A section's keys are exactly these, except
# [model], which also takes any ModelConfig field as an override of the preset.
DEFAULTS: dict[str, dict[str, Any]] = {
    "model": {"preset": "tiny", "init_from": ""},
    "data": {
        "source": "default",
        "tokenizer": "",
        "val_fraction": 0.02,
        "skip_bad_lines": False,
        "seed": 0,  # seeds the generated text of the default corpus, not the run (train.seed)
    },
    "train": {
        "steps": 300,
        "seed": 0,
        "batch_size": 16,
        "micro_batch_size": 8,
        "seq_len": 256,
        "checkpoint_every": 100,
        "keep_checkpoints": 2,
        "eval_every": 100,
        "eval_batches": 8,
        "dtype": "float32",
        "threads": 0,
        "device": "cpu",
        "max_grad_norm": 0.0,
    },
    # [optim] takes exactly the fields of openk2.optim.OptimConfig (filled in below).
    "optim": {},
    "parallel": {"dp_shard": 1, "ep": 1, "activation_checkpointing": "none"},
}


def _optim_defaults() -> dict[str, Any]:
    from openk2.optim import OptimConfig

    return OptimConfig().to_dict()


DEFAULTS["optim"] = _optim_defaults()


def _parse_value(text: str) -> Any:
    """A TOML literal if it parses as one (numbers, booleans, arrays, quoted strings), else the
    raw text, so `--set data.source=corpus.jsonl` needs no quotes."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(recipe: dict[str, dict[str, Any]], assignment: str, where: str = "--set") -> None:
    if "=" not in assignment:
        raise ConfigError(f"{where} {assignment!r}: expected section.key=value, e.g. train.steps=100")
    key, text = assignment.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"{where} {assignment!r}: expected section.key=value, e.g. train.steps=100")
    section, name = parts
    recipe.setdefault(section, {})[name] = _parse_value(text.strip())


def load_recipe(path: str | Path | None, overrides: list[str] | None = None,
                sections: tuple[str, ...] | None = None) -> dict[str, dict[str, Any]]:
    """Defaults <- TOML file <- overrides, validated. `sections` limits the known sections
    (a stage may know more sections than DEFAULTS, passed via `extra_defaults`)."""
    where = str(path) if path else "recipe"
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"recipe {path}: no such file")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"recipe {path}: invalid TOML ({e})") from None
    for assignment in overrides or []:
        apply_override(raw, assignment)
    return validate(raw, where)


def validate(raw: dict[str, Any], where: str = "recipe") -> dict[str, dict[str, Any]]:
    recipe = copy.deepcopy(DEFAULTS)
    for section, values in raw.items():
        if section not in recipe:
            raise ConfigError(f"{where}: unknown section [{section}]; known: {', '.join(recipe)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: [{section}] must be a table of keys")
        for key, value in values.items():
            if section != "model" and key not in recipe[section]:
                raise ConfigError(
                    f"{where}: {section}.{key} is not a known key; [{section}] takes "
                    f"{', '.join(recipe[section])}"
                )
            default = recipe[section].get(key)
            if (section, key) in _ANY_OF:
                if not isinstance(value, _ANY_OF[section, key]):
                    raise ConfigError(f"{where}: {section}.{key}={value!r} should be a name "
                                      "or a list of paths")
            elif default is not None and not _same_kind(default, value):
                raise ConfigError(
                    f"{where}: {section}.{key}={value!r} should be {type(default).__name__} "
                    f"like the default {default!r}"
                )
            recipe[section][key] = value
    train = recipe["train"]
    for key in ("steps", "batch_size", "micro_batch_size", "seq_len"):
        if train[key] <= 0:
            raise ConfigError(f"{where}: train.{key}={train[key]} must be positive")
    if train["batch_size"] % train["micro_batch_size"]:
        raise ConfigError(
            f"{where}: train.batch_size={train['batch_size']} must be a multiple of "
            f"train.micro_batch_size={train['micro_batch_size']}"
        )
    return recipe


# Keys whose value may take several forms.
_ANY_OF: dict[tuple[str, str], tuple[type, ...]] = {("data", "source"): (str, list)}


def _same_kind(default: Any, value: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, type(default))


def model_overrides(recipe: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """[model] keys other than preset/init_from: ModelConfig field overrides."""
    return {k: v for k, v in recipe["model"].items() if k not in DEFAULTS["model"]}


def recipe_changes(saved: dict[str, Any], recipe: dict[str, dict[str, Any]],
                   sections: tuple[str, ...] | None = None) -> list[str]:
    """`section.key=saved (now new)` for every setting in which `recipe` differs from `saved` (a
    run's recipe.json), over `sections` (all of the recipe's by default)."""
    changes = []
    for section in sections or tuple(recipe):
        old, new = saved.get(section) or {}, recipe.get(section) or {}
        changes += [f"{section}.{key}={old.get(key)!r} (now {new.get(key)!r})"
                    for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]
    return changes
