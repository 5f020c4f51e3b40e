"""Tokenization at the seam, truncation, collation and KTO's mismatched pairs."""

from __future__ import annotations

import pytest
import torch

from lightning_pref.data import PreferenceCollator, PreferenceDataModule
from lightning_pref.data.tokenize import Encoded, encode_prompt, encode_response, truncate
from lightning_pref.errors import UserInputError
from lightning_pref.kl import mismatched
from tests.support import with_kl_rows, write_jsonl


def test_response_ids_are_exactly_the_response(tokenizer):
    prompt, response = "User: hi\nAssistant:", " hello there"
    p, r = encode_prompt(tokenizer, prompt), encode_response(tokenizer, response)
    assert tokenizer.decode(p) == prompt
    assert r[-1] == tokenizer.eos_token_id and r.count(tokenizer.eos_token_id) == 1
    assert tokenizer.decode(r[:-1]) == response
    # EOS already in the text is not added twice
    assert encode_response(tokenizer, response + tokenizer.eos_token) == r


def test_truncation_keeps_prompt_end_and_response_start():
    prompt, chosen, rejected = list(range(10)), [100, 101, 102, 103], [200, 201]
    p, (c, r) = truncate(prompt, [chosen, rejected], max_length=8)
    assert p == [6, 7, 8, 9] and c == chosen and r == rejected
    p, (c, r) = truncate(prompt, [list(range(100, 120)), rejected], max_length=8)
    assert p == [6, 7, 8, 9] and c == [100, 101, 102, 103] and r == rejected
    p, _ = truncate(prompt, [chosen], max_length=100, max_prompt_length=3)
    assert p == [7, 8, 9]


def test_truncation_keeps_the_prompt_head_and_end():
    prompt, response = list(range(20)), [100, 101]
    # budget max(10 - 2, min(20, 10 // 2)) = 8: the 3-token head, then the last 5 tokens
    p, (r,) = truncate(prompt, [response], max_length=10, head=3)
    assert p == [0, 1, 2, 15, 16, 17, 18, 19] and r == response
    p, _ = truncate(prompt, [response], max_length=100, max_prompt_length=6, head=2)
    assert p == [0, 1, 16, 17, 18, 19]
    # A 5-token head is more than half of the 8 kept tokens: only BOS (when the prompt starts with one) and the end.
    p, _ = truncate(prompt, [response], max_length=10, head=5, bos=True)
    assert p == [0, 13, 14, 15, 16, 17, 18, 19]
    p, _ = truncate(prompt, [response], max_length=10, head=5)
    assert p == list(range(12, 20))
    p, _ = truncate(prompt, [response], max_length=100, head=3)  # fits: nothing cut
    assert p == prompt


def test_collate_paired_layout():
    examples = [Encoded([1, 2], [3, 4, 5], [6]), Encoded([7], [8], [9, 10])]
    batch = PreferenceCollator(pad_token_id=0)(examples)
    assert batch.num_chosen == 2 and batch.paired
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5], [7, 8, 0, 0, 0], [1, 2, 6, 0, 0], [7, 9, 10, 0, 0]]
    assert batch.response_mask.int().tolist() == [[0, 0, 1, 1, 1], [0, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 1, 1, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]]
    assert batch.kl_rows is None


def test_collate_unpaired_puts_desirable_first():
    examples = [Encoded([1], [2], label=False), Encoded([3], [4], label=True), Encoded([5], [6], label=False)]
    batch = PreferenceCollator(pad_token_id=0)(examples)
    assert not batch.paired and batch.num_chosen == 1 and batch.num_rejected == 2
    assert batch.input_ids[:, :2].tolist() == [[3, 4], [1, 2], [5, 6]]


@pytest.mark.parametrize("n", [2, 3, 5])
def test_mismatched_pairs_never_use_own_completion(n):
    groups = list(range(n)) * 2  # paired data: each prompt appears as chosen and rejected row
    pairs = mismatched(groups)
    assert len(pairs) == 2 * n
    assert all(groups[i] != groups[k] for i, k in pairs)


