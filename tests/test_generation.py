"""What the policy writes: predict's JSONL, sampled completions while training, judges, and evaluate."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lightning_pref.cli import main
from lightning_pref.generation import GenerationOptions, generate, left_pad, stop_token_ids
from lightning_pref.judges import FunctionJudge, Judge, NoShoutingJudge
from lightning_pref.models import load_causal_lm
from lightning_pref.registry import JUDGES
from tests.support import REPO, TINY, write_jsonl

FIT = ["--trainer.max_steps", "4", "--trainer.val_check_interval", "4", "--data.batch_size", "4"]


@pytest.fixture(autouse=True)
def _argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["lightning-pref"])


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 4-step DPO run of configs/dpo.yaml on 24 synthetic pairs, with SampleCompletions."""
    from lightning_pref.data.synthetic import generate as synthetic

    tmp = tmp_path_factory.mktemp("gen")
    data = write_jsonl(tmp / "pairs.jsonl", synthetic(24, seed=8)[0])
    import sys

    argv, sys.argv = sys.argv, ["lightning-pref"]
    try:
        main(["fit", "--config", str(REPO / "configs/dpo.yaml"), "--data.train", str(data), "--data.val", str(data),
              "--trainer.default_root_dir", str(tmp), "--trainer.callbacks.num_prompts=3",  # the config's callback
              "--model.generation.max_new_tokens", "8", *FIT])
    finally:
        sys.argv = argv
    return {"root": tmp, "data": data, "ckpt": tmp / "lightning_logs/version_0/checkpoints/last.ckpt"}


# ------------------------------------------------------------------------------------------------ generation
def test_left_padded_batch_generates_what_each_prompt_does_alone(tokenizer):
    model = load_causal_lm(TINY, field="test", seed=3, vocab_size=len(tokenizer)).eval()
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("hi", "a longer prompt", "mid one")]
    options = GenerationOptions(max_new_tokens=6)
    stops = stop_token_ids(model, tokenizer)
    batched = generate(model, *left_pad(prompts, tokenizer.pad_token_id), options, tokenizer, 0, stops)
    for i, prompt in enumerate(prompts):
        alone = generate(model, *left_pad([prompt], tokenizer.pad_token_id), options, tokenizer, 0, stops)
        assert alone.texts[0] == batched.texts[i]
        assert torch.equal(alone.ids[0, : alone.lengths[0]], batched.ids[i, : batched.lengths[i]])


def test_sampling_is_deterministic_given_the_seed_and_leaves_the_global_rng(tokenizer):
    model = load_causal_lm(TINY, field="test", seed=3, vocab_size=len(tokenizer))
    ids, mask = left_pad([[5, 6, 7], [8, 9]], tokenizer.pad_token_id)
    options = GenerationOptions(max_new_tokens=10, do_sample=True, num_return_sequences=2)
    stops = stop_token_ids(model, tokenizer)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = generate(model, ids, mask, options, tokenizer, seed=7, stop_ids=stops)
    assert torch.equal(torch.rand(1), before)  # the training RNG stream is untouched
    b = generate(model, ids, mask, options, tokenizer, seed=7, stop_ids=stops)
    c = generate(model, ids, mask, options, tokenizer, seed=8, stop_ids=stops)
    assert a.texts == b.texts and a.texts != c.texts
    assert len(a.texts) == 2 and all(len(t) == 2 for t in a.texts) and model.training  # mode restored


def test_sampling_keeps_every_token_unless_top_k_is_set(tokenizer):
    """transformers truncates sampling to the top 50 tokens when nothing says otherwise; ``top_k: 0`` (the
    default) samples from the whole distribution, as the documented temperature/top_p sampling promises."""
    model = load_causal_lm(TINY, field="test", seed=3, vocab_size=len(tokenizer))
    ids, mask = left_pad([[5, 6, 7]] * 500, tokenizer.pad_token_id)
    stops = stop_token_ids(model, tokenizer)
    first = {}
    for top_k in (0, 10):
        options = GenerationOptions(max_new_tokens=1, do_sample=True, top_k=top_k)
        first[top_k] = set(generate(model, ids, mask, options, tokenizer, seed=1, stop_ids=stops).ids[:, 0].tolist())
    assert len(first[0]) > 50 and len(first[10]) <= 10


