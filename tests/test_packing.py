"""Packed batches (``data.packing``) score exactly what padded ones do, with shared prompts too, and train alike."""

from __future__ import annotations

import logging
from functools import partial

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

from lightning_pref import PreferenceModule, packing, segment_attention
from lightning_pref.data.collate import PreferenceCollator
from lightning_pref.data.tokenize import Encoded
from lightning_pref.layout import (
    Segment,
    best_fit_decreasing,
    pack,
    pad,
    row_bins,
    segment_spans,
    unpacked_sequences,
)
from lightning_pref.logps import SequenceScorer
from lightning_pref.losses import KTOLoss
from lightning_pref.reward import RewardModule
from tests.support import TINY, tiny_fit, with_kl_rows

VOCAB = 64
_SMALL = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2}
# Sliding windows shorter than the sequences below, so the window changes the log-probs.
ARCHITECTURES = {
    "llama": (LlamaConfig(**_SMALL), "sdpa"),
    "qwen2_tied": (Qwen2Config(**_SMALL, tie_word_embeddings=True), "sdpa"),
    "gemma2_window_softcap": (Gemma2Config(**_SMALL, head_dim=8, sliding_window=4, final_logit_softcapping=5.0,
                                           attn_logit_softcapping=20.0), "eager"),
    "gemma3_window": (Gemma3TextConfig(**_SMALL, head_dim=8, sliding_window=4, layer_types=["sliding_attention",
                                                                                            "full_attention"]), "sdpa"),
    "gpt2": (GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=1), "sdpa"),
    "gpt2_eager": (GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=1),
                   "eager"),
}


def _ids(g: torch.Generator, n: int) -> list[int]:
    return torch.randint(3, VOCAB, (n,), generator=g).tolist()


def _pairs() -> list[tuple[list[int], list[int]]]:
    """``[chosen; rejected]`` of 4 pairs: an empty prompt, a one-token prompt, and a longest sequence of 13
    tokens."""
    g = torch.Generator().manual_seed(1)
    prompts = [_ids(g, 3), [], _ids(g, 1), _ids(g, 6)]
    chosen = [_ids(g, k) for k in (5, 4, 2, 7)]
    rejected = [_ids(g, k) for k in (4, 6, 9, 1)]
    return list(zip(prompts, chosen, strict=True)) + list(zip(prompts, rejected, strict=True))


def _model(name: str) -> torch.nn.Module:
    config, attention = ARCHITECTURES[name]
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attention).float().eval()


def _scores_and_grads(scorer: SequenceScorer, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor, list]:
    scorer.zero_grad()
    logps, tokens, _ = scorer(*args, **kwargs)
    (logps * torch.linspace(0.5, 1.5, len(logps))).sum().backward()  # uneven weights: rows must not be swapped
    return logps.detach(), tokens, [p.grad.clone() for p in scorer.parameters() if p.grad is not None]


def test_best_fit_decreasing_is_deterministic_and_fills_rows():
    assert best_fit_decreasing([5, 3, 8, 2, 6], 8) == [[2], [4, 3], [0, 1]]
    assert best_fit_decreasing([1, 1, 1], 3) == [[0, 1, 2]]


def test_row_length_trades_filler_for_attention():
    """Cost of R rows of W cells: R W (1 + W / 24576), by hand. [100, 90, 80, 70]: rows of 100 cost 4 * 100 *
    1.00407 = 401.6, one row of 340 340 * 1.01383 = 344.7: one row. [300, 80, 75, 60]: 2 rows of 300 = 607.3
    against one of 515 = 525.8. Eight rows of 1000 (8,000 * 1.0407 = 8,326) against one of 8,000 (8,000 * 1.3255 =
    10,604): the mask's quadratic size makes long rows lose."""
    assert row_bins([100, 90, 80, 70]) == [[0, 1, 2, 3]]
    assert row_bins([300, 80, 75, 60]) == [[0, 1, 2, 3]]
    assert row_bins([1000] * 8) == [[i] for i in range(8)]
    assert row_bins([]) == []