def test_mismatched_single_prompt_has_no_partner():
    assert mismatched(["a", "a"]) == []


def test_collate_builds_kl_rows():
    examples = [Encoded([1], [2], label=True), Encoded([3], [4, 4], label=False), Encoded([5], [6], label=True)]
    batch = with_kl_rows(PreferenceCollator(0)(examples))
    kl = batch.kl_rows
    rows = [row[m.bool()].tolist() for row, m in zip(kl.input_ids, kl.attention_mask, strict=True)]
    # ordered rows: desirable (1,2), (5,6), undesirable (3,44); each prompt takes the next row's completion
    assert rows == [[1, 6], [5, 4, 4], [3, 2]]
    assert kl.response_mask.sum().item() == 4
    assert kl.prompt_rows.tolist() == [0, 1, 2]  # each KL row starts with the prompt of the batch row it names
    for m, row in enumerate(kl.prompt_rows.tolist()):
        prompt = batch.input_ids[row][batch.attention_mask[row].bool() & ~batch.response_mask[row]]
        assert kl.input_ids[m][: len(prompt)].tolist() == prompt.tolist()


def test_datamodule_reads_and_batches(pairs_file, tokenizer):
    dm = PreferenceDataModule(train=str(pairs_file), val=str(pairs_file), tokenizer=tokenizer, batch_size=4,
                              packing=False)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch.input_ids.shape[0] == 8 and batch.num_chosen == 4
    assert torch.all(batch.response_mask.sum(-1) > 0)


def test_datamodule_packs_by_default_with_shared_prompts_for_pairs(pairs_file, tokenizer):
    """``data.packing: auto``: pairs in shared-prompt segments, unpaired examples packed plainly."""
    paired = PreferenceDataModule(train=str(pairs_file), tokenizer=tokenizer, batch_size=4)
    unpaired = PreferenceDataModule(train=str(pairs_file), tokenizer=tokenizer, batch_size=4, unpair=True)
    for dm, shared, sequences in ((paired, True, 8), (unpaired, False, 4)):  # 4 pairs; 4 unpaired examples
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))
        assert batch.input_ids is None and batch.packed.shared_prompts is shared and batch.num_sequences == sequences


def test_bundled_default_has_train_and_heldout_val(tokenizer):
    dm = PreferenceDataModule(tokenizer=tokenizer)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 2048 and len(dm.datasets["val"]) == 256


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"prompt": "a", "chosen": "b"}\n', "expected fields prompt/chosen/rejected"),
        ('{"prompt": "a", "chosen": "b", "rejected": 3}\n', "field 'rejected' must be a string"),
        ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{oops\n', ":2: invalid JSON"),
        ('{"prompt": "a", "completion": "b", "label": "yes"}\n', "field 'label' must be true or false"),
    ],
)
def test_bad_records_name_file_line_and_field(tmp_path, tokenizer, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    dm = PreferenceDataModule(train=str(path), tokenizer=tokenizer)
    with pytest.raises(UserInputError, match=message) as err:
        dm.setup("fit")
    assert str(path) in str(err.value)


def test_missing_file(tmp_path, tokenizer):
    dm = PreferenceDataModule(train=str(tmp_path / "nope.jsonl"), tokenizer=tokenizer)
    with pytest.raises(UserInputError, match="data.train: file not found"):
        dm.setup("fit")


def test_everything_truncated_is_an_error(tmp_path, tokenizer):
    # one token left: the prompt is cut away and both responses become "a", the same tokens: no signal left
    path = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "x" * 50, "chosen": "ab", "rejected": "ac"}])
    dm = PreferenceDataModule(train=str(path), tokenizer=tokenizer, max_length=1)
    with pytest.raises(UserInputError, match="dropped by truncation"):
        dm.setup("fit")
