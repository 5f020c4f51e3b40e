"""Sources (JSON, Parquet, CSV, save_to_disk directories), val_fraction, the tokenization cache, the summary
and length-grouped batching."""

from __future__ import annotations

import gzip
import json
import random

import datasets
import pytest

import lightning_pref.data.datamodule as datamodule
from lightning_pref.data import PreferenceDataModule
from lightning_pref.data.sampler import LengthGroupedSampler
from lightning_pref.errors import UserInputError

RECORDS = [{"prompt": f"question {i}?", "chosen": f" answer {i}", "rejected": f" ANSWER {i}"} for i in range(10)]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_PREF_CACHE", str(tmp_path / "cache"))


def chosen_texts(dm, tokenizer, split="train") -> list[str]:
    dataset = dm.datasets[split]
    return [tokenizer.decode(dataset[i].chosen) for i in range(len(dataset))]


def write(tmp_path, kind: str) -> str:
    path = tmp_path / f"data.{kind}"
    if kind == "json":
        path.write_text(json.dumps(RECORDS))
    elif kind == "parquet":
        datasets.Dataset.from_list(RECORDS).to_parquet(str(path))
    elif kind == "csv":
        datasets.Dataset.from_list(RECORDS).to_csv(str(path), index=False)
    elif kind == "dir":
        datasets.Dataset.from_list(RECORDS).save_to_disk(str(path))
    elif kind == "dict":
        datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS),
                              "test": datasets.Dataset.from_list(RECORDS[:2])}).save_to_disk(str(path))
    return str(path)


@pytest.mark.parametrize("kind", ["json", "parquet", "csv", "dir", "dict"])
def test_sources_read_the_same_examples(tmp_path, tokenizer, kind):
    path = write(tmp_path, kind)
    dm = PreferenceDataModule(train=path, val=path, tokenizer=tokenizer, cache=False)
    dm.setup("fit")
    assert chosen_texts(dm, tokenizer) == [f" answer {i}</s>" for i in range(10)]
    assert len(dm.datasets["val"]) == (2 if kind == "dict" else 10)  # a DatasetDict's val = its test split


def test_json_file_holding_json_lines(tmp_path, tokenizer):
    path = tmp_path / "hub_style.json"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    dm = PreferenceDataModule(train=str(path), tokenizer=tokenizer)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 10


@pytest.mark.parametrize("kind", ["jsonl.gz", "json.gz"])
def test_gzipped_json_read_directly_with_line_numbers(tmp_path, tokenizer, kind):
    path = tmp_path / f"data.{kind}"
    text = json.dumps(RECORDS) if kind == "json.gz" else "".join(json.dumps(r) + "\n" for r in RECORDS)
    path.write_bytes(gzip.compress(text.encode()))
    dm = PreferenceDataModule(train=str(path), tokenizer=tokenizer)
    dm.setup("fit")
    assert chosen_texts(dm, tokenizer) == [f" answer {i}</s>" for i in range(10)]
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(gzip.compress((json.dumps(RECORDS[0]) + "\n" + json.dumps(RECORDS[1])[:-1] + "\n").encode()))
    with pytest.raises(UserInputError, match=r"bad.jsonl.gz:2: invalid JSON"):
        PreferenceDataModule(train=str(bad), tokenizer=tokenizer).setup("fit")


def test_broken_gzip_names_the_file(tmp_path, tokenizer):
    path = tmp_path / "data.jsonl.gz"
    path.write_bytes(gzip.compress(json.dumps(RECORDS[0]).encode())[:-8])  # cut short, as by a failed download
    with pytest.raises(UserInputError, match=r"data.train: cannot read .*data.jsonl.gz as .jsonl.gz"):
        PreferenceDataModule(train=str(path), tokenizer=tokenizer).setup("fit")


def test_dataset_dict_missing_split(tmp_path, tokenizer):
    path = tmp_path / "dd"
    datasets.DatasetDict({"other": datasets.Dataset.from_list(RECORDS)}).save_to_disk(str(path))
    dm = PreferenceDataModule(train=str(path), tokenizer=tokenizer)
    with pytest.raises(UserInputError, match=r"data.train: .*dd has splits \['other'\], none of \['train'\]"):
        dm.setup("fit")