def test_segment_spans_by_hand():
    """Shared prompts: pair 0 is [1 2 | 3 | 7 8] (5 cells), pair 1 [4 | 5 6 | 9] (4 cells), one row (9 * (1 +
    9/24576) beats two rows of 5); each rejected response attends to its prompt and itself. Plain packing: each
    sequence its own segment, longest first."""
    sequences = [([1, 2], [3]), ([4], [5, 6]), ([1, 2], [7, 8]), ([4], [9])]
    shared = segment_spans(pack(sequences, 0, share_prompts=True))
    assert shared == [[Segment(0, 5, 2, (3,)), Segment(5, 9, 6, (8,))]]
    assert shared[0][0].blocks() == [(slice(0, 3), [slice(0, 3)]), (slice(3, 5), [slice(0, 2), slice(3, 5)])]
    assert shared[0][1].blocks() == [(slice(5, 8), [slice(5, 8)]), (slice(8, 9), [slice(5, 6), slice(8, 9)])]
    plain = segment_spans(pack(sequences, 0))
    assert plain == [[Segment(0, 4, 2), Segment(4, 7, 6), Segment(7, 10, 8), Segment(10, 12, 11)]]
    assert plain[0][0].blocks() == [(slice(0, 4), [slice(0, 4)])]
    long = [([3] * 300, [4] * 300)] * 3  # rows of 600 each: a row of 1200 costs more attention than it saves
    assert segment_spans(pack(long, 0)) == [[Segment(0, 600, 300)]] * 3


def test_segment_plan_blocks_by_hand():
    """Each row's blocks as the attention takes them: the queries split in cell order (filler apart), every
    block's keys gathered block after block (a shared prompt once per block that sees it), each block's mask cut
    from the row's once per mask, for every layer and backward's recompute."""
    packed = pack([([1, 2], [3]), ([4], [5, 6]), ([1, 2], [7, 8]), ([4], [9])], 0, share_prompts=True)
    plan = segment_attention.SegmentPlan(segment_spans(packed))
    mask = packed.attention_mask  # (1, 1, 9, 9)
    (row,) = plan.blocks(mask)
    assert row.query_sizes == [3, 2, 3, 1] and row.pieces == [0, 1, 2, 3]
    assert row.key_cells.tolist() == [0, 1, 2, 0, 1, 3, 4, 5, 6, 7, 5, 8] and row.key_sizes == [3, 4, 3, 2]
    assert torch.equal(row.masks[1], mask[:, :, 3:5][..., [0, 1, 3, 4]])
    assert plan.blocks(mask) is plan.blocks(mask)
    other = mask.clone()  # a sliding-window layer's mask: blocks of its own
    assert plan.blocks(other) is not plan.blocks(mask) and len(plan.blocks(other)) == 1
    gaps = segment_attention.SegmentPlan([[Segment(1, 3, 2), Segment(4, 6, 5)], [Segment(0, 8, 4)]])
    first, second = gaps.blocks(torch.ones(2, 1, 8, 8, dtype=torch.bool))
    assert first.query_sizes == [1, 2, 1, 2, 2] and first.pieces == [None, 0, None, 1, None]
    assert first.key_cells.tolist() == [1, 2, 4, 5] and [m.shape for m in first.masks] == [(1, 1, 2, 2)] * 2
    assert second.query_sizes == [8] and second.pieces == [0] and second.key_sizes == [8]


