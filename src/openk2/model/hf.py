"""HF checkpoint import/export: config.json + safetensors, readable by transformers (K2_SPEC §1).

Written: the released K2 layout (per-expert `mlp.experts.{e}.{gate,up,down}_proj.weight`),
which transformers 4.x and 5.x and inference servers all load. Read: that layout, the
fused 3-D `mlp.experts.gate_up_proj` / `down_proj` that transformers 5.x writes, and FP8
block-quantised matrices (`weight_scale_inv`, as released), dequantised on load.
`CheckpointReader` reads any tensor, or a range of its leading rows, in openk2 names: the
basis of `load_model` and of the sharded load under torchrun (train/distributed.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from openk2.config import ModelConfig
from openk2.model.transformer import K2ForCausalLM, build_model

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_EXPERT_STACK = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$")
_EXPERT_ONE = re.compile(
    r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_EXPERT_FUSED = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")


class CheckpointError(ValueError):
    """A checkpoint folder is missing files or tensors, or holds tensors of the wrong shape."""


def _hf_tensors(state: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype | None
                ) -> Iterator[tuple[str, torch.Tensor]]:
    """(openk2 name, tensor) pairs in HF names: stacked experts become one tensor per expert."""
    for name, tensor in state:
        if dtype is not None and tensor.is_floating_point() and not _keeps_float32(name):
            tensor = tensor.to(dtype)
        match = _EXPERT_STACK.match(name)
        if match:
            prefix, proj = match.groups()
            for e in range(tensor.shape[0]):
                yield f"{prefix}.{e}.{proj}.weight", tensor[e]
        else:
            yield name, tensor


def _keeps_float32(name: str) -> bool:
    return name.endswith("mlp.gate.weight") or name.endswith("e_score_correction_bias")


def save_model(
    model: K2ForCausalLM,
    directory: str | Path,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 4 * 1024**3,
) -> Path:
    """Write config.json and safetensors (sharded with an index above `max_shard_bytes`)."""
    return save_state(model.config, model.state_dict().items(), directory,
                      dtype or model.lm_head.weight.dtype, max_shard_bytes)


def save_state(
    config: ModelConfig,
    state: Iterable[tuple[str, torch.Tensor]],
    directory: str | Path,
    dtype: torch.dtype,
    max_shard_bytes: int = 4 * 1024**3,
) -> Path:
    """`save_model` from (openk2 name, tensor) pairs, consumed one at a time: a safetensors
    file is written as soon as it is full, so at most one file's tensors are held in memory
    (the distributed export streams gathered tensors through this)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in list(directory.glob("model*.safetensors")) + [directory / INDEX_NAME]:
        stale.unlink(missing_ok=True)
    metadata = {"format": "pt"}
    written: list[tuple[Path, list[str]]] = []  # temporary file, its tensor names
    shard: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        path = directory / f"model-part-{len(written) + 1:05d}.safetensors"
        save_file(shard, path, metadata=metadata)
        written.append((path, list(shard)))
        shard.clear()

    for name, tensor in _hf_tensors(state, dtype):
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
            size = 0
        shard[name] = tensor.detach().to("cpu").contiguous().clone()
        size += nbytes
        total += nbytes
    if shard or not written:
        flush()
    hf_config = config.to_hf(for_transformers=True)
    hf_config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    if len(written) == 1:
        written[0][0].rename(directory / SINGLE_NAME)
        return directory
    weight_map = {}
    for i, (path, names) in enumerate(written, start=1):
        filename = f"model-{i:05d}-of-{len(written):05d}.safetensors"
        path.rename(directory / filename)
        weight_map.update({name: filename for name in names})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return directory


def _open_tensors(directory: Path) -> dict[str, Path]:
    """Map tensor name -> file, from the index or the single file."""
    index = directory / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
        files = {name: directory / file for name, file in weight_map.items()}
        for path in set(files.values()):
            if not path.is_file():
                raise CheckpointError(f"{index} names {path.name}, which is missing from {directory}")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: no safetensors weights (expected {SINGLE_NAME} or {INDEX_NAME})")
    out = {}
    for path in files:
        with _safe_open(path) as f:
            out.update({name: path for name in f.keys()})
    return out


def _safe_open(path: Path):
    """safe_open, with an unreadable file (truncated, not safetensors) named in a CheckpointError."""
    try:
        return safe_open(path, framework="pt")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}); "
                              "copy or export it again") from None


def _dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                    row_offset: int = 0) -> torch.Tensor:
    """weight rows row_offset.. of a block-quantised matrix; scale_inv holds the blocks from the
    one containing row_offset on."""
    rows, cols = weight.shape
    scale = scale_inv.float().repeat_interleave(block[0], 0)[row_offset : row_offset + rows]
    return weight.float() * scale.repeat_interleave(block[1], 1)[:, :cols]


