"""LoRA injection into any Flax NNX model, by target module name, for training and serving.

This module owns `LoraLinear`, the one adapter layer kind, and the functions that put it into a
model and move adapter weights in and out of it. `inject_lora` walks the module graph and wraps
every linear layer whose attribute name is a target (``q_proj``, ...) in a `LoraLinear` that keeps
the original module as ``base``: base weights stay frozen and are not copied, and the model's code
is never edited.

Each `LoraLinear` holds a bank of ``slots`` adapters: ``lora_a`` [slots, in, r] and ``lora_b``
[slots, r, out] (`nnx.LoRAParam`, so ``nnx.split(model, nnx.LoRAParam, ...)`` separates the
trainable state) and a per-slot ``scaling`` (`LoraScaling`, never trained). Training uses one slot.
Serving uses a bank whose slot 0 is "no adapter" (all zeros) and picks a slot per batch row from
``slot_ids``, which lives in one `LoraContext` shared by every layer and is set by the caller inside
its jitted function (`set_slots`). Adapters of a smaller rank than the bank's are zero-padded,
which leaves ``(x @ A) @ B`` unchanged, so adapters of different ranks share one bank.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from harli_jax.lora.config import LoraConfig
from harli_jax.lora.peft_io import AdapterWeights
from harli_jax.models.llama import Linear

LinearLike = Linear | nnx.Linear


class LoraScaling(nnx.Variable):
    """Per-slot adapter scale (alpha / r): state that is not trained."""


class LoraLayerId(nnx.Variable):
    """A LoRA layer's number, folded into its dropout keys. It is state, not a static attribute,
    so it travels with the layer's weights when the trainer relabels layers."""


class LoraBatch(nnx.Variable):
    """Per-call inputs of the LoRA layers (slot ids, dropout keys): set by the caller, not trained.

    Their stored values are placeholders; a jitted caller sets the real ones after `nnx.merge`.
    """


class LoraContext(nnx.Module):
    """The per-batch inputs that every `LoraLinear` of one injection shares by reference."""

    def __init__(self) -> None:
        # One slot id broadcasts over any batch: every row uses slot 0.
        self.slot_ids = LoraBatch(jnp.zeros((1,), jnp.int32))
        self.dropout_keys = LoraBatch(_no_dropout_keys())


def _no_dropout_keys() -> jax.Array:
    """No rows of keys: dropout is off (inference)."""
    return jnp.zeros((0, 2), jnp.uint32)


def linear_features(base: LinearLike) -> tuple[int, int]:
    """``(in_features, out_features)`` of a supported base layer."""
    if isinstance(base, Linear):
        out_features, in_features = base.weight.shape  # HF layout [out, in]
        return in_features, out_features
    if isinstance(base, nnx.Linear):
        return base.in_features, base.out_features
    raise TypeError(f"{type(base).__name__} is not a supported linear layer (Linear, nnx.Linear)")