@pytest.mark.parametrize("name", [name for name, (_, attention) in ARCHITECTURES.items() if attention == "sdpa"])
def test_attention_runs_per_segment_and_equals_the_dense_mask(name, monkeypatch):
    """sdpa models run each segment's attention on its own (one call per part and layer: a pair's prompt and
    chosen response, then its rejected response on the prompt's keys and its own), with the same hidden states as
    sdpa over the whole row with its dense mask: shared prompts in one row, and plain packing of long sequences in
    several rows. On a CPU, grouped-query models run their groups in torch's kernel, not through transformers'."""
    scorer = SequenceScorer(_model(name))
    assert scorer.per_segment
    segment_attention.install()
    calls, through_transformers = [], []
    attend, sdpa = segment_attention._attend, segment_attention._sdpa

    def counting(module, query, key, *args, **kwargs):
        calls.append((query.shape[2], key.shape[2]))
        return attend(module, query, key, *args, **kwargs)

    def transformers_sdpa(module, query, *args, **kwargs):
        through_transformers.append(query.shape[2])
        return sdpa(module, query, *args, **kwargs)

    monkeypatch.setattr(segment_attention, "_attend", counting)
    monkeypatch.setattr(segment_attention, "_sdpa", transformers_sdpa)
    grouped = getattr(scorer.lm.model.layers[0].self_attn if hasattr(scorer.lm, "model") else None,
                      "num_key_value_groups", 1) > 1
    g = torch.Generator().manual_seed(2)
    long = [(_ids(g, n), _ids(g, n)) for n in (300, 175, 125)]  # rows [600] and [350, 250] (see row_bins)
    layers = scorer.lm.config.num_hidden_layers
    for packed in (pack(_pairs(), 0, share_prompts=True), pack(long, 0)):
        usable, masks = scorer.runnable(packed)
        assert usable is packed
        spans = segment_spans(packed)
        assert sum(len(row) for row in spans) > len(spans)  # some row holds several segments
        blocks = [(q.stop - q.start, sum(k.stop - k.start for k in keys))
                  for row in spans for span in row for q, keys in span.blocks()]
        calls.clear()
        through_transformers.clear()
        with torch.no_grad():
            per_segment = scorer.body(**packing.body_inputs(packed, masks, per_segment=True)).last_hidden_state
            assert calls == blocks * layers
            assert through_transformers == ([] if grouped else [q for q, _ in blocks] * layers)
            through_transformers.clear()
            dense = scorer.body(**packing.body_inputs(packed, masks)).last_hidden_state
            assert through_transformers == [packed.input_ids.shape[1]] * layers
        real = packed.sequence_index >= 0
        assert (per_segment[real] - dense[real]).abs().max() <= 1e-5
        grads = []
        for per in (True, False):  # backward through the blocks: the dense mask's gradients
            scorer.zero_grad()
            hidden = scorer.body(**packing.body_inputs(packed, masks, per_segment=per)).last_hidden_state
            (hidden[real] * torch.linspace(-1, 1, hidden.shape[-1])).sum().backward()
            grads.append([p.grad.clone() for p in scorer.parameters() if p.grad is not None])
        for g, e in zip(*grads, strict=True):
            assert (g - e).abs().max() <= 1e-5 * e.abs().max().clamp(min=1e-6)
    assert grouped == (name != "gpt2")  # the tiny Llama, Qwen2 and Gemma 3 have 2 query heads per key head


def test_packed_rows_restart_positions_and_map_back_to_rows():
    sequences = _pairs()
    packed = pack(sequences, pad_token_id=0)
    bins = row_bins([len(p) + len(r) for p, r in sequences])
    assert packed.input_ids.shape == (len(bins), max(sum(len(sequences[i][0]) + len(sequences[i][1]) for i in b)
                                                    for b in bins))
    assert packed.real_tokens == sum(len(p) + len(r) for p, r in sequences)
    for n, (prompt, response) in enumerate(sequences):
        cells = packed.sequence_index == n
        assert packed.input_ids[cells].tolist() == prompt + response
        assert packed.position_ids[cells].tolist() == list(range(len(prompt) + len(response)))
    assert unpacked_sequences(packed) == sequences
    shared = pack(sequences, pad_token_id=0, share_prompts=True)
    assert shared.real_tokens == packed.real_tokens - sum(len(p) for p, _ in sequences[:4])
    assert unpacked_sequences(shared) == sequences
    padded = PreferenceCollator(0)([Encoded([1, 2], [3, 4, 5], [6], index=0), Encoded([7], [8], [9, 9], index=1)])
    assert padded.padding_fraction == pytest.approx(1 - 13 / 20)  # rows of 5, 2, 3 and 3 tokens, T = 5


