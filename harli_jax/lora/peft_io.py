"""Save and load LoRA adapters in the HF PEFT on-disk format.

This module owns the translation between the in-memory `AdapterWeights` (the contract the rest of
harli-jax codes against) and a PEFT adapter directory: ``adapter_config.json`` plus
``adapter_model.safetensors``.

In memory, ``weights["layers.3.self_attn.q_proj"] = (A, B)`` with A ``[in_features, r]`` and
B ``[r, out_features]``, so the adapter adds ``scaling * (x @ A) @ B``. PEFT stores the same
matrices as torch ``nn.Linear`` weights, i.e. transposed: ``lora_A.weight`` is ``[r, in]`` and
``lora_B.weight`` is ``[out, r]``, under keys such as
``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path

import jax
import numpy as np
import safetensors.numpy

from harli_jax.lora.config import LoraConfig

Array = np.ndarray | jax.Array
AdapterWeights = dict[str, tuple[Array, Array]]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

_KEY_PREFIX = "base_model.model.model."
_KEY_RE = re.compile(r"^base_model\.model\.model\.(?P<path>.+)\.lora_(?P<ab>[AB])\.weight$")
_PATH_RE = re.compile(r"^layers\.\d+\.(self_attn|mlp)\.(?P<name>\w+)$")
# Files a directory may hold for `save_adapter` to replace it; PEFT also writes a README.md.
_REPLACEABLE = frozenset({CONFIG_FILE, WEIGHTS_FILE, "README.md"})


def save_adapter(
    out_dir: str | os.PathLike[str],
    weights: Mapping[str, tuple[Array, Array]],
    config: LoraConfig,
    base_model: str = "",
) -> None:
    """Write `weights` as a PEFT adapter directory, atomically.

    Tensors keep their dtype. The files are written into a temporary sibling directory that is
    then renamed onto `out_dir`, so a reader sees either the old adapter or the new one. An
    existing `out_dir` is replaced only if it holds nothing but adapter files.
    """
    out = Path(out_dir)
    tensors = _to_peft_tensors(weights, config)
    if out.exists():
        _check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        # "format": "pt" is the metadata HF writers stamp; some loaders insist on it.
        safetensors.numpy.save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        config_text = json.dumps(config.to_peft_dict(base_model), indent=2, sort_keys=True)
        (tmp / CONFIG_FILE).write_text(config_text + "\n")
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            _fsync(tmp / name)
        _rename_over(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_adapter(adapter_dir: str | os.PathLike[str]) -> tuple[AdapterWeights, LoraConfig]:
    """Read a PEFT LoRA adapter directory into numpy `AdapterWeights` and its `LoraConfig`."""
    root = Path(adapter_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"adapter directory {root} does not exist")
    config_path, weights_path = root / CONFIG_FILE, root / WEIGHTS_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing; a PEFT adapter needs {CONFIG_FILE}")
    if not weights_path.is_file():
        hint = ""
        if (root / "adapter_model.bin").is_file():
            hint = (
                "; only the pickled adapter_model.bin is present, re-save the adapter with "
                "safetensors (PEFT save_pretrained(safe_serialization=True))"
            )
        raise FileNotFoundError(f"{weights_path} is missing{hint}")

    try:
        config = LoraConfig.from_peft_dict(json.loads(config_path.read_text()))
    except (json.JSONDecodeError, ValueError) as e:
        raise ValueError(f"{config_path}: {e}") from e
    try:
        tensors = safetensors.numpy.load_file(str(weights_path))
    except Exception as e:  # safetensors raises its own error type for corrupt files
        raise ValueError(f"{weights_path}: not a readable safetensors file: {e}") from e
    return _from_peft_tensors(tensors, config, weights_path), config


def _to_peft_tensors(
    weights: Mapping[str, tuple[Array, Array]],
    config: LoraConfig,
) -> dict[str, np.ndarray]:
    if not weights:
        raise ValueError("cannot save an adapter with no weights")
    tensors: dict[str, np.ndarray] = {}
    for path, (a, b) in weights.items():
        _check_path(path, config, where=f"module {path!r}")
        a, b = np.asarray(a), np.asarray(b)
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != config.r or b.shape[0] != config.r:
            raise ValueError(
                f"module {path!r}: expected A [in, {config.r}] and B [{config.r}, out], "
                f"got A {list(a.shape)} and B {list(b.shape)}"
            )
        tensors[f"{_KEY_PREFIX}{path}.lora_A.weight"] = np.ascontiguousarray(a.T)
        tensors[f"{_KEY_PREFIX}{path}.lora_B.weight"] = np.ascontiguousarray(b.T)
    return tensors


def _from_peft_tensors(
    tensors: Mapping[str, np.ndarray], config: LoraConfig, source: Path
) -> AdapterWeights:
    halves: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        match = _KEY_RE.match(key)
        if match is None:
            raise ValueError(
                f"{source}: tensor {key!r} is not a LoRA weight of a decoder layer "
                f"(expected '{_KEY_PREFIX}layers.N.<self_attn|mlp>.<proj>.lora_<A|B>.weight')"
            )
        path = match["path"]
        _check_path(path, config, where=f"{source}: tensor {key!r}")
        if value.ndim != 2:
            raise ValueError(f"{source}: tensor {key!r} has shape {list(value.shape)}, not 2-D")
        halves.setdefault(path, {})[match["ab"]] = value
    if not halves:
        raise ValueError(f"{source}: holds no LoRA weights")

    weights: AdapterWeights = {}
    for path, pair in halves.items():
        for have, want in (("A", "B"), ("B", "A")):
            if want not in pair:
                raise ValueError(
                    f"{source}: tensor '{_KEY_PREFIX}{path}.lora_{have}.weight' has no matching "
                    f"'{_KEY_PREFIX}{path}.lora_{want}.weight'"
                )
        lora_a, lora_b = pair["A"], pair["B"]  # PEFT layout: [r, in] and [out, r]
        if lora_a.shape[0] != lora_b.shape[1]:
            raise ValueError(
                f"{source}: rank mismatch for {path!r}: lora_A.weight {list(lora_a.shape)} has "
                f"rank {lora_a.shape[0]}, lora_B.weight {list(lora_b.shape)} has rank "
                f"{lora_b.shape[1]}"
            )
        if lora_a.shape[0] != config.r:
            raise ValueError(
                f"{source}: {path!r} has rank {lora_a.shape[0]} but {CONFIG_FILE} says r={config.r}"
            )
        weights[path] = (np.ascontiguousarray(lora_a.T), np.ascontiguousarray(lora_b.T))
    return weights


def _check_path(path: str, config: LoraConfig, *, where: str) -> None:
    match = _PATH_RE.match(path)
    if match is None:
        raise ValueError(
            f"{where}: module path {path!r} is not of the form 'layers.N.<self_attn|mlp>.<proj>' "
            f"(HF naming without the 'model.' prefix)"
        )
    if match["name"] not in config.target_modules:
        raise ValueError(
            f"{where}: module {match['name']!r} is not in target_modules "
            f"{list(config.target_modules)}"
        )


def _check_replaceable(out: Path) -> None:
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    foreign = sorted(set(os.listdir(out)) - _REPLACEABLE)
    if foreign:
        raise FileExistsError(
            f"{out} holds files other than an adapter's ({foreign}); refusing to replace it"
        )


def _rename_over(src: Path, dst: Path) -> None:
    """Move directory `src` to `dst`, replacing an existing `dst`.

    POSIX cannot rename a directory onto a non-empty one, so an existing `dst` is first moved
    aside; a crash between the two renames leaves the old adapter intact under the aside name.
    """
    if not dst.exists():
        os.rename(src, dst)
        return
    aside = dst.with_name(f".{dst.name}.{uuid.uuid4().hex}.old")
    os.rename(dst, aside)
    os.rename(src, dst)
    shutil.rmtree(aside)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
