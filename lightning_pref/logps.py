"""Per-sequence log-probabilities of response tokens, without a full-vocabulary ``log_softmax``.

``log p(y_t) = z[y_t] - logsumexp(z)`` for the logits ``z`` at each *response* position only: the transformer
body runs on every token, but the LM head (the ``(T, V)`` matmul that dominates memory at large vocabularies)
is applied to response positions in chunks of ``chunk_size`` tokens, each recomputed in backward instead of
stored, so peak memory does not scale with ``B * T * V``. The default chunk holds at most ``2**25`` fp32
logits (128 MB): 4096 rows at an 8k vocabulary, 262 at 128k.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

# Config attributes of models whose logits are post-processed after the LM head (soft-capping, scaling): for
# them the response-only head would be wrong, so the scorer falls back to the model's own ``logits``.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
_CHUNK_LOGITS = 2**25  # logits per chunk by default


def default_chunk_size(vocab_size: int) -> int:
    """Rows per LM-head chunk so that a chunk's fp32 logits stay within ``2**25`` values (128 MB)."""
    return max(64, min(4096, _CHUNK_LOGITS // vocab_size))


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
    # With a single chunk its logits are the whole transient anyway: keeping them costs less than recomputing.
    recompute = torch.is_grad_enabled() and hidden.requires_grad and len(hidden) > chunk_size
    for h, y in zip(hidden.split(chunk_size), targets.split(chunk_size), strict=True):
        if recompute:
            # Recompute each chunk's logits in backward rather than keeping all (R, V) activations alive.
            out.append(checkpoint(_chunk_logps, head, h, y, use_reentrant=False))
        else:
            out.append(_chunk_logps(head, h, y))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def _chunk_logps(head: nn.Module, h: Tensor, y: Tensor) -> Tensor:
    logits = head(h).float()  # (C, V), fp32 for a stable logsumexp
    return logits.gather(-1, y[:, None]).squeeze(-1) - logits.logsumexp(-1)


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

    @property
    def lm(self) -> nn.Module:
        """The ``transformers`` model itself (inside a ``peft`` wrapper, LoRA layers are injected into it)."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def _split_available(self) -> bool:
        body = getattr(self.lm, "base_model", None)
        return body is not None and body is not self.lm and self.lm.get_output_embeddings() is not None

    def forward(self, input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Score ``input_ids``.

        Args:
            input_ids: prompt + response token ids, right-padded. # (N, T)
            attention_mask: 1 for real tokens. # (N, T)
            response_mask: True where a token belongs to the response and is scored. # (N, T)

        Returns:
            ``(logps, num_tokens)``: summed response log-probs and number of response tokens. # (N,), (N,)
        """
        # Logits at position t predict token t + 1, so token t is scored from position t - 1.
        target_mask = response_mask[:, 1:].bool()  # (N, T-1)
        targets = input_ids[:, 1:][target_mask]  # (R,)
        if self.response_only_head:
            # use_cache=False: a scoring pass never decodes further, so keeping every layer's K/V is waste.
            hidden = self.lm.base_model(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            ).last_hidden_state
            per_token = token_logps(
                hidden[:, :-1][target_mask], self.lm.get_output_embeddings(), targets, self.chunk_size
            )  # (N, T, H) -> (R, H) -> (R,)
        else:
            logits = self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # (N, T, V)
            per_token = logits_logps(logits[:, :-1][target_mask], targets, self.chunk_size)  # (R, V) -> (R,)
        rows = target_mask.nonzero()[:, 0]  # (R,) sequence index of each scored token
        logps = per_token.new_zeros(input_ids.shape[0]).index_add(0, rows, per_token)  # (N,)
        return logps, target_mask.sum(-1)