@pytest.mark.parametrize("layout", ["packed", "shared"])
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_packed_logps_and_gradients_equal_padded(name, layout):
    scorer = SequenceScorer(_model(name))
    assert packing.supports_packing(scorer.lm) == (True, "")
    sequences = _pairs()
    expected, expected_tokens, expected_grads = _scores_and_grads(scorer, *pad(sequences, 0))
    packed = pack(sequences, 0, share_prompts=layout == "shared")
    if layout == "shared":  # the layout really is shared: no fallback to plain packing
        assert packing.runnable(scorer.lm, packed)[1] is not None
    logps, tokens, grads = _scores_and_grads(scorer, None, None, None, packed=packed)
    assert tokens.tolist() == expected_tokens.tolist() == [len(r) - (not p) for p, r in sequences]
    assert (logps - expected).abs().max() <= 1e-5
    for g, e in zip(grads, expected_grads, strict=True):
        assert (g - e).abs().max() <= 1e-5 * e.abs().max().clamp(min=1e-6)


@pytest.mark.parametrize("response_only_head", [True, False])
def test_odd_unpaired_batch_packs(response_only_head):
    scorer = SequenceScorer(_model("llama"), response_only_head=response_only_head)
    sequences = _pairs()[:5]
    with torch.no_grad():
        expected = scorer(*pad(sequences, 0))[0]
        logps = scorer(None, None, None, packed=pack(sequences, 0))[0]
    assert len(logps) == 5 and (logps - expected).abs().max() <= 1e-5


def test_a_model_that_cannot_pack_is_padded_with_one_info_line(monkeypatch, caplog):
    scorer = SequenceScorer(_model("llama"))
    monkeypatch.setattr(packing, "supports_packing", lambda model: (False, "LlamaModel.forward takes no position_ids"))
    packing._tell.cache_clear()
    sequences = _pairs()
    with torch.no_grad(), caplog.at_level(logging.INFO):
        expected = scorer(*pad(sequences, 0))[0]
        logps = scorer(None, None, None, packed=pack(sequences, 0))[0]
        scorer(None, None, None, packed=pack(sequences, 0))
    assert torch.equal(logps, expected)
    lines = [r.getMessage() for r in caplog.records if "data.packing" in r.getMessage()]
    assert lines == ["lightning-pref: data.packing: scoring padded batches, LlamaModel.forward takes no position_ids"]


def test_shared_prompts_fall_back_to_plain_packing_where_the_mask_is_not_taken(caplog):
    config, _ = ARCHITECTURES["llama"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="flex_attention").float().eval()
    packed = pack(_pairs(), 0, share_prompts=True)
    packing._tell.cache_clear()
    with caplog.at_level(logging.INFO):
        plain, masks = packing.runnable(model, packed)
    assert masks is None and not plain.shared_prompts and plain.real_tokens > packed.real_tokens
    assert "packing without shared prompts, attention implementation 'flex_attention'" in caplog.text