class CheckpointReader:
    """The tensors of an HF checkpoint folder in openk2 names (experts stacked from the
    per-expert or the fused layout, FP8 dequantised), each read whole or as a range of its
    leading dimension, so that a rank under torchrun reads only the rows it holds."""

    def __init__(self, directory: str | Path, config: ModelConfig):
        self.directory = Path(directory)
        self.files = _open_tensors(self.directory)
        self.block = tuple(config.extra.get("quantization_config", {}).get("weight_block_size", (128, 128)))
        self._handles: dict[Path, object] = {}
        # openk2 name -> ("plain", hf name) | ("experts", [hf name per expert]) | ("gate_up", hf name, half)
        self.sources: dict[str, tuple] = {}
        per_expert: dict[tuple[str, str], dict[int, str]] = {}
        for name in self.files:
            if name.endswith("weight_scale_inv") or name.endswith("rotary_emb.inv_freq"):
                continue
            layer = re.match(r"^model\.layers\.(\d+)\.", name)
            if layer and int(layer.group(1)) >= config.num_hidden_layers:
                continue  # multi-token-prediction layers, which openk2 does not build
            if match := _EXPERT_ONE.match(name):
                prefix, expert, proj = match.groups()
                per_expert.setdefault((prefix, proj), {})[int(expert)] = name
            elif match := _EXPERT_FUSED.match(name):
                prefix, proj = match.groups()
                if proj == "gate_up_proj":  # [E, 2I, D]: gate rows first
                    self.sources[f"{prefix}.gate_proj"] = ("gate_up", name, 0)
                    self.sources[f"{prefix}.up_proj"] = ("gate_up", name, 1)
                else:
                    self.sources[f"{prefix}.down_proj"] = ("plain", name)
            else:
                self.sources[name] = ("plain", name)
        for (prefix, proj), experts in per_expert.items():
            missing = [e for e in range(config.n_routed_experts) if e not in experts]
            if missing:
                raise CheckpointError(
                    f"{self.directory}: missing tensor {prefix}.{missing[0]}.{proj}.weight "
                    f"({len(missing)} experts of {prefix} lack {proj})"
                )
            self.sources[f"{prefix}.{proj}"] = ("experts",
                                                [experts[e] for e in range(config.n_routed_experts)])

    def shape(self, name: str) -> tuple[int, ...]:
        kind, source, *rest = self.sources[name]
        if kind == "experts":
            return (len(source), *self._slice(source[0]).get_shape())
        shape = tuple(self._slice(source).get_shape())
        return (shape[0], shape[1] // 2, *shape[2:]) if kind == "gate_up" else shape

    def read(self, name: str, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Rows start:end of tensor `name` (all of it by default)."""
        kind, source, *rest = self.sources[name]
        end = self.shape(name)[0] if end is None else end
        if kind == "experts":
            return torch.stack([self._rows(expert, 0, None) for expert in source[start:end]])
        if kind == "gate_up":
            return self._rows(source, start, end).chunk(2, dim=1)[rest[0]]
        return self._rows(source, start, end)

    def _slice(self, hf_name: str):
        path = self.files[hf_name]
        if path not in self._handles:
            self._handles[path] = _safe_open(path)
        return self._handles[path].get_slice(hf_name)

    def _rows(self, hf_name: str, start: int, end: int | None) -> torch.Tensor:
        tensor_slice = self._slice(hf_name)
        end = tensor_slice.get_shape()[0] if end is None else end
        tensor = tensor_slice[start:end]
        scale_name = hf_name.removesuffix("weight") + "weight_scale_inv"
        if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) and scale_name in self.files:
            first = start // self.block[0]
            scale = self._slice(scale_name)[first : -(-end // self.block[0])]
            tensor = _dequantize_fp8(tensor, scale, self.block, row_offset=start - first * self.block[0])
        return tensor


def read_hf_state_dict(directory: str | Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder in openk2 names (experts stacked, FP8 dequantised)."""
    reader = CheckpointReader(directory, config)
    return {name: reader.read(name) for name in reader.sources}


def check_tensor_shapes(directory: str | Path, found: dict[str, tuple[int, ...]],
                        expected: dict[str, tuple[int, ...]]) -> None:
    """CheckpointError naming the first missing, unexpected or mis-shaped tensor."""
    missing = [name for name in expected if name not in found]
    if missing:
        raise CheckpointError(
            f"{directory}: missing tensor {missing[0]}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    unexpected = [name for name in found if name not in expected]
    if unexpected:
        raise CheckpointError(
            f"{directory}: unexpected tensor {unexpected[0]} for this config.json"
            + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
        )
    for name, shape in found.items():
        if tuple(shape) != tuple(expected[name]):
            raise CheckpointError(
                f"{directory}: tensor {name} has shape {list(shape)}, "
                f"config.json implies {list(expected[name])}"
            )


def load_model(
    directory: str | Path,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> K2ForCausalLM:
    """Load an HF-format K2/DeepSeek-V3 checkpoint folder into a `K2ForCausalLM`.

    dtype defaults to the dtype the weights are stored in (float32 for FP8 checkpoints,
    which are dequantised). Raises ConfigError for a bad config.json and CheckpointError,
    naming the tensor, for missing, unexpected or mis-shaped tensors.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a checkpoint folder")
    config = ModelConfig.from_hf(directory)
    state = read_hf_state_dict(directory, config)
    model = build_model(config, device="meta")
    check_tensor_shapes(directory, {name: tuple(t.shape) for name, t in state.items()},
                        {name: tuple(t.shape) for name, t in model.state_dict().items()})
    if dtype is None:
        dtype = state["lm_head.weight"].dtype
    for name, tensor in state.items():
        target = torch.float32 if _keeps_float32(name) else dtype
        state[name] = tensor.to(device=device, dtype=target).contiguous()
    model.load_state_dict(state, assign=True)
    # Non-persistent buffers (rotary frequencies, statistics) are not in the checkpoint.
    with torch.device(device):
        for module in model.modules():
            for buffer_name, buffer in list(module.named_buffers(recurse=False)):
                if buffer.device.type == "meta":
                    dtype = buffer.dtype if buffer.dtype == torch.long else torch.float32
                    module.register_buffer(buffer_name, torch.zeros(buffer.shape, dtype=dtype),
                                           persistent=False)
    for module in model.modules():
        if hasattr(module, "inv_freq"):
            module.reset_parameters()
    return model
