"""Per-sequence log-probs: response tokens only, chunked, response-only LM head."""

from __future__ import annotations

import pytest
import torch

from lightning_pref.head import LogitTransform, token_logps
from lightning_pref.logps import SequenceScorer
from tests.support import with_kl_rows


def _batch(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (3, 12), generator=g)
    attention_mask = torch.ones_like(input_ids)
    response_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    # row 0: prompt 4, response 8; row 1: prompt 2, response 5, then padding; row 2: prompt 6, response 1
    response_mask[0, 4:12] = True
    response_mask[1, 2:7] = True
    attention_mask[1, 7:] = 0
    input_ids[1, 7:] = 0
    response_mask[2, 6:7] = True
    attention_mask[2, 7:] = 0
    return input_ids, attention_mask, response_mask


def _brute_force(model, input_ids, attention_mask, response_mask):
    """Loop over every token: sum log_softmax(logits[t-1])[token t] over response tokens."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    out = []
    for row in range(input_ids.shape[0]):
        total = 0.0
        for t in range(1, input_ids.shape[1]):
            if response_mask[row, t]:
                total += torch.log_softmax(logits[row, t - 1].double(), -1)[input_ids[row, t]].item()
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("response_only_head", [True, False])
@pytest.mark.parametrize("chunk_size", [1, 4, 1024])
def test_sequence_logps_match_brute_force(tiny_model, response_only_head, chunk_size):
    scorer = SequenceScorer(tiny_model, chunk_size=chunk_size, response_only_head=response_only_head)
    assert scorer.response_only_head is response_only_head
    batch = _batch(tiny_model.config.vocab_size)
    with torch.no_grad():
        logps, tokens, _ = scorer(*batch)
        expected = _brute_force(tiny_model, *batch)
    torch.testing.assert_close(logps.double(), expected, rtol=1e-5, atol=1e-4)
    assert tokens.tolist() == [8, 5, 1]


def test_prompt_and_padding_do_not_count(tiny_model):
    """Changing padding ids changes nothing; only response tokens are summed."""
    scorer = SequenceScorer(tiny_model)
    input_ids, attention_mask, response_mask = _batch(tiny_model.config.vocab_size)
    other = input_ids.clone()
    other[attention_mask == 0] = 7  # different padding token ids
    with torch.no_grad():
        a = scorer(input_ids, attention_mask, response_mask)[0]
        b = scorer(other, attention_mask, response_mask)[0]
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("head_kind", ["linear", "linear_bias", "module"])
@pytest.mark.parametrize("chunk_size", [3, 10])
def test_chunked_token_logps_value_and_gradient(head_kind, chunk_size):
    """Against ``log_softmax`` of the full logits, with uneven upstream gradients: the fused path of a plain
    ``nn.Linear`` head (with and without bias) and the checkpointed path of any other head module."""
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(16, 50, bias=head_kind == "linear_bias")
    head = torch.nn.Sequential(linear) if head_kind == "module" else linear
    hidden = torch.randn(10, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (10,), generator=g)
    upstream = torch.randn(10, generator=g)
    params = (hidden, *linear.parameters())

    naive = torch.log_softmax(head(hidden), -1).gather(-1, targets[:, None]).squeeze(-1)
    expected = torch.autograd.grad((naive * upstream).sum(), params)
    chunked = token_logps(hidden, head, targets, chunk_size=chunk_size)
    grads = torch.autograd.grad((chunked * upstream).sum(), params)

    torch.testing.assert_close(chunked, naive)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("columns", [4, 64])  # 13 tiles (the last of 2 columns), or the vocabulary in one
@pytest.mark.parametrize("transform", [LogitTransform(), LogitTransform(0.5, None, 0.7), LogitTransform(2.0, 3.0, 0.8)],
                         ids=["identity", "scale_temperature", "softcap"])
@pytest.mark.parametrize("kept", [0, 500, 10**6], ids=["recompute", "last_chunk_kept", "all_kept"])
def test_fused_head_in_tiles_value_gradient_and_entropy(columns, transform, kept, monkeypatch):
    """The fused head over tiles of vocabulary columns (the online logsumexp, each target picked in its tile,
    each tile's rows of the weight's gradient) against autograd on the full logits ``s = T(h W^T + b)``:
    log-probs, gradients of the hidden states, weight and bias, and each row's entropy; backward recomputing
    each chunk's tiles, or taking the last chunk's (500 logits: 10 rows) or all chunks' exponentials kept from
    forward."""
    monkeypatch.setattr("lightning_pref.head._TILE_LOGITS", 10 * columns)  # chunks of 10 rows
    monkeypatch.setattr("lightning_pref.head._KEEP_LOGITS", kept)
    g = torch.Generator().manual_seed(4)
    head = torch.nn.Linear(16, 50)
    hidden = torch.randn(20, 16, generator=g, requires_grad=True)
    targets = torch.tensor([0, 49, 6, 7, 48, *torch.randint(0, 50, (15,), generator=g).tolist()])  # tile edges
    upstream = torch.randn(20, generator=g)
    params = (hidden, head.weight, head.bias)

    z = head(hidden) * transform.scale
    s = (transform.softcap * torch.tanh(z / transform.softcap) if transform.softcap else z) / transform.temperature
    naive = torch.log_softmax(s, -1).gather(-1, targets[:, None]).squeeze(-1)
    expected = torch.autograd.grad((naive * upstream).sum(), params)
    logps, entropy = token_logps(hidden, head, targets, chunk_size=10, transform=transform, entropy=True)
    grads = torch.autograd.grad((logps * upstream).sum(), params)

    torch.testing.assert_close(logps, naive)
    torch.testing.assert_close(entropy, -(s.softmax(-1) * s.log_softmax(-1)).sum(-1).detach())
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize(("kept", "recomputed"), [(0, [0, 1, 2]), (50 * 8, [0]), (10**6, [])])
def test_fused_head_recomputes_only_the_chunks_it_did_not_keep(kept, recomputed, monkeypatch):
    """Backward recomputes a chunk's logits (one matmul per tile) unless forward kept its exponentials: the
    trailing chunks whose logits fit within ``_KEEP_LOGITS`` (here 8 of the 10 rows: the last two chunks of 4
    and 2 rows, not the first of 4), none without gradient."""
    from torch.utils._python_dispatch import TorchDispatchMode

    monkeypatch.setattr("lightning_pref.head._KEEP_LOGITS", kept)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(10, 16, requires_grad=True)
    targets = torch.randint(0, 50, (10,))
    logits_of: list[int] = []  # rows of each (rows, 50) matmul result: a chunk's logits

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default) and out.shape[1:] == (50,):
                logits_of.append(out.shape[0])
            return out

    out = token_logps(hidden, head, targets, chunk_size=4)
    with Record():
        out.sum().backward()
    assert logits_of == [[4, 4, 2][i] for i in reversed(recomputed)]  # backward takes the last chunk first
    with torch.no_grad(), Record():
        logits_of.clear()
        token_logps(hidden, head, targets, chunk_size=4)
    assert logits_of == [4, 4, 2]  # forward: every chunk, once


def test_fused_head_scores_no_rows_with_gradient():
    """A pass with no scored token (``split`` gives one empty chunk) returns no log-probs and a zero-row
    gradient, whether or not that chunk keeps its exponentials."""
    head = torch.nn.Linear(16, 50)
    hidden = torch.zeros(0, 16, requires_grad=True)
    logps = token_logps(hidden, head, torch.zeros(0, dtype=torch.long), chunk_size=4)
    logps.sum().backward()
    assert logps.shape == (0,) and hidden.grad is not None and hidden.grad.shape == (0, 16)
    assert head.weight.grad is not None and not head.weight.grad.any()


def test_fused_head_under_bf16_autocast_matches_autograd():
    """Under autocast the fused head recomputes its logits in bf16 in backward, as autograd's linear would."""
    g = torch.Generator().manual_seed(1)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(10, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (10,), generator=g)
    upstream = torch.randn(10, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = token_logps(hidden, head, targets, chunk_size=4)
        reference = torch.cat([
            _chunk.float().gather(-1, y[:, None]).squeeze(-1) - _chunk.float().logsumexp(-1)
            for _chunk, y in zip(head(hidden).split(4), targets.split(4), strict=True)
        ])
    assert head(hidden).dtype == torch.float32  # outside autocast
    got = torch.autograd.grad((fused * upstream).sum(), (hidden, head.weight))
    want = torch.autograd.grad((reference * upstream).sum(), (hidden, head.weight))
    torch.testing.assert_close(fused, reference)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_response_only_head_gives_identical_gradients(tiny_model):
    batch = _batch(tiny_model.config.vocab_size, seed=1)
    grads = []
    for response_only in (True, False):
        tiny_model.zero_grad()
        logps = SequenceScorer(tiny_model, chunk_size=5, response_only_head=response_only)(*batch)[0]
        (logps * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
        grads.append({n: p.grad.clone() for n, p in tiny_model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


# Architectures whose CausalLM post-processes the head's logits: final soft-capping (Gemma 2), a multiplier
# (Cohere's logit_scale), a divisor (Granite's logits_scaling).
_POSTPROCESSING = {
    "gemma2": {"model_type": "gemma2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "final_logit_softcapping": 2.0,
               "max_position_embeddings": 64},
    "cohere": {"model_type": "cohere", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
               "num_attention_heads": 2, "num_key_value_heads": 2, "logit_scale": 3.0, "max_position_embeddings": 64},
    "granite": {"model_type": "granite", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                "num_attention_heads": 2, "num_key_value_heads": 2, "logits_scaling": 0.25,
                "max_position_embeddings": 64},
}


def _sharpened(architecture: str, tokenizer):
    """A tiny model of ``architecture`` with its head scaled up, so logits are large and post-processing matters
    (a soft-cap of 2 changes logits of +-10 by whole nats)."""
    from lightning_pref.models import load_causal_lm

    model = load_causal_lm(_POSTPROCESSING[architecture], field="test", seed=0, vocab_size=len(tokenizer))
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40.0)
    return model


@pytest.mark.parametrize("architecture", list(_POSTPROCESSING))
def test_postprocessed_logits_inside_the_response_only_head(tokenizer, architecture):
    """The chunked head applies the model's own post-processing: values equal the model's logits (brute force)
    and gradients equal the full-logits path, without falling back to (N, T, V) logits."""
    model = _sharpened(architecture, tokenizer)
    scorer = SequenceScorer(model, chunk_size=3)
    assert scorer.response_only_head and not scorer.transform.identity
    batch = _batch(model.config.vocab_size, seed=2)
    logps = scorer(*batch)[0]
    with torch.no_grad():
        torch.testing.assert_close(logps.double(), _brute_force(model, *batch), rtol=1e-5, atol=1e-4)
    weights = torch.tensor([1.0, -2.0, 0.5])
    grads = []
    for response_only in (True, False):
        model.zero_grad()
        (SequenceScorer(model, chunk_size=3, response_only_head=response_only)(*batch)[0] * weights).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, want in grads[1].items():  # sharpened logits give gradients of ~1e3: tolerance relative to them
        atol = 1e-5 * float(want.abs().max()) + 1e-7
        torch.testing.assert_close(grads[0][name], want, rtol=1e-3, atol=atol, msg=name)


def test_self_check_catches_postprocessing_the_head_does_not_apply(tokenizer):
    """Had the head missed Gemma 2's soft-cap, the first batch stops with an error naming the architecture."""
    from lightning_pref.errors import UserInputError

    model = _sharpened("gemma2", tokenizer)
    batch = _batch(model.config.vocab_size, seed=2)
    assert SequenceScorer(model).checked is False
    right = SequenceScorer(model)
    right(*batch)  # passes
    assert right.checked
    wrong = SequenceScorer(model)
    wrong.transform = LogitTransform()  # what the head would do without knowing final_logit_softcapping
    with pytest.raises(UserInputError, match="Gemma2ForCausalLM.*response_only_head: false"):
        wrong(*batch)


def test_self_check_runs_once_and_not_for_the_full_logits_path(tiny_model, monkeypatch):
    calls = []
    original = SequenceScorer.check_head
    monkeypatch.setattr(SequenceScorer, "check_head", lambda self, *a: calls.append(1) or original(self, *a))
    batch = _batch(tiny_model.config.vocab_size)
    scorer = SequenceScorer(tiny_model)
    for _ in range(3):
        scorer(*batch)
    SequenceScorer(tiny_model, response_only_head=False)(*batch)
    assert calls == [1]


@pytest.mark.parametrize("tied", [True, False])
def test_tied_embeddings_gradients_through_the_fused_head(tokenizer, tied):
    """With tied input/output embeddings the one weight gets the head's and the embedding's gradient: the
    fused head's equals autograd's. Tied, the response-only head's pass takes the embedding's part as sparse
    rows (no dense (V, H) embedding gradient is built) and the weight's gradient stays dense."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from lightning_pref.models import load_causal_lm

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func.__name__)
            return func(*args, **(kwargs or {}))

    config = {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 2, "num_key_value_heads": 1, "tie_word_embeddings": tied,
              "max_position_embeddings": 64}
    model = load_causal_lm(config, field="test", seed=0, vocab_size=len(tokenizer))
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) is tied
    batch = _batch(model.config.vocab_size, seed=3)
    grads = []
    for response_only in (True, False):
        model.zero_grad()
        logps = SequenceScorer(model, chunk_size=4, response_only_head=response_only)(*batch)[0]
        with Ops() as ops:
            logps.sum().backward()
        dense_rows = any(name.startswith("embedding_dense_backward") for name in ops.names)
        assert dense_rows == (not (tied and response_only))
        assert model.get_input_embeddings().weight.grad.layout == torch.strided
        assert not model.get_input_embeddings().sparse
        grads.append(model.get_input_embeddings().weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_fused_head_under_bf16_never_holds_an_fp32_copy_of_the_chunk(softcap, monkeypatch):
    """Under bf16 autocast the chunk's logits never exist whole, in forward or backward: one tile of vocabulary
    columns at a time, in bf16, with at most a tile-sized fp32 copy (the module docstring's claim)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    rows, vocab, columns = 64, 512, 64
    head = torch.nn.Linear(16, vocab, bias=False)
    hidden = torch.randn(rows, 16, requires_grad=True)
    targets = torch.randint(0, vocab, (rows,))
    sizes: list[tuple[torch.dtype, int]] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple | list) else [out]:
                if isinstance(t, torch.Tensor):
                    sizes.append((t.dtype, t.numel()))
            return out

    monkeypatch.setattr("lightning_pref.head._TILE_LOGITS", rows * columns)
    with Record(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = token_logps(hidden, head, targets, chunk_size=rows, transform=LogitTransform(1.0, softcap))
        out.sum().backward()
    tile = rows * columns
    assert (torch.bfloat16, tile) in sizes  # a tile of logits, in bf16
    assert max(n for _, n in sizes if n != vocab * 16) <= tile  # nothing of a chunk's (rows, vocab) size
    assert max(n for dtype, n in sizes if dtype == torch.float32 and n != vocab * 16) <= tile
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()
    assert head.weight.grad is not None and torch.isfinite(head.weight.grad).all()


def test_default_chunk_size_bounds_chunk_logits_by_vocabulary():
    from lightning_pref.head import default_chunk_size

    assert default_chunk_size(1000) == 4096  # capped
    assert default_chunk_size(8000) == 2**23 // 8000 == 1048  # 1048 x 8k fp32 logits = 32 MB
    assert default_chunk_size(32_000) == 2**23 // 32_000 == 262
    assert default_chunk_size(128_000) == 256  # floor: 2**23 // 128_000 would be 65 rows


# Tiny configs of other architectures: absolute positions (gpt2), partial rotary (gpt_neox), grouped K/V heads
# (qwen2), a sliding-window cache that cannot be shared (mistral: the scorer must fall back to a full pass).
_ARCHITECTURES = {
    "llama": {},
    "gpt2": {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64},
    "gpt_neox": {"model_type": "gpt_neox", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                 "num_attention_heads": 2, "rotary_pct": 0.5, "max_position_embeddings": 64},
    "qwen2": {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64},
    "mistral": {"model_type": "mistral", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                "num_attention_heads": 2, "num_key_value_heads": 1, "sliding_window": 4096,
                "max_position_embeddings": 64},
}
_SHARES_PROMPTS = {"llama", "gpt2", "gpt_neox", "qwen2"}


def _kto_batch():
    """Unpaired rows with prompts of 1-6 tokens and responses of 1-6 tokens, plus their mismatched KL rows."""
    from lightning_pref.data.collate import PreferenceCollator
    from lightning_pref.data.tokenize import Encoded

    g = torch.Generator().manual_seed(5)
    lengths = [(4, 6, True), (2, 3, False), (6, 1, True), (1, 5, False), (3, 2, True)]
    examples = [
        Encoded(torch.randint(3, 250, (p,), generator=g).tolist(), torch.randint(3, 250, (r,), generator=g).tolist(),
                label=label)
        for p, r, label in lengths
    ]
    return with_kl_rows(PreferenceCollator(0)(examples))


@pytest.mark.parametrize("architecture", list(_ARCHITECTURES))
def test_kl_rows_reusing_prompt_cache_match_a_full_pass(tokenizer, tiny_model, monkeypatch, architecture):
    """The KL rows' log-probs, computed on top of the batch's cached prompt K/V, equal scoring them from scratch
    (and the brute-force loop), while the batch's own log-probs are unchanged and still carry gradients."""
    from lightning_pref.models import load_causal_lm

    model = tiny_model if architecture == "llama" else load_causal_lm(
        _ARCHITECTURES[architecture], field="test", seed=0, vocab_size=len(tokenizer)
    )
    model.train()  # dropout-free configs; training mode is where the policy's cache must still be usable
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    scorer = SequenceScorer(model, chunk_size=4)
    calls = []
    original = SequenceScorer._score_continuations
    monkeypatch.setattr(SequenceScorer, "_score_continuations", lambda *a: calls.append(1) or original(*a))
    batch = _kto_batch()
    main = (batch.input_ids, batch.attention_mask, batch.response_mask)

    logps, tokens, kl_logps = scorer(*main, batch.kl_rows)
    assert len(calls) == (architecture in _SHARES_PROMPTS)
    assert logps.requires_grad and not kl_logps.requires_grad
    with torch.no_grad():
        plain_logps, plain_tokens, none = scorer(*main)
        expected = scorer(*batch.kl_rows[:3])[0]
        brute = _brute_force(model, *batch.kl_rows[:3])
    assert none is None and tokens.tolist() == plain_tokens.tolist()
    torch.testing.assert_close(logps.detach(), plain_logps)
    torch.testing.assert_close(kl_logps, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl_logps.double(), brute, rtol=1e-5, atol=1e-4)


def test_kl_rows_fall_back_to_a_full_pass_under_gradient_checkpointing(tiny_model, monkeypatch):
    """Gradient checkpointing turns the policy's cache off in training, so the KL rows are scored from scratch."""
    tiny_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tiny_model.train()
    monkeypatch.setattr(SequenceScorer, "_score_continuations", lambda *a: pytest.fail("must not reuse a cache"))
    batch = _kto_batch()
    kl_logps = SequenceScorer(tiny_model)(batch.input_ids, batch.attention_mask, batch.response_mask, batch.kl_rows)[2]
    with torch.no_grad():
        torch.testing.assert_close(kl_logps, SequenceScorer(tiny_model)(*batch.kl_rows[:3])[0])
