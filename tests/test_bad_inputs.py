"""Bad input to the newer half (judges, on-policy and RL training, ``evaluate``, reward models, ``report``,
precision, packing fallbacks), tried as a new user would: each gets one line naming the file, row, field or option
and the fix (exit 2 from the CLI), or works correctly. Every test here failed on the code before its fix.

What was tried, and what happens now (input -> outcome):

Judges (``evaluate``, on-policy pairs, RL rollouts: checked where their output enters, ``judges/base.py``)
    score returns NaN, inf, None, a string, a list, a 1-element tensor -> ``judge function(fn='...'): score
        returned nan for completion 0; a judge's score must be one finite number ...`` (was: ties in evaluate and
        the default ``prefer``; a crash inside ``statistics``; ``float()`` turned "0.5" into a number)
    pairwise ``prefer`` returns 2, "1", None -> ``judge ...: prefer returned 2 for comparison 0; it must return 1,
        -1 or 0`` (was: counted as neither win, loss nor tie)
    a judge that raises -> ``judge ...: score raised RuntimeError: ... (at file:line in fn); fix the judge``
        (was: a traceback through the training loop or evaluate)
    a judge returning one score too few -> ``judge ...: score returned 3 values for 4 completions``
    every comparison a tie (nothing decided) -> ``win_rate_without_ties.value`` is null; the report is strict JSON
        (was: ``NaN`` in the file, which is not JSON)
    ``evaluate --confidence nan`` -> ``--confidence: must be in (0, 1)`` (already)
    interrupted ``evaluate`` -> during generation Lightning stops (exit 1) before any file; the report is written
        under a temporary name and moved, so no half-written JSON is left
Options (``lightning_pref/checks.py``, checked when a module, data module or plugin is built)
    ``model.min_gap`` -1 or NaN, ``model.eos_penalty`` NaN or -1 (on-policy and RL), ``model.ref_sync_alpha`` 1.5,
        0 or NaN, ``model.chunk_size`` 0 (was: silently the default), ``model.mode`` offline, ``model.round_prompts``
        0, ``model.reference_mode`` adapters, ``model.on_nonfinite`` skipp (was: acted as skip), ``model.dtype``
        fp16, ``model.kl.coef`` NaN, ``model.critic.vf_coef`` NaN, a loss's ``beta`` NaN (``beta <= 0`` is false
        for NaN), ``data.batch_size`` 0 and ``data.num_workers`` -1 (were: tracebacks), ``data.max_prompt_length``
        above ``data.max_length``, ``data.on_identical`` drop (was: identical pairs kept), ``data.val_fraction``
        1.0 or NaN, ``model.generation.temperature`` NaN or inf, ``judge.batch_size`` 0 -> one line each
    options that would be ignored -> refused, naming why: ``model.lora`` without ``reference_mode: adapter`` (was:
        full fine-tuning), ``ref_sync_alpha`` without ``ref_sync_steps``, ``reference_cache_dir`` outside precomputed
        mode, ``model.reference``/``reference_dtype`` with reference modes none or adapter or a reference-free loss,
        ``round_prompts`` in online mode, ``generation.num_return_sequences`` when training on-policy or RL (the
        rollouts take ``samples_per_prompt``), ``temperature``/``top_p``/``top_k`` with greedy decoding,
        ``data.cache_dir`` with ``data.cache: false``, ``data.group_by_length`` for prompt batches, ``judge.center``
        with ``judge.normalize``, ``export --adapter_only`` of a model without LoRA (was: the whole model written),
        ``model.model_kwargs.num_labels`` 2 for a reward model
A checkpoint or model of the wrong kind
    a reward-model checkpoint to ``predict`` or ``evaluate`` -> ``--ckpt_path: ... is a reward-model checkpoint
        (RewardModule): it scores texts and does not generate ...`` with the export + judge commands (was: a
        traceback, or usage text naming an option never given)
    a reward-model checkpoint with a policy config to ``fit``/``validate`` (and the reverse) -> one line naming both
        (was: the reward model resumed training under a DPO config, exit 0)
    ``predict --config configs/reward.yaml`` -> ``model: RewardModule does not generate text ...``
    a causal-LM directory (or a 2-label classifier, or one whose head was not saved) as ``judge reward_model`` or
        ``model.critic.model`` -> ``judge.path: ... is a LlamaForCausalLM model, not a reward model (its head would
        be new and random) ...`` (was: a random head, then a traceback)
    a checkpoint from an older version (``generation``, ``chunk_size``, ``compile``, RNG states missing) -> works
        (validate, resume, export): the defaults fill in
Data
    ``margin`` NaN, Infinity or -Infinity in JSONL, NaN in Parquet, 1e40 (beyond float32) -> ``pairs.jsonl:2:
        field 'margin' must be a finite number within float32's range (±3.4e+38), or null for none; got nan``
        (``data.on_invalid: drop`` counts them as "not finite"; was: NaN loss blamed on the learning rate)
    a prompts file with only system messages -> ``prompts.jsonl:1: the prompt has only system messages, no user
        turn to answer`` (was: generated from nothing)
    an empty rounds file (iterative mode) -> ``data.train: round_0.jsonl contains no records`` (already)
Precision and non-finite losses
    ``16-true`` with AdamW's default eps 1e-8 (0 in float16) -> ``model.optimizer: eps 1e-08 is 0 in float16 ...;
        set model.optimizer.init_args.eps to 1e-4 or more, or train with fp32 master weights`` (was: NaN at step 1
        blamed on the learning rate); with eps 1e-4 pure fp16 trains
    a NaN loss before any update -> the message says it is not the learning rate; with weights an earlier update
        made non-finite -> it says so
``report``
    a ``metrics.csv`` re-saved by a spreadsheet as UTF-16 (tab- or comma-separated), or UTF-8 with a BOM, steps as
        ``5.0`` -> the same report (was: ``UnicodeDecodeError``)
    a reward-model, on-policy or RL run (``model: {class_path, init_args}`` in config.yaml) -> the module, model and
        plugins in the summary (was: "No config.yaml in the run directory"); a reward run's scores are titled as
        such; a DDP run -> its report (``tests/test_distributed.py``)
Layout metrics
    ``train/padding_fraction`` of a model that cannot pack (policy or reward model) -> the padded layout that ran
        (a reward model logged the packed rows it never ran)
Found by a QA sweep of the RL stage, on-policy training, judges and the commands after training (this file's tail;
RL behaviour in ``tests/test_rl.py``, reports in ``tests/test_report.py``, data in ``tests/test_data_errors.py``)
    RL: ``trainer.max_steps`` between rollouts -> ``... not a whole number of training batches of 4 updates each
        (model.ppo_epochs 2 x model.minibatches 2); use 4 or 8`` (was: ran past it); more minibatches than a rollout
        has completions, the epoch's last batch included -> refused (was: silently fewer); a judge score beyond
        float32 or an int beyond any float -> one line (was: a NaN loss blamed on the data; OverflowError)
    a pairwise-only judge for on-policy or RL training -> ``model.judge: ... only compares two completions`` when
        built (was: "score raised NotImplementedError ... fix the judge" after the models were built)
    a logger ``version`` an earlier run used -> refused before Lightning deletes its metrics.csv (was: deleted, then
        a traceback); ``--ckpt_path`` a directory or ``best`` -> one line (was: tracebacks); ``validate``/``test``
        without held-out data, or with ``limit_val_batches: 0`` -> one line (was: exit 0, nothing measured);
        ``data.val`` with ``limit_val_batches: 0`` -> refused (was: ignored); resuming at ``max_steps`` -> one line
        (was: exit 0, nothing trained); a refused command takes back the log directory it had begun
    output paths through a file, or a directory for ``--predictions.path`` -> one line before any work (was:
        tracebacks after generating); a file that is no PyTorch archive as ``--ckpt_path`` -> no torch.save advice
    a two-label classifier as reward backbone, a model directory without tokenizer files, ``judge.device`` this
        machine lacks -> one line naming the option (were: tracebacks, a message cut off at "from one of:", torch's
        words); jsonargparse's errors (a mistyped class path, option name or Literal value) -> one line, the
        deepest error after its option (was: usage and a 25-125 line tree)
    prompts for on-policy/RL: dropped rows and prompts cut to ``max_length`` counted and printed, a summary row
        (were: silent); a first row of the wrong type -> named at its line (was: "conversational ... no chat
        template"); a CSV the reader refuses -> its own error with the line; empty or header-only -> "contains no
        records"; a JSONL with a BOM is read; UTF-16 or gzip without .gz -> named
    a margin beyond float32 -> refused at its row; an on-policy run in which no step kept a pair -> an error saying
        the policy is unchanged (was: exit 0)
Found by a QA sweep of own plugins, config files and a run's life (resume, export; resume and checkpoint
behaviour in ``tests/test_resume.py``, LoRA export in ``tests/test_reference_modes.py``)
    a loss, reward loss or advantage estimator that raises -> one line naming it and its line (was: tracebacks);
        per-sequence advantages ``(N,)``, a reward loss's ``(B, B)`` or mean -> refused (were: trained, exit 0);
        a loss's NaN rewards with finite losses, a vector metric, a metric named as the module's own -> refused
        (were: NaN metrics or a replaced ``train/rewards/accuracies``, exit 0; Lightning's words)
    a constructor's ``TypeError``/``KeyError`` (a weighted loss's ``term_args`` typo) -> names ``model.loss``
    a ``--config`` with a tab, a key twice, nothing, or a list -> ``--config: c.yaml:2:1: ...`` (was: "in
        "<unicode string>", line 2, column 1"); a missing interpolation key -> one line (was: a traceback)
    resuming under another module, or with a new lr, seed or LoRA alpha on the command line -> refused (were:
        exit 0, the checkpoint's values or a rescaled adapter); ``trainer.default_root_dir`` a file -> one line;
        an exported model directory as ``--ckpt_path`` -> "give --model.policy DIR"
Test hygiene
    the suite leaves the checkout as it found it (``tests/conftest.py`` compares ``git status`` before and after)
"""

