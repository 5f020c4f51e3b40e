"""Completions from the policy and the reference: sampling options, stop tokens, decoding.

One function, :func:`generate`, serves ``predict``, ``evaluate``, the ``SampleCompletions`` callback and
on-policy training. It runs ``transformers``' own ``generate`` in eval mode without gradients, with the model's
generation config as the base (its EOS ids) plus the chat template's end-of-turn, and seeds a private RNG stream,
so the same seed gives the same completions and the training RNG (exact resume) is untouched.
:class:`Sampler` binds what stays fixed over a run (tokenizer, options, stop tokens) so callers pass only the
model, the prompts, the seed and how many samples per prompt.
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn
from transformers import GenerationConfig, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicCache

from lightning_pref.errors import UserInputError
from lightning_pref.layout import left_pad
from lightning_pref.logps import plain_kv_cache


@dataclass
class GenerationOptions:
    """How completions are sampled (``model.generation``); the fields of ``transformers.GenerationConfig``.

    Attributes:
        max_new_tokens: most tokens per completion (a completion that stops earlier ended with EOS).
        do_sample: sample (with ``temperature``, ``top_p`` and ``top_k``) instead of greedy decoding.
        temperature: sampling temperature.
        top_p: nucleus sampling mass.
        top_k: sample among the ``top_k`` most likely tokens only; 0 (the default) keeps them all (transformers
            would otherwise truncate to 50 whenever the model's generation config does not say).
        num_return_sequences: completions per prompt.
        seed: seed of the sampling; each batch uses ``seed`` plus its first prompt's index.
    """

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    num_return_sequences: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise UserInputError(f"model.generation.max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        if self.num_return_sequences < 1:
            raise UserInputError(f"model.generation.num_return_sequences: must be >= 1, got {self.num_return_sequences}")
        if self.num_return_sequences > 1 and not self.do_sample:
            raise UserInputError(
                "model.generation.num_return_sequences: several completions per prompt need do_sample: true "
                "(greedy decoding gives the same one each time)"
            )
        if not self.temperature > 0 or self.temperature == float("inf") or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise UserInputError(
                f"model.generation: temperature must be finite and > 0, top_p in (0, 1] and top_k >= 0, got {self.temperature}, "
                f"{self.top_p}, {self.top_k}"
            )
        changed = [f"{k} {v}" for k, v in (("temperature", self.temperature), ("top_p", self.top_p),
                                           ("top_k", self.top_k)) if v != getattr(GenerationOptions, k)]
        if changed and not self.do_sample:  # greedy decoding reads none of them: it would silently not sample
            raise UserInputError(f"model.generation: {', '.join(changed)} apply only when sampling; set do_sample: "
                                 "true, or drop them for greedy decoding")


@dataclass
class Completions:
    """Completions of a batch of ``B`` prompts, ``k = num_return_sequences`` each, prompt-major.

    Attributes:
        texts: decoded completions, special tokens dropped. # [B][k]
        ids: the generated token ids, right-padded with the pad id, ending with the stop token where one was
            generated. # (B * k, L)
        lengths: tokens of each completion, its stop token included. # (B * k,)
        eos: whether each completion stopped on a stop token (rather than at ``max_new_tokens``). # (B * k,)
        stop_ids: the tokens that ended completions.
        logps: each generated token's log-probability under the sampling model at the sampling temperature, 0
            after the stop token (``generate(logps=True)`` only). # (B * k, L)
    """

    texts: list[list[str]]
    ids: Tensor
    lengths: Tensor
    eos: Tensor
    stop_ids: list[int] = field(default_factory=list)
    logps: Tensor | None = None


def stop_token_ids(model: nn.Module, tokenizer: PreTrainedTokenizerBase, end_of_turn: str = "") -> list[int]:
    """The tokens that end a completion: the model's generation config's EOS ids, the tokenizer's EOS and the
    chat template's end-of-turn (ChatML ``<|im_end|>``, Gemma ``<end_of_turn>``) when it is one token."""
    ids: list[int] = []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (configured, tokenizer.eos_token_id):
        ids += value if isinstance(value, list) else [value] if value is not None else []
    if end_of_turn:
        encoded = tokenizer(end_of_turn, add_special_tokens=False)["input_ids"]
        if len(encoded) == 1:
            ids.append(encoded[0])
    return list(dict.fromkeys(ids))


@torch.no_grad()
def generate(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, options: GenerationOptions,
    tokenizer: PreTrainedTokenizerBase, seed: int, stop_ids: list[int], synced: bool = False, logps: bool = False,
) -> Completions:
    """Sample completions for left-padded prompts.

    With several completions per prompt, the prompts are run once (all but their last token, into a K/V cache
    expanded ``k`` times) and every sample continues from that shared prefill, instead of ``transformers``
    running each prompt ``k`` times; the samples are the same either way (the same seeded draws), for models
    whose cache is a plain full-attention one.

    Args:
        model: a ``transformers`` causal LM (the policy's, or the reference's).
        input_ids: prompts, left-padded. # (B, P)
        attention_mask: 1 for real prompt tokens. # (B, P)
        options: the sampling options.
        tokenizer: decodes the completions; its pad id pads them.
        seed: seed of this call's private RNG stream.
        stop_ids: tokens that end a completion (:func:`stop_token_ids`).
        synced: every process keeps stepping until all are done (sharded weights are gathered per forward, so
            ranks must run the same number of forwards whatever their prompts).
        logps: also return each generated token's log-probability at the sampling temperature.
    """
    base = getattr(model, "generation_config", None)
    fields = {**(base.to_dict() if base is not None else {}), **_fields(options)}
    if not options.do_sample:  # sampling parameters (ours or a checkpoint's) would only warn under greedy decoding
        for key in ("temperature", "top_p", "top_k"):
            fields.pop(key, None)
    config = GenerationConfig(**fields)
    config.eos_token_id, config.pad_token_id = stop_ids, tokenizer.pad_token_id
    config.bos_token_id = getattr(base, "bos_token_id", None)
    k = options.num_return_sequences
    prompt_length = input_ids.shape[1]
    was_training = model.training
    model.eval()
    devices = [input_ids.device] if input_ids.device.type == "cuda" else []
    try:
        extra: dict[str, Any] = {}
        # Every rank of a sharded run must run the same forwards: its prompts may not all allow a shared prefill.
        if k > 1 and prompt_length > 1 and not synced:
            cache = _shared_prefill(model, input_ids, attention_mask, k)
            if cache is not None:
                input_ids, attention_mask = input_ids.repeat_interleave(k, 0), attention_mask.repeat_interleave(k, 0)
                config.num_return_sequences = 1
                extra[_cache_argument(model)] = cache
        if logps:
            config.output_logits, config.return_dict_in_generate = True, True
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                                 synced_gpus=synced, **extra)
    finally:
        model.train(was_training)
    sequences = out.sequences if logps else out
    new = sequences[:, prompt_length:]  # (B * k, L)
    stops = torch.isin(new, torch.tensor(stop_ids, device=new.device))
    first_stop = torch.where(stops.any(-1), stops.int().argmax(-1), torch.full_like(stops[:, 0], new.shape[1], dtype=torch.long))
    eos = stops.any(-1)
    lengths = torch.where(eos, first_stop + 1, torch.full_like(first_stop, new.shape[1]))  # stop token included
    keep = torch.arange(new.shape[1], device=new.device) < lengths[:, None]
    ids = new.masked_fill(~keep, tokenizer.pad_token_id)
    decoded = [tokenizer.decode(row[:n], skip_special_tokens=True) for row, n in zip(ids, lengths.tolist(), strict=True)]
    texts = [decoded[i : i + k] for i in range(0, len(decoded), k)]
    token_logps = None
    if logps:
        temperature = options.temperature if options.do_sample else 1.0
        token_logps = torch.stack([
            (step.float() / temperature).log_softmax(-1).gather(-1, new[:, t, None]).squeeze(-1)
            for t, step in enumerate(out.logits)
        ], 1).masked_fill(~keep, 0.0) if new.shape[1] else new.new_zeros(new.shape, dtype=torch.float32)  # (B * k, L)
    return Completions(texts, ids, lengths, eos, stop_ids, token_logps)


