"""The serving model's adapter bank: which LoRA adapter sits in which slot.

Serving keeps one LoRA bank over every linear layer (`inject_lora` with ``slots = capacity + 1``;
slot 0 stays zero and means "no adapter"), so requests for different adapters share one decode
batch and adding or replacing an adapter is a write into the bank's arrays: same shapes, no
recompilation, the base weights untouched. Adapters of a rank below the bank's are zero-padded.
A deleted adapter's slot is cleared only once the requests that asked for it have finished, so a
deletion never changes a stream already decoding.
"""

from __future__ import annotations

from flax import nnx

from harli_jax.lora.config import ALL_LINEAR, LoraConfig
from harli_jax.lora.inject import clear_slot, inject_lora, load_adapter_weights
from harli_jax.lora.peft_io import AdapterWeights


class AdapterBank:
    def __init__(self, capacity: int, max_rank: int):
        if capacity < 1 or max_rank < 1:
            raise ValueError(f"need capacity >= 1 and max_rank >= 1, got {capacity}, {max_rank}")
        self.capacity = capacity
        self.max_rank = max_rank
        self._slots: dict[str, int] = {}
        # Slots of deleted adapters that requests which asked for them still decode with: each
        # is cleared, and free again, once none is left (`clear_retired`).
        self.retiring: set[int] = set()

    def inject(self, base: nnx.Module) -> nnx.Module:
        """A serving view of ``base`` (sharing its weights) with an empty bank in every linear."""
        model = nnx.merge(*nnx.split(base))
        config = LoraConfig(r=self.max_rank, alpha=self.max_rank, target_modules=ALL_LINEAR)
        dtype = base.embed_tokens[...].dtype
        return inject_lora(
            model, config, slots=self.capacity + 1, rngs=nnx.Rngs(0), param_dtype=dtype
        )

    def names(self) -> list[str]:
        return list(self._slots)

    def slot(self, name: str | None) -> int:
        """The slot of adapter ``name`` (0 for None); KeyError naming it if it is not loaded."""
        if name is None:
            return 0
        if name not in self._slots:
            raise KeyError(f"adapter {name!r} is not loaded (loaded: {self.names() or 'none'})")
        return self._slots[name]

    def load(
        self, model: nnx.Module, name: str, weights: AdapterWeights, config: LoraConfig
    ) -> None:
        """Writes the adapter into ``model``'s bank: into its own slot if ``name`` is loaded
        (replacing it), else into a free one; ValueError when the bank is full."""
        if config.r > self.max_rank:
            raise ValueError(
                f"adapter {name!r} has rank {config.r}; the bank holds <= {self.max_rank}"
            )
        slot = self._slots.get(name)
        if slot is None:
            free = self._free()
            if not free:
                raise ValueError(f"all {self.capacity} adapter slots are in use")
            slot = free[0]
        load_adapter_weights(model, weights, config, slot)
        self._slots[name] = slot

    def retire(self, name: str) -> None:
        """Stops adapter ``name`` being asked for (KeyError naming it if it is not loaded); its
        slot keeps its weights for the requests that asked for it until `clear_retired`."""
        self.retiring.add(self._slots.pop(name))

    def clear_retired(self, model: nnx.Module, in_use: set[int]) -> None:
        """Zeroes and frees every retiring slot that no request uses (``in_use``) any more."""
        for slot in sorted(self.retiring - in_use):
            clear_slot(model, slot)
            self.retiring.discard(slot)

    def compile(self, model: nnx.Module) -> None:
        """Compiles the program that writes a slot, by clearing a free one (already zero), so
        that the first adapter loaded while serving (a finished fine-tune job's) compiles
        nothing on the engine loop. With no slot free, one was written already."""
        free = self._free()
        if free:
            clear_slot(model, free[0])

    def _free(self) -> list[int]:
        """The slots neither loaded nor retiring, lowest first."""
        taken = set(self._slots.values()) | self.retiring
        return sorted(set(range(1, self.capacity + 1)) - taken)