from __future__ import annotations

import csv
import json
import math
import re
from functools import partial
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback, Trainer

from lightning_pref import OnPolicyModule, PreferenceDataModule, PreferenceModule, packing
from lightning_pref.cli import main
from lightning_pref.data.synthetic import generate as synthetic
from lightning_pref.errors import TrainingError, UserInputError
from lightning_pref.evaluate import evaluate_records
from lightning_pref.generation import GenerationOptions
from lightning_pref.judges import FunctionJudge, Judge, RewardModelJudge
from lightning_pref.judges.base import judge_preferences, judge_scores
from lightning_pref.losses import DPOLoss, SimPOLoss
from lightning_pref.models import load_causal_lm
from lightning_pref.reward import RewardModule
from lightning_pref.rl.module import PolicyGradientModule
from tests.support import REPO, TINY, NaNAtCall, tiny_fit, write_jsonl

THIS = "tests.test_bad_inputs"


@pytest.fixture(autouse=True)
def _argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["lightning-pref"])


def _one_line_exit_2(capsys, argv: list[str]) -> str:
    """Run the CLI, expect exit 2 with one ``error:`` line and no traceback; the line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2, err[-2000:]
    last = err.splitlines()[-1]
    assert last.startswith("error:") and "Traceback" not in err, err[-2000:]
    return last


# ------------------------------------------------------------------------------------------------------- judges
def nan_score(prompt, completion):
    return float("nan")


def inf_score(prompt, completion):
    return math.inf


def huge_score(prompt, completion):
    return 1e39


def huge_int_score(prompt, completion):
    return 10**400


def none_score(prompt, completion):
    return None


def text_score(prompt, completion):
    return "0.5"


def list_score(prompt, completion):
    return [1.0]


def tensor_score(prompt, completion):
    return torch.tensor([1.0])


def zero_score(prompt, completion):
    return 0


def raising_score(prompt, completion):
    raise RuntimeError("my judge broke")


def two_verdict(prompt, a, b):
    return 2


def text_verdict(prompt, a, b):
    return "1"


def none_verdict(prompt, a, b):
    return None


class ShortJudge(Judge):
    def score(self, prompts, completions):
        return [0.0] * (len(completions) - 1)


RECORDS = [{"prompt": f"p{i}", "policy": "quiet words", "reference": "LOUD WORDS", "policy_tokens": 3,
            "reference_tokens": 3, "policy_eos": True, "reference_eos": False} for i in range(4)]


@pytest.mark.parametrize(("fn", "shown"), [("nan_score", "nan"), ("inf_score", "inf"), ("none_score", "None"),
                                           ("text_score", "'0.5'"), ("list_score", "[1.0]"),
                                           ("tensor_score", "tensor([1.])"), ("huge_score", "1e+39"), ("huge_int_score", str(10**400))])
def test_a_judge_score_that_is_not_a_finite_number_is_one_line(fn, shown):
    """evaluate's comparisons (the default prefer compares scores: a NaN was a tie) and its mean scores; a score
    beyond float32 (was: inf in the rollout's rewards, then a NaN loss blamed on the data), an int beyond any float
    (was: OverflowError)."""
    judge = FunctionJudge(f"{THIS}:{fn}")
    expected = re.escape(f"judge function(fn='{THIS}:{fn}'): score returned {shown} for completion 0")
    with pytest.raises(UserInputError, match=expected):
        evaluate_records(RECORDS, judge)


@pytest.mark.parametrize(("fn", "shown"), [("two_verdict", "2"), ("text_verdict", "'1'"), ("none_verdict", "None")])
def test_a_pairwise_verdict_outside_1_0_minus_1_is_one_line(fn, shown):
    judge = FunctionJudge(f"{THIS}:{fn}", pairwise=True)
    with pytest.raises(UserInputError, match=re.escape(f"prefer returned {shown} for comparison 0; it must return 1")):
        evaluate_records(RECORDS, judge)


def test_a_judge_that_raises_is_one_line_naming_it_and_where():
    judge = FunctionJudge(f"{THIS}:raising_score")
    with pytest.raises(UserInputError) as info:
        judge_scores(judge, ["p"], ["c"])
    message = str(info.value)
    assert message.startswith(f"judge function(fn='{THIS}:raising_score'): score raised RuntimeError: my judge broke")
    assert f"{Path(__file__).name}:" in message and "in raising_score" in message
    with pytest.raises(UserInputError, match="prefer raised|score raised"):
        judge_preferences(judge, ["p"], ["a"], ["b"])


def test_a_judge_returning_the_wrong_number_of_scores_is_one_line():
    with pytest.raises(UserInputError, match="judge ShortJudge: score returned 3 values for 4 completions"):
        judge_scores(ShortJudge(), ["p"] * 4, ["a", "b", "c", "d"])


def test_on_policy_pairs_from_a_raising_judge_are_one_line():
    module = OnPolicyModule(policy=TINY, tokenizer="byte", judge=FunctionJudge(f"{THIS}:raising_score"),
                            generation=GenerationOptions(max_new_tokens=2, do_sample=True))
    module.configure_model()
    ids = [module.tokenizer("hi", add_special_tokens=False)["input_ids"]]
    with pytest.raises(UserInputError, match="score raised RuntimeError: my judge broke"):
        module.sample_pairs(ids, ["hi"], seed=0)


def test_all_ties_give_a_null_win_rate_and_strict_json(tmp_path):
    report = evaluate_records(RECORDS, FunctionJudge(f"{THIS}:zero_score"))
    assert report["tie_rate"]["count"] == 4 and report["win_rate_without_ties"]["value"] is None
    json.dumps(report, allow_nan=False)  # raised on the NaN before
    # the CLI end to end: the file it writes is JSON (json.loads would accept NaN; refuse it as JSON does)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", synthetic(3, seed=1)[0])
    main(["evaluate", "--config", str(REPO / "configs/dpo.yaml"), "--data.val", str(pairs), "--data.train",
          str(pairs), "--trainer.default_root_dir", str(tmp_path), "--model.generation.max_new_tokens", "2",
          "--progress_bar.refresh_rate", "0", "--judge", "function", f"--judge.fn={THIS}:zero_score"])
    text = (tmp_path / "lightning_logs/version_0/evaluation.json").read_text()
    written = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in evaluation.json"))
    assert written["win_rate_without_ties"]["value"] is None and written["tie_rate"]["count"] == 3
    assert not list(tmp_path.rglob(".evaluation.json.tmp*"))


# ------------------------------------------------------------------------------------------------------ options
def _policy(**kwargs) -> PreferenceModule:
    return PreferenceModule(policy=TINY, tokenizer="byte", **kwargs)


def _online(**kwargs) -> OnPolicyModule:
    kwargs.setdefault("judge", FunctionJudge("lightning_pref.judges.rules:quiet_letters"))
    kwargs.setdefault("generation", GenerationOptions(max_new_tokens=4, do_sample=True))
    return OnPolicyModule(policy=TINY, tokenizer="byte", **kwargs)


def _rl(**kwargs) -> PolicyGradientModule:
    kwargs.setdefault("judge", FunctionJudge("lightning_pref.judges.rules:quiet_letters"))
    kwargs.setdefault("generation", GenerationOptions(max_new_tokens=4, do_sample=True))
    return PolicyGradientModule(policy=TINY, tokenizer="byte", **kwargs)


def _data(tokenizer, **kwargs) -> PreferenceDataModule:
    return PreferenceDataModule(tokenizer=tokenizer, **kwargs)


OPTIONS = {
    # option outside its range
    "min_gap negative": (partial(_online, min_gap=-1.0), r"model\.min_gap: must be a finite number >= 0, got -1"),
    "min_gap nan": (partial(_online, min_gap=math.nan), r"model\.min_gap: must be a finite number >= 0, got nan"),
    "eos_penalty nan": (partial(_online, eos_penalty=math.nan), r"model\.eos_penalty: must be a finite number"),
    "eos_penalty negative": (partial(_online, eos_penalty=-1.0), r"model\.eos_penalty: must be a finite number >= 0"),
    "rl eos_penalty nan": (partial(_rl, eos_penalty=math.nan), r"model\.eos_penalty: must be a finite number"),
    "rl kl coef nan": (partial(_rl, kl={"coef": math.nan}), r"model\.kl\.coef: must be a finite number >= 0"),
    "rl critic vf_coef nan": (partial(_rl, critic={"vf_coef": math.nan}), r"model\.critic\.vf_coef: must be"),
    "mode typo": (partial(_online, mode="offline"), r"model\.mode: 'offline' is not one of online, iterative"),
    "round_prompts 0": (partial(_online, mode="iterative", round_prompts=0), r"model\.round_prompts: must be an"),
    "ref_sync_alpha 1.5": (partial(_policy, ref_sync_steps=4, ref_sync_alpha=1.5),
                           r"model\.ref_sync_alpha: must be a finite number in \(0, 1\], got 1\.5"),
    "ref_sync_alpha 0": (partial(_policy, ref_sync_steps=4, ref_sync_alpha=0.0), r"model\.ref_sync_alpha: must be"),
    "ref_sync_alpha nan": (partial(_policy, ref_sync_steps=4, ref_sync_alpha=math.nan), r"ref_sync_alpha: must be"),
    "chunk_size 0": (partial(_policy, chunk_size=0), r"model\.chunk_size: must be an integer >= 1, got 0"),
    "gradient_checkpointing 0": (partial(_policy, gradient_checkpointing=0),
                                 r"model\.gradient_checkpointing: must be an integer >= 1, got 0; true checkpoints"),
    "reward gradient_checkpointing -2": (partial(RewardModule, backbone=TINY, tokenizer="byte",
                                                 gradient_checkpointing=-2),
                                         r"model\.gradient_checkpointing: must be an integer >= 1, got -2"),
    "block without a number of layers": (partial(_policy, gradient_checkpointing=True,
                                                 gradient_checkpointing_method="block"),
                                         r"^model\.gradient_checkpointing_method: block recomputes the "
                                         r"bottom n decoder layers, and model\.gradient_checkpointing is "
                                         r"true; set it to n \(an integer >= 1\), or the method to "
                                         r"uniform$"),
    "reward block without checkpointing": (partial(RewardModule, backbone=TINY, tokenizer="byte",
                                                   gradient_checkpointing_method="block"),
                                           r"model\.gradient_checkpointing is false; set it to n"),
    "checkpointing method typo": (partial(_policy, gradient_checkpointing=2,
                                          gradient_checkpointing_method="bottom"),
                                  r"^model\.gradient_checkpointing_method: 'bottom' is not one of "
                                  r"uniform, block"),
    "reference_mode typo": (partial(_policy, reference_mode="adapters"), r"model\.reference_mode: 'adapters' is not"),
    "on_nonfinite typo": (partial(_policy, on_nonfinite="skipp"), r"model\.on_nonfinite: 'skipp' is not one of"),
    "dtype typo": (partial(_policy, dtype="fp16"), r"model\.dtype: 'fp16' is not one of float32, bfloat16, float16"),
    "loss beta nan": (partial(DPOLoss, beta=math.nan), r"dpo: beta must be finite, got nan"),
    "temperature nan": (partial(GenerationOptions, do_sample=True, temperature=math.nan),
                        r"temperature must be finite and > 0"),
    "temperature inf": (partial(GenerationOptions, do_sample=True, temperature=math.inf),
                        r"temperature must be finite and > 0"),
    "judge batch_size 0": (partial(RewardModelJudge, "unused", batch_size=0), r"judge\.batch_size: must be an"),
    "reward num_labels 2": (partial(RewardModule, backbone=TINY, tokenizer="byte", model_kwargs={"num_labels": 2}),
                            r"model\.model_kwargs: num_labels 2; a reward model has one label"),
    # an option that would be ignored
    "lora without adapter mode": (partial(_policy, lora={"r": 4}),
                                  r"model\.lora: \{'r': 4\} would be ignored: LoRA adapters are trained only with "
                                  r"reference_mode adapter .*set model\.reference_mode: adapter"),
    "ref_sync_alpha without steps": (partial(_policy, ref_sync_alpha=0.5),
                                     r"model\.ref_sync_alpha: 0\.5 would be ignored: .*set ref_sync_steps"),
    "reference_cache_dir in model mode": (partial(_policy, reference_cache_dir="cache"),
                                          r"model\.reference_cache_dir: 'cache' would be ignored"),
    "reference with mode none": (partial(_policy, loss=SimPOLoss(), reference_mode="none", reference=TINY),
                                 r"model\.reference: .* would be ignored: with reference_mode none there is no"),
    "reference_dtype with adapter mode": (partial(_policy, reference_mode="adapter", reference_dtype="bfloat16"),
                                          r"model\.reference_dtype: 'bfloat16' would be ignored"),
    "reference with a reference-free loss": (partial(_policy, loss=SimPOLoss(), reference=TINY),
                                             r"model\.reference: .* would be ignored: SimPOLoss uses no reference"),
    "round_prompts in online mode": (partial(_online, round_prompts=64),
                                     r"model\.round_prompts: 64 would be ignored: rounds are sampled only in mode "
                                     r"iterative"),
    "temperature with greedy decoding": (partial(GenerationOptions, temperature=0.7),
                                         r"model\.generation: temperature 0\.7 apply only when sampling"),
    "normalize and center": (partial(RewardModelJudge, "unused", normalize=True, center=True), r"judge\.center:"),
}


@pytest.mark.parametrize("case", OPTIONS)
def test_an_option_outside_its_meaning_is_refused(case):
    build, message = OPTIONS[case]
    with pytest.raises((UserInputError, ValueError), match=message):
        build()


DATA_OPTIONS = {
    "batch_size 0": ({"batch_size": 0}, r"data\.batch_size: must be an integer >= 1, got 0"),
    "num_workers -1": ({"num_workers": -1}, r"data\.num_workers: must be an integer >= 0"),
    "max_length 0": ({"max_length": 0}, r"data\.max_length: must be an integer >= 1"),
    "max_prompt_length above max_length": ({"max_prompt_length": 600}, r"data\.max_prompt_length: must be an integer "
                                           r"in \[1, 512\], got 600; it is part of data\.max_length"),
    "val_fraction 1": ({"val_fraction": 1.0}, r"data\.val_fraction: must be a finite number in \[0, 1\)"),
    "val_fraction nan": ({"val_fraction": math.nan}, r"data\.val_fraction: must be"),
    "on_identical typo": ({"on_identical": "drop"}, r"data\.on_identical: 'drop' is not one of warn, error, keep"),
    "cache_dir without cache": ({"cache": False, "cache_dir": "x"}, r"data\.cache_dir: 'x' would be ignored"),
    "group_by_length for prompts": ({"group_by_length": True, "train_data": "prompts"},
                                    r"data\.group_by_length: True would be ignored"),
}


@pytest.mark.parametrize("case", DATA_OPTIONS)
def test_a_data_option_outside_its_meaning_is_refused(case, tokenizer):
    kwargs, message = DATA_OPTIONS[case]
    with pytest.raises(UserInputError, match=message):
        _data(tokenizer, **kwargs)


def test_rollout_options_ignored_while_training_are_refused_when_training_starts():
    """``predict``/``evaluate`` of an on-policy checkpoint honour num_return_sequences; training would not."""
    for module in (_online(generation=GenerationOptions(max_new_tokens=4, do_sample=True, num_return_sequences=2)),
                   _rl(generation=GenerationOptions(max_new_tokens=4, do_sample=True, num_return_sequences=2))):
        with pytest.raises(UserInputError, match=r"model\.generation\.num_return_sequences: 2 would be ignored"):
            module.on_fit_start()


def test_an_option_error_from_the_cli_is_one_line(tmp_path, capsys):
    line = _one_line_exit_2(capsys, ["fit", "--config", str(REPO / "configs/online_dpo.yaml"), "--model.init_args.min_gap",
                                     "-1", "--trainer.default_root_dir", str(tmp_path)])
    assert "model.min_gap: must be a finite number >= 0, got -1" in line
    # NaN from YAML (jsonargparse itself refuses "nan" on the command line)
    (tmp_path / "nan.yaml").write_text("model:\n  loss:\n    class_path: dpo\n    init_args: {beta: .nan}\n")
    line = _one_line_exit_2(capsys, ["fit", "--config", str(REPO / "configs/dpo.yaml"), "--config",
                                     str(tmp_path / "nan.yaml"), "--trainer.default_root_dir", str(tmp_path)])
    assert "model.loss: dpo: beta must be finite, got nan" in line


# ------------------------------------------------------------------------------------- the wrong kind of model
@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """1-step runs of configs/dpo.yaml and configs/reward.yaml: their run directories."""
    tmp = tmp_path_factory.mktemp("bad_inputs_runs")
    pairs = write_jsonl(tmp / "pairs.jsonl", synthetic(8, seed=2)[0])
    out = {"pairs": pairs}
    with pytest.MonkeyPatch.context() as mp:  # conftest's function-scoped cache fixture does not reach here
        mp.setenv("LIGHTNING_PREF_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        mp.setattr("sys.argv", ["lightning-pref"])
        for name in ("dpo", "reward"):
            main(["fit", "--config", str(REPO / f"configs/{name}.yaml"), "--data.train", str(pairs), "--data.val",
                  str(pairs), "--trainer.max_steps", "1", "--trainer.val_check_interval", "1", "--data.batch_size",
                  "4", "--trainer.default_root_dir", str(tmp / name), "--progress_bar.refresh_rate", "0"])
            out[name] = tmp / name / "lightning_logs/version_0"
    return out


@pytest.mark.parametrize("subcommand", ["predict", "evaluate"])
def test_a_reward_checkpoint_to_predict_or_evaluate_is_one_line(runs, tmp_path, capsys, subcommand):
    ckpt = runs["reward"] / "checkpoints/last.ckpt"
    judge = ["--judge", "no_shouting"] if subcommand == "evaluate" else []
    line = _one_line_exit_2(capsys, [subcommand, "--config", str(REPO / "configs/dpo.yaml"), "--ckpt_path", str(ckpt),
                                     "--data.val", str(runs["pairs"]), "--trainer.default_root_dir", str(tmp_path),
                                     *judge])
    assert f"is a reward-model checkpoint (RewardModule): it scores texts and does not generate; {subcommand}" in line
    assert "--judge reward_model --judge.path" in line
    assert not list(tmp_path.iterdir())  # refused before anything was written


@pytest.mark.parametrize(("config", "run"), [("dpo", "reward"), ("reward", "dpo")])
def test_a_checkpoint_of_another_kind_than_the_config_is_one_line(runs, tmp_path, capsys, config, run):
    line = _one_line_exit_2(capsys, ["fit", "--config", str(REPO / f"configs/{config}.yaml"), "--ckpt_path",
                                     str(runs[run] / "checkpoints/last.ckpt"), "--trainer.default_root_dir",
                                     str(tmp_path)])
    trained, configured = ("RewardModule", "PreferenceModule") if run == "reward" else ("PreferenceModule", "RewardModule")
    assert f"is a {trained} checkpoint" in line and f"the config is for a {configured}" in line


def test_a_fit_resumed_under_another_module_is_one_line(runs, tmp_path, capsys):
    """An offline DPO checkpoint resumed with the on-policy config (and the reverse) restored and trained on,
    exit 0, and ``report`` then joined the two trainings' histories."""
    line = _one_line_exit_2(capsys, ["fit", "--config", str(REPO / "configs/online_dpo.yaml"), "--ckpt_path",
                                     str(runs["dpo"] / "checkpoints/last.ckpt"), "--trainer.default_root_dir",
                                     str(tmp_path)])
    assert "is a PreferenceModule checkpoint, but the config trains a OnPolicyModule; a resumed fit continues" in line


@pytest.mark.parametrize(("option", "value"), [("model.optimizer.init_args.lr", "0.1"), ("model.init_seed", "1"),
                                               ("model.lora", "{r: 4, lora_alpha: 64}")])
def test_resuming_with_an_option_the_checkpoint_restores_is_one_line(runs, tmp_path, capsys, option, value):
    """A new learning rate on resume was the optimizer state's old one while config.yaml recorded the new; a new
    seed rebuilt a random-init reference apart from its policy; a new LoRA alpha rescaled the trained adapter:
    all exit 0. The same values as trained are accepted (requeue scripts repeat their command line)."""
    argv = ["fit", "--config", str(REPO / "configs/dpo.yaml"), "--ckpt_path", str(runs["dpo"] / "checkpoints/last.ckpt"),
            "--data.train", str(runs["pairs"]), "--data.val", "null", "--data.batch_size", "4",
            "--trainer.default_root_dir", str(tmp_path), "--progress_bar.refresh_rate", "0"]
    line = _one_line_exit_2(capsys, [*argv, f"--{option}", value])
    assert line.startswith(f"error: {option.replace('.init_args', '')}") and " was trained with " in line
    assert f"from the command line cannot take effect: drop --{option}," in line


def test_resuming_with_a_config_file_that_changed_the_learning_rate_is_one_line(runs, tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("model:\n  optimizer:\n    class_path: torch.optim.AdamW\n    init_args:\n"
                                     "      lr: 0.5\n")
    line = _one_line_exit_2(capsys, [
        "fit", "--config", str(REPO / "configs/dpo.yaml"), "--config", str(tmp_path / "c.yaml"), "--ckpt_path",
        str(runs["dpo"] / "checkpoints/last.ckpt"), "--trainer.default_root_dir", str(tmp_path)])
    assert "error: model.optimizer.lr: " in line and "was trained with 0.001" in line
    assert "so 0.5 from the config cannot take effect: give the run's own config (its config.yaml)" in line


def test_resuming_with_the_options_it_was_trained_with_works(runs, tmp_path):
    trained = yaml.safe_load((runs["dpo"] / "config.yaml").read_text())["model"]  # written flat, as users write it
    main(["fit", "--config", str(REPO / "configs/dpo.yaml"), "--ckpt_path", str(runs["dpo"] / "checkpoints/last.ckpt"),
          "--data.train", str(runs["pairs"]), "--data.val", "null", "--data.batch_size", "4", "--trainer.max_steps", "2",
          "--model.optimizer.init_args.lr", str(trained["optimizer"]["init_args"]["lr"]), "--model.init_seed", "0",
          "--model.lora", "null",
          "--trainer.default_root_dir", str(tmp_path), "--progress_bar.refresh_rate", "0"])
    assert torch.load(next(tmp_path.glob("**/last.ckpt")), weights_only=False)["global_step"] == 2


def test_predict_with_a_reward_module_is_one_line(runs, tmp_path, capsys):
    line = _one_line_exit_2(capsys, ["predict", "--config", str(REPO / "configs/reward.yaml"), "--data.val",
                                     str(runs["pairs"]), "--trainer.default_root_dir", str(tmp_path),
                                     "--progress_bar.refresh_rate", "0"])
    assert "model: RewardModule does not generate text" in line


def _save_lm(path: Path, tokenizer, **fields) -> Path:
    load_causal_lm(TINY, field="test", vocab_size=len(tokenizer), **fields).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_a_causal_lm_as_a_reward_model_is_one_line(tmp_path, tokenizer):
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForSequenceClassification

    lm = _save_lm(tmp_path / "lm", tokenizer)
    with pytest.raises(UserInputError, match=r"judge\.path: .*lm is a LlamaForCausalLM model, not a reward model "
                       r"\(its head would be new and random\)"):
        RewardModelJudge(str(lm))
    two = _save_lm(tmp_path / "two", tokenizer, auto_class=AutoModelForSequenceClassification, num_labels=2)
    with pytest.raises(UserInputError, match=r"is a LlamaForSequenceClassification with 2 labels"):
        RewardModelJudge(str(two))
    headless = _save_lm(tmp_path / "headless", tokenizer, auto_class=AutoModelForSequenceClassification, num_labels=1)
    weights = headless / "model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if not k.startswith("score.")}, weights,
              metadata={"format": "pt"})
    with pytest.raises(UserInputError, match=r"has no trained reward head \(score\.weight is not in its weights"):
        RewardModelJudge(str(headless))
    critic = _rl(critic={"model": str(lm)})
    with pytest.raises(UserInputError, match=r"model\.critic\.model: .* is a LlamaForCausalLM model, not a reward"):
        critic.configure_model()


def test_export_adapter_only_of_a_full_model_is_one_line(runs, tmp_path, capsys):
    for run in ("dpo", "reward"):
        line = _one_line_exit_2(capsys, ["export", "--ckpt_path", str(runs[run] / "checkpoints/last.ckpt"),
                                         "--output_dir", str(tmp_path / run), "--adapter_only", "true"])
        assert "--adapter_only: this model has no LoRA adapter" in line
        assert not (tmp_path / run).exists()


def test_a_checkpoint_from_an_older_version_still_loads(runs, tmp_path):
    """Hyperparameters added since (generation, chunk_size, compile) and the RNG states are absent: defaults."""
    checkpoint = torch.load(runs["dpo"] / "checkpoints/last.ckpt", weights_only=False)
    for key in ("generation", "chunk_size", "compile", "response_only_head"):
        checkpoint["hyper_parameters"].pop(key)
    checkpoint.pop("rng_states")
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    main(["validate", "--config", str(REPO / "configs/dpo.yaml"), "--ckpt_path", str(old), "--data.val",
          str(runs["pairs"]), "--data.train", str(runs["pairs"]), "--trainer.default_root_dir", str(tmp_path), "--progress_bar.refresh_rate", "0"])
    (row,) = [r for r in csv.DictReader(open(tmp_path / "lightning_logs/version_0/metrics.csv")) if r["val/loss"]]
    assert math.isfinite(float(row["val/loss"]))


# ---------------------------------------------------------------------------------------------------------- data
@pytest.mark.parametrize(("value", "shown"), [("NaN", "nan"), ("Infinity", "inf"), ("-Infinity", "-inf"),
                                              ("1e40", "1e+40"), ("-1e39", "-1e+39")])
def test_a_non_finite_margin_is_one_line_with_file_line_and_field(tmp_path, tokenizer, value, shown):
    """Beyond float32 too (was: accepted, then an inf loss blamed on the batch, not the field)."""
    rows = [json.dumps(r) for r in synthetic(3, seed=1)[0]]
    rows[1] = rows[1][:-1] + f', "margin": {value}}}'
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(UserInputError, match=rf"pairs\.jsonl:2: field 'margin' must be a finite number within "
                       rf"float32's range \(±3\.4e\+38\), or null for none; got {re.escape(shown)}"):
        _data(tokenizer, train=str(path), val=None, cache=False).setup("fit")
    dropped = _data(tokenizer, train=str(path), val=None, cache=False, on_invalid="drop")
    dropped.setup("fit")
    assert dropped.stats["train"].dropped.get("not finite") == 1


def test_a_nan_margin_in_parquet_is_one_line(tmp_path, tokenizer):
    import datasets

    records = synthetic(3, seed=1)[0]
    margins = [1.0, math.nan, 2.0]
    datasets.Dataset.from_list([r | {"margin": m} for r, m in zip(records, margins, strict=True)]).to_parquet(
        tmp_path / "pairs.parquet")
    with pytest.raises(UserInputError, match=r"pairs\.parquet:row 2: field 'margin' must be a finite number"):
        _data(tokenizer, train=str(tmp_path / "pairs.parquet"), val=None, cache=False).setup("fit")


def test_a_prompt_of_only_system_messages_is_one_line(tmp_path):
    from lightning_pref.models import load_tokenizer
    from tests.real import smollm2_dir

    chat = load_tokenizer(str(smollm2_dir()))  # a tokenizer with a chat template
    for record in ({"prompt": [{"role": "system", "content": "You are helpful."}]},
                   {"messages": [{"role": "system", "content": "Be brief."}, {"role": "assistant", "content": "Hi"}]}):
        prompts = write_jsonl(tmp_path / "prompts.jsonl", [record])
        dm = _data(chat, val=str(prompts))
        with pytest.raises(UserInputError, match=r"prompts\.jsonl:1: the prompt has only system messages, no user turn"):
            dm.setup("predict")


def test_an_empty_rounds_file_is_one_line(tmp_path, tokenizer):
    (tmp_path / "round_0.jsonl").write_text("")
    dm = _data(tokenizer, train_data="rounds")
    with pytest.raises(UserInputError, match=r"data\.train: .*round_0\.jsonl contains no records"):
        dm.train_from(str(tmp_path / "round_0.jsonl"))


# ----------------------------------------------------------------------------------- precision, non-finite losses
def _fit(module, pairs: Path, steps: int = 2, callbacks=(), **trainer) -> None:
    dm = PreferenceDataModule(train=str(pairs), tokenizer=module.tokenizer, batch_size=4)
    Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, callbacks=list(callbacks), **trainer).fit(module, dm)


