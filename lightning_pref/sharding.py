"""Sharding the policy and the reference: FSDP2 (``fully_shard``) and FSDP1 wrapping policies.

Decoder layers are found automatically: every ``transformers`` model lists its decoder-layer classes in
``_no_split_modules``. The policy and the frozen reference are sharded in units of their own, so a unit never
mixes trainable and frozen parameters (FSDP1 flattens each unit's parameters into one tensor, which needs a
uniform ``requires_grad``).
"""

from __future__ import annotations

from torch import nn

from lightning_pref.logps import SequenceScorer


def decoder_layer_names(model: nn.Module) -> set[str]:
    """Class names of the decoder layers of every ``transformers`` model inside ``model``."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return names


def fsdp_mesh(mesh):
    """The mesh to shard over, from ``ModelParallelStrategy``'s (data_parallel, tensor_parallel) mesh.

    No tensor parallelism is applied, so a ``(world, 1)`` mesh means plain FSDP over all ranks, and any other
    shape, e.g. the ``auto``/``auto`` default of ``(nodes, devices per node)``, means HSDP: each model is sharded
    within the second dimension (a node) and replicated along the first.
    """
    return mesh["data_parallel"] if mesh["tensor_parallel"].size() == 1 else mesh


def apply_fsdp2(scorers: list[SequenceScorer], mesh) -> None:
    """``fully_shard`` each decoder layer, then each scorer as the unit holding the rest (embeddings, head)."""
    from torch.distributed.fsdp import fully_shard

    for scorer in scorers:
        layers = decoder_layer_names(scorer)
        for module in scorer.modules():
            if type(module).__name__ in layers:
                fully_shard(module, mesh=mesh)
        fully_shard(scorer, mesh=mesh)


class DecoderLayerWrapPolicy:
    """FSDP1 ``auto_wrap_policy``: wrap every decoder layer and every :class:`SequenceScorer`.

    Usable from YAML: ``auto_wrap_policy: {class_path: lightning_pref.sharding.DecoderLayerWrapPolicy}``.
    With the scorers wrapped, the policy's and the reference's embeddings and heads land in separate units.

    Args:
        trainable_only: for ``activation_checkpointing_policy``: the policy's decoder layers only. Not the
            frozen reference's (it keeps no activations for backward, so recomputing them saves nothing), and
            not the scorers (a checkpointed scorer would nest checkpointing and run the whole policy forward
            once more in backward).
    """

    def __init__(self, trainable_only: bool = False) -> None:
        self.trainable_only = trainable_only
        self.layer_names: set[str] = set()

    def __call__(self, module: nn.Module, recurse: bool, nonwrapped_numel: int = 0) -> bool:
        if recurse:
            # FSDP asks about a parent (recurse=True) before deciding on its children, so a model's decoder-layer
            # names are known by the time its layers come up.
            self.layer_names.update(getattr(module, "_no_split_modules", None) or ())
            return True
        layer = type(module).__name__ in self.layer_names
        if self.trainable_only:
            return layer and any(p.requires_grad for p in module.parameters())
        return layer or isinstance(module, SequenceScorer)