class LoraLinear(nnx.Module):
    """``base(x) + scaling[s] * (dropout(x) @ A[s]) @ B[s]`` with ``s`` the row's slot."""

    def __init__(
        self,
        base: LinearLike,
        *,
        rank: int,
        slots: int,
        scaling: float,
        dropout: float,
        context: LoraContext,
        layer_id: int,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ) -> None:
        in_features, out_features = linear_features(base)
        self.base = base
        if slots == 1:
            # PEFT's init: kaiming_uniform(a=sqrt(5)) on A, i.e. U(+-1/sqrt(fan_in)); B = 0.
            bound = 1.0 / math.sqrt(in_features)
            a = jax.random.uniform(
                rngs.params(), (1, in_features, rank), param_dtype, -bound, bound
            )
            scale = jnp.full((1,), scaling, jnp.float32)
        else:
            # A serving bank starts empty; `load_adapter_weights` fills its slots.
            a = jnp.zeros((slots, in_features, rank), param_dtype)
            scale = jnp.zeros((slots,), jnp.float32)
        self.lora_a = nnx.LoRAParam(a)
        self.lora_b = nnx.LoRAParam(jnp.zeros((slots, rank, out_features), param_dtype))
        self.scaling = LoraScaling(scale)
        self.context = context
        self.dropout = dropout
        self.layer_id = LoraLayerId(jnp.asarray(layer_id, jnp.int32))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.base(x)
        a, b, scaling = self.lora_a[...], self.lora_b[...], self.scaling[...]
        h = self._dropout(x.astype(a.dtype))
        slots = a.shape[0]
        if slots == 1:
            delta = (h @ a[0]) @ b[0] * scaling[0]
        else:
            delta = _multi_slot(h, a, b, scaling, self.context.slot_ids[...])
        # As PEFT: add in the wider dtype, then return the base layer's dtype.
        return (y + delta).astype(y.dtype)

    def _dropout(self, x: jax.Array) -> jax.Array:
        keys = self.context.dropout_keys[...]
        if self.dropout == 0.0 or keys.shape[0] == 0:
            return x
        if keys.shape[0] != x.shape[0]:
            raise ValueError(f"{keys.shape[0]} rows of dropout keys for {x.shape[0]} rows")
        keep_prob = 1.0 - self.dropout

        # Keys are per batch row, so a row's mask does not depend on how rows are split.
        def row_mask(key: jax.Array) -> jax.Array:
            key = jax.random.fold_in(jax.random.wrap_key_data(key), self.layer_id[...])
            return jax.random.bernoulli(key, keep_prob, x.shape[1:])

        keep = jax.vmap(row_mask)(keys)
        return jnp.where(keep, x / keep_prob, 0).astype(x.dtype)


def _multi_slot(
    x: jax.Array, a: jax.Array, b: jax.Array, scaling: jax.Array, slot_ids: jax.Array
) -> jax.Array:
    """Per-row adapters: x [rows, ..., in], a [S, in, r], b [S, r, out], slot_ids [rows] or [1]."""
    rows, slots = x.shape[0], a.shape[0]
    x3 = x.reshape(rows, -1, x.shape[-1])
    slot_ids = jnp.broadcast_to(slot_ids, (rows,))
    if rows < slots:
        # Few rows (decode of a small batch): gather each row's A and B, as Punica's BGMV does.
        scale = scaling[slot_ids][:, None, None]
        y = jnp.einsum("bti,bir->btr", x3, a[slot_ids])
        y = jnp.einsum("btr,bro->bto", y * scale, b[slot_ids])
    else:
        # Many rows: a gather would copy A and B once per row; read the bank once instead and
        # keep each row's slot by a one-hot weight (S * r extra columns, small next to the base).
        weight = jax.nn.one_hot(slot_ids, slots, dtype=x.dtype) * scaling.astype(x.dtype)
        y = jnp.einsum("bti,sir->btsr", x3, a) * weight[:, None, :, None]
        y = jnp.einsum("btsr,sro->bto", y, b)
    return y.reshape(*x.shape[:-1], b.shape[-1])