def test_pure_fp16_with_an_eps_fp16_cannot_hold_is_refused_with_the_reason(pairs_file):
    with pytest.raises(UserInputError, match=r"model\.optimizer: eps 1e-08 is 0 in float16 \(the parameters' dtype "
                       r"under trainer\.precision 16-true.*set model\.optimizer\.init_args\.eps to 1e-4 or more"):
        _fit(_policy(), pairs_file, precision="16-true")
    # the fix the message gives trains: finite losses, fp16 weights
    module = _policy(optimizer=partial(torch.optim.AdamW, lr=1e-3, eps=1e-4))
    _fit(module, pairs_file, steps=3, precision="16-true")
    assert next(module.policy.parameters()).dtype == torch.float16
    assert all(torch.isfinite(p).all() for p in module.policy.parameters())


class _PoisonWeights(Callback):
    """After the first optimizer step, a NaN in the weights (as a diverged update leaves them)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        with torch.no_grad():
            next(pl_module.policy.parameters()).fill_(math.nan)


def test_a_non_finite_loss_names_its_cause(pairs_file):
    with pytest.raises(TrainingError, match=r"at step 0 .*no update has been taken yet, so it is not the learning rate"):
        _fit(_policy(loss=NaNAtCall(at=0)), pairs_file)
    with pytest.raises(TrainingError, match=r"at step 1 .*the weights are already non-finite: an earlier optimizer step"):
        _fit(_policy(), pairs_file, callbacks=[_PoisonWeights()])


# -------------------------------------------------------------------------------------------------------- report
def _report_page(run: Path) -> str:
    main(["report", str(run)])
    return (run / "report.html").read_text(encoding="utf-8")


def _config_rows(page: str) -> dict[str, str]:
    import html

    section = page[page.index("<h2>Configuration"): page.index("<h2>Final")]
    return {html.unescape(k): html.unescape(v) for k, v in re.findall(r"<tr><td>(.*?)</td><td><code>(.*?)</code>",
                                                                        section)}


@pytest.mark.parametrize("form", ["utf-16 tabs", "utf-16 commas", "utf-8 bom"])
def test_report_reads_a_metrics_csv_a_spreadsheet_saved(runs, tmp_path, form):
    pytest.importorskip("matplotlib")
    import shutil

    run = tmp_path / "run"
    shutil.copytree(runs["dpo"], run, ignore=shutil.ignore_patterns("checkpoints", "report*"))
    expected = _report_page(run)
    rows = list(csv.reader(open(run / "metrics.csv", newline="")))
    rows = [rows[0]] + [[f"{float(c):.1f}" if i == rows[0].index("step") and c else c for i, c in enumerate(r)]
                        for r in rows[1:]]  # steps as a spreadsheet writes them: 1.0
    delimiter = "\t" if "tabs" in form else ","
    text = "\r\n".join(delimiter.join(r) for r in rows) + "\r\n"
    (run / "metrics.csv").write_bytes(text.encode("utf-16") if "16" in form else text.encode("utf-8-sig"))
    page = _report_page(run)
    assert re.findall(r'alt="([^"]*)"', page) == re.findall(r'alt="([^"]*)"', expected)
    assert page.count("<tr><td>val/") == expected.count("<tr><td>val/") > 0


def test_report_of_a_reward_run_finds_its_config(runs):
    pytest.importorskip("matplotlib")
    page = _report_page(runs["reward"])
    rows = _config_rows(page)
    assert "No config.yaml" not in page
    assert rows["model"] == "RewardModule" and rows["model.backbone"].startswith("{model_type: llama")
    assert rows["model.loss"].endswith("BradleyTerryLoss") and rows["model.loss.use_margin"] == "true"
    assert 'alt="Reward-model scores"' in page and 'alt="Implicit rewards"' not in page


def test_report_of_a_policy_run(runs):
    pytest.importorskip("matplotlib")
    rows = _config_rows(_report_page(runs["dpo"]))
    assert "model" not in rows and rows["model.loss"].endswith("DPOLoss") and rows["model.loss.beta"] == "0.1"


@pytest.mark.parametrize("config", ["online_dpo", "ppo"])
def test_report_of_on_policy_and_rl_runs(runs, tmp_path, config):
    """A 1-step run of each shipped config: the summary names the module, its model and its plugins, and the
    judge's score (their signal) is plotted."""
    pytest.importorskip("matplotlib")
    rl = ["--model.init_args.ppo_epochs", "1", "--model.init_args.minibatches", "1"] if config == "ppo" else []
    main(["fit", "--config", str(REPO / f"configs/{config}.yaml"), "--data.train", str(runs["pairs"]), *rl,
          "--trainer.max_steps", "2", "--trainer.log_every_n_steps", "1", "--data.batch_size", "2",
          "--model.init_args.generation.max_new_tokens", "2", "--trainer.default_root_dir", str(tmp_path),
          "--progress_bar.refresh_rate", "0"])
    page = _report_page(tmp_path / "lightning_logs/version_0")
    rows = _config_rows(page)
    module, plugin = {"online_dpo": ("OnPolicyModule", "model.loss"), "ppo": ("PolicyGradientModule",
                                                                              "model.estimator")}[config]
    assert rows["model"] == module and rows["model.policy"].startswith("{model_type: llama")
    assert rows["model.judge.fn"] == "lightning_pref.judges.rules:quiet_letters" and plugin in rows
    assert "report_metric_judge.png" in page and "No config.yaml" not in page


