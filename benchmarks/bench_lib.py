"""Shared pieces of the benchmarks: synthetic data, a word-level tokenizer, memory probes, step timers.

Everything here runs without network access: the tokenizer is a ``tokenizers`` WordLevel model over the
vocabulary ``<pad> </s> <unk> w3 ... w{V-1}`` (one word = one token), saved as a ``PreTrainedTokenizerFast``
directory, so lightning-pref (``model.tokenizer: <dir>``) and TRL tokenize the same text into the same ids the
plain loop reads directly.
"""

from __future__ import annotations

import json
import os
import random
import re
import resource
import statistics
import time
from pathlib import Path
from typing import Any

PAD, EOS, UNK = 0, 1, 2
FIRST_WORD = 3

# Default model of the throughput benchmark: the "small Llama: 4 layers x 256 wide".
DEFAULT_MODEL = {
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 1024,
}

# `--model-config <name>`: named shapes. "0.5b" is the GPU benchmark's ~0.5B-parameter Llama (470M at a 32k
# vocabulary: 24 layers x 1024, 4096 MLP, untied LM head), sized like Qwen2.5-0.5B / TinyLlama-class models.
MODEL_PRESETS = {
    "small": DEFAULT_MODEL,
    "0.5b": {
        "model_type": "llama",
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "max_position_embeddings": 4096,
    },
}

# Trainer precision -> (autocast dtype or None, parameter dtype): how the plain loop and TRL reproduce it.
PRECISIONS = {
    "32-true": (None, "float32"),
    "bf16-mixed": ("bfloat16", "float32"),
    "bf16-true": (None, "bfloat16"),
}


def compute_dtype(precision: str) -> str:
    """The dtype the matmuls of a ``precision`` run in (the autocast dtype, else the parameters')."""
    autocast, param_dtype = PRECISIONS[precision]
    return autocast or param_dtype


def device() -> str:
    """Where the benchmark runs: the GPU when there is one (as Lightning's ``accelerator: auto`` picks)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    """Wait for queued GPU kernels (a no-op on CPU), so a timestamp taken next covers them."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------- tokenizer / data
