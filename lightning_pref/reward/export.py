"""A reward model as a standard Hugging Face sequence-classification directory.

Consumers call ``model(**batch).logits`` on right-padded batches, and Hugging Face's sequence-classification
models read the last token whose id is not ``config.pad_token_id``. Where the pad id is also a token that ends
sequences (pad = EOS: SmolLM2, Qwen, Llama 3), that would be the token *before* the EOS, not the one the model
was trained to score. So the export gives the tokenizer a pad token of its own (one embedding row more, never
attended to) and points ``pad_token_id`` at it: the plain forward then scores exactly what training scored.

The validation set's reward mean and standard deviation at the last validation go into the config
(``reward_mean``, ``reward_std``), so a consumer can normalize: ``(logits - reward_mean) / reward_std``.
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path
from typing import Any

import torch

from lightning_pref.data.chat import ChatTemplate
from lightning_pref.models import DtypeName, quiet_saving
from lightning_pref.reward.module import RewardModule

PAD_TOKEN = "<|reward_pad|>"
_SCORER_PREFIX = "scorer."


def ends_sequences(tokenizer: Any, token_id: int | None) -> bool:
    """Whether ``token_id`` can be a real token at the end of a scored sequence: EOS, BOS, or the chat template's
    end-of-turn."""
    if token_id is None:
        return True
    stops = {tokenizer.eos_token_id, tokenizer.bos_token_id}
    if getattr(tokenizer, "chat_template", None):
        end_of_turn = ChatTemplate(tokenizer).end_of_turn
        ids = tokenizer(end_of_turn, add_special_tokens=False)["input_ids"] if end_of_turn else []
        stops |= set(ids[-1:])
    return token_id in stops


def save_reward_model(module: RewardModule, output_dir: str | Path, dtype: DtypeName | None = None) -> Path:
    """Write ``module``'s reward model and tokenizer with ``save_pretrained`` (see the module docstring)."""
    out = Path(output_dir)
    model, tokenizer = copy.deepcopy(module.scorer.model), copy.deepcopy(module.tokenizer)
    if ends_sequences(tokenizer, tokenizer.pad_token_id):
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        needed = max(len(tokenizer), tokenizer.pad_token_id + 1)  # (a byte tokenizer's len() can lag its ids)
        if needed > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(needed, mean_resizing=False)
    model.config.pad_token_id = tokenizer.pad_token_id
    if dtype is not None:
        model = model.to(getattr(torch, dtype))
    stats = module.reward_stats
    if stats:
        model.config.reward_mean, model.config.reward_std = stats["mean"], stats["std"]
    with quiet_saving():
        model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def load_reward_from_checkpoint(checkpoint: dict[str, Any]) -> RewardModule:
    """Rebuild a reward module from a loaded checkpoint (hyperparameters, weights, reward statistics)."""
    accepted = inspect.signature(RewardModule.__init__).parameters
    hparams = {k: v for k, v in checkpoint["hyper_parameters"].items() if k in accepted}
    state = {k[len(_SCORER_PREFIX) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(_SCORER_PREFIX)}
    trained = next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)
    hparams.update(loss=None, dtype=str(trained).removeprefix("torch."))  # the loss is not needed to export
    module = RewardModule(**hparams)
    module.configure_model()
    module.scorer.load_state_dict(state)
    module.reward_stats = dict(checkpoint.get("reward_stats") or {})
    return module