# ----------------------------------------------------------------------------------------------- layout metrics
class _PaddingFractions(Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.values.append(float(trainer.callback_metrics["train/padding_fraction"]))


@pytest.mark.parametrize("kind", ["policy", "reward"])
def test_padding_fraction_describes_the_layout_that_ran(kind, pairs_file, monkeypatch):
    """A model that cannot pack runs padded batches: the logged fraction is the padded one, not that of the
    packed rows it fell back from."""
    def build():
        if kind == "policy":
            return _policy()
        return RewardModule(backbone=TINY, tokenizer="byte")

    fractions = {}
    monkeypatch.setattr(packing, "supports_packing", lambda model: (False, "test: no packing"))
    packing._tell.cache_clear()
    for layout in (False, "shared"):
        record = _PaddingFractions()
        module = build()
        dm = PreferenceDataModule(train=str(pairs_file), tokenizer=module.tokenizer, batch_size=4, packing=layout)
        Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, callbacks=[record]).fit(module, dm)
        fractions[layout] = record.values
    packing._tell.cache_clear()
    assert len(fractions[False]) == 2 and fractions["shared"] == fractions[False]


# ------------------------------------------------------------------------------------ RL updates and rollouts
_GRPO = ["fit", "--config", str(REPO / "configs/grpo.yaml"), "--model.init_args.generation.max_new_tokens", "4",
         "--progress_bar.refresh_rate", "0"]  # 2 epochs x 2 minibatches: 4 updates a rollout


