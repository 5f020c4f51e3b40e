"""Per-sequence log-probabilities of response tokens: the transformer body on every token, the LM head only at
response positions (chunked, see :mod:`lightning_pref.head`).

``log p(y_t) = s[y_t] - logsumexp(s)`` for the (post-processed) logits ``s`` at each *response* position only, so
peak memory does not scale with ``B * T * V``. A self-check on the first batch compares this split computation
with the model's own logits, so an architecture whose logits are post-processed in a way the head does not
reproduce stops with an error instead of training on wrong log-probs.

Packed batches (:mod:`lightning_pref.layout`) run the body on rows of several sequences and come back as the
same per-sequence values; a model that cannot take them gets the batch padded again (one info line says why;
:mod:`lightning_pref.packing` decides, once per model).

KTO's mismatched rows (:mod:`lightning_pref.kl`) are scored here too, inside the scorer's forward where sharded
strategies have gathered the parameters: where the model allows it only their completions run, on the batch's
own K/V cut to each prompt (padded batches) or in their prompts' segments of the batch's own pass (packed
batches); otherwise the rows are scored in full. Either way the same forwards run on every rank, also on one with
no rows, so every rank of a sharded run issues the same collectives.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn
from transformers.cache_utils import DynamicCache, DynamicLayer

from lightning_pref import layout, packing
from lightning_pref.errors import UserInputError
from lightning_pref.head import (
    LogitTransform,
    default_chunk_size,
    logits_logps,
    sparse_tied_embedding_grad,
    sum_rows,
    token_logps,
)
from lightning_pref.segment_attention import PromptKV
from lightning_pref.types import KLRows, PackedRows, PreferenceBatch

# Positions compared by the self-check, and its tolerance on |log p| differences: fp32 agrees to rounding; in
# bf16/fp16 the model's own head post-processes bf16 logits while ours works in fp32. A missing soft-cap or
# scale is off by whole nats.
_CHECK_POSITIONS = 16
_CHECK_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}
_CHECK_TOLERANCE_HALF = 0.1


@dataclass
class TokenLogps:
    """Per-token values of a batch's response tokens, one row per sequence (right-padded), in batch row order."""

    logps: Tensor  # (N, L) log-prob of each response token (at the temperature asked for); 0 on padding
    mask: Tensor  # (N, L) True on real tokens
    entropy: Tensor | None = None  # (N, L) entropy of the distribution each token was drawn from (detached)


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
        self._capability: packing.Capability | None = None

    @property
    def capability(self) -> packing.Capability:
        """Which packed layouts the model runs, decided on first use (its config does not change)."""
        if self._capability is None:
            self._capability = packing.capability(self.lm)
        return self._capability

    @property
    def per_segment(self) -> bool:
        """Whether packed rows' attention runs per segment: an sdpa model, not compiled (a compiled forward would
        specialise on each batch's segment boundaries and recompile)."""
        return packing.segment_attention(self.capability) and getattr(self, "_compiled_call_impl", None) is None

    def runnable(self, packed: PackedRows) -> tuple[PackedRows | None, Any]:
        """The layout of ``packed`` this model runs and the masks it needs (:func:`packing.runnable`)."""
        return packing.runnable(self.lm, packed, self.capability)

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
                Each starts with the prompt of one of the ``N`` rows, so where the model allows it the prompt is
                not run again: a padded batch's rows take its keys and values from this pass; a packed batch's
                run in this pass, each completion in its prompt's segment (:meth:`kl_layout`).
            packed: the same ``N`` sequences packed into rows, instead of the padded tensors.

        Returns:
            ``(logps, num_tokens, kl_logps)``: summed response log-probs and number of response tokens, and the
            summed log-probs of ``kl_rows`` (``None`` without them), in batch row order either way.
            # (N,), (N,), (M,)
        """
        if packed is not None:
            usable, masks = self.runnable(packed)
            prompts = self.prompt_kv(kl_rows, usable) if kl_rows is not None and usable is not None else None
            together = self.kl_layout(kl_rows) if kl_rows is not None and prompts is None else None
            if together is not None:  # one pass: the batch, and the KL completions in their prompts' segments
                return self._score_packed_rows(*together, packed.num_sequences)
            if usable is not None:
                logps, tokens, _ = self._score_packed_rows(usable, masks, packed.num_sequences, prompts)
                if kl_rows is None:
                    return logps, tokens, None
                if prompts is not None and prompts.complete(self.lm.config.get_text_config().num_hidden_layers):
                    return logps, tokens, self.score_continuations(kl_rows.completions, prompts)
                return logps, tokens, self.score_kl_rows(kl_rows, None, None)
            input_ids, attention_mask, response_mask = layout.unpack(packed)
        share = kl_rows is not None and self.can_share_prompts(kl_rows)
        logps, hidden, cache = self.score(input_ids, attention_mask, response_mask, keep_cache=share)
        kl_logps = self.score_kl_rows(kl_rows, hidden, cache) if kl_rows is not None else None
        return logps, response_mask[:, 1:].sum(-1), kl_logps

    def score_packed(self, packed: PackedRows, masks: Any = None) -> tuple[Tensor, Tensor]:
        """Summed response log-probs and response tokens of each of the ``N`` packed sequences. # (N,), (N,)"""
        return self._score_packed_rows(packed, masks, packed.num_sequences)[:2]

    def _score_packed_rows(self, packed: PackedRows, masks: Any, num_rows: int,
                           prompts: PromptKV | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Summed response log-probs and response tokens of the first ``num_rows`` packed sequences, and summed
        log-probs of the rest, without gradient (KTO's KL rows ride along in the same pass); ``prompts``: record
        those prompts' keys, values and last hidden states on the way (:meth:`prompt_kv`).
        # -> (num_rows,), (num_rows,), (N - num_rows,)"""
        if not self.checked:
            self.check_head(*layout.unpack(packed))
        cells, predictors, sequences = layout.scored_tokens(packed)  # (S,) each
        targets = packed.input_ids.flatten()[cells]  # (S,)
        rest = sequences >= num_rows  # (S,) tokens of rows scored without gradient
        inputs = packing.body_inputs(packed, masks, self.per_segment, prompts)
        if self.response_only_head:
            states = self.body(head_grad=bool((~rest).any()), **inputs).last_hidden_state.flatten(0, 1)  # (R*L, H)
            if prompts is not None:
                length = packed.input_ids.shape[1]
                last = torch.tensor([r * length + end - 1 for r, _, end in prompts.spans], device=states.device)
                prompts.last_hidden = states[last].detach()  # (P, H)
            score = self.head_logps  # (S', H) -> (S',)
        else:
            states = self.lm(**inputs).logits.flatten(0, 1)  # (R, L, V) -> (R * L, V)
            score = lambda logits, ids: logits_logps(logits, ids, self.chunk_size)  # noqa: E731 - (S', V) -> (S',)
        per_token = score(states[predictors[~rest]], targets[~rest])
        with torch.no_grad():
            rest_per_token = (score(states[predictors[rest]], targets[rest]) if num_rows < packed.num_sequences
                              else per_token.new_zeros(0))
        kept = sequences[~rest]
        rest_sums = layout.sequence_sums(rest_per_token, sequences[rest] - num_rows, packed.num_sequences - num_rows)
        return layout.sequence_sums(per_token, kept, num_rows), torch.bincount(kept, minlength=num_rows), rest_sums

    def body(self, cache: Any = None, head_grad: bool = False, **kwargs: Any) -> Any:
        """The transformer body without the LM head; a ``cache`` given goes in under the name this version of
        transformers uses, and the output's ``cache`` is set whichever name it came back under. ``head_grad``:
        the head scores some of this pass's tokens with gradient, so a tied input embedding can take its
        gradient as sparse rows (:func:`~lightning_pref.head.sparse_tied_embedding_grad`)."""
        if cache is not None:
            kwargs[self._cache_arg] = cache
            kwargs["use_cache"] = True
        with sparse_tied_embedding_grad(self.lm, head_grad):
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
            out = self.body(input_ids=input_ids, attention_mask=attention_mask, use_cache=keep_cache,
                            head_grad=bool(target_mask.any()))
            hidden, cache = out.last_hidden_state, out.cache if keep_cache else None  # (N, T, H)
            per_token = self.head_logps(hidden[:, :-1][target_mask], targets)  # (N, T, H) -> (R, H) -> (R,)
        else:
            per_token = self._full_logits(input_ids, attention_mask, target_mask, targets)
        return sum_rows(per_token, target_mask), hidden, cache

    def head_logps(self, hidden: Tensor, targets: Tensor) -> Tensor:
        """Log-probs of ``targets`` from final hidden states, through the response-only head. # (R, H) -> (R,)"""
        return token_logps(hidden, self.lm.get_output_embeddings(), targets, self.chunk_size, self.transform)

    def token_logps(self, batch: PreferenceBatch, temperature: float = 1.0, entropy: bool = False) -> TokenLogps:
        """Log-prob of every response token of ``batch`` (padded or packed), with the logits divided by
        ``temperature`` as sampling at that temperature divided them, and optionally each position's entropy.

        Returns:
            One row per sequence: response token ``t`` of sequence ``n`` at ``[n, t]``. # (N, L) each
        """
        packed, masks = (self.runnable(batch.packed) if batch.packed is not None else (None, None))
        if batch.packed is not None and packed is None:  # a model that cannot take packed rows: padded again
            batch = PreferenceBatch(*layout.unpack(batch.packed), num_chosen=batch.num_chosen, paired=batch.paired)
        transform = self.transform.at_temperature(temperature)
        if packed is not None:
            cells, predictors, sequences = layout.scored_tokens(packed)  # (S,) each
            targets = packed.input_ids.flatten()[cells]
            inputs = packing.body_inputs(packed, masks, self.per_segment)
            flat = lambda hidden: hidden.flatten(0, 1)[predictors]  # noqa: E731 - (R, L, H) -> (S, H)
            num_sequences = packed.num_sequences
        else:
            target_mask = batch.response_mask[:, 1:].bool()  # (N, T-1) token t + 1 is scored from position t
            targets, sequences = batch.input_ids[:, 1:][target_mask], target_mask.nonzero()[:, 0]
            inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "use_cache": False}
            flat = lambda hidden: hidden[:, :-1][target_mask]  # noqa: E731 - (N, T, H) -> (S, H)
            num_sequences = batch.input_ids.shape[0]
        if self.response_only_head:
            hidden = flat(self.body(**inputs).last_hidden_state)
            out = token_logps(hidden, self.lm.get_output_embeddings(), targets, self.chunk_size, transform, entropy)
        else:
            out = logits_logps(flat(self.lm(**inputs).logits), targets, self.chunk_size, temperature, entropy)
        per_token, per_entropy = out if entropy else (out, None)
        table, mask = layout.by_sequence(per_token, sequences, num_sequences)
        entropies = layout.by_sequence(per_entropy, sequences, num_sequences)[0] if entropy else None
        return TokenLogps(table, mask, entropies)

    def _full_logits(self, input_ids: Tensor, attention_mask: Tensor, target_mask: Tensor, targets: Tensor) -> Tensor:
        """Log-probs of ``targets`` from the model's own ``(N, T, V)`` logits. # -> (R,)"""
        logits = self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # (N, T, V)
        return logits_logps(logits[:, :-1][target_mask], targets, self.chunk_size)  # (R, V) -> (R,)

    # ------------------------------------------------------------------------------------------- KTO's KL rows
    def kl_layout(self, kl_rows: KLRows) -> tuple[PackedRows, Any] | None:
        """The layout scoring a packed batch and its KL rows in one pass (``kl_rows.shared``: each mismatched
        completion in its prompt's segment, so only the completions run) and its masks; ``None``: score them
        apart, the KL rows in full (a padded batch, or a model that cannot take the masks).

        Without gradients (the reference, validation) the one pass is always less work. With gradients the KL
        completions also run backward (to no effect: the baseline is detached) and the recompute of checkpointed
        layers, so they ride along only when that costs less than running their prompts again without gradient,
        on a sharded model always (every rank then runs the same forwards, whatever its rows).
        """
        if kl_rows.shared is None:
            return None
        usable, masks = self.runnable(kl_rows.shared)
        if usable is None or (kl_rows.shared.shared_prompts and masks is None):
            return None  # unpacked, or packed without its shared prompts: the KL rows would run in full anyway
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()) and not sharded(self.lm):
            prompts = int(_prompt_lengths(kl_rows).sum())
            completions = int(kl_rows.response_mask.sum())
            if (2 + checkpointed(self.lm)) * completions > prompts:  # backward ~2 forwards, the recompute 1
                return None
        return usable, masks

    def prompt_kv(self, kl_rows: KLRows, packed: PackedRows) -> PromptKV | None:
        """A :class:`PromptKV` to record the prompts of ``kl_rows`` in the batch pass over ``packed``, so that
        only their completions run afterwards (:meth:`score_continuations`); ``None`` where that is not the
        cheapest way or not possible.

        Cheapest in a pass with gradients: riding along (:meth:`kl_layout`) runs the completions backward too,
        scoring them apart runs their prompts again. Possible with per-segment attention (sdpa) and full
        attention only (a sliding window would also apply to the recorded prompt), on a batch whose rows hold
        their own prompts (no shared prompts) and a model that is not sharded (every rank runs the same passes).
        """
        if (kl_rows.completions is None or not torch.is_grad_enabled() or packed.shared_prompts
                or not any(p.requires_grad for p in self.parameters()) or sharded(self.lm)
                or not self.per_segment or self.capability.window is not None):
            return None
        prompt_lengths = _prompt_lengths(kl_rows)  # (M,)
        if not bool((prompt_lengths > 0).all()):
            return None
        first = layout.first_cells(packed)  # (N,) a batch row's first cell is its prompt's
        length = packed.input_ids.shape[1]
        starts = first[kl_rows.prompt_rows.to(first.device)].tolist()  # (M,) that of each KL row's batch row
        return PromptKV([(s // length, s % length, s % length + n) for s, n in zip(starts, prompt_lengths.tolist(),
                                                                                   strict=True)])

    @torch.no_grad()
    def score_continuations(self, packed: PackedRows, prompts: PromptKV) -> Tensor:
        """Summed log-probs of ``packed``'s sequences, each continuing a prompt recorded in ``prompts`` (its
        ``p``-th sequence the ``p``-th prompt; :func:`lightning_pref.layout.continuations`), without gradient.
        Only their own cells run; each attends to its prompt's recorded keys and values, and its first token is
        predicted from the prompt's last hidden state. # -> (M,)"""
        sequences = packed.sequence_index.flatten()  # (R * L,)
        # Each segment is one sequence: in row-major order, the sequences as their cells first appear. A new
        # object: the recording one stays as it is for a checkpointed layer's recompute in backward.
        continuing = replace(prompts, continues=torch.unique_consecutive(sequences[sequences >= 0]).tolist())
        inputs = packing.body_inputs(packed, None, per_segment=True, prompts=continuing)
        states = self.body(**inputs).last_hidden_state.flatten(0, 1)  # (R, L, H) -> (R * L, H)
        cells = packed.response_mask.flatten().nonzero().squeeze(-1)  # (S,) every cell of every sequence
        owner = sequences[cells]  # (S,)
        first = torch.ones_like(owner, dtype=torch.bool)
        first[1:] = owner[1:] != owner[:-1]  # a sequence's cells are contiguous, in order
        predictors = torch.where(first[:, None], prompts.last_hidden[owner], states[(cells - 1).clamp(min=0)])
        per_token = self.head_logps(predictors, packed.input_ids.flatten()[cells])  # (S,)
        return layout.sequence_sums(per_token, owner, packed.num_sequences)

    def can_share_prompts(self, kl_rows: KLRows) -> bool:
        """Whether the KL rows can reuse the batch pass's prompt K/V.

        Needs a split head on a body that takes ``position_ids``, a non-empty prompt in every row, and a batch pass
        that backward will not recompute: a recomputed layer would run again on a cache that scoring the KL rows
        has since cropped and re-indexed. Passes without gradients (the reference's, validation) always qualify.
        """
        if not self.takes_position_ids or len(kl_rows.prompt_rows) == 0:
            return False
        if torch.is_grad_enabled() and checkpointed(self.lm):
            return False
        return bool((_prompt_lengths(kl_rows) > 0).all() and kl_rows.response_mask.any())

    @torch.no_grad()
    def score_kl_rows(self, kl_rows: KLRows, hidden: Tensor | None, cache: Any) -> Tensor:
        """Summed log-probs of ``kl_rows``, without gradient. # -> (M,)

        Args:
            kl_rows: the batch's mismatched rows.
            hidden: the batch pass's final hidden states when it kept its cache (``None``: a packed pass).
                # (N, T, H)
            cache: the batch pass's K/V cache (``None``: score the rows in full).
        """
        if len(kl_rows.prompt_rows) == 0:  # every row of the batch shares one prompt: nothing to estimate here,
            # but other ranks run a forward, so this one does too (sharded strategies gather layers per forward)
            device = kl_rows.input_ids.device  # the batch's device, also after a packed pass (no hidden states)
            ids, attention, response = (t[:1, :2] for t in kl_rows[:3]) if kl_rows.input_ids.numel() else _dummy(device)
            self.score(ids, attention, response)
            return torch.zeros(0, dtype=torch.float32, device=device)
        if cache is not None and plain_kv_cache(cache):
            return self._score_continuations(hidden, cache, kl_rows)
        if kl_rows.packed is not None:
            usable, masks = self.runnable(kl_rows.packed)
            if usable is not None:
                return self.score_packed(usable, masks)[0]
        return self.score(kl_rows.input_ids, kl_rows.attention_mask, kl_rows.response_mask)[0]

    def _score_continuations(self, hidden: Tensor, cache: Any, kl_rows: KLRows) -> Tensor:
        """Score ``kl_rows`` by running only their responses on top of their prompts' cached K/V.

        Row ``m`` continues the prompt of batch row ``prompt_rows[m]``, whose first ``P_m`` cached positions are
        exactly that prompt's (causal attention: a prompt's K/V never depend on what follows it). The response
        runs at positions ``P_m, P_m + 1, ...`` attending to those ``P_m`` cached entries and to itself; its first
        token is predicted from the batch row's hidden state at the prompt's last position.
        """
        ids, attention, response, rows = kl_rows[:4]
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
        out = self.body(
            input_ids=responses, attention_mask=torch.cat([prompt_mask, valid], 1).long(), position_ids=positions,
            cache=cache,
        ).last_hidden_state  # (M, R_max, H)
        last_prompt = hidden[rows, prompt_lengths - 1]  # (M, H) predicts each response's first token
        predictors = torch.cat([last_prompt[:, None], out[:, :-1]], 1)  # (M, R_max, H): position j predicts token j
        per_token = self.head_logps(predictors[valid], responses[valid])
        return sum_rows(per_token, valid)

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