def test_shared_prefill_samples_what_separate_prefills_do(tokenizer, monkeypatch):
    """k samples of a prompt continue one prefill of it (run once, its K/V repeated k times): the same samples and
    the same sampled-token log-probs as transformers expanding the prompts k times."""
    import lightning_pref.generation as generation

    model = load_causal_lm(TINY, field="test", seed=3, vocab_size=len(tokenizer))
    ids, mask = left_pad([[5, 6, 7, 9, 11], [8, 9], [40, 41, 42]], tokenizer.pad_token_id)
    options = GenerationOptions(max_new_tokens=8, do_sample=True, num_return_sequences=3, temperature=0.8)
    stops = stop_token_ids(model, tokenizer)
    calls = []
    original = generation._shared_prefill
    monkeypatch.setattr(generation, "_shared_prefill", lambda *a: calls.append(1) or original(*a))
    shared = generate(model, ids, mask, options, tokenizer, seed=4, stop_ids=stops, logps=True)
    assert calls == [1]
    monkeypatch.setattr(generation, "_shared_prefill", lambda *a: None)  # transformers' own expansion
    separate = generate(model, ids, mask, options, tokenizer, seed=4, stop_ids=stops, logps=True)
    assert torch.equal(shared.ids, separate.ids) and shared.texts == separate.texts
    torch.testing.assert_close(shared.logps, separate.logps, rtol=1e-5, atol=1e-5)


def test_generation_options_refuse_what_cannot_work():
    from lightning_pref.errors import UserInputError

    with pytest.raises(UserInputError, match="num_return_sequences.*do_sample"):
        GenerationOptions(num_return_sequences=3)
    with pytest.raises(UserInputError, match="max_new_tokens"):
        GenerationOptions(max_new_tokens=0)


# ------------------------------------------------------------------------------------------------------ predict
def _written(capsys, checkpoint: Path) -> Path:
    """The file ``predict`` says it wrote: in a new directory of the checkpoint's run, never over an earlier one."""
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("predict: wrote")]
    path = Path(line.split(" to ", 1)[1])
    run = checkpoint.parent.parent
    assert path.name == "predictions.jsonl" and path.parent.parent == run and path.parent.name.startswith("predict")
    return path


def test_predict_writes_one_record_per_prompt_in_input_order(run, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"User: tell me about topic {i}\nAssistant:"}
                                                       for i in range(7)])
    main(["predict", "--config", str(REPO / "configs/dpo.yaml"), "--ckpt_path", str(run["ckpt"]),
          "--data.predict", str(prompts), "--data.batch_size", "3", "--trainer.default_root_dir", str(tmp_path),
          "--model.generation.max_new_tokens", "5"])
    assert not (tmp_path / "lightning_logs").exists()  # nothing that passes for a new run
    records = _records(_written(capsys, run["ckpt"]))
    assert [r["prompt"] for r in records] == [f"User: tell me about topic {i}\nAssistant:" for i in range(7)]
    for r in records:
        assert isinstance(r["policy"], str) and isinstance(r["reference"], str)
        assert 1 <= r["policy_tokens"] <= 5 and isinstance(r["policy_eos"], bool)
    # several samples per prompt: lists; the prompts of a preference file work as well
    main(["predict", "--config", str(REPO / "configs/dpo.yaml"), "--ckpt_path", str(run["ckpt"]),
          "--data.predict", str(run["data"]), "--trainer.default_root_dir", str(tmp_path),
          "--model.generation.max_new_tokens", "4", "--model.generation.do_sample", "true",
          "--model.generation.num_return_sequences", "2"])
    records = _records(_written(capsys, run["ckpt"]))
    pairs = _records(run["data"])
    assert [r["prompt"] for r in records] == [p["prompt"] for p in pairs]
    assert all(len(r["policy"]) == 2 and len(r["reference"]) == 2 for r in records)


def test_predict_refuses_to_overwrite_a_file(run, tmp_path, capsys):
    taken = tmp_path / "mine.jsonl"
    taken.write_text("keep\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--config", str(REPO / "configs/dpo.yaml"), "--ckpt_path", str(run["ckpt"]),
              "--predictions.path", str(taken), "--trainer.default_root_dir", str(tmp_path)])
    assert exit_info.value.code == 2 and "--predictions.overwrite" in capsys.readouterr().err
    assert taken.read_text() == "keep\n"


