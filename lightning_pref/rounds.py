"""Iterative on-policy training in rounds: the :class:`IterativeRounds` callback ``OnPolicyModule`` adds in
``mode: iterative``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from lightning_pref.errors import UserInputError
from lightning_pref.predict import all_gather_objects, write_jsonl


class IterativeRounds(Callback):
    """``iterative`` on-policy training: before each epoch, the round file it trains on.

    Round ``r`` samples and labels ``round_prompts`` of the data module's training prompts (wrapping around) with
    :meth:`~lightning_pref.online.OnPolicyModule.label` into ``round_<r>.jsonl`` in the run directory (every rank samples its share, rank
    0 writes), then points the data module at it (:meth:`PreferenceDataModule.train_from`). The round files are
    this callback's state, saved in checkpoints: a resumed run trains its round on the interrupted run's file.

    Args:
        round_prompts: prompts sampled per round.
    """

    def __init__(self, round_prompts: int) -> None:
        self.round_prompts = round_prompts
        self.round_files: dict[int, str] = {}

    def state_dict(self) -> dict[str, Any]:
        return {"round_files": dict(self.round_files)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.round_files = dict(state_dict.get("round_files") or {})

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.reload_dataloaders_every_n_epochs:
            raise UserInputError("model.mode: iterative trains each round's file in its own epoch; set "
                                 "trainer.reload_dataloaders_every_n_epochs: 1")
        self.prepare(trainer, pl_module, trainer.current_epoch)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        last = trainer.max_epochs not in (None, -1) and trainer.current_epoch + 1 >= trainer.max_epochs
        if last or trainer.should_stop or 0 <= trainer.max_steps <= trainer.global_step:
            return  # no epoch follows to train the next round: sampling and judging it would be wasted
        self.prepare(trainer, pl_module, trainer.current_epoch + 1)

    def prepare(self, trainer: Trainer, module: LightningModule, round_index: int) -> None:
        """The file of round ``round_index`` (this run's or, resuming, the interrupted run's), and the data module
        pointed at it for the next training dataloader."""
        datamodule = trainer.datamodule
        path = self.round_files.get(round_index)
        if path is None or not Path(path).is_file():
            prompts = datamodule.train_prompts
            shard = [prompts[(round_index * self.round_prompts + i) % len(prompts)] for i in range(self.round_prompts)]
            path = str(self.write_round(trainer, module, round_index, [(p.ids, p.prompt) for p in shard]))
            self.round_files[round_index] = path
        datamodule.train_from(path)

    def write_round(self, trainer: Trainer, module: LightningModule, round_index: int,
                    prompts: list[tuple[list[int], Any]]) -> Path:
        """Sample and label a round's prompts (``(ids, value)`` pairs) into its JSONL; returns the file."""
        mine = prompts[trainer.global_rank :: trainer.world_size]
        batch_size = trainer.datamodule.hparams.batch_size
        records = []
        for start in range(0, len(mine), batch_size):
            part = mine[start : start + batch_size]
            seed = module.generation.seed + 1_000_003 * round_index + 10_007 * start + 101 * trainer.global_rank
            records += module.label([p[0] for p in part], [p[1] for p in part], seed)
        records = all_gather_objects(trainer, records)
        path = Path(trainer.log_dir or trainer.default_root_dir) / f"round_{round_index}.jsonl"
        if trainer.is_global_zero:
            if not records:
                raise UserInputError(f"model.min_gap: round {round_index} kept no pair (every prompt's samples "
                                     "tied); lower model.min_gap or sample more per prompt")
            write_jsonl(path, records)
        trainer.strategy.barrier()
        return path