@pytest.mark.parametrize("window", [4, 100])
def test_one_mask_for_all_layers_shares_prompts_only_within_the_window(window, caplog):
    """Mistral applies a custom 4D mask to its sliding-window layers as given: with segments longer than the
    window the prompts are not shared (plain packing keeps the window), and the log-probs stay the padded ones."""
    torch.manual_seed(0)
    config = MistralConfig(**_SMALL, sliding_window=window)
    scorer = SequenceScorer(AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float().eval())
    sequences = _pairs()
    packed = pack(sequences, 0, share_prompts=True)
    packing._tell.cache_clear()
    with torch.no_grad(), caplog.at_level(logging.INFO):
        shared = packing.runnable(scorer.lm, packed)[0].shared_prompts
        expected, logps = scorer(*pad(sequences, 0))[0], scorer(None, None, None, packed=packed)[0]
    assert shared is (window == 100)
    assert ("applies one custom mask to its sliding-window layers" in caplog.text) is (window == 4)
    assert (logps - expected).abs().max() <= 1e-5


# ------------------------------------------------------------------------------------------------ training
def _losses(module, data, steps: int, **data_kwargs) -> list[float]:
    data_kwargs.setdefault("packing", False)  # padded unless a test asks for a layout
    return tiny_fit(module, data, steps, data_options=data_kwargs, num_sanity_val_steps=0)


def _dpo(lr: float = 1e-2, **kwargs) -> PreferenceModule:
    return PreferenceModule(policy=TINY, tokenizer="byte", optimizer=partial(torch.optim.AdamW, lr=lr), **kwargs)


def test_dpo_trajectory_packed_equals_padded(pairs_file):
    """20 optimizer steps; at this learning rate the loss falls from ln 2 to about 0.03 without saturating."""
    padded = _losses(_dpo(lr=1e-3), pairs_file, 20)
    assert padded[-1] < padded[0] - 0.3 and padded[-1] > 1e-3
    for layout in (True, "shared"):
        packed = _losses(_dpo(lr=1e-3), pairs_file, 20, packing=layout)
        assert len(packed) == len(padded) == 20
        assert max(abs(a - b) for a, b in zip(packed, padded, strict=True)) <= 1e-5, layout


def test_kto_with_kl_rows_packed_equals_padded(pairs_file):
    def kto() -> PreferenceModule:
        return _dpo(loss=KTOLoss())

    options = {"unpair": True}
    padded = _losses(kto(), pairs_file, 2, **options)
    packed = _losses(kto(), pairs_file, 2, packing=True, **options)
    assert max(abs(a - b) for a, b in zip(packed, padded, strict=True)) <= 1e-5


@pytest.mark.parametrize("name", ["llama", "gemma3_window"])
def test_kl_rows_of_a_packed_batch_are_packed_and_score_as_padded(name):
    """KTO's mismatched rows: packed with their batch (no padding run), the same z0 inputs as the padded rows
    scored on the batch's cached prompts."""
    examples = [Encoded(p, r, None, label=i % 2 == 0, index=i) for i, (p, r) in enumerate(_pairs())]
    scorer = SequenceScorer(_model(name))
    kl = {}
    with torch.no_grad():
        for layout in (False, True):
            batch = with_kl_rows(PreferenceCollator(0, packing=layout)(examples))
            assert (batch.kl_rows.packed is not None) is layout
            kl[layout] = scorer(batch.input_ids, batch.attention_mask, batch.response_mask, batch.kl_rows,
                                batch.packed)[2]
    assert kl[True].shape == kl[False].shape == (len(batch.kl_rows.prompt_rows),)
    torch.testing.assert_close(kl[True], kl[False], rtol=0, atol=1e-5)


def _kto_examples() -> list[Encoded]:
    """Unpaired examples with prompts much longer than their completions (so that KL rows riding in their prompts'
    segments pays also in a pass with gradients), one of them with an empty prompt."""
    g = torch.Generator().manual_seed(2)
    prompts = [[], *(_ids(g, k) for k in (10, 12, 9, 11, 12))]
    return [Encoded(p, _ids(g, 1 + i % 3), None, label=i % 2 == 0, index=i) for i, p in enumerate(prompts)]


