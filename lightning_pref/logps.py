"""Per-sequence log-probabilities of response tokens: the transformer body on every token, the LM head only at
response positions (chunked, see :mod:`lightning_pref.head`).

``log p(y_t) = s[y_t] - logsumexp(s)`` for the (post-processed) logits ``s`` at each *response* position only, so
peak memory does not scale with ``B * T * V``. A self-check on the first batch compares this split computation
with the model's own logits, so an architecture whose logits are post-processed in a way the head does not
reproduce stops with an error instead of training on wrong log-probs.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn
from transformers.cache_utils import DynamicCache, DynamicLayer

from lightning_pref.errors import UserInputError
from lightning_pref.head import LogitTransform, default_chunk_size, logits_logps, token_logps
from lightning_pref.types import KLRows

# Positions compared by the self-check, and its tolerance on |log p| differences: fp32 agrees to rounding; in
# bf16/fp16 the model's own head post-processes bf16 logits while ours works in fp32. A missing soft-cap or
# scale is off by whole nats.
_CHECK_POSITIONS = 16
_CHECK_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}
_CHECK_TOLERANCE_HALF = 0.1


class SequenceScorer(nn.Module):
    """Wraps a Hugging Face causal LM and returns summed response log-probs per sequence.

    Being an ``nn.Module`` whose ``forward`` does the whole computation matters for sharded strategies: FSDP
    gathers the parameters around a module's ``forward``, so the LM head must be called from inside it.

    Args:
        model: a ``transformers`` causal LM (``AutoModelForCausalLM``).
        chunk_size: response tokens per LM-head chunk; ``None`` = :func:`default_chunk_size` of the vocabulary.
        response_only_head: apply the LM head only at response positions (identical values, less compute and
            memory), with the model's logit post-processing (:class:`LogitTransform`) inside the head; off when
            the model has no separate body and head.
    """

    def __init__(self, model: nn.Module, chunk_size: int | None = None, response_only_head: bool = True) -> None:
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size or default_chunk_size(self.lm.config.vocab_size)
        self.transform = LogitTransform.from_config(getattr(self.lm, "config", None))
        self.response_only_head = response_only_head and self._split_available()
        # Reusing cached prompts runs the body at explicit positions, so it must accept ``position_ids``.
        self._takes_position_ids = self.response_only_head and "position_ids" in inspect.signature(
            type(self.lm.base_model).forward
        ).parameters
        self.checked = not self.response_only_head  # the self-check runs once, on the first scored batch

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
        if not self.checked:
            self.check_head(input_ids, attention_mask, response_mask)
        # Logits at position t predict token t + 1, so token t is scored from position t - 1.
        target_mask = response_mask[:, 1:].bool()  # (N, T-1)
        targets = input_ids[:, 1:][target_mask]  # (R,)
        hidden = cache = None
        if self.response_only_head:
            # use_cache only when the K/V are reused: otherwise a scoring pass keeping every layer's K/V is waste.
            out = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=keep_cache)
            hidden, cache = out.last_hidden_state, out.past_key_values if keep_cache else None  # (N, T, H)
            per_token = self._head(hidden[:, :-1][target_mask], targets)  # (N, T, H) -> (R, H) -> (R,)
        else:
            per_token = self._full_logits(input_ids, attention_mask, target_mask, targets)
        return _sum_rows(per_token, target_mask), hidden, cache

    def _head(self, hidden: Tensor, targets: Tensor) -> Tensor:
        """Log-probs of ``targets`` from final hidden states, through the response-only head. # (R, H) -> (R,)"""
        return token_logps(hidden, self.lm.get_output_embeddings(), targets, self.chunk_size, self.transform)

    def _full_logits(self, input_ids: Tensor, attention_mask: Tensor, target_mask: Tensor, targets: Tensor) -> Tensor:
        """Log-probs of ``targets`` from the model's own ``(N, T, V)`` logits. # -> (R,)"""
        logits = self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # (N, T, V)
        return logits_logps(logits[:, :-1][target_mask], targets, self.chunk_size)  # (R, V) -> (R,)

    @torch.compiler.disable
    @torch.no_grad()
    def check_head(self, input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor) -> None:
        """Compare the response-only head with the model's own logits on one row's first response positions.

        Both run in eval mode (dropout would make them differ) and without gradients, on the first row that has
        response tokens. Every rank of a sharded run calls this on its first batch, so collectives stay matched.

        Raises:
            UserInputError: when they disagree: the architecture post-processes its logits in a way the head does
                not reproduce, and every log-prob would be wrong.
        """
        self.checked = True
        target_mask = response_mask[:, 1:].bool()  # (N, T-1)
        rows = target_mask.any(-1).nonzero()
        if len(rows) == 0:
            return
        row = int(rows[0])
        ids, mask = input_ids[row : row + 1], attention_mask[row : row + 1]  # (1, T)
        positions = target_mask[row : row + 1].clone()
        positions[0, positions[0].nonzero()[_CHECK_POSITIONS:, 0]] = False  # (1, T-1) at most 16 positions
        targets = ids[:, 1:][positions]
        was_training = self.lm.training
        self.lm.eval()
        try:
            hidden = self.lm.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            ours = self._head(hidden[:, :-1][positions], targets)
            theirs = self._full_logits(ids, mask, positions, targets)
        finally:
            self.lm.train(was_training)
        dtype = hidden.dtype if not torch.is_autocast_enabled(hidden.device.type) else torch.bfloat16
        tolerance = _CHECK_TOLERANCE.get(dtype, _CHECK_TOLERANCE_HALF)
        error = (ours - theirs).abs() / (1 + theirs.abs())  # (P,) relative beyond 1 nat, absolute below
        if error.numel() and float(error.max()) > tolerance:
            name = type(self.lm).__name__
            raise UserInputError(
                f"model: the response-only LM head disagrees with {name}'s own logits (max |log p difference| "
                f"{float((ours - theirs).abs().max()):.3g} over {error.numel()} positions): this architecture "
                f"post-processes its logits in a way lightning-pref does not reproduce ({self.transform} known), so "
                "every log-prob would be wrong; set model.response_only_head: false to score from the model's own "
                "logits"
            )

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
        per_token = self._head(predictors[valid], responses[valid])
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
        type(x) is DynamicLayer and getattr(x, "keys", None) is not None for x in layers
    )
