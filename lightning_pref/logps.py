"""Per-sequence log-probabilities of response tokens, without a full-vocabulary ``log_softmax``.

``log p(y_t) = z[y_t] - logsumexp(z)`` for the logits ``z`` at each *response* position only: the transformer
body runs on every token, but the LM head (the ``(T, V)`` matmul that dominates memory at large vocabularies)
is applied to response positions in chunks of ``chunk_size`` tokens. For a plain ``nn.Linear`` head, a chunk
keeps only its ``logsumexp`` for backward, which recomputes the logits and writes the gradient in place of
them, so peak memory does not scale with ``B * T * V`` and no ``(C, V)`` temporary is allocated beyond the
logits themselves. The default chunk holds at most ``2**23`` fp32 logits (32 MB) but at least 256 rows: 1048
rows at an 8k vocabulary, 256 at 128k.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers.cache_utils import DynamicCache, DynamicLayer

from lightning_pref.types import KLRows

# Config attributes of models whose logits are post-processed after the LM head (soft-capping, scaling): for
# them the response-only head would be wrong, so the scorer falls back to the model's own ``logits``.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
# Logits per chunk by default: 32 MB of fp32 is a small transient on a GPU, and on a CPU it stays within
# glibc's largest heap allocation, so a chunk's buffer is reused instead of being mapped (page-faulted) anew
# (measured: faster than 128 MB chunks at an 8k vocabulary). At very large vocabularies fewer, larger chunks
# had the lower peak (128k: 256 rows 1,104 MB vs 65 rows 1,523 MB at batch 8; benchmarks/memory.py), hence
# the 256-row minimum.
_CHUNK_LOGITS = 2**23
_MIN_CHUNK_ROWS = 256


def default_chunk_size(vocab_size: int) -> int:
    """Rows per LM-head chunk: as many as keep a chunk's fp32 logits within ``2**23`` values (32 MB), at
    least 256 and at most 4096."""
    return max(_MIN_CHUNK_ROWS, min(4096, _CHUNK_LOGITS // vocab_size))


def token_logps(hidden: Tensor, head: nn.Module, targets: Tensor, chunk_size: int = 1024) -> Tensor:
    """Log-probs of ``targets`` under ``head(hidden)``, computed ``chunk_size`` rows at a time.

    Args:
        hidden: hidden states at the positions that predict ``targets``. # (R, H)
        head: the LM head (``hidden -> logits``).
        targets: token ids to score. # (R,)
        chunk_size: rows per chunk; bounds the transient ``(chunk_size, V)`` fp32 logits.

    Returns:
        ``log softmax(head(hidden))[targets]``. # (R,)
    """
    out = []
    linear = type(head) is nn.Linear  # quantized or adapter-wrapped heads go through their own forward
    for h, y in zip(hidden.split(chunk_size), targets.split(chunk_size), strict=True):
        if linear:
            out.append(_LinearLogps.apply(h, head.weight, head.bias, y))
        elif torch.is_grad_enabled() and h.requires_grad:
            # Recompute each chunk's logits in backward rather than keeping all (R, V) activations alive.
            out.append(checkpoint(_chunk_logps, head, h, y, use_reentrant=False))
        else:
            out.append(_chunk_logps(head, h, y))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def _chunk_logps(head: nn.Module, h: Tensor, y: Tensor) -> Tensor:
    logits = head(h).float()  # (C, V), fp32 for a stable logsumexp
    return logits.gather(-1, y[:, None]).squeeze(-1) - logits.logsumexp(-1)


class _LinearLogps(torch.autograd.Function):
    """``log softmax(h W^T + b)[y]`` for one chunk, saving ``logsumexp`` (``C`` values) instead of the logits.

    ``d log p_i / d z_ij = 1[j = y_i] - softmax_ij``, and ``softmax_ij = exp(z_ij - logsumexp_i)``: backward
    recomputes ``z`` (one matmul) and turns it into the gradient in place. The caller's autocast state is
    replayed in backward, so the recomputed logits and the gradient matmuls use the forward's dtype.
    """

    @staticmethod
    def forward(ctx: Any, h: Tensor, weight: Tensor, bias: Tensor | None, y: Tensor) -> Tensor:
        device = h.device.type
        ctx.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        z = F.linear(h, weight, bias).float()  # (C, V), fp32 for a stable logsumexp
        picked = z.gather(-1, y[:, None]).squeeze(-1)  # (C,)
        top = z.amax(-1, keepdim=True)  # (C, 1)
        lse = z.sub_(top).exp_().sum(-1).log_().add_(top.squeeze(-1))  # (C,) in place: z is not needed again
        ctx.save_for_backward(h, weight, bias, y, lse)
        return picked - lse

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        h, weight, bias, y, lse = ctx.saved_tensors
        device, dtype, enabled = ctx.autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            z = F.linear(h, weight, bias)  # (C, V) in the forward's compute dtype
            dz = z.float().sub_(lse[:, None]).exp_().mul_(-grad[:, None])  # -g * softmax
            dz = dz.scatter_add_(-1, y[:, None], grad[:, None].float()).to(z.dtype)  # + g at the target
            grad_h = (dz @ weight.to(z.dtype)).to(h.dtype) if ctx.needs_input_grad[0] else None  # (C, H)
            grad_w = (dz.T @ h.to(z.dtype)).to(weight.dtype) if ctx.needs_input_grad[1] else None  # (V, H)
            grad_b = dz.sum(0).to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
        return grad_h, grad_w, grad_b, None


def logits_logps(logits: Tensor, targets: Tensor, chunk_size: int = 1024) -> Tensor:
    """Same as :func:`token_logps` for logits already computed by the model. # (R, V) -> (R,)"""
    out = [
        z.float().gather(-1, y[:, None]).squeeze(-1) - z.float().logsumexp(-1)
        for z, y in zip(logits.split(chunk_size), targets.split(chunk_size), strict=True)
    ]
    return torch.cat(out) if out else logits.new_zeros(0, dtype=torch.float32)


