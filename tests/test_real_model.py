"""The real path: SmolLM2-135M-Instruct as a hub checkpoint is (bf16 on disk, tied embeddings, pad = EOS, a ChatML
template) trained with the shipped recipes on real human preference text (Anthropic HH-RLHF), then exported,
reloaded and asked to generate. Skips when the model package or the data file is absent (see ``tests/real.py``)."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from lightning.pytorch import Trainer

from lightning_pref import PreferenceModule
from lightning_pref.cli import main
from lightning_pref.logps import SequenceScorer
from tests.real import hh_records
from tests.support import REPO, write_jsonl

pytestmark = pytest.mark.slow

# Short HH pairs keep a CPU step of a 135M model around a second.
RUN = [
    "--trainer.precision", "32-true", "--trainer.accumulate_grad_batches", "1", "--trainer.log_every_n_steps", "1",
    "--trainer.max_steps", "3", "--trainer.val_check_interval", "3", "--data.batch_size", "2",
    "--data.max_length", "192", "--data.max_prompt_length", "128", "--model.optimizer.init_args.lr", "1e-5",
    "--progress_bar.refresh_rate", "0",
    # one weights-only checkpoint (a 135M fp32 policy with AdamW state is 1.6 GB per file) and no sanity pass
    "--checkpoint.save_top_k", "0", "--checkpoint.save_weights_only", "true", "--trainer.num_sanity_val_steps", "0",
]


@pytest.fixture(scope="module")
def hh(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hh")
    records = hh_records(12, max_chars=500)
    return {"train": write_jsonl(tmp / "train.jsonl", records[:8]), "val": write_jsonl(tmp / "val.jsonl", records[8:])}


def _metrics(root) -> list[dict]:
    (path,) = list(root.glob("lightning_logs/version_0/metrics.csv"))
    return list(csv.DictReader(open(path)))


@pytest.fixture(scope="module")
def dpo_run(smollm2, hh, tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    main(["fit", "--config", str(REPO / "configs/recipes/dpo.yaml"), "--model.policy", str(smollm2),
          "--data.train", str(hh["train"]), "--data.val", str(hh["val"]), "--trainer.default_root_dir", str(root),
          *RUN])
    return root


@pytest.mark.parametrize(("precision", "expected"), [("32-true", torch.float32), ("bf16-true", torch.bfloat16)])
def test_real_bf16_checkpoint_parameter_dtype(smollm2, precision, expected):
    model = PreferenceModule(policy=str(smollm2))
    model.trainer = Trainer(precision=precision, logger=False)
    model.configure_model()
    assert {p.dtype for p in model.policy.parameters()} == {expected}
    assert model.tokenizer.pad_token_id == model.tokenizer.eos_token_id  # pad = EOS, as SmolLM2 ships


def test_dpo_recipe_on_real_model_and_text(dpo_run):
    rows = _metrics(dpo_run)
    losses = [float(r["train/loss"]) for r in rows if r["train/loss"]]
    assert len(losses) == 3
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)  # dropout off, policy == reference at step 0
    assert abs(losses[-1] - losses[0]) > 1e-4  # and it moves (fp32 rounding is ~1e-7)
    (val,) = [r for r in rows if r["val/loss"]]
    assert all(math.isfinite(float(val[k])) for k in val if k.startswith("val/"))


def test_kto_recipe_on_real_model_and_text(smollm2, hh, tmp_path):
    main(["fit", "--config", str(REPO / "configs/recipes/kto.yaml"), "--model.policy", str(smollm2),
          "--data.train", str(hh["train"]), "--data.val", str(hh["val"]), "--data.unpair", "true",
          "--trainer.default_root_dir", str(tmp_path), *RUN, "--data.batch_size", "4"])
    rows = _metrics(tmp_path)
    losses = [float(r["train/loss"]) for r in rows if r["train/loss"]]
    kl = [float(r["train/kl"]) for r in rows if r.get("train/kl")]
    assert losses[0] == pytest.approx(0.5, abs=1e-4) and abs(losses[-1] - 0.5) > 1e-4
    assert kl and all(v >= 0 and math.isfinite(v) for v in kl)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_response_only_head_equals_full_logits_on_real_model(smollm2, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_pref.layout import pad

    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    texts = [("\n\nHuman: What is a prime number?\n\nAssistant:", " A number with exactly two divisors."),
             ("\n\nHuman: hi", "\n\nAssistant: Hello! How can I help?")]
    ids, attention, response = pad(
        [(tokenizer(p)["input_ids"], tokenizer(r)["input_ids"]) for p, r in texts], tokenizer.pad_token_id
    )
    with torch.no_grad():
        split = SequenceScorer(model)(ids, attention, response)[0]
        full = SequenceScorer(model, response_only_head=False)(ids, attention, response)[0]
    torch.testing.assert_close(split, full, rtol=1e-4 if dtype == torch.float32 else 2e-2, atol=1e-3)


def test_export_reloads_and_generates_with_the_chat_template(dpo_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    (last,) = list(dpo_run.glob("lightning_logs/version_0/checkpoints/last.ckpt"))
    out = tmp_path / "aligned"
    main(["export", "--ckpt_path", str(last), "--output_dir", str(out)])
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    state = torch.load(last, weights_only=False)["state_dict"]
    torch.testing.assert_close(model.model.embed_tokens.weight, state["policy.model.model.embed_tokens.weight"])
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # still tied
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:]
    text = tokenizer.decode(generated, skip_special_tokens=True)
    assert "Paris" in text


def test_predict_chat_prompts_on_the_real_model(smollm2, dpo_run, tmp_path):
    """Chat messages rendered with the model's template and its generation prompt; a completion stops at the
    template's end-of-turn (<|im_end|>) and is written without it."""
    (last,) = list(dpo_run.glob("lightning_logs/version_0/checkpoints/last.ckpt"))
    messages = [[{"role": "user", "content": "What is the capital of France?"}],
                [{"role": "user", "content": "Say hello."}]]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": m} for m in messages])
    main(["predict", "--config", str(REPO / "configs/recipes/dpo.yaml"), "--model.policy", str(smollm2),
          "--ckpt_path", str(last),
          "--data.predict", str(prompts), "--trainer.default_root_dir", str(tmp_path),
          "--trainer.precision", "32-true", "--model.generation.max_new_tokens", "24", "--progress_bar.refresh_rate", "0"])
    import json

    # predict writes beside the checkpoint's run (the first predict of that run)
    records = [json.loads(x) for x in (last.parent.parent / "predict/predictions.jsonl").open()]
    assert [r["prompt"] for r in records] == messages
    assert "Paris" in records[0]["policy"] and "Paris" in records[0]["reference"]
    assert records[0]["policy_eos"] and "<|im_end|>" not in records[0]["policy"]


