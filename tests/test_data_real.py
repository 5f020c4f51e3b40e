"""The data path with a real chat tokenizer (SmolLM2-135M-Instruct, ChatML) and real text (Anthropic HH-RLHF).

SmolLM2's facts used below: pad = EOS = ``<|im_end|>`` (id 2), BOS ``<|im_start|>`` (id 1) is not added by
``tokenizer("x")``, an assistant turn renders as ``content<|im_end|>\\n`` ("\\n" is id 198), and a conversation
without a system turn gets the template's default one.
"""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from transformers import AutoTokenizer

from lightning_pref.data import PreferenceDataModule
from lightning_pref.errors import UserInputError
from tests.real import hh_file, hh_records
from tests.support import write_jsonl

IM_START, IM_END, NEWLINE = 1, 2, 198
DEFAULT_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


@pytest.fixture(scope="module")
def smol(smollm2):
    return AutoTokenizer.from_pretrained(smollm2)


def load(tmp_path, tokenizer, records, **kwargs) -> PreferenceDataModule:
    dm = PreferenceDataModule(train=str(write_jsonl(tmp_path / "d.jsonl", records)), tokenizer=tokenizer,
                              cache=False, **kwargs)
    dm.setup("fit")
    return dm


def template_ids(tokenizer, messages, generation_prompt=False) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt)
    return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)  # a BatchEncoding in transformers 5


def text_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_chatml_response_ends_with_one_im_end(tmp_path, smol):
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    chosen = [{"role": "assistant", "content": "Paris."}]
    rejected = [{"role": "assistant", "content": "Lyon, I think."}]
    example = load(tmp_path, smol, [{"prompt": prompt, "chosen": chosen, "rejected": rejected}]).datasets["train"][0]
    for response, ids in ((chosen, example.chosen), (rejected, example.rejected)):
        full = template_ids(smol, prompt + response)
        assert full[-2:] == [IM_END, NEWLINE]  # the template's turn ends "<|im_end|>\n"
        assert example.prompt == full[: len(example.prompt)]  # the prompt is an exact prefix of the rendering
        assert example.prompt + ids == full[:-1]  # the response: the template's tokens up to its own <|im_end|>
        assert ids[-1] == IM_END and ids.count(IM_END) == 1 and NEWLINE not in ids[-1:]
    assert example.prompt[:1] == [IM_START] and example.prompt[1:2] != [IM_START]  # BOS once
    assert smol.decode(example.prompt).startswith(DEFAULT_SYSTEM)
    assert smol.decode(example.chosen) == "Paris.<|im_end|>"


def test_hh_transcripts_with_a_chat_template(tmp_path, smol):
    # Records whose chosen and rejected differ only in the last assistant turn: the response is that turn's text.
    records = [r for r in hh_records(40) if r["chosen"].rsplit("\n\nAssistant:", 1)[0]
               == r["rejected"].rsplit("\n\nAssistant:", 1)[0]]
    dm = load(tmp_path, smol, records, max_length=100_000)
    assert dm.stats["train"].format == "implicit_prompt (HH transcript)" and dm.stats["train"].kept == len(records)
    for i, record in enumerate(records):
        example = dm.datasets["train"][i]
        prompt = smol.decode(example.prompt)
        assert prompt.endswith("<|im_start|>assistant\n")
        first_question = record["chosen"].split("\n\nAssistant:")[0].removeprefix("\n\nHuman:").strip()
        assert prompt.startswith(f"{DEFAULT_SYSTEM}<|im_start|>user\n{first_question}<|im_end|>\n")  # a user turn
        for key, ids in (("chosen", example.chosen), ("rejected", example.rejected)):
            last_turn = record[key].rsplit("\n\nAssistant:", 1)[1].strip()
            assert smol.decode(ids) == last_turn + "<|im_end|>" and ids.count(IM_END) == 1


LONG = [
    {"role": role, "content": f"{'Question' if role == 'user' else 'Answer'} {i}: " + "many words here " * 6}
    for i in range(8) for role in ("user", "assistant")
]


@pytest.mark.parametrize("system", [None, "Answer in one word.", "Be brief. " * 30])
def test_truncation_keeps_the_system_header_and_the_end(tmp_path, smol, system):
    prompt = ([{"role": "system", "content": system}] if system else []) + LONG[:-1]  # ends with a user turn
    record = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "Yes."}],
              "rejected": [{"role": "assistant", "content": "No."}]}
    example = load(tmp_path, smol, [record], max_prompt_length=64).datasets["train"][0]
    full = template_ids(smol, prompt, generation_prompt=True)
    header = text_ids(smol, (f"<|im_start|>system\n{system}<|im_end|>\n" if system else DEFAULT_SYSTEM)
                      + "<|im_start|>user\n")
    assert len(full) > 200 and len(example.prompt) == 64
    if len(header) <= 32:  # the header fits in half the prompt: kept whole, then the prompt's end
        assert example.prompt == header + full[len(full) - (64 - len(header)) :]
    else:  # a system turn longer than half the budget: BOS (<|im_start|>) and the end only
        assert system and len(header) > 32
        assert example.prompt == [IM_START, *full[len(full) - 63 :]]
    assert smol.decode(example.prompt).endswith("<|im_start|>user\n" + LONG[-2]["content"] + "<|im_end|>\n"
                                                "<|im_start|>assistant\n")


def test_hh_file_on_invalid_drop_and_error(smol, capsys):
    path = str(hh_file())  # 2,312 records; 4 have a chosen whose last "Assistant:" turn is empty
    dm = PreferenceDataModule(train=path, tokenizer=smol, on_invalid="drop", cache=False)
    dm.setup("fit")
    stats = dm.stats["train"]
    assert stats.format == "implicit_prompt (HH transcript)"
    assert stats.kept == 2308 and stats.dropped == {"empty response": 4}
    err = capsys.readouterr().err
    for lineno in (87, 517, 926, 1104):
        assert f"{path}:{lineno}: the chosen response has no text" in err
    with pytest.raises(UserInputError, match=rf"^{path}:87: the chosen response has no text"):
        PreferenceDataModule(train=path, tokenizer=smol, cache=False).setup("fit")
