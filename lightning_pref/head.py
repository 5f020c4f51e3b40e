"""Log-probs of target tokens under the LM head, chunked, without a full-vocabulary ``log_softmax``.

``log p(y) = s[y] - logsumexp(s)`` with ``s = T(z)``, ``z = W h + b`` the head's logits and ``T`` the model's own
post-processing of them (:class:`LogitTransform`: logit scaling as in Cohere or Granite, final soft-capping as
in Gemma 2) and a sampling temperature, applied inside the head so that such models keep the response-only
head. The entropy of each position's distribution, ``H = logsumexp(s) - sum_j softmax(s)_j s_j``, comes out of the
same pass on request (a metric: no gradient flows through it).

For a plain ``nn.Linear`` head a chunk of ``C`` rows keeps only its ``logsumexp`` (``C`` values) for backward.
Its logits exist one tile of vocabulary columns at a time (at most ``2**20`` values, 4 MB of fp32, a power of two
of columns), in the matmul's dtype: forward keeps a running maximum and sum of exponentials per row (the online
``logsumexp``), backward recomputes each tile, turns it into its gradient in place and writes that tile's rows of
the weight's gradient. The fp32 work (``T``, ``exp``, the softmax gradient) runs on the tile: a view under fp32,
a tile-sized copy under bf16, never an fp32 copy of the chunk. On SmolLM2's head (193 rows, 49k vocabulary) on
this project's CPU, tiles of 4096 columns ran the logits' matmul at 90 GFLOP/s where the whole chunk's ran at
66-72: the head's forward 162 to 140 ms. The default chunk holds at most ``2**23`` logits' worth of rows but at
least 256 rows: 1048 rows at an 8k vocabulary, 256 at 128k.

Backward takes the chunks last first, and the last chunks' tiles are still there: those within ``2**24`` logits
keep their exponentials ``exp(s - m)`` (with each tile's running maximum ``m``) from forward, so backward turns
them into the gradient without recomputing the logits: one head-sized matmul less (0.40 to 0.33 s for the head's
forward and backward on SmolLM2's 193 rows). The head's backward, the first that runs, frees them, before the
decoder layers' gradients exist. Soft-capped logits recompute: their derivative needs the logits themselves.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

# Logits per chunk by default: 32 MB of fp32 is a small transient on a GPU, and on a CPU it stays within
# glibc's largest heap allocation, so a chunk's buffer is reused instead of being mapped (page-faulted) anew
# (measured: faster than 128 MB chunks at an 8k vocabulary). At very large vocabularies fewer, larger chunks
# had the lower peak (128k: 256 rows 1,104 MB vs 65 rows 1,523 MB at batch 8; benchmarks/memory.py), hence
# the 256-row minimum.
_CHUNK_LOGITS = 2**23
_MIN_CHUNK_ROWS = 256
# Logits per tile of vocabulary columns (4 MB of fp32): see _LinearLogps.
_TILE_LOGITS = 2**20
# Logits whose fp32 exponentials the last chunks keep from forward to backward (64 MB), so that backward does
# not recompute them: one matmul the size of the head's forward saved (SmolLM2 on short HH rows: 193 rows, 9.5M
# logits, ~2% of a DPO step). The head's backward, the first that runs, frees them.
_KEEP_LOGITS = 2**24


def default_chunk_size(vocab_size: int) -> int:
    """Rows per LM-head chunk: as many as keep a chunk's fp32 logits within ``2**23`` values (32 MB), at
    least 256 and at most 4096."""
    return max(_MIN_CHUNK_ROWS, min(4096, _CHUNK_LOGITS // vocab_size))


@dataclass(frozen=True)
class LogitTransform:
    r"""A model's post-processing of its LM-head logits, and a sampling temperature :math:`\tau` on top:
    :math:`s = c \tanh(a z / c) / \tau`, or :math:`s = a z / \tau` without soft-capping (``generate`` divides
    the model's own logits by the temperature, so a training forward that scores sampled tokens must too).

    Attributes:
        scale: :math:`a`, the product of the config's multipliers (``logit_scale``, ``output_multiplier``) and
            the inverse of its divisors (``logits_scaling``).
        softcap: :math:`c`, the config's ``final_logit_softcapping`` (``None``: no soft-capping).
        temperature: :math:`\tau > 0`.
    """

    scale: float = 1.0
    softcap: float | None = None
    temperature: float = 1.0

    @classmethod
    def from_config(cls, config: Any) -> LogitTransform:
        """Read the known post-processing fields of a ``transformers`` config (its text config for multimodal
        models). Anything else an architecture does is caught by the scorer's self-check."""
        if config is None:
            return cls()
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        scale = 1.0
        for name in ("logit_scale", "output_multiplier"):
            value = getattr(text, name, None)
            if isinstance(value, int | float) and not isinstance(value, bool):
                scale *= value
        divisor = getattr(text, "logits_scaling", None)
        if isinstance(divisor, int | float) and divisor:
            scale /= divisor
        softcap = getattr(text, "final_logit_softcapping", None)
        return cls(float(scale), float(softcap) if softcap else None)

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None and self.temperature == 1.0

    def at_temperature(self, temperature: float) -> LogitTransform:
        """This transform, then divided by ``temperature``."""
        return replace(self, temperature=temperature)

    @property
    def factor(self) -> float:
        """Without soft-capping, ``T(z) = factor * z``."""
        return self.scale / self.temperature

    def apply_(self, z: Tensor) -> Tensor:
        """``T(z)`` in place (``z`` fp32)."""
        if self.softcap is None:
            return z.mul_(self.factor) if self.factor != 1.0 else z
        return z.mul_(self.scale / self.softcap).tanh_().mul_(self.softcap / self.temperature)

    def __call__(self, z: Tensor) -> Tensor:
        return self.apply_(z.float().clone()) if not self.identity else z.float()


IDENTITY = LogitTransform()


def token_logps(
    hidden: Tensor, head: nn.Module, targets: Tensor, chunk_size: int = 1024, transform: LogitTransform = IDENTITY,
    entropy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Log-probs of ``targets`` under ``T(head(hidden))``, computed ``chunk_size`` rows at a time.

    Args:
        hidden: hidden states at the positions that predict ``targets``. # (R, H)
        head: the LM head (``hidden -> logits``).
        targets: token ids to score. # (R,)
        chunk_size: rows per chunk; bounds the transient ``(chunk_size, V)`` logits.
        transform: the model's post-processing of the head's logits (and a temperature).
        entropy: also return each row's entropy (detached).

    Returns:
        ``log softmax(T(head(hidden)))[targets]``, and the entropies with ``entropy``. # (R,), (R,)
    """
    out, entropies = [], []
    linear = type(head) is nn.Linear  # quantized or adapter-wrapped heads go through their own forward
    chunks = hidden.split(chunk_size)
    # Soft-capping's derivative needs the logits themselves: those chunks recompute.
    kept = (chunks_kept([len(h) for h in chunks], head.weight.shape[0])
            if linear and transform.softcap is None and torch.is_grad_enabled()
            and (hidden.requires_grad or any(p.requires_grad for p in head.parameters())) else [False] * len(chunks))
    for h, y, keep in zip(chunks, targets.split(chunk_size), kept, strict=True):
        if linear:
            logp, ent = _LinearLogps.apply(h, head.weight, head.bias, y, transform, entropy, keep)
        elif torch.is_grad_enabled() and h.requires_grad:
            # Recompute each chunk's logits in backward rather than keeping all (R, V) activations alive.
            logp = checkpoint(_chunk_logps, head, h, y, transform, use_reentrant=False)
            ent = _chunk_entropy(head, h, transform) if entropy else None
        else:
            logp = _chunk_logps(head, h, y, transform)
            ent = _chunk_entropy(head, h, transform) if entropy else None
        out.append(logp)
        entropies.append(ent)
    logps = torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)
    if not entropy:
        return logps
    return logps, torch.cat(entropies) if entropies else hidden.new_zeros(0, dtype=torch.float32)


def chunks_kept(rows: list[int], vocab: int) -> list[bool]:
    """For chunks of these many rows each, whether the fused head keeps a chunk's exponentials from forward for
    backward: the trailing chunks whose logits fit within ``_KEEP_LOGITS`` together (backward takes the chunks
    last first, so theirs are the tiles still there when it starts)."""
    keep_from = sum(rows) - _KEEP_LOGITS // max(1, vocab)
    starts = list(itertools.accumulate(rows, initial=0))[:-1]
    return [start >= keep_from for start in starts]


@contextlib.contextmanager
def sparse_tied_embedding_grad(lm: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Within: ``lm``'s input embedding takes its gradient as sparse rows, where it shares its weight ``W`` with
    a plain linear LM head (tied embeddings) and gradients are on.

    The head's gradient of ``W`` is dense (every vocabulary row gets one); the embedding's, left dense, is a
    ``(V, H)`` matrix of zeros but for the batch's tokens' rows, which autograd then adds to the head's. As sparse
    rows it adds only those rows: the parameter's gradient is the same dense tensor, without a second ``(V, H)``
    one filled and added every step (SmolLM2: 113 MB, 1% of a DPO step on short HH rows). The caller enables it
    only for a pass whose head scores some tokens with gradient: without the head's, the parameter's gradient
    would stay sparse, which optimizers such as AdamW refuse. # W: (V, H)
    """
    embedding, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    if not (enabled and torch.is_grad_enabled() and type(head) is nn.Linear and isinstance(embedding, nn.Embedding)
            and embedding.weight is head.weight and embedding.weight.requires_grad and not embedding.sparse):
        yield
        return
    embedding.sparse = True  # set around the pass only: DDP reads it when it wraps the model, to bucket gradients
    try:
        yield
    finally:
        embedding.sparse = False


def _chunk_logps(head: nn.Module, h: Tensor, y: Tensor, transform: LogitTransform) -> Tensor:
    logits = transform(head(h))  # (C, V) fp32 for a stable logsumexp
    return logits.gather(-1, y[:, None]).squeeze(-1) - logits.logsumexp(-1)


@torch.no_grad()
def _chunk_entropy(head: nn.Module, h: Tensor, transform: LogitTransform) -> Tensor:
    return entropy_of(transform(head(h)))


def entropy_of(logits: Tensor) -> Tensor:
    """Entropy of each row's softmax, ``logsumexp(s) - sum_j softmax(s)_j s_j``. # (R, V) -> (R,)"""
    s = logits.float()
    return s.logsumexp(-1) - (s.softmax(-1) * s).sum(-1)


def logits_logps(logits: Tensor, targets: Tensor, chunk_size: int = 1024, temperature: float = 1.0,
                 entropy: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Same as :func:`token_logps` for logits already computed (and post-processed) by the model, divided by
    ``temperature``. # (R, V) -> (R,)"""
    out, entropies = [], []
    for z, y in zip(logits.split(chunk_size), targets.split(chunk_size), strict=True):
        s = z.float() / temperature if temperature != 1.0 else z.float()
        out.append(s.gather(-1, y[:, None]).squeeze(-1) - s.logsumexp(-1))
        if entropy:
            entropies.append(entropy_of(s.detach()))
    logps = torch.cat(out) if out else logits.new_zeros(0, dtype=torch.float32)
    if not entropy:
        return logps
    return logps, torch.cat(entropies) if entropies else logits.new_zeros(0, dtype=torch.float32)


def sum_rows(per_token: Tensor, mask: Tensor) -> Tensor:
    """Sum the values of the ``True`` cells of ``mask`` (row-major order) per row. # (R,), (N, L) -> (N,)"""
    rows = mask.nonzero()[:, 0]  # (R,) row of each value
    return per_token.new_zeros(mask.shape[0]).index_add(0, rows, per_token)


def _tiles(rows: int, vocab: int) -> list[slice]:
    """Vocabulary columns of each logits tile of a chunk of ``rows`` rows: a power of two, at most
    ``_TILE_LOGITS`` values a tile (a CPU's matmul of 193 rows ran 20% slower on tiles of 5433 columns than of
    4096)."""
    columns = 1 << max(0, (_TILE_LOGITS // max(1, rows)).bit_length() - 1)
    return [slice(c, min(c + columns, vocab)) for c in range(0, vocab, columns)]


def _tile(weight: Tensor, bias: Tensor | None, columns: slice) -> tuple[Tensor, Tensor | None]:
    return weight[columns], bias[columns] if bias is not None else None


def _in_tile(y: Tensor, columns: slice, width: int) -> tuple[Tensor, Tensor]:
    """Which rows' targets lie in the tile of ``columns``, and each row's target column within it (clamped into
    the tile where it lies outside, so the caller can gather or scatter for every row). # (C,) -> (C,), (C,)"""
    return (y >= columns.start) & (y < columns.stop), (y - columns.start).clamp_(0, width - 1)


class _LinearLogps(torch.autograd.Function):
    """``log softmax(T(h W^T + b))[y]`` for one chunk, saving ``logsumexp`` (``C`` values) instead of logits
    (with ``keep``: also each tile's exponentials, which backward then uses instead of recomputing the tile).

    The logits exist one tile of vocabulary columns at a time (:func:`_tiles`): forward keeps a running maximum
    and sum of exponentials per row (the online ``logsumexp``) and picks each target's logit in the tile that
    holds it. With ``s = T(z)``: ``d log p_i / d z_ij = (1[j = y_i] - softmax(s)_ij) T'(z_ij)`` and
    ``softmax(s)_ij = exp(s_ij - logsumexp_i)``: backward recomputes each tile (one matmul), overwrites it with
    its gradient, adds its part of the hidden states' gradient and writes its rows of the weight's. The caller's
    autocast state is replayed in backward, so the recomputed logits and the gradient matmuls use the forward's
    dtype.
    """

    @staticmethod
    def forward(ctx: Any, h: Tensor, weight: Tensor, bias: Tensor | None, y: Tensor,
                transform: LogitTransform, entropy: bool = False, keep: bool = False) -> tuple[Tensor, Tensor]:
        device = h.device.type
        ctx.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        ctx.transform = transform
        rows = h.shape[0]
        kept: list[Tensor] = []  # with keep: each tile's exp(s - m_t) and its running maximum m_t
        picked = h.new_zeros(rows, dtype=torch.float32)  # (C,)
        top = torch.full_like(picked, -torch.inf)  # (C,) running maximum of s
        total = torch.zeros_like(picked)  # (C,) running sum of exp(s - top)
        weighted = torch.zeros_like(picked) if entropy else None  # (C,) running sum of exp(s - top) s
        for columns in _tiles(rows, weight.shape[0]):
            z = F.linear(h, *_tile(weight, bias, columns))  # (C, c) in the compute dtype
            ctx.compute_dtype = z.dtype
            s = transform.apply_(z.float())  # (C, c) fp32
            inside, at = _in_tile(y, columns, s.shape[1])
            picked = torch.where(inside, s.gather(-1, at[:, None]).squeeze(-1), picked)
            new_top = torch.maximum(top, s.amax(-1))
            rescale = (top - new_top).exp_()  # 0 on the first tile (top = -inf)
            e = (s - new_top[:, None]).exp_() if entropy else s.sub_(new_top[:, None]).exp_()
            total = total.mul_(rescale).add_(e.sum(-1))
            if weighted is not None:  # H = lse - sum(e s) / sum e
                weighted = weighted.mul_(rescale).add_((e * s).sum(-1))
            top = new_top
            if keep:
                kept += [e, top]
        lse = total.log() + top  # (C,)
        entropies = lse - weighted / total if weighted is not None else picked.new_zeros(0)  # (C,) or empty
        ctx.save_for_backward(h, weight, bias, y, lse, *kept)
        ctx.mark_non_differentiable(entropies)
        return picked - lse, entropies

    @staticmethod
    def backward(ctx: Any, grad: Tensor, _entropy_grad: Tensor | None = None) -> tuple[Tensor | None, ...]:
        h, weight, bias, y, lse, *kept = ctx.saved_tensors
        device, dtype, enabled = ctx.autocast
        transform: LogitTransform = ctx.transform
        g = grad.float()[:, None]  # (C, 1)
        grad_h = torch.zeros(h.shape, dtype=torch.float32, device=h.device) if ctx.needs_input_grad[0] else None
        grad_w = torch.empty_like(weight) if ctx.needs_input_grad[1] else None  # (V, H) every row written below
        grad_b = torch.empty_like(bias) if bias is not None and ctx.needs_input_grad[2] else None
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            for i, columns in enumerate(_tiles(h.shape[0], weight.shape[0])):
                w, b = _tile(weight, bias, columns)
                ds = None
                if kept:  # softmax = exp(s - m_t) exp(m_t - lse), from the forward's tile: no recompute
                    e, top = kept[2 * i], kept[2 * i + 1]
                    dz = e * (top - lse).exp_().mul_(-g[:, 0])[:, None]  # -g * softmax (e stays as saved)
                else:
                    z = F.linear(h, w, b)  # (C, c) in the forward's compute dtype; becomes the gradient
                    block = z.float()  # z itself under fp32, else a tile-sized fp32 copy
                    if transform.softcap is None:
                        s = block.mul_(transform.factor) if transform.factor != 1.0 else block
                    else:  # s = c tanh(a z / c) / tau; ds/dz = a (1 - tanh^2) / tau
                        t = block.mul_(transform.scale / transform.softcap).tanh_()
                        s = t * (transform.softcap / transform.temperature)  # a second tile-sized buffer: t is kept
                        ds = t.square_().neg_().add_(1).mul_(transform.factor)
                    dz = s.sub_(lse[:, None]).exp_().mul_(-g)  # -g * softmax
                inside, at = _in_tile(y, columns, dz.shape[1])
                dz.scatter_add_(-1, at[:, None], torch.where(inside[:, None], g, 0.0))  # + g at the target
                if ds is not None:
                    dz.mul_(ds)
                elif transform.factor != 1.0:
                    dz.mul_(transform.factor)
                dz = dz.to(ctx.compute_dtype)  # back into the compute dtype (no copy under fp32)
                if grad_h is not None:
                    if w.dtype == dz.dtype == torch.float32:
                        grad_h.addmm_(dz, w)
                    else:
                        grad_h += dz @ w.to(dz.dtype)
                if grad_w is not None:
                    if h.dtype == dz.dtype == grad_w.dtype:  # straight into the tile's rows (contiguous)
                        torch.mm(dz.T, h, out=grad_w[columns])
                    else:
                        grad_w[columns] = dz.T @ h.to(dz.dtype)
                if grad_b is not None:
                    grad_b[columns] = dz.sum(0)
        return grad_h.to(h.dtype) if grad_h is not None else None, grad_w, grad_b, None, None, None, None
