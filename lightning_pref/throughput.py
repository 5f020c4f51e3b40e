"""Throughput in the logs, by Lightning's ``ThroughputMonitor``: real tokens per second, and model FLOPs
utilization where the device's peak is known.

A preference batch's cost is its tokens, not its rows, and padding is not work: :class:`TokenThroughput` counts
a batch's sequences as samples and its real tokens (:attr:`~lightning_pref.types.PreferenceBatch.real_tokens`:
padding and packing filler left out, a shared prompt once) as items, so ``train/device/items_per_sec`` is real
tokens per second. The modules set ``flops_per_batch`` for each training batch from :func:`flop_parameters`
(the usual estimate: 6N per token of a forward and backward, 2N per token of a forward without gradient), which
the monitor turns into ``train/device/flops_per_sec`` and, on devices whose peak Lightning knows (CUDA GPUs, TPUs),
``train/device/mfu``. The padding fraction is logged by the modules as ``train/padding_fraction``.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import ThroughputMonitor
from torch import nn

from lightning_pref.types import PreferenceBatch


def flop_parameters(model: nn.Module) -> int:
    """``N`` of the FLOPs estimate: every parameter except the input embedding table, which is a lookup (an LM
    head tied to it is a matmul and is counted). Call it before sharding: sharded parameters are local pieces."""
    total = sum(p.numel() for p in model.parameters())
    get_input = getattr(model, "get_input_embeddings", None)
    embedding = get_input() if get_input is not None else None
    if embedding is None:
        return total
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = head is not None and getattr(head, "weight", None) is embedding.weight
    return total - (0 if tied else embedding.weight.numel())


def _samples(batch: Any) -> int:
    return batch.num_sequences if isinstance(batch, PreferenceBatch) else len(batch.index)


def _tokens(batch: Any) -> int:
    # Prompt batches (generation, on-policy steps): their prompt tokens.
    return batch.real_tokens if isinstance(batch, PreferenceBatch) else int(batch.attention_mask.sum())


class TokenThroughput(ThroughputMonitor):
    """``ThroughputMonitor`` over preference and prompt batches: samples are sequences, items real tokens.

    Args:
        window_size: batches the rates are averaged over (the first values are logged once as many have run).
        **kwargs: more ``ThroughputMonitor`` / ``Throughput`` arguments (``separator``).
    """

    def __init__(self, window_size: int = 10, **kwargs: Any) -> None:
        super().__init__(batch_size_fn=_samples, length_fn=_tokens, window_size=window_size, **kwargs)

    def _compute(self, trainer: Any, iter_num: int | None = None) -> None:
        # Lightning's monitor labels a step by the steps done (from 1); every other metric in metrics.csv by the
        # step's index (from 0): the same step, one label.
        super()._compute(trainer, iter_num - 1 if iter_num is not None else None)
