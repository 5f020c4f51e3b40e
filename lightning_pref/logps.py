"""Per-sequence log-probabilities of response tokens: the transformer body on every token, the LM head only at
response positions (chunked, see :mod:`lightning_pref.head`).

``log p(y_t) = s[y_t] - logsumexp(s)`` for the (post-processed) logits ``s`` at each *response* position only, so
peak memory does not scale with ``B * T * V``. A self-check on the first batch compares this split computation
with the model's own logits, so an architecture whose logits are post-processed in a way the head does not
reproduce stops with an error instead of training on wrong log-probs.

Packed batches (:mod:`lightning_pref.packing`) run the body on rows of several sequences and come back as the
same per-sequence values; a model that cannot take them gets the batch padded again (one info line says why).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn

from lightning_pref import kl, packing
from lightning_pref.errors import UserInputError
from lightning_pref.head import LogitTransform, default_chunk_size, logits_logps, sum_rows, token_logps
from lightning_pref.types import KLRows, PackedRows

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
        body_args = inspect.signature(type(self.lm.base_model).forward).parameters if self.response_only_head else {}
        # Reusing cached prompts runs the body at explicit positions, so it must accept ``position_ids``.
        self.takes_position_ids = "position_ids" in body_args
        self._cache_arg = "cache" if "cache" in body_args else "past_key_values"  # renamed in transformers 5.x
        self.checked = not self.response_only_head  # the self-check runs once, on the first scored batch

    @property
    def lm(self) -> nn.Module:
        """The ``transformers`` model itself (inside a ``peft`` wrapper, LoRA layers are injected into it)."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def _split_available(self) -> bool:
        body = getattr(self.lm, "base_model", None)
        return body is not None and body is not self.lm and self.lm.get_output_embeddings() is not None

    def forward(
        self, input_ids: Tensor | None, attention_mask: Tensor | None, response_mask: Tensor | None,
        kl_rows: KLRows | None = None, packed: PackedRows | None = None,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Score ``input_ids`` (or ``packed``) and, for KTO, the mismatched ``kl_rows`` that reuse their prompts.

        Args:
            input_ids: prompt + response token ids, right-padded; ``None`` with ``packed``. # (N, T)
            attention_mask: 1 for real tokens. # (N, T)
            response_mask: True where a token belongs to the response and is scored. # (N, T)
            kl_rows: KTO's mismatched prompt/completion rows, scored without gradient (``z0`` is detached).
                Each starts with the prompt of one of the ``N`` rows, so where the model allows it the prompt's
                keys and values are taken from this pass instead of being computed again (padded batches only:
                a packed pass keeps no cache).
            packed: the same ``N`` sequences packed into rows, instead of the padded tensors.

        Returns:
            ``(logps, num_tokens, kl_logps)``: summed response log-probs and number of response tokens, and the
            summed log-probs of ``kl_rows`` (``None`` without them), in batch row order either way.
            # (N,), (N,), (M,)
        """
        if packed is not None:
            usable, masks = packing.runnable(self.lm, packed)
            if usable is not None:
                logps, tokens = self.score_packed(usable, masks)
                kl_logps = kl.score_kl_rows(self, kl_rows, None, None) if kl_rows is not None else None
                return logps, tokens, kl_logps
            input_ids, attention_mask, response_mask = packing.unpack(packed)
        share = kl_rows is not None and kl.can_share_prompts(self, kl_rows)
        logps, hidden, cache = self.score(input_ids, attention_mask, response_mask, keep_cache=share)
        kl_logps = kl.score_kl_rows(self, kl_rows, hidden, cache) if kl_rows is not None else None
        return logps, response_mask[:, 1:].sum(-1), kl_logps

    def score_packed(self, packed: PackedRows, masks: Any = None) -> tuple[Tensor, Tensor]:
        """Summed response log-probs and response tokens of each of the ``N`` packed sequences. # (N,), (N,)"""
        if not self.checked:
            self.check_head(*packing.unpack(packed))
        cells, predictors, sequences = packing.scored_tokens(packed)  # (S,) each
        targets = packed.input_ids.flatten()[cells]  # (S,)
        inputs = packing.body_inputs(packed, masks)
        if self.response_only_head:
            hidden = self.body(**inputs).last_hidden_state  # (R, L, H)
            per_token = self.head_logps(hidden.flatten(0, 1)[predictors], targets)  # (R * L, H) -> (S, H) -> (S,)
        else:
            logits = self.lm(**inputs).logits  # (R, L, V)
            per_token = logits_logps(logits.flatten(0, 1)[predictors], targets, self.chunk_size)  # (S, V) -> (S,)
        num_tokens = torch.bincount(sequences, minlength=packed.num_sequences)
        return packing.sequence_sums(per_token, sequences, packed.num_sequences), num_tokens

    def body(self, cache: Any = None, **kwargs: Any) -> Any:
        """The transformer body without the LM head; a ``cache`` given goes in under the name this version of
        transformers uses, and the output's ``cache`` is set whichever name it came back under."""
        if cache is not None:
            kwargs[self._cache_arg] = cache
            kwargs["use_cache"] = True
        out = self.lm.base_model(**kwargs)
        if kwargs.get("use_cache"):
            out.cache = getattr(out, self._cache_arg, None)
        return out

    def score(
        self, input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor, keep_cache: bool = False
    ) -> tuple[Tensor, Tensor | None, Any]:
        """Summed response log-probs, and the final hidden states and K/V cache when ``keep_cache``. # (N,)"""
        if not self.checked:
            self.check_head(input_ids, attention_mask, response_mask)
        # Logits at position t predict token t + 1, so token t is scored from position t - 1.
        target_mask = response_mask[:, 1:].bool()  # (N, T-1)
        targets = input_ids[:, 1:][target_mask]  # (R,)
        hidden = cache = None
        if self.response_only_head:
            # use_cache only when the K/V are reused: otherwise a scoring pass keeping every layer's K/V is waste.
            out = self.body(input_ids=input_ids, attention_mask=attention_mask, use_cache=keep_cache)
            hidden, cache = out.last_hidden_state, out.cache if keep_cache else None  # (N, T, H)
            per_token = self.head_logps(hidden[:, :-1][target_mask], targets)  # (N, T, H) -> (R, H) -> (R,)
        else:
            per_token = self._full_logits(input_ids, attention_mask, target_mask, targets)
        return sum_rows(per_token, target_mask), hidden, cache

    def head_logps(self, hidden: Tensor, targets: Tensor) -> Tensor:
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
            hidden = self.body(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            ours = self.head_logps(hidden[:, :-1][positions], targets)
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
