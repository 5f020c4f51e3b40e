"""Reward models: pairwise losses by hand, the last-token pitfall (pad = EOS) in training and in the export,
learning the embedded default, exact metrics, the margin column, resume and export, the reward-model judge."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, ByT5Tokenizer

from lightning_pref.cli import main
from lightning_pref.data.collate import PreferenceCollator
from lightning_pref.data.tokenize import Encoded
from lightning_pref.registry import REWARD_LOSSES
from lightning_pref.reward import (
    BradleyTerryLoss,
    CenteredBradleyTerryLoss,
    MarginRankingLoss,
    RewardModule,
    last_token,
)
from tests.support import REPO, TINY, write_jsonl

RUN = ["--trainer.max_steps", "40", "--trainer.val_check_interval", "40", "--trainer.log_every_n_steps", "5"]


@pytest.fixture(autouse=True)
def _argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["lightning-pref"])


def _metrics(root) -> list[dict]:
    (path,) = root.glob("lightning_logs/version_0/metrics.csv")
    return list(csv.DictReader(open(path)))


# -------------------------------------------------------------------------------------------------------- losses
def test_bradley_terry_by_hand():
    chosen, rejected, margin = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]), torch.tensor([0.5, 0.0])
    # -log sigmoid(d) = log(1 + exp(-d)): d = 2 - 1 - 0.5 = 0.5 and d = 0 - 1 - 0 = -1
    torch.testing.assert_close(BradleyTerryLoss()(chosen, rejected, margin),
                               torch.tensor([math.log1p(math.exp(-0.5)), math.log1p(math.exp(1.0))]))
    torch.testing.assert_close(BradleyTerryLoss(use_margin=False)(chosen, rejected, margin),
                               torch.tensor([math.log1p(math.exp(-1.0)), math.log1p(math.exp(1.0))]))
    centered = CenteredBradleyTerryLoss(eta=0.1)(chosen, rejected, margin)
    torch.testing.assert_close(centered, BradleyTerryLoss()(chosen, rejected, margin) + 0.1 * torch.tensor([9.0, 1.0]))
    # hinge: relu(delta + m - d) = relu(1 + 0.5 - 1) = 0.5, relu(1 + 0 + 1) = 2
    torch.testing.assert_close(MarginRankingLoss()(chosen, rejected, margin), torch.tensor([0.5, 2.0]))


@pytest.mark.parametrize("name", REWARD_LOSSES.names())
def test_every_reward_loss_is_per_pair_finite_and_differentiable(name):
    loss = REWARD_LOSSES.create(name)
    chosen = torch.randn(5, requires_grad=True)
    rejected = torch.randn(5, requires_grad=True)
    out = loss(chosen, rejected, torch.rand(5))
    assert out.shape == (5,) and torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(chosen.grad).all() and loss.paper and loss.spec["class_path"].endswith(type(loss).__name__)


# ------------------------------------------------------------------------------------------------ the last token
@pytest.fixture
def eos_pad_tokenizer(tmp_path):
    """A byte tokenizer whose pad is its EOS, as SmolLM2's, Qwen's and Llama 3's are."""
    tokenizer = ByT5Tokenizer(pad_token="</s>")
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    tokenizer.save_pretrained(tmp_path / "tok")
    return tokenizer, str(tmp_path / "tok")


def _pairs_batch(tokenizer) -> object:
    encode = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = [tokenizer.eos_token_id]
    examples = [Encoded(encode("q: hi"), encode(" fine") + eos, encode(" FINE, REALLY") + eos),
                Encoded(encode("q: a longer question"), encode(" yes") + eos, encode(" NO") + eos)]
    return PreferenceCollator(tokenizer.pad_token_id)(examples)