class SequenceScorer(nn.Module):
    """Wraps a Hugging Face causal LM and returns summed response log-probs per sequence.

    Being an ``nn.Module`` whose ``forward`` does the whole computation matters for sharded strategies: FSDP
    gathers the parameters around a module's ``forward``, so the LM head must be called from inside it.

    Args:
        model: a ``transformers`` causal LM (``AutoModelForCausalLM``).
        chunk_size: response tokens per LM-head chunk; ``None`` = :func:`default_chunk_size` of the vocabulary.
        response_only_head: apply the LM head only at response positions (identical values, less compute and
            memory); automatically off for models that post-process their logits.
    """

    def __init__(self, model: nn.Module, chunk_size: int | None = None, response_only_head: bool = True) -> None:
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size or default_chunk_size(self.lm.config.vocab_size)
        config = getattr(model, "config", None)
        postprocessed = any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_POSTPROCESSING)
        self.response_only_head = response_only_head and not postprocessed and self._split_available()
        # Reusing cached prompts runs the body at explicit positions, so it must accept ``position_ids``.
        self._takes_position_ids = self.response_only_head and "position_ids" in inspect.signature(
            type(self.lm.base_model).forward
        ).parameters

    @property
    def lm(self) -> nn.Module:
        """The ``transformers`` model itself (inside a ``peft`` wrapper, LoRA layers are injected into it)."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def _split_available(self) -> bool:
        body = getattr(self.lm, "base_model", None)
        return body is not None and body is not self.lm and self.lm.get_output_embeddings() is not None

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor, kl_rows: KLRows | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Score ``input_ids`` and, for KTO, the mismatched ``kl_rows`` that reuse their prompts.

        Args:
            input_ids: prompt + response token ids, right-padded. # (N, T)
            attention_mask: 1 for real tokens. # (N, T)
            response_mask: True where a token belongs to the response and is scored. # (N, T)
            kl_rows: KTO's mismatched prompt/completion rows, scored without gradient (``z0`` is detached).
                Each starts with the prompt of one of the ``N`` rows, so where the model allows it the prompt's
                keys and values are taken from this pass instead of being computed again.

        Returns:
            ``(logps, num_tokens, kl_logps)``: summed response log-probs and number of response tokens, and the
            summed log-probs of ``kl_rows`` (``None`` without them). # (N,), (N,), (M,)
        """
        share = kl_rows is not None and self._can_share_prompts(kl_rows)
        logps, hidden, cache = self._score(input_ids, attention_mask, response_mask, keep_cache=share)
        kl_logps = None
        if kl_rows is not None:
            with torch.no_grad():
                if len(kl_rows.prompt_rows) == 0:  # every row of the batch shares one prompt
                    kl_logps = logps.new_zeros(0)
                elif cache is not None and _plain_kv_cache(cache):
                    kl_logps = self._score_continuations(hidden, cache, kl_rows)
                else:
                    kl_logps = self._score(kl_rows.input_ids, kl_rows.attention_mask, kl_rows.response_mask)[0]
        return logps, response_mask[:, 1:].sum(-1), kl_logps

    def _score(
        self, input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor, keep_cache: bool = False
    ) -> tuple[Tensor, Tensor | None, Any]:
        """Summed response log-probs, and the final hidden states and K/V cache when ``keep_cache``."""
        # Logits at position t predict token t + 1, so token t is scored from position t - 1.
        target_mask = response_mask[:, 1:].bool()  # (N, T-1)
        targets = input_ids[:, 1:][target_mask]  # (R,)
        hidden = cache = None
        if self.response_only_head:
            # use_cache only when the K/V are reused: otherwise a scoring pass keeping every layer's K/V is waste.
            out = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=keep_cache)
            hidden, cache = out.last_hidden_state, out.past_key_values if keep_cache else None  # (N, T, H)
            per_token = token_logps(
                hidden[:, :-1][target_mask], self.lm.get_output_embeddings(), targets, self.chunk_size
            )  # (N, T, H) -> (R, H) -> (R,)
        else:
            logits = self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # (N, T, V)
            per_token = logits_logps(logits[:, :-1][target_mask], targets, self.chunk_size)  # (R, V) -> (R,)
        return _sum_rows(per_token, target_mask), hidden, cache

    def _can_share_prompts(self, kl_rows: KLRows) -> bool:
        """Whether the KL rows can reuse the prompts' K/V: a split head, a non-empty prompt in every row, a model
        that takes ``position_ids``, and no gradient checkpointing (which turns the cache off in training)."""
        if not self._takes_position_ids or len(kl_rows.prompt_rows) == 0:
            return False
        if self.lm.training and any(getattr(m, "gradient_checkpointing", False) for m in self.lm.modules()):
            return False
        return bool((_prompt_lengths(kl_rows) > 0).all() and kl_rows.response_mask.any())

    def _score_continuations(self, hidden: Tensor, cache: Any, kl_rows: KLRows) -> Tensor:
        """Score ``kl_rows`` by running only their responses on top of their prompts' cached K/V.

        Row ``m`` continues the prompt of batch row ``prompt_rows[m]``, whose first ``P_m`` cached positions are
        exactly that prompt's (causal attention: a prompt's K/V never depend on what follows it). The response
        runs at positions ``P_m, P_m + 1, ...`` attending to those ``P_m`` cached entries and to itself; its first
        token is predicted from the batch row's hidden state at the prompt's last position.
        """
        ids, attention, response, rows = kl_rows
        prompt_lengths = _prompt_lengths(kl_rows)  # (M,)
        response_lengths = response.sum(-1)  # (M,)
        offsets = torch.arange(int(response_lengths.max()), device=ids.device)  # (R_max,)
        valid = offsets < response_lengths[:, None]  # (M, R_max)
        positions = prompt_lengths[:, None] + offsets  # (M, R_max) positions of the response tokens
        responses = ids.gather(1, positions.clamp(max=ids.shape[1] - 1)).masked_fill(~valid, 0)  # (M, R_max)

        prefix = int(prompt_lengths.max())
        cache.crop(prefix - cache.get_seq_length())  # keep the first P_max positions (crop takes a negative count)
        cache.batch_select_indices(rows)  # (N, ...) -> (M, ...): each KL row gets its prompt's K/V
        # Cached positions past a row's own prompt belong to its batch row's response: masked out as holes.
        prompt_mask = torch.arange(prefix, device=ids.device) < prompt_lengths[:, None]  # (M, P_max)
        out = self.lm.base_model(
            input_ids=responses, attention_mask=torch.cat([prompt_mask, valid], 1).long(), position_ids=positions,
            past_key_values=cache, use_cache=True,
        ).last_hidden_state  # (M, R_max, H)
        last_prompt = hidden[rows, prompt_lengths - 1]  # (M, H) predicts each response's first token
        predictors = torch.cat([last_prompt[:, None], out[:, :-1]], 1)  # (M, R_max, H): position j predicts token j
        per_token = token_logps(predictors[valid], self.lm.get_output_embeddings(), responses[valid], self.chunk_size)
        return _sum_rows(per_token, valid)


def _prompt_lengths(kl_rows: KLRows) -> Tensor:
    """Prompt tokens of each (right-padded) row: attended tokens outside the response. # (M,)"""
    return (kl_rows.attention_mask.bool() & ~kl_rows.response_mask.bool()).sum(-1)


def _sum_rows(per_token: Tensor, mask: Tensor) -> Tensor:
    """Sum the values of the ``True`` cells of ``mask`` (row-major order) per row. # (R,), (N, L) -> (N,)"""
    rows = mask.nonzero()[:, 0]  # (R,) row of each value
    return per_token.new_zeros(mask.shape[0]).index_add(0, rows, per_token)


def _plain_kv_cache(cache: Any) -> bool:
    """Whether ``cache`` is a ``DynamicCache`` of full-attention layers only, whose positions can be cropped and
    rows selected (sliding-window, linear-attention or quantized layers keep other state)."""
    layers = getattr(cache, "layers", None)
    return isinstance(cache, DynamicCache) and bool(layers) and all(
        type(x) is DynamicLayer and x.is_initialized for x in layers
    )