def test_sample_completions_recorded_at_each_validation(run):
    records = _records(run["root"] / "lightning_logs/version_0/completions.jsonl")
    pairs = _records(run["data"])
    assert [r["step"] for r in records] == [3, 3, 3]  # after 4 steps: the step metrics.csv's validation row has
    assert [r["prompt"] for r in records] == [p["prompt"] for p in pairs[:3]]
    assert all(isinstance(r["policy"], str) and isinstance(r["reference"], str) for r in records)


def test_report_shows_the_sampled_completions(run, tmp_path):
    pytest.importorskip("matplotlib")
    import html

    main(["report", str(run["root"]), "--output_dir", str(tmp_path)])
    page = (tmp_path / "report.html").read_text()
    for record in _records(run["root"] / "lightning_logs/version_0/completions.jsonl"):
        assert html.escape(record["policy"]) in page


def test_fit_prints_the_summary(tmp_path, capsys):
    main(["fit", "--config", str(REPO / "configs/dpo.yaml"), "--trainer.default_root_dir", str(tmp_path), *FIT])
    out = capsys.readouterr().out
    last = tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt"
    assert "final validation (step 3, after 4 optimizer steps)" in out and "val/rewards/accuracies" in out
    assert f"lightning-pref export --ckpt_path {last}" in out.replace("\n", "")


@pytest.mark.parametrize("flag", ["--trainer.enable_progress_bar", "--trainer.enable_checkpointing"])
def test_lightning_flags_turn_the_always_on_callbacks_off(tmp_path, flag):
    main(["fit", "--config", str(REPO / "configs/dpo.yaml"), "--trainer.default_root_dir", str(tmp_path), flag,
          "false", *FIT])
    checkpoints = list(tmp_path.glob("lightning_logs/version_0/checkpoints/*.ckpt"))
    assert bool(checkpoints) is (flag != "--trainer.enable_checkpointing")


def test_tensorboard_logger_from_config(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    main(["fit", "--config", str(REPO / "configs/dpo.yaml"), "--trainer.default_root_dir", str(tmp_path),
          "--trainer.logger", "TensorBoardLogger", f"--trainer.logger.save_dir={tmp_path}", "--trainer.log_every_n_steps=1",
          "--trainer.callbacks+=lightning_pref.predict.SampleCompletions", "--model.generation.max_new_tokens", "4",
          *FIT])
    (events,) = tmp_path.glob("lightning_logs/version_0/events.out.tfevents.*")
    accumulator = EventAccumulator(str(events.parent), size_guidance={"tensors": 0})
    accumulator.Reload()
    assert "train/loss" in accumulator.Tags()["scalars"] and "val/rewards/accuracies" in accumulator.Tags()["scalars"]
    assert any("completions" in tag for tag in accumulator.Tags()["tensors"])  # the text table


# ------------------------------------------------------------------------------------------------------- judges
def score_length(prompt, completion) -> float:
    return len(completion)


def longer(prompt, a, b) -> int:
    return (len(a) > len(b)) - (len(a) < len(b))


def test_judges_score_and_prefer():
    prompts = ["p", "q", "r"]
    judge = FunctionJudge("tests.test_generation:score_length")
    assert judge.score(prompts, ["a", "abc", ""]) == [1.0, 3.0, 0.0]
    assert judge.prefer(prompts, ["ab", "a", "x"], ["a", "ab", "y"]) == [1, -1, 0]  # from the scores
    pairwise = FunctionJudge("tests.test_generation.longer", pairwise=True)
    assert pairwise.prefer(prompts, ["ab", "a", "x"], ["a", "ab", "y"]) == [1, -1, 0] and not pairwise.scores
    assert NoShoutingJudge().score(prompts, ["quiet please", "LOUD", "123"]) == [1.0, -1.0, 0.0]
    assert JUDGES.get("no_shouting") is NoShoutingJudge and JUDGES.get("function") is FunctionJudge
    with pytest.raises(NotImplementedError):
        Judge().score(prompts, ["a", "b", "c"])


def test_unknown_judge_and_bad_function_are_one_line(run, tmp_path, capsys):
    base = ["evaluate", "--config", str(REPO / "configs/dpo.yaml"), "--trainer.default_root_dir", str(tmp_path)]
    for extra, expected in ((["--judge", "no_shoutin"], "Did you mean 'no_shouting'"),
                            (["--judge", "function", "--judge.fn", "tests.nowhere:f"], "cannot import")):
        with pytest.raises(SystemExit) as exit_info:
            main([*base, *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and expected in err[-1] and err[-1].startswith("error:")


# ----------------------------------------------------------------------------------------------------- evaluate
def _suppressing(tmp_path: Path, tokenizer, name: str, upper: bool) -> str:
    """The same tiny model, able to write only lowercase (``upper=False``) or only uppercase letters: a
    known-good and a known-bad policy for the no-shouting rule, through nothing but its generation config."""
    out = tmp_path / name
    model = load_causal_lm(TINY, field="test", seed=4, vocab_size=len(tokenizer))
    letters = "abcdefghijklmnopqrstuvwxyz"
    allowed = {tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in (letters.upper() if upper else letters)}
    model.generation_config.suppress_tokens = [i for i in range(len(tokenizer)) if i not in allowed]
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.mark.parametrize("good_is_policy", [True, False])
def test_evaluate_measures_a_known_good_policy_against_a_known_bad_one(tmp_path, tokenizer, good_is_policy):
    good, bad = _suppressing(tmp_path, tokenizer, "good", upper=False), _suppressing(tmp_path, tokenizer, "bad", upper=True)
    policy, reference = (good, bad) if good_is_policy else (bad, good)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"say something {i}:"} for i in range(24)])
    main(["evaluate", "--config", str(REPO / "configs/dpo.yaml"), "--model.policy", policy, "--model.tokenizer", "null",
          "--model.reference", reference, "--data.predict", str(prompts), "--trainer.default_root_dir", str(tmp_path),
          "--model.generation.max_new_tokens", "16", "--judge", "no_shouting"])
    report = json.loads((tmp_path / "lightning_logs/version_0/evaluation.json").read_text())
    records = _records(tmp_path / "lightning_logs/version_0/predictions.jsonl")
    # the win rate, computed here from the written completions with the rule itself
    judge = NoShoutingJudge()
    verdicts = judge.prefer([r["prompt"] for r in records], [r["policy"] for r in records],
                            [r["reference"] for r in records])
    assert report["comparisons"] == len(records) == 24
    assert report["win_rate"]["count"] == verdicts.count(1) and report["tie_rate"]["count"] == verdicts.count(0)
    assert report["win_rate"]["low"] <= report["win_rate"]["value"] <= report["win_rate"]["high"]
    winner = "win_rate" if good_is_policy else "loss_rate"
    assert report[winner]["value"] == 1.0 and report[winner]["low"] > 0.85  # every comparison, CI from 24
    assert report["policy"]["score"]["mean"] == pytest.approx(
        sum(judge.score([r["prompt"] for r in records], [r["policy"] for r in records])) / 24)
    assert 0 <= report["policy"]["eos_rate"]["value"] <= 1 and math.isfinite(report["policy"]["tokens"]["mean"])