def test_scores_are_read_at_the_last_real_token_not_before_the_eos(eos_pad_tokenizer):
    """With pad = EOS, Hugging Face's own pick (the last token that is not the pad id) is the token before the
    EOS; the reward model is read at the EOS, found from the attention mask."""
    tokenizer, path = eos_pad_tokenizer
    module = RewardModule(backbone=TINY, tokenizer=path)
    module.configure_model()
    batch = _pairs_batch(tokenizer)
    lengths = batch.attention_mask.sum(-1)
    assert last_token(batch.attention_mask).tolist() == (lengths - 1).tolist()
    with torch.no_grad():
        ours = torch.cat(module(batch))
        hf = module.scorer.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, 0]
        hidden = module.scorer.model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        before_eos = module.scorer.head(hidden.last_hidden_state[torch.arange(4), lengths - 2]).squeeze(-1)
    torch.testing.assert_close(hf, before_eos)  # the pitfall, as Hugging Face's model does it
    assert not torch.allclose(ours, hf)


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory):
    """configs/reward.yaml on the embedded default, 40 steps, with a pad = EOS tokenizer."""
    tmp = tmp_path_factory.mktemp("reward")
    ByT5Tokenizer(pad_token="</s>").save_pretrained(tmp / "tok")
    import sys

    argv, sys.argv = sys.argv, ["lightning-pref"]
    try:
        main(["fit", "--config", str(REPO / "configs/reward.yaml"), "--model.tokenizer", str(tmp / "tok"),
              "--trainer.default_root_dir", str(tmp), *RUN])
    finally:
        sys.argv = argv
    return {"root": tmp, "ckpt": tmp / "lightning_logs/version_0/checkpoints/last.ckpt", "tok": str(tmp / "tok")}


def test_reward_model_learns_the_embedded_default(reward_run):
    rows = _metrics(reward_run["root"])
    losses = [float(r["train/loss"]) for r in rows if r["train/loss"]]
    (val,) = [r for r in rows if r["val/loss"]]
    assert float(val["val/rewards/accuracies"]) >= 0.9  # held-out topics
    assert losses[-1] < losses[0] < math.log(2) + 0.05
    assert float(val["val/rewards/ties"]) == 0.0 and float(val["val/rewards/margins"]) > 0
    for key in ("chosen_std", "rejected_std"):
        assert math.isfinite(float(val[f"val/rewards/{key}"])) and float(val[f"val/rewards/{key}"]) >= 0


def test_export_scores_what_training_scored_with_a_plain_forward(reward_run, tmp_path):
    """The exported directory's plain ``model(**batch).logits`` on a right-padded batch equals the module's
    scores, though the tokenizer's pad was its EOS; the validation statistics go with it."""
    out = tmp_path / "rm"
    main(["export", "--ckpt_path", str(reward_run["ckpt"]), "--output_dir", str(out)])
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.pad_token_id == tokenizer.pad_token_id != tokenizer.eos_token_id
    module = RewardModule.load_from_checkpoint(reward_run["ckpt"]).eval()
    batch = _pairs_batch(module.tokenizer)
    ids = batch.input_ids.masked_fill(batch.attention_mask == 0, tokenizer.pad_token_id)  # a consumer's padding
    with torch.no_grad():
        ours = torch.cat(module(batch))
        theirs = model(input_ids=ids, attention_mask=batch.attention_mask).logits[:, 0]
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    checkpoint = torch.load(reward_run["ckpt"], weights_only=False)
    assert model.config.reward_mean == pytest.approx(checkpoint["reward_stats"]["mean"])
    assert model.config.reward_std == pytest.approx(checkpoint["reward_stats"]["std"]) and model.config.reward_std > 0


def test_reward_checkpoint_resumes(reward_run):
    main(["fit", "--config", str(REPO / "configs/reward.yaml"), "--model.tokenizer", reward_run["tok"],
          "--trainer.default_root_dir", str(reward_run["root"]), *RUN, "--trainer.max_steps", "44",
          "--ckpt_path", "last"])
    resumed = torch.load(reward_run["root"] / "lightning_logs/version_1/checkpoints/last.ckpt", weights_only=False)
    assert resumed["global_step"] == 44 and resumed["hyper_parameters"]["loss"]["class_path"].endswith("BradleyTerryLoss")


def test_margin_column_reaches_the_loss(tmp_path, tokenizer):
    from lightning_pref.data import PreferenceDataModule

    records = [{"prompt": "p", "chosen": "good", "rejected": "bad", "margin": 2.0},
               {"prompt": "q", "chosen": "fine", "rejected": "worse", "margin": None}]
    dm = PreferenceDataModule(train=str(write_jsonl(tmp_path / "m.jsonl", records)), tokenizer=tokenizer, batch_size=2)
    dm.setup("fit")
    batch = PreferenceCollator(tokenizer.pad_token_id)([dm.datasets["train"][i] for i in range(2)])
    assert batch.margins.tolist() == [2.0, 0.0]
    module = RewardModule(backbone=TINY, tokenizer="byte")
    module.configure_model()
    with torch.no_grad():
        chosen, rejected = module(batch)
    expected = -torch.nn.functional.logsigmoid(chosen - rejected - torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(module.loss(chosen, rejected, batch.margins), expected)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{**records[0], "margin": "high"}])
    from lightning_pref.errors import UserInputError

    with pytest.raises(UserInputError, match=r"bad\.jsonl:1: field 'margin' must be a number"):
        PreferenceDataModule(train=str(bad), tokenizer=tokenizer).setup("fit")