def _scores_kl_and_grads(scorer: SequenceScorer, batch) -> tuple[torch.Tensor, torch.Tensor, list]:
    scorer.zero_grad()
    logps, _, kl_logps = scorer(batch.input_ids, batch.attention_mask, batch.response_mask, batch.kl_rows,
                                batch.packed)
    (logps * torch.linspace(0.5, 1.5, len(logps))).sum().backward()
    assert not kl_logps.requires_grad  # z0 is a baseline, not a path for gradients
    return logps.detach(), kl_logps, [p.grad.clone() for p in scorer.parameters() if p.grad is not None]


@pytest.mark.parametrize("name", ["llama", "gemma2_window_softcap", "gemma3_window"])
def test_kl_completions_in_their_prompts_segments_score_as_padded(name):
    """A packed KTO batch and its mismatched rows in one pass, each mismatched completion in the segment of the
    batch row whose prompt it continues: only the completions run (the prompts once), and the batch's log-probs,
    their gradients and the KL rows' log-probs are the padded path's (which reuses the cached prompts)."""
    examples = _kto_examples()
    scorer = SequenceScorer(_model(name))
    padded = with_kl_rows(PreferenceCollator(0)(examples))
    packed = with_kl_rows(PreferenceCollator(0, packing=True)(examples))
    rows = packed.kl_rows
    completions = int(rows.response_mask.sum())
    assert rows.shared.real_tokens == packed.packed.real_tokens + completions  # no prompt runs twice
    assert scorer.kl_layout(rows) is not None and scorer.kl_layout(rows)[1] is not None  # shared, with its masks
    expected, expected_kl, expected_grads = _scores_kl_and_grads(scorer, padded)
    logps, kl_logps, grads = _scores_kl_and_grads(scorer, packed)
    assert kl_logps.shape == expected_kl.shape == (len(examples),)
    torch.testing.assert_close(logps, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(kl_logps, expected_kl, rtol=0, atol=1e-5)
    for g, e in zip(grads, expected_grads, strict=True):
        assert (g - e).abs().max() <= 1e-5 * e.abs().max().clamp(min=1e-6)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("name", ["llama", "qwen2_tied", "gpt2"])
def test_kl_completions_continue_the_batch_pass_recorded_prompts(name, checkpointing):
    """With gradients, the KL completions run alone after the batch's pass, on the keys and values of their
    prompts that pass recorded (neither their prompts again nor a backward through them): the padded path's
    log-probs, gradients and KL log-probs, with and without checkpointing's recompute."""
    examples = _kto_examples()[1:]  # every prompt non-empty: the first completion token follows its prompt
    model = _model(name)
    if checkpointing:  # (recomputes in training mode only; GPT-2's dropout off, so both paths are deterministic)
        model.train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    scorer = SequenceScorer(model)
    padded = with_kl_rows(PreferenceCollator(0)(examples))
    packed = with_kl_rows(PreferenceCollator(0, packing=True)(examples))
    rows = packed.kl_rows
    assert rows.completions.real_tokens == int(rows.response_mask.sum())  # the completions' cells only
    continued = []
    score_continuations = scorer.score_continuations
    scorer.score_continuations = lambda *a: continued.append(1) or score_continuations(*a)
    expected, expected_kl, expected_grads = _scores_kl_and_grads(scorer, padded)
    logps, kl_logps, grads = _scores_kl_and_grads(scorer, packed)
    assert continued == [1]
    torch.testing.assert_close(logps, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(kl_logps, expected_kl, rtol=0, atol=1e-5)
    for g, e in zip(grads, expected_grads, strict=True):
        assert (g - e).abs().max() <= 1e-5 * e.abs().max().clamp(min=1e-6)


def test_kl_completions_ride_along_with_gradients_only_where_that_is_less_work():
    """With gradients a completion in the batch's pass also runs backward: against prompts shorter than twice
    their completions the KL rows are scored apart. Without gradients (the reference) they always ride along."""
    g = torch.Generator().manual_seed(3)
    examples = [Encoded(_ids(g, 2), _ids(g, 6), None, label=i % 2 == 0, index=i) for i in range(4)]
    scorer = SequenceScorer(_model("llama"))
    batch = with_kl_rows(PreferenceCollator(0, packing=True)(examples))
    assert scorer.kl_layout(batch.kl_rows) is None
    with torch.no_grad():
        assert scorer.kl_layout(batch.kl_rows) is not None
        kl_logps = scorer(None, None, None, batch.kl_rows, batch.packed)[2]
        torch.testing.assert_close(kl_logps, scorer(*batch.kl_rows[:3])[0], rtol=0, atol=1e-5)


def test_kl_rows_fall_back_to_their_own_packing_where_the_masks_are_not_taken(monkeypatch, caplog):
    """A model that takes packed rows but not the shared-prompt masks scores the KL rows packed on their own, in
    full: the same values (and one info line)."""
    examples = _kto_examples()
    scorer = SequenceScorer(_model("llama"))
    padded = with_kl_rows(PreferenceCollator(0)(examples))
    packed = with_kl_rows(PreferenceCollator(0, packing=True)(examples))
    monkeypatch.setattr(packing, "prompt_sharing_masks", lambda *a, **k: (None, "no custom masks here"))
    packing._tell.cache_clear()
    with caplog.at_level(logging.INFO):
        assert scorer.kl_layout(packed.kl_rows) is None
        expected, expected_kl, expected_grads = _scores_kl_and_grads(scorer, padded)
        logps, kl_logps, grads = _scores_kl_and_grads(scorer, packed)
    assert "packing without shared prompts, no custom masks here" in caplog.text
    torch.testing.assert_close(logps, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(kl_logps, expected_kl, rtol=0, atol=1e-5)
    for g, e in zip(grads, expected_grads, strict=True):
        assert (g - e).abs().max() <= 1e-5 * e.abs().max().clamp(min=1e-6)


def test_precomputed_reference_packed_equals_padded(pairs_file, tmp_path):
    padded = _losses(_dpo(reference_mode="precomputed", reference_cache_dir=str(tmp_path)), pairs_file, 3)
    packed = _losses(_dpo(reference_mode="precomputed", reference_cache_dir=str(tmp_path)), pairs_file, 3,
                     packing="shared")
    assert max(abs(a - b) for a, b in zip(packed, padded, strict=True)) <= 1e-5


def test_reward_model_packed_equals_padded(pairs_file):
    def reward() -> RewardModule:
        return RewardModule(backbone=TINY, tokenizer="byte", optimizer=partial(torch.optim.AdamW, lr=1e-2))

    padded = _losses(reward(), pairs_file, 3)
    for layout in (True, "shared"):
        packed = _losses(reward(), pairs_file, 3, packing=layout)
        assert max(abs(a - b) for a, b in zip(packed, padded, strict=True)) <= 1e-5, layout


def test_online_pairs_are_packed_as_offline_batches(pairs_file):
    from lightning_pref import OnPolicyModule
    from lightning_pref.generation import GenerationOptions
    from lightning_pref.judges import FunctionJudge

    seen: list = []

    class Online(OnPolicyModule):
        def _step(self, batch, stage):
            seen.append(batch.packed is not None)
            return super()._step(batch, stage)

    def online() -> OnPolicyModule:
        return Online(policy=TINY, tokenizer="byte", judge=FunctionJudge("lightning_pref.judges.rules:quiet_letters"),
                      generation=GenerationOptions(max_new_tokens=8, do_sample=True),
                      optimizer=partial(torch.optim.AdamW, lr=1e-2))

    padded = _losses(online(), pairs_file, 1, train_data="prompts")
    packed = _losses(online(), pairs_file, 1, train_data="prompts", packing="shared")
    assert seen == [False, True]
    assert max(abs(a - b) for a, b in zip(packed, padded, strict=True)) <= 1e-5
