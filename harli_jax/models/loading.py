"""Loading a HF checkpoint directory into the NNX decoder.

Owns the file discovery (``model.safetensors`` or a sharded ``model.safetensors.index.json``),
the HF-name <-> module-path mapping, and the checks that name the file and tensor at fault. The
model is built abstractly (``nnx.eval_shape``) and each tensor goes straight from its file to the
device in the target dtype (and sharding), so host memory never holds the whole model.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from safetensors import safe_open

from harli_jax.models.config import CheckpointError, ModelConfig
from harli_jax.models.llama import Llama

ParamPath = tuple[str | int, ...]


def hf_name(path: ParamPath) -> str:
    """``('layers', 3, 'self_attn', 'q_proj', 'weight')`` -> ``model.layers.3.self_attn...``."""
    if path == ("embed_tokens",):
        return "model.embed_tokens.weight"
    if path[0] == "lm_head":
        return "lm_head.weight"
    return "model." + ".".join(str(part) for part in path)


def weight_files(checkpoint_dir: Path) -> dict[str, Path]:
    """Maps every tensor name to the safetensors file that holds it."""
    index = checkpoint_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{index}: not a safetensors index ({err})") from None
        for shard in set(weight_map.values()):
            if not (checkpoint_dir / shard).is_file():
                raise CheckpointError(
                    f"{checkpoint_dir / shard}: listed in {index.name}, not found"
                )
        return {name: checkpoint_dir / shard for name, shard in weight_map.items()}
    single = checkpoint_dir / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(
            f"{checkpoint_dir}: no model.safetensors or model.safetensors.index.json "
            "(only safetensors checkpoints are supported)"
        )
    with safe_open(single, framework="flax") as f:
        return dict.fromkeys(f.keys(), single)


def from_pretrained(
    checkpoint_dir: str | Path,
    dtype: jnp.dtype = jnp.bfloat16,
    sharding_for: Callable[[ParamPath], jax.sharding.Sharding] | None = None,
) -> Llama:
    """Builds the decoder from a HF checkpoint; ``sharding_for`` places each parameter."""
    checkpoint_dir = Path(checkpoint_dir)
    config = ModelConfig.from_dir(checkpoint_dir)
    abstract = nnx.eval_shape(lambda: Llama(config, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    files = weight_files(checkpoint_dir)
    handles: dict[Path, object] = {}

    def load(key_path, expected: jax.ShapeDtypeStruct) -> jax.Array:
        path = tuple(getattr(key, "key", key) for key in key_path)
        name = hf_name(path)
        if name not in files:
            where = files and next(iter(set(files.values())))
            raise CheckpointError(f"{where}: tensor {name!r} is missing")
        file = files[name]
        if file not in handles:
            handles[file] = safe_open(file, framework="flax")
        shape = tuple(handles[file].get_slice(name).get_shape())
        if shape != expected.shape:
            raise CheckpointError(
                f"{file}: tensor {name!r} has shape {shape}, config.json implies {expected.shape}"
            )
        array = handles[file].get_tensor(name).astype(dtype)
        return jax.device_put(array, sharding_for(path)) if sharding_for else array

    loaded = jax.tree_util.tree_map_with_path(load, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, loaded)
    return nnx.merge(graphdef, state)
