r"""``PolicyGradientModule``: the RL stage of RLHF, a policy optimized against a reward with a KL penalty to the
reference (the SFT model), by PPO with a critic or by critic-free estimators (RLOO, GRPO, REINFORCE++).

The objective (Ouyang et al. 2022, "Training language models to follow instructions with human feedback",
arXiv:2203.02155, Eq. 2):

.. math::
    \max_\theta\ \mathbb{E}_{x, y \sim \pi_\theta}\big[r(x, y)\big] - \beta\, KL\big(\pi_\theta \| \pi_{ref}\big)
    + \gamma\, \mathbb{E}_{x \sim D_{pretrain}}\big[\log \pi_\theta(x)\big]

Each training step takes a batch of ``B`` prompts and

1. **rolls out** ``k`` completions of each with the current policy (eval mode, no gradients, seeded per step,
   batch and rank) and has the judge score them (:mod:`lightning_pref.rollout`), keeping each sampled token's
   log-probability at the sampling temperature (:math:`\pi_{\theta_{old}}`);
2. **scores the rollout**: the reference's log-probs (at the same temperature), the critic's values, per-token
   rewards (the judge's score on each completion's last token, its stop token, never on the padding after it;
   the KL penalty :math:`-\beta\,k_1` on every token when ``kl.placement`` is ``reward``) and advantages by the
   estimator plugin (:mod:`lightning_pref.rl.advantages`);
3. **updates**: ``ppo_epochs`` passes over the rollout in ``minibatches`` shuffled minibatches, each an optimizer
   step on the clipped surrogate (:mod:`lightning_pref.rl.objective`), plus the critic's clipped value loss, the
   KL penalty when it is placed in the loss, and PPO-ptx's language-model loss; with Lightning's manual
   optimization (``manual_backward``, ``clip_gradients``, the scheduler stepped per update), so every process runs
   the same number of updates under DDP and FSDP2. ``trainer.max_steps`` counts these updates.

The policy's training forward divides its logits by the sampling temperature, as generation did, so the first
update's ratio :math:`\pi_\theta / \pi_{\theta_{old}}` is 1.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from transformers import AutoModelForSequenceClassification

from lightning_pref import layout
from lightning_pref.checks import check_range
from lightning_pref.errors import UserInputError
from lightning_pref.judges.base import Judge, check_scoring
from lightning_pref.metrics import ExactMeans
from lightning_pref.models import (
    ModelSpec,
    load_reward_model,
    read_tokenizer,
)
from lightning_pref.policy import PolicyModule
from lightning_pref.reference import check_reference_mode
from lightning_pref.registry import ADVANTAGES, JUDGES
from lightning_pref.rl.advantages import GAE, AdvantageEstimator
from lightning_pref.rl.advantages.base import checked_call
from lightning_pref.rl.critic import CriticOptions, ValueScorer
from lightning_pref.rl.kl_penalty import KLController, KLEstimator, kl_estimate
from lightning_pref.rl.objective import Aggregation, clipped_surrogate, clipped_value_loss, token_weights
from lightning_pref.rl.ptx import PtxData, PtxOptions
from lightning_pref.rollout import Rollout, check_sampling_count, roll_out
from lightning_pref.types import PreferenceBatch, PromptBatch

_PROGRESS_BAR = ("train/judge/score", "train/objective/kl")
#: Validated and tested: what the policy writes for held-out prompts, judged.
_HELD_OUT = ("judge/score", "completions/eos_rate", "completions/tokens")


@dataclass
class KLOptions:
    r"""``model.kl``: the penalty :math:`\beta\,KL(\pi_\theta \| \pi_{ref})` (see :mod:`lightning_pref.rl.kl_penalty`).

    Attributes:
        coef: :math:`\beta \ge 0` (the initial one when adaptive).
        estimator: ``k1`` (default), ``k2`` or ``k3``, per token.
        placement: ``reward`` (:math:`-\beta k` in each token's reward, InstructGPT's form) or ``loss``
            (:math:`+\beta k` added to the loss, GRPO's form; ``k3`` there biases the gradient: prefer ``k2``).
        target: adapt :math:`\beta` towards this KL per completion (Ziegler et al. 2019); ``None``: fixed.
        horizon: completions over which the adaptive controller corrects an error.
    """

    coef: float = 0.05
    estimator: KLEstimator = "k1"
    placement: Literal["reward", "loss"] = "reward"
    target: float | None = None
    horizon: int = 10_000

    def __post_init__(self) -> None:
        check_range("model.kl.coef", self.coef, 0)  # NaN-safe: a NaN coefficient passed "< 0"
        if self.estimator not in ("k1", "k2", "k3"):
            raise UserInputError(f"model.kl.estimator: {self.estimator!r} is not one of k1, k2, k3")
        if self.placement not in ("reward", "loss"):
            raise UserInputError(f"model.kl.placement: {self.placement!r} is not one of reward, loss")
        if self.target is not None and (not 0 < self.target < float("inf") or self.coef == 0):
            raise UserInputError("model.kl.target: an adaptive KL coefficient needs target > 0 and kl.coef > 0 to "
                                 f"start from, got target {self.target}, coef {self.coef}")
        if self.horizon < 1:
            raise UserInputError(f"model.kl.horizon: must be >= 1, got {self.horizon}")


class PolicyGradientModule(PolicyModule):
    """Reinforcement learning of the policy against a judge's reward with a KL penalty (see the module docstring).

    In YAML: ``model: {class_path: lightning_pref.PolicyGradientModule, init_args: {judge: ..., estimator: gae}}``
    (``configs/ppo.yaml``, ``configs/grpo.yaml``, ``configs/rloo.yaml``); the data are prompts, as for on-policy
    DPO; every ``PolicyModule`` option applies (``model.generation`` must sample: ``do_sample: true``).

    Args:
        policy: the model to train (a hub id, a local directory, or config fields).
        judge: the reward: a registered judge name, class name or import path, or an instance (``function`` for
            verifiable rewards, ``no_shouting``, ``reward_model`` with ``center: true`` for InstructGPT's
            normalization).
        estimator: the advantage estimator: ``gae`` (PPO with a critic), ``rloo``, ``grpo``, ``reinforce_pp``.
        samples_per_prompt: completions sampled per prompt (``k``; RLOO and GRPO need ``k >= 2``).
        ppo_epochs: passes over each rollout.
        minibatches: optimizer steps per pass (the rollout's ``B * k`` completions split evenly).
        micro_batches: each minibatch is run in this many parts with accumulated gradients (the same gradient as
            undivided: the aggregation's denominators are the minibatch's).
        clip: :math:`\\epsilon` of the clipped surrogate.
        max_grad_norm: clip the gradients' total norm to this before each update (``None``: no clipping); the
            module's own option, as Lightning's ``trainer.gradient_clip_val`` does not apply to manual
            optimization.
        loss_aggregation: ``token_mean``, ``sequence_mean`` or ``constant`` (Dr. GRPO).
        kl: the KL penalty (``coef``, ``estimator``, ``placement``, ``target``, ``horizon``).
        critic: the critic of ``gae`` (``model``, ``lr``, ``vf_coef``, ``value_clip``); refused with a critic-free
            estimator.
        ptx: PPO-ptx (``data``, ``coef``, ``batch_size``): language-model loss on pretraining or SFT text.
        eos_penalty: subtracted from the score of a completion that never emitted a stop token (the N+ recipe
            penalizes them; ``None``: no penalty).
        **kwargs: ``PolicyModule``'s arguments (reference, generation, optimizer, scheduler, ...).
    """

    plugin_registries = {"judge": JUDGES, "estimator": ADVANTAGES}
    not_hparams = (*PolicyModule.not_hparams, "judge", "estimator", "kl", "critic", "ptx")
    train_data = "prompts"
    val_data = "prompts"

    def __init__(
        self,
        policy: ModelSpec,
        judge: Judge | None = None,
        estimator: AdvantageEstimator | None = None,
        samples_per_prompt: int = 4,
        ppo_epochs: int = 1,
        minibatches: int = 1,
        micro_batches: int = 1,
        clip: float = 0.2,
        max_grad_norm: float | None = 1.0,
        loss_aggregation: Aggregation = "token_mean",
        kl: KLOptions | None = None,
        critic: CriticOptions | None = None,
        ptx: PtxOptions | None = None,
        eos_penalty: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(policy, **kwargs)
        self.automatic_optimization = False
        self.judge = self.plugin(judge, JUDGES, None, "model.judge")
        check_scoring(self.judge, "model.judge", "the policy gradient's reward is a score per completion")
        self.estimator = self.plugin(estimator, ADVANTAGES, GAE, "model.estimator")
        kl = KLOptions(**kl) if isinstance(kl, dict) else kl or KLOptions()
        critic = CriticOptions(**critic) if isinstance(critic, dict) else critic
        ptx = PtxOptions(**ptx) if isinstance(ptx, dict) else ptx
        if self.estimator.requires_critic and critic is None:
            critic = CriticOptions()
        self._check(samples_per_prompt, ppo_epochs, minibatches, micro_batches, clip, loss_aggregation, kl, critic)
        self.kl_options, self.critic_options, self.ptx_options = kl, critic, ptx
        self.hparams.update(judge=self.judge.spec, estimator=self.estimator.spec, kl=dataclasses.asdict(kl),
                            critic=dataclasses.asdict(critic) if critic else None,
                            ptx=dataclasses.asdict(ptx) if ptx else None)
        check_reference_mode(self.hparams.reference_mode, self.needs_reference, False, "the KL penalty",
                             self.hparams.ref_sync_steps)
        self.kl_controller = KLController(kl.coef, kl.target, kl.horizon)
        self.critic: ValueScorer | None = None
        self.ptx: PtxData | None = None
        #: checkpointed: the adaptive KL coefficient, so a resumed run continues with the one it had
        self.kl_state: dict[str, float] = {"coef": kl.coef}
        self.val_metrics, self.test_metrics = ExactMeans(_HELD_OUT), ExactMeans(_HELD_OUT)

    checkpointed_state = ("kl_state",)

    def _check(self, k: int, epochs: int, minibatches: int, micro: int, clip: float, aggregation: str,
               kl: KLOptions, critic: CriticOptions | None) -> None:
        """Refuse options outside their meaning or contradicting each other, naming the option."""
        if k < 1 or epochs < 1 or minibatches < 1 or micro < 1:
            raise UserInputError("model: samples_per_prompt, ppo_epochs, minibatches and micro_batches must be >= 1, "
                                 f"got {k}, {epochs}, {minibatches}, {micro}")
        if self.estimator.requires_groups and k < 2:
            raise UserInputError(f"model.samples_per_prompt: {type(self.estimator).__name__} compares the "
                                 f"completions of a prompt, so it needs >= 2, got {k}")
        if critic is not None and not self.estimator.requires_critic:
            raise UserInputError(f"model.critic: {type(self.estimator).__name__} uses no critic; drop model.critic or "
                                 "use estimator gae")
        if not 0 < clip < 1:
            raise UserInputError(f"model.clip: must be in (0, 1), got {clip}")
        if self.hparams.max_grad_norm is not None and not self.hparams.max_grad_norm > 0:
            raise UserInputError(f"model.max_grad_norm: must be > 0 (or null), got {self.hparams.max_grad_norm}")
        if aggregation not in ("token_mean", "sequence_mean", "constant"):
            raise UserInputError(f"model.loss_aggregation: {aggregation!r} is not one of token_mean, sequence_mean, "
                                 "constant")
        if self.hparams.reference_mode == "precomputed":
            raise UserInputError("model.reference_mode: 'precomputed' cannot serve rollouts (new every step); use "
                                 "reference_mode model or adapter")
        if self.hparams.reference_mode == "none" and kl.coef > 0:
            raise UserInputError("model.reference_mode: 'none' leaves no reference for the KL penalty; set "
                                 "model.kl.coef: 0 or use reference_mode model or adapter")
        check_range("model.eos_penalty", self.hparams.eos_penalty, 0, hint="it is subtracted from the score of a "
                    "completion that never stopped (null: no penalty)")

    def on_fit_start(self) -> None:
        # Checked when training starts, not when built: evaluating a trained policy greedily is fine.
        if not self.generation.do_sample:
            raise UserInputError("model.generation.do_sample: the policy gradient needs samples from the policy "
                                 "(greedy decoding is not a sample of it); set it to true")
        check_sampling_count(self.generation)
        super().on_fit_start()

    def on_train_start(self) -> None:
        # Checked before the first rollout: every minibatch needs a completion, in the epoch's last batch too
        loader, k = self.trainer.train_dataloader, self.hparams.samples_per_prompt
        size, samples = getattr(loader, "batch_size", None), len(getattr(loader, "sampler", ()))
        if size is None or not samples:
            return
        prompts = min(size, samples % size or size)  # the smallest batch: the epoch's last, or a full one
        if self.hparams.minibatches > prompts * k:
            last = " in the epoch's last batch" if prompts < size else ""
            raise UserInputError(
                f"model.minibatches: {self.hparams.minibatches} minibatches cannot split a rollout of {prompts * k} "
                f"completions ({prompts} prompt{'s' if prompts > 1 else ''}{last} x model.samples_per_prompt {k}); "
                f"use model.minibatches <= {prompts * k}, or a data.batch_size that leaves more prompts")

    @property
    def updates_per_batch(self) -> int:
        """``ppo_epochs`` passes of ``minibatches`` optimizer steps per rollout."""
        return self.hparams.ppo_epochs * self.hparams.minibatches

    def describe_updates(self) -> str:
        return f"model.ppo_epochs {self.hparams.ppo_epochs} x model.minibatches {self.hparams.minibatches}"

    @property
    def needs_reference(self) -> bool:
        """A reference is built unless ``reference_mode: none`` (then ``kl.coef`` is 0): the KL to it is logged
        even when it is not penalized."""
        return self.hparams.reference_mode != "none"

    # ------------------------------------------------------------------------------------------------- models
    def configure_model(self) -> None:
        if self.policy is not None:
            return
        super().configure_model()
        if self.critic_options is not None:
            self.critic = self.build_critic()
            if self._trainer is not None:
                rank_zero_info(self.describe_dtype("critic", self.critic))
        if self.ptx_options is not None:
            self.ptx = PtxData(self.ptx_options, self.tokenizer, self.hparams.init_seed)

    def build_critic(self) -> ValueScorer:
        """The critic: from ``critic.model`` (a reward model, InstructGPT), or the policy's body with a zero head."""
        spec = self.critic_options.model
        if spec is None:
            model = self.load_model(self.hparams.policy, "model.critic", model_kwargs=self.hparams.model_kwargs,
                                    auto_class=AutoModelForSequenceClassification, num_labels=1)
            head = ValueScorer(model).head
            torch.nn.init.zeros_(head.weight)
            if getattr(head, "bias", None) is not None:
                torch.nn.init.zeros_(head.bias)
        else:
            self._check_critic_tokenizer(spec)
            # a trained one-label head, checked (a causal LM would get a random one)
            model = load_reward_model(spec, "model.critic.model", dtype=self.parameter_dtype)
        self.checkpoint_activations(model)
        return ValueScorer(model).to(self.device)

    def _check_critic_tokenizer(self, spec: str) -> None:
        """A critic reads the policy's tokens: its tokenizer must encode text as the policy's does."""
        theirs = read_tokenizer(spec, "model.critic.model", "a reward model directory holds its tokenizer "
                                "(lightning-pref export writes it)")
        probe = "The critic reads the policy's tokens: 123, ok?"
        if theirs(probe, add_special_tokens=False)["input_ids"] != self.tokenizer(probe, add_special_tokens=False)["input_ids"]:
            raise UserInputError(f"model.critic.model: {spec} uses another tokenizer than the policy; a critic must "
                                 "read the policy's tokens (start it from a reward model of the policy's family, or "
                                 "drop critic.model to start from the policy's body)")

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return super().trainable_parameters() + (list(self.critic.parameters()) if self.critic is not None else [])

    def configure_optimizers(self) -> Any:
        """One optimizer over the policy and, as a parameter group with its own learning rate, the critic (so one
        update is one optimizer step, and the scheduler moves both)."""
        groups: list[dict[str, Any]] = [{"params": super().trainable_parameters()}]
        if self.critic is not None:
            group: dict[str, Any] = {"params": list(self.critic.parameters())}
            if self.critic_options.lr is not None:
                group["lr"] = self.critic_options.lr
            groups.append(group)
        return self.build_optimizers(groups)

    # ---------------------------------------------------------------------------------------------- training
    def _seed(self, first_prompt: int) -> int:
        """A seed per update count, batch and rank: all three come back on resume."""
        rank = self.trainer.global_rank if self._trainer is not None else 0
        return self.generation.seed + 1_000_003 * self.global_step + 10_007 * first_prompt + 101 * rank

    def training_step(self, batch: PromptBatch, batch_idx: int) -> None:
        start = time.perf_counter()
        prompts = batch.token_ids()
        rollout = self.roll_out(prompts, batch.prompts, self._seed(int(batch.index[0])))
        experience = self.experience(rollout, batch.packing)
        metrics = self.update(experience)
        metrics |= rollout.metrics() | experience.metrics
        seconds = time.perf_counter() - start
        metrics["generation/share"] = torch.tensor(rollout.seconds / max(seconds, 1e-9))
        metrics["kl_coef"] = torch.tensor(self.kl_controller.value)
        self.kl_controller.update(float(experience.metrics["objective/kl"]), len(experience.mask))
        self.kl_state["coef"] = self.kl_controller.value
        self.log_metrics("train", metrics, len(prompts), _PROGRESS_BAR)
        self.flops_per_batch = self.flop_params * experience.tokens * (
            2 * (1 + self.reference.passes) + 6 * self.hparams.ppo_epochs)

    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        self._held_out(batch, "val")

    def test_step(self, batch: PromptBatch, batch_idx: int) -> None:
        self._held_out(batch, "test")

    def _held_out(self, batch: PromptBatch, stage: str) -> None:
        """What the policy writes for held-out prompts, judged: one completion of each at the sampling temperature,
        seeded by the prompt's row (not by the step), so that every validation judges the same draws; exact means
        over the epoch on every device (a prompt a distributed sampler padded in weighs 0)."""
        prompts = batch.token_ids()
        rollout = roll_out(self.sampler, self.policy.lm, self.judge, prompts, batch.prompts, 1,
                           self.generation.seed + 10_007 * int(batch.index[0]), self.hparams.eos_penalty)
        weights = batch.weights.to(self.device) if batch.weights is not None else None
        values = {"judge/score": rollout.scores.flatten(), "completions/eos_rate": rollout.completions.eos.float(),
                  "completions/tokens": rollout.completions.lengths.float()}
        metrics = getattr(self, f"{stage}_metrics").update({k: (v.to(self.device), weights) for k, v in values.items()})
        for key, metric in metrics.items():
            self.log(f"{stage}/{key}", metric, on_step=False, on_epoch=True, batch_size=len(prompts),
                     prog_bar=key == "judge/score")

    def roll_out(self, prompts: list[list[int]], values: list[Any], seed: int) -> Rollout:
        """``samples_per_prompt`` completions of each prompt by the current policy, judged, with each sampled
        token's log-probability at the sampling temperature."""
        hp = self.hparams
        return roll_out(self.sampler, self.policy.lm, self.judge, prompts, values, hp.samples_per_prompt, seed,
                        hp.eos_penalty, logps=True)

    @torch.no_grad()
    def experience(self, rollout: Rollout, packing: bool | str) -> Experience:
        """What the updates need from a rollout, per completion token: the sampling policy's and the reference's
        log-probs, the critic's values, rewards, advantages and returns."""
        completions, k = rollout.completions, rollout.k
        lengths = completions.lengths.tolist()
        sequences = [(rollout.prompts[n // k], completions.ids[n, :length].tolist()) for n, length in enumerate(lengths)]
        width = max(lengths)
        batch = self.sequence_batch(sequences, packing)
        old = completions.logps[:, :width].to(self.device)  # (N, L) pi_old, at the sampling temperature
        mask = torch.arange(width, device=self.device) < completions.lengths.to(self.device)[:, None]  # (N, L)
        reference = self.reference.per_token(self.policy, batch, self.generation.temperature)
        reference_logps = reference.logps[:, :width] if reference is not None else None
        kl = kl_estimate(old, reference_logps, "k1") * mask if reference is not None else torch.zeros_like(old)
        beta = self.kl_controller.value
        rewards = -beta * kl if self.kl_options.placement == "reward" else torch.zeros_like(old)  # -beta k1 per token
        scores = rollout.scores.flatten().to(self.device)  # (N,)
        last = completions.lengths.to(self.device) - 1  # the stop token (or the last token), never padding after it
        rewards[torch.arange(len(last), device=self.device), last] += scores
        values = self.critic_values(batch, width) if self.critic is not None else None
        strategy = self.trainer.strategy if self._trainer is not None else None
        reduce = (lambda t: strategy.reduce(t, reduce_op="sum")) if strategy is not None else None
        advantages, returns = checked_call(self.estimator, rewards, mask, k, values, reduce)
        sequence_kl = kl.sum(-1)  # (N,) k1 summed over each completion: its KL estimate
        non_score = -beta * sequence_kl if self.kl_options.placement == "reward" else torch.zeros_like(sequence_kl)
        metrics = {
            "objective/scores": scores.mean(), "objective/kl": sequence_kl.mean(),
            "objective/non_score_reward": non_score.mean(), "objective/rlhf_reward": (scores + non_score).mean(),
            "returns/mean": _masked_mean(returns, mask), "advantages/mean": _masked_mean(advantages, mask),
            "advantages/std": _masked_var(advantages, mask).sqrt(),
        }
        if reference is not None:
            for name in ("k1", "k2", "k3"):
                metrics[f"objective/kl_{name}"] = (kl_estimate(old, reference_logps, name) * mask).sum(-1).mean()
        if values is not None:
            unexplained = _masked_var(returns - values, mask) / _masked_var(returns, mask).clamp(min=1e-8)
            metrics["value/explained_variance"] = 1 - unexplained
        return Experience(sequences, packing, old, reference_logps, rewards, advantages, returns, values, mask, metrics)

    def critic_values(self, batch: PreferenceBatch, width: int) -> Tensor:
        """The critic's :math:`V(s_t)` before each completion token. # -> (N, L)"""
        values, rows = self.critic.values(batch.input_ids, batch.attention_mask, batch.response_mask, batch.packed)
        return layout.by_sequence(values, rows, batch.num_sequences)[0][:, :width]

    def update(self, experience: Experience) -> dict[str, Tensor]:
        """``ppo_epochs`` passes of ``minibatches`` optimizer steps over the rollout; their mean metrics."""
        hp = self.hparams
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        generator = torch.Generator().manual_seed(hp.init_seed + self.global_step)
        sums: dict[str, float] = {}
        updates = 0
        for _ in range(hp.ppo_epochs):
            order = torch.randperm(len(experience.sequences), generator=generator)
            for minibatch in order.chunk(hp.minibatches):
                for key, value in self.minibatch_step(experience, minibatch.sort().values).items():
                    sums[key] = sums.get(key, 0.0) + value
                if hp.max_grad_norm is not None:
                    self.clip_gradients(optimizer, hp.max_grad_norm, "norm")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if scheduler is not None:
                    scheduler.step()
                self.reference.after_optimizer_step(self.policy, self.global_step)
                updates += 1
        return {key: torch.tensor(value / updates) for key, value in sums.items()}

    def minibatch_step(self, experience: Experience, rows: Tensor) -> dict[str, float]:
        """Forward and backward of one minibatch, in ``micro_batches`` parts, and PPO-ptx's term; its metrics."""
        hp = self.hparams
        mask = experience.mask[rows]
        counts = torch.tensor([float(mask.sum()), float(len(rows))], device=self.device)
        world = self.trainer.world_size if self._trainer is not None else 1
        if world > 1:  # the minibatch's global counts, shared by processes whose gradients are averaged
            counts = self.trainer.strategy.reduce(counts, reduce_op="sum") / world
        parts = rows.chunk(hp.micro_batches)
        out: dict[str, float] = {}
        for part in parts:
            for key, value in self.micro_step(experience, part, float(counts[0]), float(counts[1])).items():
                out[key] = out.get(key, 0.0) + value / len(parts)
        if self.ptx is not None:
            nll = self.ptx.loss(self.policy, self.global_step, self.device)
            self.manual_backward(self.ptx_options.coef * nll)  # Eq. 2's gamma * E[log pi(x)], as a loss
            out["loss/ptx"] = float(nll.detach())
        return out

    def micro_step(self, experience: Experience, rows: Tensor, tokens: float, sequences: float) -> dict[str, float]:
        """One micro-batch's loss, weighted for the whole minibatch, and its backward."""
        hp = self.hparams
        batch = self.sequence_batch([experience.sequences[i] for i in rows.tolist()], experience.packing)
        mask, old = experience.mask[rows], experience.old_logps[rows]
        width = old.shape[1]
        current = self.policy.token_logps(batch, self.generation.temperature, entropy=True)
        logps = _widen(current.logps, width)
        weights = token_weights(mask, hp.loss_aggregation, self.generation.max_new_tokens, tokens, sequences)
        surrogate, ratio = clipped_surrogate(logps, old, experience.advantages[rows], hp.clip)
        loss = (surrogate * weights).sum()
        log_ratio = (logps - old).detach()
        metrics = {
            "loss/policy": float(_masked_mean(surrogate.detach(), mask)),
            "policy/approxkl": float(_masked_mean(0.5 * log_ratio**2, mask)),
            "policy/clipfrac": float(_masked_mean(((ratio.detach() - 1).abs() > hp.clip).float(), mask)),
            "policy/ratio": float(_masked_mean(ratio.detach(), mask)),  # TRL's val/ratio; val/ is a stage here
            "objective/entropy": float(_masked_mean(_widen(current.entropy, width), mask)),
        }
        if self.kl_options.placement == "loss" and experience.reference_logps is not None:
            penalty = kl_estimate(logps, experience.reference_logps[rows], self.kl_options.estimator)
            loss = loss + self.kl_controller.value * (penalty * weights).sum()
        if self.critic is not None:
            values = self.critic_values(batch, width)
            value_loss = clipped_value_loss(values, experience.values[rows], experience.returns[rows],
                                            self.critic_options.value_clip)
            loss = loss + self.critic_options.vf_coef * (value_loss * weights).sum()
            metrics["loss/value"] = float(_masked_mean(value_loss.detach(), mask))
        self.manual_backward(self.checked_loss(loss, logps, 0))
        return metrics

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.kl_controller.target is None:  # a fixed coefficient is the configured one, changed or not
            self.kl_state["coef"] = self.kl_controller.value
            return
        saved = float(self.kl_state.get("coef", self.kl_controller.value))  # adaptive: continue where it was
        initial = ((checkpoint.get("hyper_parameters") or {}).get("kl") or {}).get("coef")
        if initial is not None and initial != self.kl_options.coef and self._trainer is not None:
            rank_zero_info(f"lightning-pref: model.kl.coef {self.kl_options.coef} is the initial coefficient of an "
                           "adaptive KL (model.kl.target); the resumed run continues from the checkpoint's "
                           f"{saved:.6g}")
        self.kl_controller.value = saved


@dataclass
class Experience:
    """What a rollout left for the updates: its sequences (the batches are laid out anew per micro-batch) and, per
    completion token, the rest. # each (N, L)"""

    sequences: list[layout.Sequence]
    packing: bool | str
    old_logps: Tensor
    reference_logps: Tensor | None
    rewards: Tensor
    advantages: Tensor
    returns: Tensor
    values: Tensor | None
    mask: Tensor
    metrics: dict[str, Tensor]

    @property
    def tokens(self) -> int:
        return int(self.mask.sum())


def _widen(table: Tensor, width: int) -> Tensor:
    """``table`` cut or right-padded with 0 to ``width`` columns (a micro-batch's longest completion may be shorter
    than the rollout's). # (n, L') -> (n, L)"""
    if table.shape[1] >= width:
        return table[:, :width]
    return torch.nn.functional.pad(table, (0, width - table.shape[1]))


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def _masked_var(values: Tensor, mask: Tensor) -> Tensor:
    return _masked_mean((values - _masked_mean(values, mask)) ** 2, mask)