def test_reward_model_on_the_real_model(smollm2, hh, tmp_path):
    """SmolLM2 as a reward model's body (pad = EOS): a new scalar head, trained a few steps on HH pairs; the
    export's plain forward scores what training scored."""
    main(["fit", "--config", str(REPO / "configs/reward.yaml"), "--model.backbone", str(smollm2),
          "--model.tokenizer", "null", "--model.optimizer.init_args.lr", "1e-5", "--data.train", str(hh["train"]),
          "--data.val", str(hh["val"]), "--data.batch_size", "2", "--data.max_length", "192",
          "--trainer.max_steps", "3", "--trainer.val_check_interval", "3", "--trainer.log_every_n_steps", "1",
          "--trainer.default_root_dir", str(tmp_path), "--progress_bar.refresh_rate", "0",
          "--checkpoint.save_top_k", "0", "--checkpoint.save_weights_only", "true",
          "--trainer.num_sanity_val_steps", "0"])
    rows = _metrics(tmp_path)
    losses = [float(r["train/loss"]) for r in rows if r["train/loss"]]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    (val,) = [r for r in rows if r["val/loss"]]
    assert 0 <= float(val["val/rewards/accuracies"]) <= 1
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lightning_pref import RewardModule
    from lightning_pref.layout import pad

    (last,) = list(tmp_path.glob("lightning_logs/version_0/checkpoints/last.ckpt"))
    out = tmp_path / "rm"
    main(["export", "--ckpt_path", str(last), "--output_dir", str(out)])
    module = RewardModule.load_from_checkpoint(last).eval()
    assert module.tokenizer.pad_token_id == module.tokenizer.eos_token_id
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id == module.tokenizer.eos_token_id
    t = module.tokenizer
    ids, mask, _ = pad([(t("Q: hi")["input_ids"], t(" Hello there!")["input_ids"] + [t.eos_token_id]),
                        (t("Q: why")["input_ids"], t(" No.")["input_ids"] + [t.eos_token_id])], t.pad_token_id)
    with torch.no_grad():
        ours = module.scorer(ids, mask)
        consumer = ids.masked_fill(mask == 0, tokenizer.pad_token_id)  # padded with the export's own pad
        theirs = model(input_ids=consumer, attention_mask=mask).logits[:, 0]
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