def inject_lora(
    model: nnx.Module,
    config: LoraConfig,
    *,
    slots: int = 1,
    rngs: nnx.Rngs,
    param_dtype: jnp.dtype = jnp.float32,
) -> nnx.Module:
    """Wraps every linear layer named in ``config.target_modules`` in a `LoraLinear`, in place.

    ``slots == 1`` makes a trainable adapter initialised as PEFT does, with ``config.scaling``;
    ``slots > 1`` makes an empty serving bank of rank ``config.r``. Adapter weights are kept in
    ``param_dtype`` (float32 by default, as PEFT keeps them for bf16 models). Raises ValueError if
    the model already has LoRA layers or no module matches.
    """
    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    if lora_layers(model):
        raise ValueError(
            "the model already has LoRA layers; inject into a fresh view of the base model "
            "instead (nnx.merge(*nnx.split(base)) shares its weights without copying)"
        )
    found = [
        (path, node)
        for path, node in nnx.iter_graph(model)
        if path and path[-1] in config.target_modules and isinstance(node, nnx.Module)
    ]
    if not found:
        modules = [_dotted(p) for p, node in nnx.iter_graph(model) if _is_linear(node) and p]
        raise ValueError(
            f"no module matched target_modules {list(config.target_modules)}; "
            f"the model's linear layers include {modules[:6] or 'none'}"
        )
    context = LoraContext()
    for index, (path, node) in enumerate(found):
        if not _is_linear(node):
            raise ValueError(
                f"{_dotted(path)} is a {type(node).__name__}; LoRA targets must be Linear or "
                "nnx.Linear layers"
            )
        lora = LoraLinear(
            node,
            rank=config.r,
            slots=slots,
            scaling=config.scaling,
            dropout=config.dropout,
            context=context,
            layer_id=index,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        _set_child(_node_at(model, path[:-1]), path[-1], lora)
    return model


def lora_layers(model: nnx.Module) -> dict[str, LoraLinear]:
    """The model's LoRA layers by dotted module path (``"layers.3.self_attn.q_proj"``)."""
    return {
        _dotted(path): node for path, node in nnx.iter_graph(model) if isinstance(node, LoraLinear)
    }


def set_slots(model: nnx.Module, slot_ids: jax.Array) -> None:
    """Selects the adapter slot of each batch row ([rows] int) for the model's next calls.

    Call it inside the jitted function, on the model `nnx.merge` built there (a merge made outside
    a `jax.grad` cannot be mutated inside it: merge there, or with ``copy=True``)."""
    for context in _contexts(model):
        context.slot_ids.set_value(jnp.asarray(slot_ids, jnp.int32))


def set_dropout_keys(model: nnx.Module, keys: jax.Array | None) -> None:
    """Turns LoRA dropout on with one raw PRNG key per batch row ([rows, key_size] uint32, as
    `jax.random.key_data` gives), or off with None."""
    for context in _contexts(model):
        context.dropout_keys.set_value(_no_dropout_keys() if keys is None else keys)


def adapter_weights(model: nnx.Module, slot: int = 0) -> AdapterWeights:
    """One slot's adapter in the `peft_io` format: ``{path: (A [in, r], B [r, out])}``, at the
    bank's rank (an adapter loaded with a smaller one comes back zero-padded), as host copies.
    The banks come to the host whole and are sliced there: a slice on the device compiles a
    program per shape, 60 ms of a finished job's hand-off on a 2-core CPU."""
    layers = _checked_layers(model, slot)
    banks = jax.device_get({path: (m.lora_a[...], m.lora_b[...]) for path, m in layers.items()})
    return {path: (a[slot], b[slot]) for path, (a, b) in banks.items()}


def load_adapter_weights(
    model: nnx.Module, weights: AdapterWeights, config: LoraConfig, slot: int
) -> None:
    """Writes an adapter (A, B and ``config.scaling``) into ``slot`` of every LoRA layer.

    Layers the adapter does not cover get zeros in that slot. An adapter of rank below the bank's
    is zero-padded; a larger rank, a path the model has no LoRA layer at, or a shape that does not
    match the layer raises ValueError.
    """
    layers = _checked_layers(model, slot)
    if slot == 0 and _num_slots(layers) > 1:
        raise ValueError("slot 0 of a serving bank is reserved for 'no adapter'")
    unknown = sorted(set(weights) - set(layers))
    if unknown:
        raise ValueError(
            f"adapter modules {unknown[:4]} have no LoRA layer in the model; "
            f"it has {sorted(layers)[:4]}..."
        )
    padded = {path: _padded(path, layers[path], *weights[path], config) for path in weights}
    _write_slot(layers, slot, padded, config.scaling)


def clear_slot(model: nnx.Module, slot: int) -> None:
    """Zeroes ``slot`` (A, B and its scaling) in every LoRA layer."""
    _write_slot(_checked_layers(model, slot), slot, {}, 0.0)


def _padded(path: str, layer: LoraLinear, a, b, config: LoraConfig) -> tuple[np.ndarray, ...]:
    """``a`` and ``b`` checked against ``layer`` and zero-padded to its bank's rank, on the host
    (on the device each shape would compile a program of its own)."""
    a, b = np.asarray(a), np.asarray(b)
    _, in_features, bank_rank = layer.lora_a.shape
    out_features = layer.lora_b.shape[-1]
    if (
        a.ndim != 2
        or b.ndim != 2
        or a.shape[0] != in_features
        or b.shape[1] != out_features
        or a.shape[1] != b.shape[0]
    ):
        raise ValueError(
            f"{path}: expected A [{in_features}, r] and B [r, {out_features}], got A "
            f"{list(a.shape)} and B {list(b.shape)}"
        )
    rank = a.shape[1]
    if rank != config.r:
        raise ValueError(f"{path}: the weights have rank {rank} but the config says r={config.r}")
    if rank > bank_rank:
        raise ValueError(f"{path}: adapter rank {rank} exceeds the bank's rank {bank_rank}")
    pad = bank_rank - rank
    return np.pad(a, ((0, 0), (0, pad))), np.pad(b, ((0, pad), (0, 0)))


def _write_slot(
    layers: dict[str, LoraLinear],
    slot: int,
    padded: dict[str, tuple[np.ndarray, ...]],
    scaling: float,
) -> None:
    """Writes ``slot`` of every layer's bank (``padded``'s A and B and ``scaling`` where it has
    the layer, zeros elsewhere) in one program, the banks donated: one dispatch, and one
    program per bank whatever the slot or the adapter's rank, where writing each layer's arrays
    on their own dispatched three programs a layer and compiled some on first use (on the
    engine loop's thread, while it served)."""
    banks, rows = {}, {}
    for path, layer in layers.items():
        a_bank, b_bank = layer.lora_a[...], layer.lora_b[...]
        banks[path] = (a_bank, b_bank, layer.scaling[...])
        if path in padded:
            (a, b), scale = padded[path], scaling
        else:
            a, b, scale = np.zeros(a_bank.shape[1:]), np.zeros(b_bank.shape[1:]), 0.0
        rows[path] = (a.astype(a_bank.dtype), b.astype(b_bank.dtype), np.float32(scale))
    for path, (a_bank, b_bank, scales) in _set_rows(banks, rows, np.int32(slot)).items():
        layer = layers[path]  # set_value: the old (donated) arrays cannot be read again
        layer.lora_a.set_value(a_bank)
        layer.lora_b.set_value(b_bank)
        layer.scaling.set_value(scales)


@functools.partial(jax.jit, donate_argnums=0)
def _set_rows(banks: dict, rows: dict, slot: jax.Array) -> dict:
    """Each bank array with row ``slot`` replaced by its entry of ``rows``."""
    return jax.tree.map(lambda bank, row: bank.at[slot].set(row), banks, rows)


def _checked_layers(model: nnx.Module, slot: int) -> dict[str, LoraLinear]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers; call inject_lora first")
    slots = _num_slots(layers)
    if not 0 <= slot < slots:
        raise ValueError(f"slot {slot} is out of range for a bank of {slots} slots")
    return layers


def _num_slots(layers: dict[str, LoraLinear]) -> int:
    return next(iter(layers.values())).lora_a.shape[0]


def _contexts(model: nnx.Module) -> list[LoraContext]:
    unique = {id(m.context): m.context for m in lora_layers(model).values()}
    if not unique:
        raise ValueError("the model has no LoRA layers; call inject_lora first")
    return list(unique.values())


def _is_linear(node: object) -> bool:
    return isinstance(node, (Linear, nnx.Linear))


def _dotted(path: tuple) -> str:
    return ".".join(str(part) for part in path)


def _node_at(root: object, path: tuple) -> object:
    node = root
    for part in path:
        node = node[part] if isinstance(part, int) else getattr(node, part)
    return node


def _set_child(parent: object, name: str | int, child: nnx.Module) -> None:
    if isinstance(name, int):
        parent[name] = child
    else:
        setattr(parent, name, child)