def test_evaluate_writes_next_to_the_checkpoint_never_over_an_earlier_report(run, tmp_path):
    args = ["evaluate", "--config", str(REPO / "configs/dpo.yaml"), "--ckpt_path", str(run["ckpt"]),
            "--trainer.default_root_dir", str(tmp_path), "--model.generation.max_new_tokens", "4",
            "--judge", "no_shouting"]
    main(args)
    main(args)
    written = sorted(p.name for p in run["ckpt"].parent.glob("*.evaluation.json"))
    assert written == ["last-1.evaluation.json", "last.evaluation.json"]


def test_prompts_of_any_file_whatever_its_responses(tmp_path, tokenizer):
    """predict needs only prompts: rows whose responses would fail training checks still give their prompt, a
    conversation's final assistant turn is the one to generate, and HH transcripts give their shared prefix."""
    from lightning_pref.data import PreferenceDataModule

    cases = {
        "standard": ([{"prompt": "p one", "chosen": "", "rejected": "r"}, {"prompt": "p two", "chosen": 3,
                                                                        "rejected": "x"}], ["p one", "p two"]),
        "prompts": ([{"prompt": "only a prompt"}], ["only a prompt"]),
        "hh": ([{"chosen": "\n\nHuman: hi\n\nAssistant: ", "rejected": "\n\nHuman: hi\n\nAssistant: go"}],
               ["\n\nHuman: hi\n\nAssistant: "]),  # no chat template: text, cut where they part
    }
    for name, (records, expected) in cases.items():
        path = write_jsonl(tmp_path / f"{name}.jsonl", records)
        dm = PreferenceDataModule(predict=str(path), tokenizer=tokenizer, batch_size=2)
        dm.setup("predict")
        assert [e.prompt for e in dm.prompts] == expected, name
        assert [tokenizer.decode(e.ids) for e in dm.prompts] == expected, name
