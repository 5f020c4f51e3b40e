"""Per-sequence log-probs: response tokens only, chunked, response-only LM head."""

from __future__ import annotations

import pytest
import torch

from lightning_pref.logps import SequenceScorer, token_logps


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
        logps, tokens = scorer(*batch)
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
        a, _ = scorer(input_ids, attention_mask, response_mask)
        b, _ = scorer(other, attention_mask, response_mask)
    torch.testing.assert_close(a, b)


def test_chunked_token_logps_value_and_gradient():
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(10, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (10,), generator=g)

    naive = torch.log_softmax(head(hidden), -1).gather(-1, targets[:, None]).squeeze(-1)
    (grad_h_naive, grad_w_naive) = torch.autograd.grad(naive.sum() * 2, (hidden, head.weight))
    chunked = token_logps(hidden, head, targets, chunk_size=3)
    (grad_h, grad_w) = torch.autograd.grad(chunked.sum() * 2, (hidden, head.weight))

    torch.testing.assert_close(chunked, naive)
    torch.testing.assert_close(grad_h, grad_h_naive)
    torch.testing.assert_close(grad_w, grad_w_naive)


def test_response_only_head_gives_identical_gradients(tiny_model):
    batch = _batch(tiny_model.config.vocab_size, seed=1)
    grads = []
    for response_only in (True, False):
        tiny_model.zero_grad()
        logps, _ = SequenceScorer(tiny_model, chunk_size=5, response_only_head=response_only)(*batch)
        (logps * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
        grads.append({n: p.grad.clone() for n, p in tiny_model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_logit_postprocessing_models_fall_back_to_full_logits(tiny_model):
    tiny_model.config.final_logit_softcapping = 30.0
    assert SequenceScorer(tiny_model).response_only_head is False


def test_default_chunk_size_bounds_chunk_logits_by_vocabulary():
    from lightning_pref.logps import default_chunk_size

    assert default_chunk_size(8000) == 4096  # capped
    assert default_chunk_size(128_000) == 2**25 // 128_000 == 262  # 262 x 128k fp32 logits = 128 MB
    assert default_chunk_size(10**7) == 64  # floor