def test_rl_max_steps_between_rollouts_is_refused(capsys, tmp_path):
    """Lightning stops only between batches: max_steps 6 ran 8 updates (was: exit 0, past max_steps)."""
    line = _one_line_exit_2(capsys, [*_GRPO, "--trainer.max_steps", "6", "--data.batch_size", "2",
                                     "--trainer.default_root_dir", str(tmp_path)])
    assert "trainer.max_steps: 6" in line and "model.ppo_epochs 2 x model.minibatches 2" in line
    assert line.endswith("use 4 or 8"), line
    assert not list(tmp_path.glob("lightning_logs/version_*"))  # the refused run takes back its directory


@pytest.mark.parametrize(("prompts", "minibatches", "completions"), [(None, 16, "8 completions (2 prompts x"),
                                                                      (5, 6, "4 completions (1 prompt in the epoch's")])
def test_rl_more_minibatches_than_completions_is_refused(capsys, tmp_path, prompts, minibatches, completions):
    """16 minibatches of 8 completions were silently 8 (``chunk`` gives fewer), and a short last batch fewer."""
    data = [] if prompts is None else ["--data.train", str(write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": f"prompt {i}"} for i in range(prompts)]))]
    line = _one_line_exit_2(capsys, [*_GRPO, "--trainer.max_steps", str(2 * minibatches), "--data.batch_size", "2",
                                     "--model.init_args.minibatches", str(minibatches), *data,
                                     "--trainer.default_root_dir", str(tmp_path)])
    assert f"model.minibatches: {minibatches} minibatches cannot split a rollout of {completions}" in line, line


# ------------------------------------------------------------------------------------------- runs and outputs
def test_a_logger_version_an_earlier_run_used_is_refused_before_its_metrics_are_deleted(capsys, tmp_path):
    """``--trainer.logger.version exp1`` twice: Lightning's CSVLogger deleted the first run's metrics.csv, then
    LightningCLI refused to write config.yaml over the first one's (a traceback, after the loss)."""
    run = ["fit", "--config", str(REPO / "configs/dpo.yaml"), "--trainer.max_steps", "2",
           "--trainer.log_every_n_steps", "1", "--trainer.logger", "CSVLogger", "--trainer.logger.save_dir",
           str(tmp_path), "--trainer.logger.version", "exp1", "--progress_bar.refresh_rate", "0"]
    main(run)
    metrics = tmp_path / "lightning_logs/exp1/metrics.csv"
    before = metrics.read_bytes()
    capsys.readouterr()
    for again in (run, [*run, "--ckpt_path", "last", "--trainer.max_steps", "4"]):
        line = _one_line_exit_2(capsys, again)
        assert "trainer.logger: " in line and "exp1 already holds a run's files" in line, line
        assert metrics.read_bytes() == before


@pytest.mark.parametrize("ckpt", ["{run}", "{run}/checkpoints", "best"])
def test_a_checkpoint_path_that_is_a_directory_or_best_is_one_line(runs, tmp_path, capsys, ckpt):
    """A run's directory, its checkpoints/ directory (were: IsADirectoryError, and a stray version_N), or
    Lightning's ``best``, which names the best checkpoint of a fit in the same process (was: ValueError)."""
    line = _one_line_exit_2(capsys, ["validate", "--config", str(REPO / "configs/dpo.yaml"), "--ckpt_path",
                                     ckpt.format(run=runs["dpo"]), "--trainer.default_root_dir", str(tmp_path)])
    expected = "best names the best checkpoint" if ckpt == "best" else "is a directory, not a checkpoint; give a " \
        f"checkpoint in it, e.g. {runs['dpo']}/checkpoints/last.ckpt"
    assert line.startswith("error: --ckpt_path: ") and expected in line, line
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("subcommand", ["validate", "test"])
def test_validate_or_test_without_held_out_pairs_is_one_line(runs, tmp_path, capsys, subcommand):
    """A run trained with ``data.val: null`` validated as it was configured: nothing ran, exit 0, and the line said
    "metrics in" a directory without metrics."""
    line = _one_line_exit_2(capsys, [subcommand, "--config", str(REPO / "configs/dpo.yaml"), "--ckpt_path",
                                     str(runs["dpo"] / "checkpoints/last.ckpt"), "--data.train", str(runs["pairs"]),
                                     "--data.val", "null"])
    assert line == (f"error: data.val: {subcommand} measures held-out data and there is none; give data.val or "
                    "data.val_fraction")


@pytest.mark.parametrize("case", ["predict through a file", "predict onto a directory", "evaluate through a file",
                                  "export through a file", "report through a file"])
def test_an_output_path_that_cannot_be_written_is_refused_before_the_work(runs, tmp_path, capsys, case):
    """Paths through an existing file (were: NotADirectoryError or FileExistsError, for predict and evaluate after
    generating and judging), and ``--predictions.path`` an existing directory with ``--predictions.overwrite`` (was:
    IsADirectoryError after generating, and a temporary file left beside it)."""
    (tmp_path / "notes.txt").write_text("keep")
    (tmp_path / "adir").mkdir()
    (tmp_path / "adir/keep.txt").write_text("keep")
    ckpt = str(runs["dpo"] / "checkpoints/last.ckpt")
    generate = ["--config", str(REPO / "configs/dpo.yaml"), "--ckpt_path", ckpt, "--data.predict",
                str(runs["pairs"]), "--model.generation.max_new_tokens", "2", "--trainer.default_root_dir",
                str(tmp_path / "root")]
    argv, option, expected = {
        "predict through a file": (["predict", *generate, "--predictions.path", str(tmp_path / "notes.txt/p.jsonl")],
                                   "--predictions.path", "notes.txt, which is a file"),
        "predict onto a directory": (["predict", *generate, "--predictions.path", str(tmp_path / "adir"),
                                      "--predictions.overwrite", "true"], "--predictions.path", "adir is a directory"),
        "evaluate through a file": (["evaluate", *generate, "--judge", "no_shouting", "--output",
                                     str(tmp_path / "notes.txt/e.json")], "--output", "notes.txt, which is a file"),
        "export through a file": (["export", "--ckpt_path", ckpt, "--output_dir", str(tmp_path / "notes.txt/sub")],
                                  "--output_dir", "notes.txt, which is a file"),
        "report through a file": (["report", str(runs["dpo"]), "--output_dir", str(tmp_path / "notes.txt/sub")],
                                  "--output_dir", "notes.txt, which is a file"),
    }[case]
    line = _one_line_exit_2(capsys, argv)
    assert line.startswith(f"error: {option}: ") and expected in line, line
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "root") == ["adir", "notes.txt"]
    assert [p.name for p in (tmp_path / "adir").iterdir()] == ["keep.txt"]


# ------------------------------------------------------------------------------------------- models and tokenizers
def test_a_two_label_classifier_as_a_reward_backbone_is_one_line(tmp_path):
    """Was: transformers' size-mismatch RuntimeError (a traceback) from loading its two-label head as one."""
    from transformers import AutoModelForSequenceClassification

    from lightning_pref.models import load_configured, load_tokenizer

    tokenizer = load_tokenizer("byte")
    load_configured(TINY, "x", tokenizer, auto_class=AutoModelForSequenceClassification,
                    num_labels=2).save_pretrained(tmp_path / "cls2")
    module = RewardModule(backbone=str(tmp_path / "cls2"), tokenizer="byte")
    with pytest.raises(UserInputError, match=re.escape(f"model.backbone: {tmp_path / 'cls2'} holds a classification "
                                                       "head with another number of labels than the 1 needed here")):
        module.configure_model()


@pytest.mark.parametrize("where", ["policy", "judge"])
def test_a_model_directory_without_tokenizer_files_is_one_line_naming_the_way_out(tmp_path, where):
    """Was: ``Couldn't instantiate the backend tokenizer from one of:`` and nothing after it (transformers' message
    goes on over lines the first-line rule cut)."""
    from lightning_pref.models import load_configured, load_tokenizer
    from lightning_pref.reward.export import save_reward_model

    if where == "policy":
        load_configured(TINY, "x", load_tokenizer("byte")).save_pretrained(tmp_path / "m")
        with pytest.raises(UserInputError, match=re.escape(
                f"model.tokenizer (null: model.policy's own): cannot load tokenizer '{tmp_path / 'm'}' (no tokenizer "
                "files in it); give a local directory with tokenizer files")):
            OnPolicyModule(str(tmp_path / "m"), judge=FunctionJudge(f"{THIS}:zero_score"))
    else:
        reward = RewardModule(TINY, tokenizer="byte")
        reward.configure_model()
        save_reward_model(reward, tmp_path / "m")
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (tmp_path / "m" / name).unlink(missing_ok=True)
        with pytest.raises(UserInputError, match=re.escape(f"judge.path: cannot load tokenizer '{tmp_path / 'm'}' (no tokenizer "
                                                           "files in it); a reward model directory holds its")):
            RewardModelJudge(str(tmp_path / "m"))


def pairwise_tie(prompt, first, second):
    return 0


@pytest.mark.parametrize("module", ["online", "rl"])
def test_a_pairwise_judge_for_on_policy_training_says_a_scoring_one_is_needed(module):
    """A pairwise judge is fine for evaluate; training on the policy's samples needs scores. Was, only after the
    models were built: ``score raised NotImplementedError ...; fix the judge``."""
    judge = FunctionJudge(f"{THIS}:pairwise_tie", pairwise=True)
    build = partial(OnPolicyModule, TINY, tokenizer="byte") if module == "online" else partial(
        PolicyGradientModule, TINY, tokenizer="byte")
    with pytest.raises(UserInputError, match=re.escape(f"model.judge: function(fn='{THIS}:pairwise_tie', "
                                                       "pairwise=True) only compares two completions (prefer); ")):
        build(judge=judge)


class _NoMethods(Judge):
    """A judge whose author named its method ``scores``: it defines neither ``score`` nor ``prefer``."""

    def scores_of(self, prompts, completions):
        return [0.0] * len(completions)


def test_a_judge_defining_neither_score_nor_prefer_says_so():
    """Was described as a judge that "only compares two completions (prefer)"."""
    with pytest.raises(UserInputError, match=re.escape("model.judge: _NoMethods defines neither score nor prefer; a "
                                                       "judge overrides score")):
        OnPolicyModule(TINY, tokenizer="byte", judge=_NoMethods())


@pytest.mark.parametrize(("args", "expected"), [
    (["--model.init_args.judge", "my.pkg.NoSuchJudge"], "model.judge: No module named 'my' (class_path my.pkg.NoSuchJudge)"),
    (["--model.init_args.samples_per_promt", "4"],
     "model: Option 'samples_per_promt' is not accepted (class_path lightning_pref.PolicyGradientModule)"),
    (["--model.init_args.kl.estimator", "k4"], "model.kl.estimator: Expected a typing.Literal['k1', 'k2', 'k3']. Got "
                                               "value: k4"),
    (["--data.batch_size", "abc"], "data.batch_size: Expected a <class 'int'>. Got value: abc"),
])
def test_a_parser_error_is_one_line_naming_the_option(capsys, args, expected):
    """jsonargparse wrote the whole usage and then its tree of union attempts (25 to 125 lines) for a mistyped
    class path, option name or value inside the module; now the error that ends it, after its option."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / "configs/grpo.yaml"), *args])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {expected}"]


def test_training_prompts_are_counted_like_pairs(tmp_path, tokenizer, capsys):
    """On-policy and RL prompts: rows dropped by ``data.on_invalid: drop`` and prompts cut to ``data.max_length``
    were silent, and the summary table had no row for them (was: a title over an empty table, printed twice)."""
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a" * 40}, {"prompt": ""}, {"prompt": "short"}])
    dm = _data(tokenizer, train=str(path), val=None, train_data="prompts", on_invalid="drop", max_length=16)
    dm.prepare_data()
    dm.setup("fit")
    err = capsys.readouterr().err
    assert f"data.train: dropped 1 rows of {path} that fail a check (1 empty field; data.on_invalid: drop)" in err
    assert f"{path}:2: field 'prompt' is empty" in err
    assert f"data.train: cut 1 of 2 prompts of {path} to data.max_length 16 tokens" in err
    assert err.count("preference data") == 1 and "│ train │ p.jsonl │ prompts │    2 │ 1 empty field │" in err
    stats = dm.stats["train"]
    assert (stats.kept, stats.dropped, stats.length_max) == (2, {"empty field": 1}, 16)
    assert [len(p.ids) for p in dm.train_prompts] == [16, 5]


@pytest.mark.parametrize(("first", "expected"), [
    ({"prompt": None}, "p.jsonl:1: field 'prompt' must be a string, got null"),
    ({"prompt": 5}, "p.jsonl:1: field 'prompt' must be a string, got a number"),
    ({"prompt": "p", "chosen": ["good answer"], "rejected": "bad"}, "p.jsonl:1: field 'chosen' must be a string, got "
                                                                    "a list (or set data.on_invalid"),
])
def test_a_wrong_type_in_the_first_row_is_named_at_its_line(tmp_path, first, expected):
    """Was: "the data is conversational (lists of role/content messages) but tokenizer ... has no chat template",
    with no line: the first row's value decided the format, and anything not a string counted as messages."""
    from lightning_pref.models import load_tokenizer

    second = {"prompt": "ok"} if "chosen" not in first else {"prompt": "p", "chosen": "a", "rejected": "b"}
    path = write_jsonl(tmp_path / "p.jsonl", [first, second])
    train_data = "pairs" if "chosen" in first else "prompts"
    dm = _data(load_tokenizer("byte"), train=str(path), val=None, train_data=train_data, cache=False)
    with pytest.raises(UserInputError, match=re.escape(f"{tmp_path}/{expected}")):
        dm.setup("fit")


def test_data_val_with_validation_turned_off_is_refused(capsys, tmp_path):
    """The on-policy and RL configs set ``trainer.limit_val_batches: 0``: a ``data.val`` given to them was read and
    never used."""
    line = _one_line_exit_2(capsys, ["fit", "--config", str(REPO / "configs/online_dpo.yaml"), "--data.val",
                                     str(REPO / "lightning_pref/assets/synthetic_val.jsonl"),
                                     "--trainer.default_root_dir", str(tmp_path)])
    assert line.startswith("error: data.val: ") and "would be ignored: trainer.limit_val_batches is 0" in line, line


def test_resuming_a_run_already_at_max_steps_is_one_line(runs, capsys, tmp_path):
    """Was: exit 0 having trained nothing, and a new version_N without a run record."""
    line = _one_line_exit_2(capsys, ["fit", "--config", str(REPO / "configs/dpo.yaml"), "--ckpt_path",
                                     str(runs["dpo"] / "checkpoints/last.ckpt"), "--data.train", str(runs["pairs"]),
                                     "--trainer.max_steps", "1", "--trainer.default_root_dir", str(tmp_path)])
    assert line == (f"error: trainer.max_steps: 1, and {runs['dpo'] / 'checkpoints/last.ckpt'} is at step 1 already, "
                    "so nothing is left to train; raise trainer.max_steps (it counts the whole run, the resumed steps "
                    "included)")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("subcommand", ["validate", "export"])
def test_a_file_that_is_no_checkpoint_is_not_told_to_re_save_it(capsys, tmp_path, subcommand):
    """Was: torch's advice ('please torch.save your checkpoint with this option') quoted for a YAML or text file;
    export read checkpoints with a reader of its own that kept it."""
    bad = tmp_path / "bad.ckpt"
    bad.write_text("model: not a checkpoint\n")
    where = ["--output_dir", str(tmp_path / "out")] if subcommand == "export" else [
        "--config", str(REPO / "configs/dpo.yaml")]
    line = _one_line_exit_2(capsys, [subcommand, *where, "--ckpt_path", str(bad)])
    assert line == (f"error: --ckpt_path: {bad} is not a readable checkpoint (not a PyTorch archive, which every .ckpt "
                    "that fit saves is); it may be truncated by an interrupted save or copy: use another one (e.g. an "
                    "earlier epoch=...ckpt)")


@pytest.mark.parametrize("device", ["gpu", "cuda:7"])
def test_a_judge_device_this_machine_lacks_names_the_option(tmp_path, device):
    """Was: torch's "Torch not compiled with CUDA enabled" or its list of device types, naming no option."""
    from lightning_pref.reward.export import save_reward_model

    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has that device")
    reward = RewardModule(TINY, tokenizer="byte")
    reward.configure_model()
    save_reward_model(reward, tmp_path / "rm")
    with pytest.raises(UserInputError, match=re.escape(f"judge.device: cannot put the reward model on {device!r} (")):
        RewardModelJudge(str(tmp_path / "rm"), device=device)


_SCHEDULE = ["--model.scheduler", "lightning_pref.schedules.WarmupDecay"]


@pytest.mark.parametrize(("args", "expected"), [
    # was: every update uphill (Lightning divides the loss by -1), exit 0; 0 was a ZeroDivisionError
    (["--trainer.accumulate_grad_batches", "-1"], "trainer.accumulate_grad_batches: must be an integer >= 1, got -1"),
    (["--trainer.accumulate_grad_batches", "0"], "trainer.accumulate_grad_batches: must be an integer >= 1, got 0"),
    (["--trainer.gradient_clip_val", "-1"], "trainer.gradient_clip_val: must be >= 0, got -1"),  # was: no clipping
    # were: peft's tracebacks
    (["--model.reference_mode", "adapter", "--model.lora", "{r: 4, alpha: 8}"],
     "model.lora: LoraConfig.__init__() got an unexpected keyword argument 'alpha'; its keys are peft.LoraConfig's"),
    (["--model.reference_mode", "adapter", "--model.lora", "{target_modules: [q_prj]}"],
     "model.lora: Target modules {'q_prj'} not found in the base model."),
    # were: accepted, maximising DPO or learning nothing, exit 0
    (["--model.loss", "weighted", "--model.loss.terms", "{dpo: -1.0, nll: 1.0}"],
     "model.loss: weighted: weights must be finite and >= 0 (a negative one maximises its loss), got {'dpo': -1.0}"),
    (["--model.loss", "weighted", "--model.loss.terms", "{dpo: 0.0}"], "model.loss: weighted: every weight is 0"),
    (["--model.loss", "kto", "--model.loss.desirable_weight", "0", "--model.loss.undesirable_weight", "0",
      "--data.unpair", "true"], "model.loss: kto: desirable_weight and undesirable_weight are both 0"),
    # was: a warmup the run never finished (lr 2e-6 of a 1e-3 peak), exit 0; 1.5 read as 1 step
    ([*_SCHEDULE, "--model.scheduler.warmup", "500"], "model.scheduler: WarmupDecay: warmup 500 steps is not shorter "
                                                      "than the run's 2 optimizer steps"),
    ([*_SCHEDULE, "--model.scheduler.warmup", "1.5"], "model.scheduler: WarmupDecay: warmup 1.5 is neither"),
    # was: the option named twice
    ([*_SCHEDULE, "--model.scheduler.min_ratio", "2"], "model.scheduler: WarmupDecay: warmup must be >= 0"),
    # was: Lightning's "The lr scheduler dict must include a monitor ...", a fix in code the user cannot change
    (["--model.scheduler", "torch.optim.lr_scheduler.ReduceLROnPlateau"],
     "model.scheduler: ReduceLROnPlateau steps on a logged metric and this one names none; use "
     "lightning.pytorch.cli.ReduceLROnPlateau with init_args.monitor"),
    # was: "Expected a <class 'bool'>", the first member of the union only
    (["--data.packing", "maybe"], "data.packing: Expected a <class 'bool'> or typing.Literal['auto', 'shared']"),
])
def test_offline_training_options_that_would_mislead_are_one_line(capsys, tmp_path, args, expected):
    line = _one_line_exit_2(capsys, ["fit", "--config", str(REPO / "configs/dpo.yaml"), "--trainer.max_steps", "2",
                                     "--trainer.default_root_dir", str(tmp_path), *args])
    assert line.startswith(f"error: {expected}"), line


class _ContractBreaker(DPOLoss):
    """DPO whose output is bent one way per ``how``: what a hand-written plugin gets wrong."""

    requires_reference = True

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how

    def forward(self, policy, reference, *, kl_baseline=None):
        from lightning_pref.types import LossOutput

        if self.how == "needs what it declined":
            raise ValueError("this loss requires reference log-probs, got reference=None")
        if self.how == "raises":
            raise RuntimeError("boom")
        out = super().forward(policy, reference, kl_baseline=kl_baseline)
        return {
            "scalar": LossOutput(out.losses.mean(), out.chosen_rewards, out.rejected_rewards),
            "tuple": (out.losses, out.chosen_rewards, out.rejected_rewards),
            "detached": LossOutput(out.losses.detach(), out.chosen_rewards, out.rejected_rewards),
            "one reward": LossOutput(out.losses, out.chosen_rewards[:1], out.rejected_rewards),
            "list": LossOutput(list(out.losses), out.chosen_rewards, out.rejected_rewards),
            "nan rewards": LossOutput(out.losses, out.chosen_rewards * torch.nan, out.rejected_rewards),
            "vector metric": LossOutput(out.losses, out.chosen_rewards, out.rejected_rewards,
                                        metrics={"mine": out.chosen_rewards.detach()}),
        }[self.how]


@pytest.mark.parametrize(("how", "expected"), [
    ("scalar", "returned losses of shape (); one per pair (3)"),  # was: IndexError in the metrics
    ("tuple", "forward returned a tuple; a loss returns a LossOutput"),  # was: AttributeError
    ("detached", "returned losses that do not depend on the policy's log-probs"),  # was: RuntimeError in backward
    ("one reward", "returned chosen_rewards of shape (1,); one per chosen sequence (3)"),  # was: exit 0, 1 example
    ("needs what it declined", "this loss requires reference log-probs, got reference=None"),  # was: a traceback
    # found by a QA sweep of plugins: each was a traceback, or (NaN rewards) NaN metrics with exit 0
    ("raises", "_ContractBreaker.forward raised RuntimeError: boom (at "),
    ("list", "returned losses as a list; a LossOutput holds tensors"),
    ("nan rewards", "returned non-finite rewards (nan) with finite losses"),
    ("vector metric", "returned metrics['mine'] of shape (3,); a metric is one number"),
])
def test_a_loss_plugin_breaking_the_contract_is_one_line_naming_it(how, expected):
    from lightning_pref.losses.base import checked_call
    from lightning_pref.types import SequenceLogps

    tokens = torch.ones(3)
    policy = SequenceLogps(torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True), tokens, tokens)
    reference = SequenceLogps(torch.randn(3), torch.randn(3), tokens, tokens)
    with pytest.raises(UserInputError, match=re.escape("model.loss: _ContractBreaker")) as info:
        checked_call(_ContractBreaker(how), policy, reference, None)
    assert expected in str(info.value), str(info.value)