def checkpointed(model: nn.Module) -> bool:
    """Whether backward will recompute some of ``model``'s forward: Hugging Face's gradient checkpointing in
    training, or a checkpoint wrapper (Lightning's ``activation_checkpointing_policy``, torch's
    ``apply_activation_checkpointing``) around any of its modules."""
    if model.training and any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
        return True
    return any(type(m).__name__ == "CheckpointWrapper" for m in model.modules())


def sharded(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are gathered around each forward (FSDP, DeepSpeed ZeRO-3): every rank must
    then run the same forwards."""
    if any(type(p).__name__ == "DTensor" or hasattr(p, "ds_id") for p in model.parameters()):
        return True
    return any(type(m).__name__ == "FullyShardedDataParallel" for m in model.modules())


def _dummy(device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    ids = torch.zeros(1, 2, dtype=torch.long, device=device)
    return ids, torch.ones_like(ids), torch.tensor([[False, True]], device=device)


def _prompt_lengths(kl_rows: KLRows) -> Tensor:
    """Prompt tokens of each (right-padded) row: attended tokens outside the response. # (M,)"""
    return (kl_rows.attention_mask.bool() & ~kl_rows.response_mask.bool()).sum(-1)


def plain_kv_cache(cache: Any) -> bool:
    """Whether ``cache`` is a ``DynamicCache`` of full-attention layers only, whose positions can be cropped and
    rows selected (sliding-window, linear-attention or quantized layers keep other state)."""
    layers = getattr(cache, "layers", None)
    return isinstance(cache, DynamicCache) and bool(layers) and all(
        type(x) is DynamicLayer and getattr(x, "keys", None) is not None for x in layers
    )
