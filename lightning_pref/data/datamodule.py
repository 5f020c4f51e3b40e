"""``PreferenceDataModule``: preference data as people have it in, padded :class:`PreferenceBatch` out."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Literal, get_args

import datasets
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from lightning_pref.checks import check_choice, check_range, refuse_unused
from lightning_pref.data import cache as tokenized_cache
from lightning_pref.data.collate import PreferenceCollator
from lightning_pref.data.formats import Format, Transcript
from lightning_pref.data.prepare import Options, prepare
from lightning_pref.data.prompts import PromptCollator, PromptExample, prepare_prompts
from lightning_pref.data.sampler import EvalSampler, LengthGroupedSampler, ResumableLoader, TrainSampler
from lightning_pref.data.sources import Source, bundled, read_source
from lightning_pref.data.stats import SplitStats, print_summary
from lightning_pref.data.tokenize import Encoded
from lightning_pref.errors import UserInputError
from lightning_pref.layout import Packing


class EncodedDataset(Dataset):
    """Encoded examples backed by an Arrow table (memory-mapped when it comes from the cache)."""

    def __init__(self, table: datasets.Dataset) -> None:
        self.table = table

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, key: int | tuple[int, bool]) -> Encoded:
        index, padding = key if isinstance(key, tuple) else (key, False)  # EvalSampler marks padding
        row = self.table[index]
        return Encoded(row["prompt"], row["chosen"], row["rejected"], label=row["label"], index=index,
                       weight=0.0 if padding else 1.0, margin=row.get("margin"))

    @property
    def lengths(self) -> list[int]:
        """Tokens of prompt + longest response, per example."""
        return list(self.table["length"])


class PreferenceDataModule(LightningDataModule):
    """Preference data from files or datasets, in any of the common formats (see ``formats.py``).

    Formats are detected from the columns: ``prompt/chosen/rejected`` as strings (standard) or messages
    (conversational, rendered with the tokenizer's chat template; role/content or ShareGPT from/value messages,
    a list or one message object); ``chosen/rejected`` only (implicit prompt: the shared prefix; Anthropic HH
    transcripts become conversations, see ``transcript``); ``prompt/completion/label`` or ``messages/label``
    (unpaired, KTO). With ``train`` unset, the bundled synthetic set is used for train *and* val. After loading,
    a summary table (kept, dropped and why, token lengths) goes to stderr and the counts to
    ``self.stats[split]``.

    Args:
        train: training data: a ``.jsonl`` or ``.json`` file (optionally gzipped, ``.jsonl.gz``), a ``.parquet``
            or ``.csv`` file, a ``save_to_disk`` directory or a Hugging Face dataset id (``name:split`` picks a
            split); ``None`` = the bundled set.
        val: validation data, as ``train``; ``None`` = no validation (or the bundled held-out split when
            ``train`` is unset, or a ``val_fraction`` of train).
        tokenizer: the policy's tokenizer (linked from ``model.tokenizer`` by the CLI).
        batch_size: pairs (paired data) or examples (unpaired data) per batch.
        max_length: maximum tokens of prompt + response; longer examples are truncated (see ``truncate``), and
            an example left with no response token is dropped.
        max_prompt_length: maximum prompt tokens; a cut prompt keeps its head (BOS, and the chat template's
            system turn up to the first user content) and its end.
        num_workers: DataLoader workers.
        format: ``auto`` (detect from the columns) or ``standard``, ``conversational``, ``implicit_prompt``,
            ``unpaired``.
        columns: your column names for the canonical fields, e.g. ``{prompt: question, chosen: response_j,
            rejected: response_k}``.
        unpair: turn each pair into a desirable and an undesirable example (for unpaired losses such as KTO).
        on_identical: pairs whose chosen equals rejected: ``warn`` drops and counts them, ``error`` stops,
            ``keep`` keeps them.
        transcript: implicit-prompt ``chosen``/``rejected`` strings as Anthropic HH transcripts
            (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``), turned into user/assistant conversations for the chat
            template: ``auto`` when the first row's both start with ``"\\n\\nHuman:"`` and the tokenizer has a
            chat template (else they stay plain text), ``hh`` always (a row that does not parse is an error),
            ``none`` never.
        on_invalid: a row that fails a check (wrong type, empty field, a response empty once the shared prompt
            is taken, a transcript that does not parse, a conversation the template cannot render): ``error``
            stops with its location; ``drop`` skips it, counts it by reason in the stats and the summary, and
            prints the first few locations. Problems of a whole source (missing file, unknown format, no chat
            template) stop either way.
        val_fraction: carve this fraction of ``train`` out as validation (seeded by ``seed``; needs ``val``
            unset).
        seed: seed of ``val_fraction`` and of ``group_by_length``'s order.
        group_by_length: batch examples of similar length together (less padding; still shuffled per epoch).
        cache: cache tokenized splits on disk, so the next run does not tokenize again.
        cache_dir: where; ``None`` = ``$LIGHTNING_PREF_CACHE`` or ``~/.cache/lightning_pref``.
        predict: prompts to generate for (``predict``, ``evaluate``): a file of prompts (``prompt``: text or
            messages; ``messages``: a conversation to continue) or any preference file (its prompts), read like
            ``train``; ``None`` = the validation data's prompts.
        train_data: what training batches are (linked from the module by the CLI): ``pairs`` from ``train``;
            ``prompts``, batches of ``train``'s prompts (online on-policy training; ``train`` may be a prompt-only
            file); ``rounds``, pairs from the files :meth:`train_from` points at, sampled from ``train``'s prompts
            (iterative on-policy training).
        val_data: what validation batches are (linked from the module by the CLI): ``pairs`` from ``val``, or
            ``prompts``, batches of ``val``'s prompts (a module that validates what its policy writes, RL).
        packing: ``true`` lays the sequences end to end in rows (:func:`lightning_pref.layout.row_bins`), each with its
            own positions and attention (identical log-probs, no compute on padding) where the model supports
            it (elsewhere batches are padded again, with an info line saying why: see
            :func:`lightning_pref.packing.supports_packing`); ``shared`` also runs each pair's prompt once for
            both responses (sdpa or eager attention; a custom mask of ``L * L`` per row), and a rollout's prompt
            once for its ``k`` samples; ``auto``, the default, is what measured fastest: ``shared`` for pairs and
            rollouts, ``true`` for unpaired examples; ``false`` pads every sequence to the batch's longest.
    """

    def __init__(
        self,
        train: str | None = None,
        val: str | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        batch_size: int = 8,
        max_length: int = 512,
        max_prompt_length: int | None = None,
        num_workers: int = 0,
        format: Format = "auto",
        columns: dict[str, str] | None = None,
        unpair: bool = False,
        on_identical: Literal["warn", "error", "keep"] = "warn",
        transcript: Transcript = "auto",
        on_invalid: Literal["error", "drop"] = "error",
        val_fraction: float = 0.0,
        seed: int = 0,
        group_by_length: bool = False,
        cache: bool = True,
        cache_dir: str | None = None,
        predict: str | None = None,
        train_data: Literal["pairs", "prompts", "rounds"] = "pairs",
        val_data: Literal["pairs", "prompts"] = "pairs",
        packing: Packing = "auto",
    ) -> None:
        super().__init__()
        if tokenizer is None:
            raise UserInputError("data.tokenizer: required (the CLI links it from model.tokenizer)")
        if tokenizer.pad_token_id is None:
            raise UserInputError(
                f"data.tokenizer: {type(tokenizer).__name__} has no pad token; load it with "
                "lightning_pref.models.load_tokenizer (which uses EOS as pad) or set tokenizer.pad_token"
            )
        if packing not in (True, False, "auto", "shared"):
            raise UserInputError(f"data.packing: {packing!r} is not one of true, false, auto, shared")
        check_range("data.val_fraction", val_fraction, 0, 1, high_open=True)
        check_range("data.batch_size", batch_size, 1, integer=True)
        check_range("data.max_length", max_length, 1, integer=True)
        check_range("data.max_prompt_length", max_prompt_length, 1, max_length, integer=True,
                    hint="it is part of data.max_length (prompt + response)")
        check_range("data.num_workers", num_workers, 0, integer=True)
        # Checked here, not where they are read (a typo in on_identical used to keep identical pairs quietly).
        check_choice("data.format", format, get_args(Format))
        check_choice("data.transcript", transcript, get_args(Transcript))
        check_choice("data.on_identical", on_identical, ("warn", "error", "keep"))
        check_choice("data.on_invalid", on_invalid, ("error", "drop"))
        check_choice("data.train_data", train_data, ("pairs", "prompts", "rounds"))
        check_choice("data.val_data", val_data, ("pairs", "prompts"))
        if cache_dir is not None and not cache:
            refuse_unused("data.cache_dir", cache_dir, "data.cache is false, so nothing is cached; drop cache_dir")
        if group_by_length and train_data == "prompts":
            refuse_unused("data.group_by_length", group_by_length, "on-policy training batches prompts in a seeded "
                          "random order, not by length; drop group_by_length")
        if val_fraction and val is not None:
            raise UserInputError("data.val_fraction: give data.val or data.val_fraction, not both")
        self.save_hyperparameters(ignore=["tokenizer"])
        self.tokenizer = tokenizer
        if train is None:
            train, val = bundled("train"), val or (None if val_fraction else bundled("val"))
        self.paths = {"train": train, "val": val}
        self.options = Options(
            format, tuple(sorted((columns or {}).items())), max_length, max_prompt_length, unpair, on_identical,
            transcript, on_invalid,
        )
        self.cache_dir = Path(cache_dir) if cache_dir else tokenized_cache.default_dir() / "data"
        self.datasets: dict[str, EncodedDataset] = {}
        self.stats: dict[str, SplitStats] = {}
        self.prompts: list[PromptExample] = []  # what predict and evaluate generate for
        self.train_prompts: list[PromptExample] = []  # on-policy training: what the policy samples for
        self.val_prompts: list[PromptExample] = []  # validation of what the policy writes (val_data: prompts)

    def prepare_data(self) -> None:
        # Runs on one process per node before setup: with the cache on, the splits are tokenized once here and
        # every process's setup reads them back memory-mapped. Prompts are few and not cached.
        if self.hparams.cache and not (self.trainer is not None and self.trainer.predicting):
            self._build()

    def setup(self, stage: str) -> None:
        if stage == "predict":
            self._build_prompts()
            return
        self._build()
        stage = getattr(stage, "value", stage)
        limit = {"fit": "limit_val_batches", "validate": "limit_val_batches", "test": "limit_test_batches"}.get(stage)
        if limit and self.trainer is not None and getattr(self.trainer, limit) == 0:  # Lightning would skip it
            if stage == "fit" and self.hparams.val is not None:
                refuse_unused("data.val", self.hparams.val, "trainer.limit_val_batches is 0 (the on-policy and RL "
                              "configs set it), so no validation runs; set trainer.limit_val_batches (e.g. 1.0) or "
                              "drop data.val")
            if stage != "fit":
                raise UserInputError(f"trainer.{limit}: 0 (the on-policy and RL configs set it), so {stage} would "
                                     f"measure nothing and exit 0; pass --trainer.{limit} 1.0")
        if stage in ("validate", "test") and not self._has_val:  # Lightning would run nothing, exit 0
            raise UserInputError(f"data.val: {stage} measures held-out data and there is none; give data.val or "
                                 "data.val_fraction")

    def _build_prompts(self) -> None:
        """The prompts of ``predict`` (default: of the validation data), in file order."""
        if self.prompts:
            return
        path, field = (self.hparams.predict, "data.predict") if self.hparams.predict else (self.paths["val"], "data.val")
        if path is None:
            raise UserInputError(
                "data.predict: no prompts to generate for; give data.predict (a file of prompts, or a preference "
                "file) or data.val"
            )
        self.prompts, _ = prepare_prompts(read_source(path, field), self.tokenizer, self.options, field)

    def _build(self) -> None:
        if self.datasets or self.train_prompts or self.val_prompts:  # built (prepare_data, then setup, alike)
            return
        train = read_source(self.paths["train"], "data.train")
        selections: dict[str, tuple[Source, list[int], tuple]] = {}
        if self.hparams.val_fraction:
            # A seeded permutation picks the held-out rows; both parts keep file order (and line numbers).
            order = list(range(len(train.rows)))
            random.Random(self.hparams.seed).shuffle(order)
            n_val = max(1, round(len(order) * self.hparams.val_fraction))
            if n_val >= len(order):
                raise UserInputError(
                    f"data.val_fraction: {self.hparams.val_fraction} of {len(order)} rows leaves no training rows"
                )
            part = ("val_fraction", self.hparams.val_fraction, self.hparams.seed)
            selections["train"] = (train, sorted(order[n_val:]), (*part, "train"))
            selections["val"] = (train, sorted(order[:n_val]), (*part, "val"))
        else:
            selections["train"] = (train, list(range(len(train.rows))), ("all",))
            if self.paths["val"] is not None:
                val = read_source(self.paths["val"], "data.val")
                selections["val"] = (val, list(range(len(val.rows))), ("all",))
        if self.hparams.train_data != "pairs":  # on-policy: the prompts are the training data (the file may hold
            source, indices, _ = selections.pop("train")  # nothing else); pairs come from the policy
            self.train_prompts, self.stats["train"] = prepare_prompts(source, self.tokenizer, self.options,
                                                                      "data.train", indices)
        if self.hparams.val_data == "prompts" and "val" in selections:
            source, indices, _ = selections.pop("val")
            self.val_prompts, self.stats["val"] = prepare_prompts(source, self.tokenizer, self.options, "data.val",
                                                                  indices)
        tokenizer_key = tokenized_cache.tokenizer_fingerprint(self.tokenizer) if self.hparams.cache else ""
        for split, (source, indices, selection) in selections.items():
            table, self.stats[split] = self._encode(source, indices, selection, tokenizer_key, f"data.{split}")
            self.datasets[split] = EncodedDataset(table)
        _print_summary(self.stats)

    def _encode(
        self, source: Source, indices: list[int], selection: tuple, tokenizer_key: str, field: str
    ) -> tuple[datasets.Dataset, SplitStats]:
        if not self.hparams.cache:
            columns, stats = prepare(source, indices, self.tokenizer, self.options, field)
            return tokenized_cache.to_dataset(columns), stats
        key = tokenized_cache.fingerprint(source.fingerprint, selection, tokenizer_key, self.options)
        hit = tokenized_cache.load(self.cache_dir, key)
        if hit is not None:
            return hit
        columns, stats = prepare(source, indices, self.tokenizer, self.options, field)
        return tokenized_cache.store(self.cache_dir, key, tokenized_cache.to_dataset(columns), stats), stats

    def train_from(self, path: str) -> None:
        """Train on ``path`` (pairs) from the next training dataloader on, e.g. an on-policy round's file."""
        source = read_source(path, "data.train")
        tokenizer_key = tokenized_cache.tokenizer_fingerprint(self.tokenizer) if self.hparams.cache else ""
        table, self.stats["train"] = self._encode(source, list(range(len(source.rows))), ("all",), tokenizer_key,
                                                  "data.train")
        self.datasets["train"] = EncodedDataset(table)

    def _loader(self, split: str, train: bool) -> DataLoader:
        collate = PreferenceCollator(self.tokenizer.pad_token_id, split=split, packing=self.hparams.packing)
        dataset, trainer = self.datasets[split], self.trainer
        world = {"num_replicas": trainer.world_size, "rank": trainer.global_rank} if trainer else {}
        if train:
            grouped = None
            if self.hparams.group_by_length:
                batch = self.hparams.batch_size * world.get("num_replicas", 1)
                grouped = LengthGroupedSampler(dataset.lengths, batch, self.hparams.seed)
            sampler = TrainSampler(dataset, seed=self.hparams.seed, grouped=grouped, **world)
            return ResumableLoader(dataset, batch_size=self.hparams.batch_size, sampler=sampler, collate_fn=collate,
                                   num_workers=self.hparams.num_workers)
        return DataLoader(dataset, batch_size=self.hparams.batch_size, sampler=EvalSampler(dataset, **world),
                          collate_fn=collate, num_workers=self.hparams.num_workers)

    def train_dataloader(self) -> DataLoader:
        if self.hparams.train_data == "prompts":  # on-policy: prompts, shuffled and resumable like pairs
            trainer = self.trainer
            world = {"num_replicas": trainer.world_size, "rank": trainer.global_rank} if trainer else {}
            dataset = PromptDataset(self.train_prompts)
            sampler = TrainSampler(dataset, seed=self.hparams.seed, **world)
            return ResumableLoader(dataset, batch_size=self.hparams.batch_size, sampler=sampler,
                                   collate_fn=PromptCollator(self.tokenizer.pad_token_id, self.hparams.packing),
                                   num_workers=self.hparams.num_workers)
        return self._loader("train", train=True)

    @property
    def _has_val(self) -> bool:
        return "val" in self.datasets or bool(self.val_prompts)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_prompts:
            return self._prompt_loader(self.val_prompts, self.hparams.packing)
        return self._loader("val", train=False) if "val" in self.datasets else []

    def test_dataloader(self) -> DataLoader | list:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        """Left-padded prompt batches in input order, split across processes (duplicates padded in to even out
        the processes carry weight 0 and are written once)."""
        return self._prompt_loader(self.prompts)

    def _prompt_loader(self, prompts: list[PromptExample], packing: bool | str = False) -> DataLoader:
        trainer = self.trainer
        world = {"num_replicas": trainer.world_size, "rank": trainer.global_rank} if trainer else {}
        dataset = PromptDataset(prompts)
        return DataLoader(dataset, batch_size=self.hparams.batch_size, sampler=EvalSampler(dataset, **world),
                          collate_fn=PromptCollator(self.tokenizer.pad_token_id, packing),
                          num_workers=self.hparams.num_workers)


class PromptDataset(Dataset):
    """Prompts by position; a sampler's ``(index, is_padding)`` marks duplicates with weight 0."""

    def __init__(self, prompts: list[PromptExample]) -> None:
        self.prompts = prompts

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, key: int | tuple[int, bool]) -> PromptExample:
        index, padding = key if isinstance(key, tuple) else (key, False)
        return dataclasses.replace(self.prompts[index], weight=0.0 if padding else 1.0)


@rank_zero_only
def _print_summary(stats: dict[str, SplitStats]) -> None:
    print_summary(stats)