def build_tokenizer(vocab: int, directory: Path) -> Path:
    """A WordLevel tokenizer with exactly ``vocab`` tokens (``len(tokenizer) == vocab``), saved to ``directory``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": PAD, "</s>": EOS, "<unk>": UNK}
    words.update({f"w{i}": i for i in range(FIRST_WORD, vocab)})
    backend = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(str(directory))
    return directory


def text(ids: list[int], leading_space: bool = False) -> str:
    return (" " if leading_space else "") + " ".join(f"w{i}" for i in ids)


def make_pairs(
    n: int, vocab: int, prompt_len: int, response_len: int, jitter: float = 0.0, seed: int = 0
) -> list[dict[str, list[int]]]:
    """``n`` random-token pairs. Responses have ``response_len`` tokens *including* the EOS every framework
    appends, so a sequence is ``prompt_len + response_len`` tokens. ``jitter`` in [0, 1): lengths are drawn
    uniformly from ``[(1 - jitter) L, L]`` (for padding / length-grouping measurements)."""
    rng = random.Random(seed)

    def length(full: int) -> int:
        return max(1, rng.randint(round(full * (1 - jitter)), full)) if jitter else full

    def words(k: int) -> list[int]:
        return [rng.randrange(FIRST_WORD, vocab) for _ in range(k)]

    pairs = []
    for _ in range(n):
        prompt = words(length(prompt_len))
        chosen = words(max(1, length(response_len) - 1))
        rejected = words(max(1, length(response_len) - 1))
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


HH_LENGTHS = Path(__file__).resolve().parent / "data" / "hh_lengths.json"


def make_pairs_like(n: int, vocab: int, lengths_file: Path = HH_LENGTHS, seed: int = 0) -> list[dict[str, list[int]]]:
    """``n`` random-token pairs whose ``(prompt, chosen, rejected)`` token counts are drawn (seeded, with
    replacement) from real data's (``hh_lengths.py`` writes them; the counts include the EOS / end-of-turn, so
    each response gets one word less, as in :func:`make_pairs`)."""
    rng = random.Random(seed)
    lengths = json.loads(Path(lengths_file).read_text())["lengths"]
    pairs = []
    for _ in range(n):
        prompt, chosen, rejected = lengths[rng.randrange(len(lengths))]
        words = [[rng.randrange(FIRST_WORD, vocab) for _ in range(max(1, k))] for k in (prompt, chosen - 1, rejected - 1)]
        pairs.append(dict(zip(("prompt", "chosen", "rejected"), words, strict=True)))
    return pairs


def write_data(pairs: list[dict[str, list[int]]], directory: Path) -> dict[str, str]:
    """Paired JSONL (DPO), unpaired JSONL (KTO: the pair as one desirable and one undesirable example, in that
    order) and the token ids (``ids.json``, read by the plain loop)."""
    paired = directory / "train.jsonl"
    unpaired = directory / "unpaired.jsonl"
    with paired.open("w") as f:
        for p in pairs:
            record = {"prompt": text(p["prompt"]), "chosen": text(p["chosen"], True), "rejected": text(p["rejected"], True)}
            f.write(json.dumps(record) + "\n")
    with unpaired.open("w") as f:
        for p in pairs:
            for key, label in (("chosen", True), ("rejected", False)):
                record = {"prompt": text(p["prompt"]), "completion": text(p[key], True), "label": label}
                f.write(json.dumps(record) + "\n")
    ids = directory / "ids.json"
    ids.write_text(json.dumps(pairs))
    return {"paired": str(paired), "unpaired": str(unpaired), "ids": str(ids)}


def load_model(model_config: dict[str, Any], vocab: int, seed: int = 0):
    """The policy exactly as ``PreferenceModule`` builds it (same helper, seed and tokenizer-derived fields)."""
    from lightning_pref.models import load_causal_lm

    return load_causal_lm(model_config, field="benchmark", seed=seed, vocab_size=vocab, pad_token_id=PAD)


def param_counts(model) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    return {"total": total, "input_embedding": embedding, "flop_params": total - embedding}


# -------------------------------------------------------------------------------------------------------- memory
def rss_mb() -> float:
    return _status_kb("VmRSS") / 1024


def peak_rss_mb() -> float:
    """Peak resident set size since start or the last :func:`reset_peak_rss` (``VmHWM``)."""
    kb = _status_kb("VmHWM")
    return (kb if kb else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux ``clear_refs`` 5); False where not supported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_kb(field: str) -> int:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return 0
    return int(match.group(1)) if match else 0


class MemoryProbe:
    """RSS at training start, then the peak of the training steps alone (CPU), or CUDA allocator peaks."""

    def __init__(self) -> None:
        self.lifetime_peak_before = 0.0
        self.start = 0.0
        self.reset_ok = False

    def on_train_start(self) -> None:
        import torch

        self.lifetime_peak_before = peak_rss_mb()
        self.start = rss_mb()
        self.reset_ok = reset_peak_rss()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def report(self) -> dict[str, float]:
        import torch

        train_peak = peak_rss_mb()
        out = {
            "rss_at_train_start_mb": self.start,
            "train_peak_rss_mb": train_peak if self.reset_ok else float("nan"),
            "peak_rss_mb": max(train_peak, self.lifetime_peak_before),
        }
        if torch.cuda.is_available():
            out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
        return out


# --------------------------------------------------------------------------------------------------------- timing
class StepClock:
    """Timestamps at the end of each optimizer step, and the non-pad tokens of each step's batch.

    Steady-state seconds per step = (end of last step - end of the last warm-up step) / measured steps: the span
    covers everything a step costs (data loading, collation, forward, backward, optimizer, logging, callbacks).
    """

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.ends: list[float] = []
        self.tokens: list[int] = []  # non-pad tokens of the trained sequences (KL rows excluded)
        self.padded: list[int] = []  # all cells the model runs on, pads and packing filler included
        self.real: list[int] = []  # the cells that are not padding (a shared prompt once)
        self.reference_seconds: list[float] = []  # per step: time inside the reference model's forward, if timed
        self._reference_running = 0.0
        self.memory = MemoryProbe()

    def add_reference_time(self, seconds: float) -> None:
        self._reference_running += seconds

    def batch(self, attention_mask=None, *, tokens: int | None = None, cells: int | None = None,
              real: int | None = None) -> None:
        """One training batch: its ``attention_mask`` (padded), or for a packed batch its sequences' ``tokens``
        (as a padded batch holds them: the same count for every variant of the same data), the ``cells`` the
        model runs on and the ``real`` (non-filler) ones among them."""
        if attention_mask is not None:
            tokens = real = int(attention_mask.sum())
            cells = int(attention_mask.numel())
        self.tokens.append(tokens)
        self.padded.append(cells)
        self.real.append(real)

    def step_end(self) -> None:
        sync()  # kernels run asynchronously: the step ends when the GPU is done
        self.ends.append(time.perf_counter())
        self.reference_seconds.append(self._reference_running)
        self._reference_running = 0.0

    def report(self) -> dict[str, Any]:
        w, n = self.warmup, len(self.ends) - self.warmup
        if n < 1 or w < 1:
            raise RuntimeError(f"need >= 1 warm-up and >= 1 measured step, got {len(self.ends)} steps, warmup {w}")
        seconds = (self.ends[-1] - self.ends[w - 1]) / n
        tokens = self.tokens[w : w + n]
        padded, real = self.padded[w : w + n], self.real[w : w + n]
        reference = sum(self.reference_seconds[w : w + n]) / n
        return {
            **({"reference_seconds_per_step": reference} if reference > 0 else {}),
            "seconds_per_step": seconds,
            "step_times": [b - a for a, b in zip(self.ends[w - 1 : -1], self.ends[w:], strict=True)],
            "measured_steps": n,
            "tokens_per_step": sum(tokens) / max(len(tokens), 1),
            "pad_fraction": 1 - sum(real) / max(sum(padded), 1),
            "cells_per_step": sum(padded) / max(len(padded), 1),
            **self.memory.report(),
        }


def _lightning_callback_base():
    from lightning.pytorch import Callback

    return Callback


class StepTimer(_lightning_callback_base()):
    """Lightning callback around :class:`StepClock`; the last instance is kept in ``StepTimer.last``."""

    last: StepTimer | None = None

    def __init__(self, warmup: int = 3) -> None:
        super().__init__()
        self.clock = StepClock(warmup)
        StepTimer.last = self

    def on_train_start(self, trainer, pl_module) -> None:
        self.clock.memory.on_train_start()
        if getattr(pl_module, "reference", None) is not None:
            self._time_reference(pl_module.reference)

    def _time_reference(self, reference) -> None:
        """Time the reference model's forward (model mode): its share of the step bounds what
        ``reference_mode: precomputed`` can save."""
        forward, clock = reference.forward, self.clock

        def timed(*args, **kwargs):
            sync()
            start = time.perf_counter()
            out = forward(*args, **kwargs)
            sync()
            clock.add_reference_time(time.perf_counter() - start)
            return out

        reference.forward = timed  # an instance attribute: nn.Module.__call__ looks it up first

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        packed = batch.packed
        if packed is None:
            self.clock.batch(batch.attention_mask)
            return
        # A sequence's length is its last position + 1, also for a rejected response that continues a shared prompt.
        import torch

        index, positions = packed.sequence_index.flatten(), packed.position_ids.flatten()
        keep = index >= 0
        ends = torch.zeros(packed.num_sequences, dtype=torch.long, device=index.device)
        ends = ends.scatter_reduce(0, index[keep], positions[keep], "amax")
        self.clock.batch(tokens=int((ends + 1).sum()), cells=packed.input_ids.numel(), real=packed.real_tokens)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.clock.step_end()


# ---------------------------------------------------------------------------------------------------- statistics
def median(values: list[float]) -> float:
    values = [v for v in values if v == v]  # drop NaN
    return statistics.median(values) if values else float("nan")


def matmul_peak_flops(dtype: str = "float32", size: int | None = None, repeats: int = 5) -> float:
    """Best-of-``repeats`` FLOP/s of a ``size`` x ``size`` matmul in ``dtype`` on the benchmark's device
    (2048 on CPU; 8192 on a GPU, which a smaller matmul does not fill)."""
    import torch

    where = device()
    size = size or (8192 if where == "cuda" else 2048)
    a = torch.randn(size, size, device=where, dtype=getattr(torch, dtype))
    b = torch.randn(size, size, device=where, dtype=getattr(torch, dtype))
    best = float("inf")
    for _ in range(repeats + 1):
        sync()
        t = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best


def environment() -> dict[str, Any]:
    import platform

    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
    }
    for package in ("lightning", "transformers", "trl"):
        try:
            from importlib.metadata import version

            info[package] = version(package)
        except Exception:
            info[package] = None
    return info