class _ClashingMetric(DPOLoss):
    def forward(self, policy, reference, *, kl_baseline=None):
        out = super().forward(policy, reference, kl_baseline=kl_baseline)
        out.metrics["rewards/accuracies"] = torch.tensor(-5.0)
        return out


def test_a_loss_metric_named_as_the_modules_own_is_one_line(pairs_file):
    """It replaced ``train/rewards/accuracies`` (-5.0 at every step, exit 0), and made Lightning refuse the second
    ``self.log`` of ``val/...`` in words that named neither the loss nor the fix."""
    module = PreferenceModule(policy=TINY, tokenizer="byte", loss=_ClashingMetric())
    with pytest.raises(UserInputError, match=re.escape("model.loss: _ClashingMetric returned metrics named "
                                                       "['rewards/accuracies'], which the module logs itself")):
        tiny_fit(module, pairs_file, steps=1)


@pytest.mark.parametrize(("returns", "expected"), [
    (lambda c, r: -torch.nn.functional.logsigmoid(c[:, None] - r), "returned shape (4, 4); a reward loss returns one "
                                                                  "loss per pair (4,)"),  # was: trained, exit 0
    (lambda c, r: -torch.nn.functional.logsigmoid(c - r).mean(), "returned shape (); a reward loss returns one loss "
                                                                 "per pair"),  # was: trained, exit 0
    (lambda c, r: (c - r).detach(), "returned losses that do not depend on the scores"),  # was: RuntimeError
    (lambda c, r: 0.5, "returned a float; a reward loss returns one loss per pair"),  # was: AttributeError
    (lambda c, r: 1 / 0, "RewardLossPlugin.forward raised ZeroDivisionError: division by zero (at "),
])
def test_a_reward_loss_plugin_breaking_the_contract_is_one_line_naming_it(returns, expected):
    from lightning_pref.reward.losses import RewardLoss
    from lightning_pref.reward.losses.base import checked_call

    class RewardLossPlugin(RewardLoss):
        def forward(self, chosen, rejected, margin=None):
            return returns(chosen, rejected)

    chosen, rejected = torch.randn(4, requires_grad=True), torch.randn(4, requires_grad=True)
    with pytest.raises(UserInputError, match=re.escape("model.loss: RewardLossPlugin")) as info:
        checked_call(RewardLossPlugin(), chosen, rejected, None)
    assert expected in str(info.value), str(info.value)