def test_val_fraction_is_deterministic_and_disjoint(tmp_path, tokenizer):
    path = write(tmp_path, "json")
    splits = []
    for _ in range(2):
        dm = PreferenceDataModule(train=path, val_fraction=0.3, seed=7, tokenizer=tokenizer)
        dm.setup("fit")
        splits.append((chosen_texts(dm, tokenizer), chosen_texts(dm, tokenizer, "val")))
    (train, val), again = splits
    assert (train, val) == again and len(val) == 3 and len(train) == 7 and not set(train) & set(val)
    other = PreferenceDataModule(train=path, val_fraction=0.3, seed=8, tokenizer=tokenizer)
    other.setup("fit")
    assert chosen_texts(other, tokenizer, "val") != val


def test_second_setup_uses_the_cache(tmp_path, tokenizer, monkeypatch):
    calls = []
    original = datamodule.prepare
    monkeypatch.setattr(datamodule, "prepare", lambda *a, **k: calls.append(1) or original(*a, **k))
    path = write(tmp_path, "parquet")

    def build(**kwargs):
        dm = PreferenceDataModule(train=path, tokenizer=tokenizer, **kwargs)
        dm.setup("fit")
        return dm

    first = build()
    assert len(calls) == 1 and list((tmp_path / "cache" / "data").iterdir())
    second = build()
    assert len(calls) == 1  # read back, not tokenized again
    assert chosen_texts(second, tokenizer) == chosen_texts(first, tokenizer)
    assert second.stats["train"] == first.stats["train"]
    build(max_length=64)  # a different option is a different cache entry
    assert len(calls) == 2
    build(on_invalid="drop")  # the new options too
    assert len(calls) == 3
    build(cache=False)
    assert len(calls) == 4


def test_summary_table_and_stats(tmp_path, tokenizer, capsys):
    dm = PreferenceDataModule(train=write(tmp_path, "json"), tokenizer=tokenizer)
    dm.setup("fit")
    err = capsys.readouterr().err
    assert "preference data" in err and "kept" in err and "p50/p90/max" in err
    stats = dm.stats["train"]
    lengths = sorted(dm.datasets["train"].lengths)
    assert stats.kept == 10 and stats.dropped == {} and stats.length_max == lengths[-1]
    assert lengths[0] <= stats.length_p50 <= stats.length_p90 <= stats.length_max


def test_length_grouped_sampler():
    lengths = [(i * 37) % 101 for i in range(100)]
    sampler = LengthGroupedSampler(lengths, batch_size=4, seed=0, group_batches=5)
    first = list(sampler)
    assert sorted(first) == list(range(100)) and list(sampler) == first  # a permutation, deterministic
    sampler.set_epoch(1)
    assert list(sampler) != first
    assert max(lengths[i] for i in first[:4]) == max(lengths)  # longest batch first

    def padding(order):
        return sum(max(lengths[i] for i in order[k : k + 4]) * 4 - sum(lengths[i] for i in order[k : k + 4])
                   for k in range(0, len(order), 4))

    shuffled = list(range(100))
    random.Random(0).shuffle(shuffled)
    assert padding(first) < padding(shuffled) / 3


def test_length_grouped_sampler_partial_batch_stays_last():
    sampler = LengthGroupedSampler([1, 9, 2, 8, 3, 7, 4], batch_size=3, seed=1, group_batches=1)
    order = list(sampler)
    assert sorted(order) == list(range(7)) and len(order) == 7
    lengths = [1, 9, 2, 8, 3, 7, 4]
    # each full batch is one group sorted by length (longest first); the leftover example comes last
    for batch in (order[0:3], order[3:6]):
        assert [lengths[i] for i in batch] == sorted((lengths[i] for i in batch), reverse=True)


def test_group_by_length_loader_covers_every_example(tmp_path, tokenizer):
    dm = PreferenceDataModule(train=write(tmp_path, "json"), tokenizer=tokenizer, batch_size=3, group_by_length=True)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler.grouped, LengthGroupedSampler)
    assert sum(batch.num_chosen for batch in loader) == 10
