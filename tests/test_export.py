"""Export of the trained policy as a Hugging Face model directory."""

from __future__ import annotations

import glob
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_pref.cli import main
from lightning_pref.data.tokenize import encode_prompt
from lightning_pref.export import load_policy_from_checkpoint
from lightning_pref.models import load_tokenizer
from tests.support import REPO

RUN = ["--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--data.batch_size", "4"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    tmp = tmp_path_factory.mktemp("export")
    from lightning_pref.data.synthetic import generate
    from tests.support import write_jsonl

    data = write_jsonl(tmp / "pairs.jsonl", generate(16, seed=4)[0])
    main(["fit", "--config", str(REPO / "configs/dpo.yaml"), "--data.train", str(data), "--data.val", str(data),
          "--trainer.default_root_dir", str(tmp), *RUN])
    (last,) = glob.glob(str(tmp / "lightning_logs/version_0/checkpoints/last.ckpt"))
    return last


def test_exported_model_reloads_with_same_logits_and_generates(checkpoint, tmp_path):
    out = tmp_path / "aligned"
    main(["export", "--ckpt_path", checkpoint, "--output_dir", str(out)])
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    policy = load_policy_from_checkpoint(checkpoint).model.eval()
    ids = tokenizer("User: Tell me about figo.\nAssistant:", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, policy(ids).logits)
    generated = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] == ids.shape[1] + 5
    # the exported weights are the trained ones, not the initial ones
    state = torch.load(checkpoint, weights_only=False)["state_dict"]
    trained = state["policy.model.model.embed_tokens.weight"]
    assert torch.equal(model.model.embed_tokens.weight, trained)


def test_export_refuses_non_empty_dir_unless_overwrite(checkpoint, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--ckpt_path", checkpoint, "--output_dir", str(out)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.rstrip().endswith("pass --overwrite true")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    main(["export", "--ckpt_path", checkpoint, "--output_dir", str(out), *err.split("pass ")[-1].split()])  # as told
    assert (out / "config.json").is_file() and (out / "keep.txt").read_text() == "user data"


def test_export_missing_checkpoint_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["export", "--ckpt_path", str(tmp_path / "nope.ckpt"), "--output_dir", str(tmp_path / "o")])
    assert "--ckpt_path: no checkpoint file" in capsys.readouterr().err


def test_export_keeps_the_trained_dtype_unless_asked(checkpoint, tmp_path):
    """fp32 master weights export as fp32 (bf16 would round small DPO updates away); --dtype bfloat16 halves."""
    trained = torch.load(checkpoint, weights_only=False)["state_dict"]["policy.model.model.embed_tokens.weight"]
    assert trained.dtype == torch.float32
    for dtype, expected in ((None, torch.float32), ("bfloat16", torch.bfloat16)):
        out = tmp_path / str(dtype)
        main(["export", "--ckpt_path", checkpoint, "--output_dir", str(out), *(["--dtype", dtype] if dtype else [])])
        model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")  # as saved
        assert model.dtype == expected
        torch.testing.assert_close(model.model.embed_tokens.weight, trained.to(expected))


def test_exported_tokenizer_and_model_generate_what_predict_wrote(checkpoint, tmp_path, capsys):
    """A user of the exported embedded default calls its tokenizer on a prompt and generates: the prompt ids are
    the ones ``predict`` used (no ``</s>`` appended, as ``ByT5Tokenizer`` did), and greedy generation with the
    exported config's stop token gives ``predict``'s completion."""
    prompt = "User: Tell me about figo.\nAssistant:"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": prompt}) + "\n")
    predictions = tmp_path / "predictions.jsonl"
    main(["predict", "--config", str(REPO / "configs/dpo.yaml"), "--ckpt_path", checkpoint, "--data.predict",
          str(prompts), "--predictions.path", str(predictions), "--model.generation.max_new_tokens", "12"])
    assert f"predict: wrote 1 record to {predictions}" in capsys.readouterr().out
    (record,) = [json.loads(line) for line in predictions.read_text().splitlines()]
    out = tmp_path / "aligned"
    main(["export", "--ckpt_path", checkpoint, "--output_dir", str(out)])
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    assert ids[0].tolist() == encode_prompt(load_tokenizer("byte"), prompt) == [b + 3 for b in prompt.encode()]
    assert tokenizer.eos_token_id == model.config.eos_token_id and tokenizer.pad_token_id == model.config.pad_token_id
    generated = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:]
    assert tokenizer.decode(generated, skip_special_tokens=True) == record["policy"]
    assert len(generated) == record["policy_tokens"]