@pytest.mark.parametrize(("returns", "expected"), [
    # per-sequence advantages broadcast along the tokens: trained with exit 0
    (lambda a: type(a)(a.advantages[:, 0], a.returns[:, 0]), "returned advantages of shape (8,); they are per "
                                                              "token, laid out like the rewards (8, 5)"),
    (lambda a: a.advantages, "returned a Tensor; an estimator returns Advantages"),  # was: a ValueError unpacking
    (lambda a: type(a)(1.0, 0.0), "returned advantages of a float"),  # was: TypeError
    (lambda a: type(a)(a.advantages * torch.nan, a.returns), "returned non-finite advantages (nan)"),  # blamed data
    (lambda a: 1 / 0, "EstimatorPlugin.__call__ raised ZeroDivisionError"),  # was: a traceback
])
def test_an_advantage_estimator_breaking_the_contract_is_one_line_naming_it(returns, expected):
    from lightning_pref.rl.advantages import AdvantageEstimator
    from lightning_pref.rl.advantages.base import checked_call
    from lightning_pref.rl.advantages.grpo import GRPO

    class EstimatorPlugin(AdvantageEstimator):
        def __call__(self, rewards, mask, group_size, values=None, reduce=None):
            return returns(GRPO()(rewards, mask, group_size))

    rewards, mask = torch.randn(8, 5), torch.ones(8, 5, dtype=torch.bool)
    with pytest.raises(UserInputError, match=re.escape("model.estimator: EstimatorPlugin")) as info:
        checked_call(EstimatorPlugin(), rewards, mask, 4, None, None)
    assert expected in str(info.value), str(info.value)


