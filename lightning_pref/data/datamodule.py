"""``PreferenceDataModule``: preference files in, padded :class:`PreferenceBatch` out."""

from __future__ import annotations

from lightning.pytorch import LightningDataModule
from rich.console import Console
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from lightning_pref.data.collate import PreferenceCollator
from lightning_pref.data.sources import bundled, read_records, validate
from lightning_pref.data.tokenize import Encoded, encode_prompt, encode_response, truncate
from lightning_pref.errors import UserInputError


class PreferenceDataModule(LightningDataModule):
    """Preference data from JSONL/JSON files.

    Records are ``{"prompt", "chosen", "rejected"}`` (paired) or ``{"prompt", "completion", "label"}``
    (unpaired, KTO). With ``train`` unset, the bundled synthetic set is used for train *and* val.

    Args:
        train: training file (``.jsonl`` or ``.json``); ``None`` = the bundled synthetic set.
        val: validation file; ``None`` = no validation (or the bundled held-out split when ``train`` is unset).
        tokenizer: the policy's tokenizer (linked from ``model.tokenizer`` by the CLI).
        batch_size: pairs (paired data) or examples (unpaired data) per batch.
        max_length: maximum tokens of prompt + response; longer examples are truncated (see ``truncate``).
        max_prompt_length: maximum prompt tokens; the prompt keeps its end.
        num_workers: DataLoader workers.
        kl_baseline: build KTO's mismatched pairs in each batch (linked from the loss by the CLI).
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
        kl_baseline: bool = False,
    ) -> None:
        super().__init__()
        if tokenizer is None:
            raise UserInputError("data.tokenizer: required (the CLI links it from model.tokenizer)")
        self.save_hyperparameters(ignore=["tokenizer"])
        self.tokenizer = tokenizer
        if train is None:
            train, val = bundled("train"), val or bundled("val")
        self.paths = {"train": train, "val": val}
        self.datasets: dict[str, list[Encoded]] = {}

    def setup(self, stage: str) -> None:
        for split, path in self.paths.items():
            if path is not None and split not in self.datasets:
                self.datasets[split] = self._load(path, f"data.{split}")

    def _load(self, path: str, field: str) -> list[Encoded]:
        tok, hp = self.tokenizer, self.hparams
        examples, dropped = [], 0
        for record in read_records(path, field):
            paired = validate(record)
            prompt = encode_prompt(tok, record["prompt"])
            if paired:
                responses = [encode_response(tok, record["chosen"]), encode_response(tok, record["rejected"])]
            else:
                responses = [encode_response(tok, record["completion"])]
            prompt, responses = truncate(prompt, responses, hp.max_length, hp.max_prompt_length)
            if any(not r for r in responses):  # no response token left to score: the example carries no signal
                dropped += 1
                continue
            if paired:
                examples.append(Encoded(prompt, responses[0], responses[1]))
            else:
                examples.append(Encoded(prompt, responses[0], label=record["label"]))
        if not examples:
            raise UserInputError(
                f"{field}: all {dropped} examples of {path} were dropped by truncation; raise data.max_length"
            )
        if dropped:
            Console(stderr=True).print(f"[yellow]{field}: dropped {dropped} examples with no response token left "
                                       f"after truncation to max_length={hp.max_length}[/yellow]")
        return examples

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        collate = PreferenceCollator(self.tokenizer.pad_token_id, kl_baseline=self.hparams.kl_baseline)
        return DataLoader(
            self.datasets[split],
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            collate_fn=collate,
            num_workers=self.hparams.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val", shuffle=False) if "val" in self.datasets else []

    def test_dataloader(self) -> DataLoader | list:
        return self.val_dataloader()