def test_reward_model_judges_with_its_own_tokenizer(reward_run, tmp_path):
    from lightning_pref.judges import RewardModelJudge

    out = tmp_path / "rm"
    main(["export", "--ckpt_path", str(reward_run["ckpt"]), "--output_dir", str(out)])
    judge = RewardModelJudge(str(out))
    prompt = "User: Why do people like figo?\nAssistant:"
    quiet, loud = judge.score([prompt, prompt], [" Because it is nice.", " BECAUSE IT IS NICE."])
    assert quiet > loud  # the demo's rule, learnt
    assert judge.prefer([prompt], [" kind words"], [" KIND WORDS"]) == [1]
    normalized = RewardModelJudge(str(out), normalize=True).score([prompt], [" Because it is nice."])[0]
    mean, std = judge.stats
    assert normalized == pytest.approx((quiet - mean) / std, rel=1e-5)


def test_evaluate_with_a_reward_model_judge(reward_run, tmp_path):
    """A DPO policy judged by an exported reward model: the judge plugs into evaluate by name."""
    out = tmp_path / "rm"
    main(["export", "--ckpt_path", str(reward_run["ckpt"]), "--output_dir", str(out)])
    main(["evaluate", "--config", str(REPO / "configs/dpo.yaml"), "--trainer.default_root_dir", str(tmp_path),
          "--model.generation.max_new_tokens", "6", "--judge", "reward_model", f"--judge.path={out}"])
    report = json.loads((tmp_path / "lightning_logs/version_0/evaluation.json").read_text())
    assert report["judge"] == "RewardModelJudge" and report["comparisons"] == 256
    assert math.isfinite(report["policy"]["score"]["mean"])


def test_online_dpo_labels_pairs_with_a_reward_model_judge(reward_run, tmp_path):
    """On-policy pairs labelled by an exported reward model (its own tokenizer, pad = EOS): the judge is chosen
    by name from YAML/command line, and the logged chosen score is above the rejected one at every step."""
    out = tmp_path / "rm"
    main(["export", "--ckpt_path", str(reward_run["ckpt"]), "--output_dir", str(out)])
    main(["fit", "--config", str(REPO / "configs/online_dpo.yaml"), "--model.init_args.judge", "reward_model",
          f"--model.init_args.judge.path={out}", "--trainer.max_steps", "2", "--trainer.log_every_n_steps", "1",
          "--data.batch_size", "4", "--trainer.default_root_dir", str(tmp_path / "online"),
          "--progress_bar.refresh_rate", "0"])
    rows = [r for r in csv.DictReader(open(tmp_path / "online/lightning_logs/version_0/metrics.csv"))
            if r["train/judge/score"]]
    assert len(rows) == 2
    assert all(float(r["train/judge/chosen"]) > float(r["train/judge/rejected"]) for r in rows)


def test_center_on_subtracts_the_mean_score_of_a_files_responses(reward_run, tmp_path):
    """InstructGPT's bias computed at start from the data's responses: those responses then score 0 on average."""
    from lightning_pref.data.sources import bundled
    from lightning_pref.errors import UserInputError
    from lightning_pref.judges import RewardModelJudge

    out = tmp_path / "rm"
    main(["export", "--ckpt_path", str(reward_run["ckpt"]), "--output_dir", str(out)])
    rows = [json.loads(line) for line in open(bundled("train"), encoding="utf-8").read().splitlines()[:6]]
    data = write_jsonl(tmp_path / "responses.jsonl", rows)
    raw = RewardModelJudge(str(out))
    centered = RewardModelJudge(str(out), center=True, center_on=str(data))
    prompts = [r["prompt"] for r in rows for _ in range(2)]
    responses = [r[key] for r in rows for key in ("chosen", "rejected")]
    expected_bias = sum(raw.score(prompts, responses)) / len(responses)
    assert centered.bias == pytest.approx(expected_bias, rel=1e-5)
    assert sum(centered.score(prompts, responses)) / len(responses) == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(UserInputError, match=r"judge\.center_on: .*set judge\.center: true"):
        RewardModelJudge(str(out), center_on=str(data))
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "chosen": 3, "rejected": "y"}])
    with pytest.raises(UserInputError, match=r"judge\.center_on: .*bad\.jsonl:1"):
        RewardModelJudge(str(out), center=True, center_on=str(bad))