def test_packed_and_shared_prompt_logps_equal_padded_on_real_model_and_text(smollm2, hh):
    """SmolLM2 (Llama body, tied head, pad = EOS) on HH conversations rendered with its chat template: packed rows
    and shared prompts give the padded batch's per-sequence log-probs."""
    from transformers import AutoModelForCausalLM

    from lightning_pref import PreferenceDataModule
    from lightning_pref.data.collate import PreferenceCollator

    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    from lightning_pref.models import load_tokenizer

    dm = PreferenceDataModule(train=str(hh["train"]), val=None, tokenizer=load_tokenizer(str(smollm2)), max_length=192,
                              cache=False)
    dm.setup("fit")
    examples = [dm.datasets["train"][i] for i in range(4)]
    scorer = SequenceScorer(model)
    logps, tokens = {}, {}
    with torch.no_grad():
        for packing in (False, True, "shared"):
            batch = PreferenceCollator(dm.tokenizer.pad_token_id, packing=packing)(examples)
            logps[packing] = scorer(batch.input_ids, batch.attention_mask, batch.response_mask, packed=batch.packed)[0]
            tokens[packing] = batch.real_tokens
    assert tokens[True] == tokens[False] == tokens["shared"] + sum(len(e.prompt) for e in examples)  # prompts once
    for packing in (True, "shared"):
        torch.testing.assert_close(logps[packing], logps[False], rtol=1e-5, atol=1e-4)


def test_ppo_recipe_on_real_model_with_a_reward_model_judge_and_critic(smollm2, hh, tmp_path):
    """A few PPO steps of configs/recipes/ppo.yaml on SmolLM2 (pad = EOS, ChatML) and HH prompts, against a reward
    model exported from SmolLM2 (its critic starts from it): every logged metric finite, the KL moves off 0."""
    from lightning_pref.reward import RewardModule
    from lightning_pref.reward.export import save_reward_model

    reward = RewardModule(str(smollm2))
    reward.configure_model()
    torch.manual_seed(0)
    torch.nn.init.normal_(reward.scorer.head.weight, std=0.02)  # an untrained but non-zero head
    reward.reward_stats = {"mean": 0.1, "std": 1.0, "step": 0}  # what a validation would have stored
    save_reward_model(reward, tmp_path / "rm")
    main(["fit", "--config", str(REPO / "configs/recipes/ppo.yaml"), "--model.init_args.policy", str(smollm2),
          "--model.init_args.judge.init_args.path", str(tmp_path / "rm"),
          "--model.init_args.critic.model", str(tmp_path / "rm"), "--data.train", str(hh["train"]),
          "--data.batch_size", "2", "--model.init_args.generation.max_new_tokens", "6",
          "--model.init_args.ppo_epochs", "1", "--model.init_args.optimizer.init_args.lr", "1e-5",
          "--trainer.precision", "32-true", "--trainer.max_steps", "2", "--trainer.default_root_dir", str(tmp_path),
          "--progress_bar.refresh_rate", "0", "--checkpoint.save_top_k", "0", "--checkpoint.save_weights_only", "true"])
    rows = [r for r in _metrics(tmp_path) if r.get("train/judge/score")]
    assert len(rows) == 2  # 2 rollouts x 1 update
    for row in rows:
        assert all(math.isfinite(float(v)) for k, v in row.items() if v and k.startswith("train/")), row
    assert float(rows[-1]["train/objective/kl_k1"]) != 0.0