def test_reduce_lr_on_plateau_with_a_monitor_steps_on_it(tmp_path):
    """Was refused by Lightning whatever was given (the module never passed the monitor on)."""
    main(["fit", "--config", str(REPO / "configs/dpo.yaml"), "--trainer.max_epochs", "2", "--trainer.max_steps", "-1",
          "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "0", "--trainer.default_root_dir",
          str(tmp_path), "--model.scheduler", "lightning.pytorch.cli.ReduceLROnPlateau", "--model.scheduler.monitor",
          "train/loss", "--progress_bar.refresh_rate", "0"])
    checkpoint = torch.load(tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt", weights_only=False)
    state = checkpoint["lr_schedulers"][0]
    assert math.isfinite(state["best"]) and state["last_epoch"] == 2  # stepped on train/loss at each epoch's end


def test_a_default_root_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    """Was a 53-line traceback from Lightning's CSV logger."""
    (tmp_path / "afile").write_text("hi")
    line = _one_line_exit_2(capsys, ["fit", "--config", str(REPO / "configs/dpo.yaml"), "--trainer.default_root_dir",
                                     str(tmp_path / "afile")])
    assert line == f"error: trainer.default_root_dir: {tmp_path / 'afile'} is a file; a directory is written there, " \
                   "so choose another path"
    assert (tmp_path / "afile").read_text() == "hi"


def test_an_exported_model_as_ckpt_path_says_to_give_it_as_the_policy(runs, tmp_path, capsys):
    """Was "a directory, not a checkpoint; give a checkpoint in it" of a directory that has none."""
    main(["export", "--ckpt_path", str(runs["dpo"] / "checkpoints/last.ckpt"), "--output_dir", str(tmp_path / "m")])
    line = _one_line_exit_2(capsys, ["predict", "--config", str(REPO / "configs/dpo.yaml"), "--ckpt_path",
                                     str(tmp_path / "m"), "--trainer.default_root_dir", str(tmp_path / "out")])
    assert f"is a Hugging Face model directory (an export), not a training checkpoint; to train or generate from " \
           f"it give --model.policy {tmp_path / 'm'}" in line


@pytest.mark.parametrize(("text", "expected"), [
    ("model:\n\tloss: dpo\n", "c.yaml:2:1: found character '\\t' that cannot start any token (YAML indents with "
                              "spaces, not tabs)"),  # was: 'in "<unicode string>", line 2, column 1'
    ("model:\n  loss: dpo\n  loss: ipo\n", "c.yaml:3:3: key 'loss' is given twice in one mapping"),  # was: no text
    ("", "c.yaml is empty (or only comments); a config is a YAML mapping"),  # was: "Unexpected config:"
    ("# a comment\n", "c.yaml is empty (or only comments)"),
    ("- a\n- b\n", "c.yaml holds a YAML list, not a mapping of options"),  # was: "Unexpected config: - a or b"
])
def test_a_config_file_that_is_no_yaml_mapping_is_one_line_naming_it(tmp_path, capsys, text, expected):
    (tmp_path / "c.yaml").write_text(text)
    line = _one_line_exit_2(capsys, ["fit", "--config", str(REPO / "configs/dpo.yaml"), "--config",
                                     str(tmp_path / "c.yaml"), "--trainer.default_root_dir", str(tmp_path)])
    assert line.startswith(f"error: --config: {tmp_path}/") and expected in line, line


def test_a_missing_interpolation_key_is_one_line(tmp_path, capsys):
    """Was a 124-line omegaconf traceback."""
    (tmp_path / "c.yaml").write_text("model:\n  loss:\n    class_path: dpo\n    init_args:\n"
                                     "      beta: ${model.nonexistent}\n")
    line = _one_line_exit_2(capsys, ["fit", "--config", str(REPO / "configs/dpo.yaml"), "--config",
                                     str(tmp_path / "c.yaml"), "--trainer.default_root_dir", str(tmp_path)])
    assert line == "error: model.loss.beta: Interpolation key 'model.nonexistent' not found; an interpolation ${...} " \
                   "refers to a key of the same config file"


@pytest.mark.parametrize(("term_args", "expected"), [
    ("{dpo: {betta: 0.3}}", "TypeError: DPOLoss.__init__() got an unexpected keyword argument 'betta'"),
    ("{dpo: {beta: abc}}", "TypeError: '<=' not supported between instances of 'str' and 'int'"),
])
def test_a_plugin_constructor_error_names_the_option(tmp_path, capsys, term_args, expected):
    """A constructor's error other than a ValueError was its bare text ("error: 'oops'"), naming neither the option
    nor the class."""
    line = _one_line_exit_2(capsys, ["fit", "--config", str(REPO / "configs/dpo.yaml"), "--model.loss", "weighted",
                                     "--model.loss.terms", "{dpo: 1.0, nll: 0.2}", "--model.loss.term_args", term_args,
                                     "--trainer.default_root_dir", str(tmp_path)])
    assert line.startswith(f"error: model.loss: WeightedLoss.__init__ raised {expected} (at ") and line.endswith(
        "; check the class and its arguments")