def _cache_argument(model: nn.Module) -> str:
    """The name ``generate`` takes a cache under (``cache`` in transformers 5, ``past_key_values`` before)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _shared_prefill(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, k: int) -> Any:
    """The K/V cache of every prompt but its last token, computed once and repeated ``k`` times per prompt (the
    last token runs in ``generate``, which needs one new token to start from); ``None`` when the model's cache is
    not a plain full-attention one, whose rows can be repeated. # (B, P) -> cache of (B * k, P - 1)"""
    positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)  # as generate counts them
    argument = _cache_argument(model)
    cache = _new_cache(model)
    out = model(input_ids=input_ids[:, :-1], attention_mask=attention_mask[:, :-1], position_ids=positions[:, :-1],
                use_cache=True, **{argument: cache})
    cache = getattr(out, argument, None) or getattr(out, "past_key_values", None)
    if not plain_kv_cache(cache):
        return None
    cache.batch_repeat_interleave(k)
    return cache


def _new_cache(model: nn.Module) -> DynamicCache:
    """An empty dynamic cache for ``model`` (its config tells sliding-window layers apart in transformers 5)."""
    try:
        return DynamicCache(config=model.config)
    except TypeError:  # transformers 4.x takes no config
        return DynamicCache()


class Sampler:
    """Samples completions of prompt token ids: what stays fixed over a run, bound once.

    Args:
        tokenizer: decodes completions; its pad id pads prompts (left) and completions (right).
        options: the sampling options (``model.generation``).
        stop_ids: tokens that end a completion (:func:`stop_token_ids`).
        synced: every process keeps stepping until all are done (sharded models, see :func:`generate`).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, options: GenerationOptions, stop_ids: list[int],
                 synced: bool = False) -> None:
        self.tokenizer, self.options, self.stop_ids, self.synced = tokenizer, options, stop_ids, synced

    def __call__(self, model: nn.Module, prompts: list[list[int]], seed: int, k: int | None = None,
                 logps: bool = False) -> Completions:
        """``k`` completions (default ``options.num_return_sequences``) of each prompt by ``model``, on its device.

        Args:
            model: a ``transformers`` causal LM.
            prompts: prompt token ids. # [B]
            seed: seed of this call's private RNG stream.
            k: completions per prompt.
            logps: also each generated token's log-probability at the sampling temperature.
        """
        device = next(model.parameters()).device
        ids, mask = (t.to(device) for t in left_pad(prompts, self.tokenizer.pad_token_id))
        options = self.options if k is None else replace(self.options, num_return_sequences=k)
        return generate(model, ids, mask, options, self.tokenizer, seed, self.stop_ids, self.synced, logps)


def _fields(options: GenerationOptions) -> dict:
    values = asdict(options)
    values.pop("seed")
    return values
