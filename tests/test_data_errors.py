"""Bad input: each problem is one UserInputError naming the file, the line/row and the field."""

from __future__ import annotations

import io
import json
import warnings

import pytest
from rich.console import Console

from lightning_pref.data import PreferenceDataModule
from lightning_pref.data.stats import summary_table
from lightning_pref.errors import UserInputError
from lightning_pref.models import load_tokenizer
from tests.test_data_formats import TEMPLATE, train_bpe

GOOD = {"prompt": "p", "chosen": "yes", "rejected": "no"}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_PREF_CACHE", str(tmp_path / "cache"))


def setup_error(tmp_path, tokenizer, lines: list[str], **kwargs) -> str:
    """Write ``lines`` as bad.jsonl, set up a data module on it and return the error message."""
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    dm = PreferenceDataModule(train=str(path), tokenizer=tokenizer, **kwargs)
    with pytest.raises(UserInputError) as err:
        dm.setup("fit")
    message = str(err.value)
    assert "\n" not in message
    return message


def rows(*records) -> list[str]:
    return [json.dumps(r) for r in records]


@pytest.mark.parametrize("name", ["missing.jsonl", "missing.parquet", "./data_dir"])
def test_missing_file(tmp_path, tokenizer, name):
    dm = PreferenceDataModule(train=str(tmp_path / name), tokenizer=tokenizer)
    with pytest.raises(UserInputError, match=r"data.train: (file not found|cannot load).*" + name.lstrip("./")):
        dm.setup("fit")


def test_malformed_json_line_number(tmp_path, tokenizer):
    message = setup_error(tmp_path, tokenizer, [*rows(GOOD, GOOD), '{"prompt": "p", "chosen": oops}'])
    assert "bad.jsonl:3: invalid JSON" in message


def test_missing_column_lists_columns_and_expected(tmp_path, tokenizer):
    message = setup_error(tmp_path, tokenizer, rows({"question": "q", "answer": "a"}))
    assert "bad.jsonl" in message and "['question', 'answer']" in message
    assert "prompt/chosen/rejected" in message and "data.columns" in message


def test_misnamed_column_in_mapping(tmp_path, tokenizer):
    message = setup_error(tmp_path, tokenizer, rows(GOOD), columns={"prompt": "question"})
    assert "bad.jsonl: data.columns maps {'prompt': 'question'} but there is no such column" in message
    assert "the columns are ['prompt', 'chosen', 'rejected']" in message


def test_column_missing_on_a_later_line(tmp_path, tokenizer):
    message = setup_error(tmp_path, tokenizer, rows(GOOD, {"prompt": "p", "chosen": "c"}))
    assert "bad.jsonl:2: missing field 'rejected'" in message


def test_unknown_mapping_key(tmp_path, tokenizer):
    assert "data.columns: unknown field(s) ['answer']" in setup_error(
        tmp_path, tokenizer, rows(GOOD), columns={"answer": "x"}
    )


@pytest.mark.parametrize(
    ("value", "kind"), [(3, "a number"), (None, "null"), (["a"], "a list"), ({"text": "a"}, "an object")]
)
def test_wrong_type(tmp_path, tokenizer, value, kind):
    message = setup_error(tmp_path, tokenizer, rows(GOOD, {**GOOD, "rejected": value}))
    assert f"bad.jsonl:2: field 'rejected' must be a string, got {kind}" in message


def test_wrong_type_names_the_users_column(tmp_path, tokenizer):
    message = setup_error(tmp_path, tokenizer, rows({"q": 1, "chosen": "a", "rejected": "b"}), columns={"prompt": "q"})
    assert "bad.jsonl:1: field 'q' (data.columns prompt) must be a string, got a number" in message


@pytest.mark.parametrize("key", ["prompt", "chosen"])
def test_empty_prompt_or_response(tmp_path, tokenizer, key):
    message = setup_error(tmp_path, tokenizer, rows(GOOD, {**GOOD, key: "  "}))
    assert f"bad.jsonl:2: field {key!r} is empty" in message


def test_bad_message_list(tmp_path, tokenizer):
    tokenizer.chat_template = TEMPLATE
    record = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant"}],
              "rejected": [{"role": "assistant", "content": "b"}]}
    try:
        message = setup_error(tmp_path, tokenizer, rows(record))
    finally:
        tokenizer.chat_template = None
    assert "bad.jsonl:1: field 'chosen'[0] must be a message" in message


def test_identical_pair_warns_and_counts_by_default(tmp_path, tokenizer, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(line + "\n" for line in rows(GOOD, {**GOOD, "rejected": "yes"})))
    dm = PreferenceDataModule(train=str(path), tokenizer=tokenizer)
    dm.setup("fit")
    assert dm.stats["train"].kept == 1 and dm.stats["train"].dropped == {"identical": 1}
    assert "identical" in capsys.readouterr().err
    kept = PreferenceDataModule(train=str(path), tokenizer=tokenizer, on_identical="keep")
    kept.setup("fit")
    assert kept.stats["train"].kept == 2


def test_identical_pair_error_on_request(tmp_path, tokenizer):
    message = setup_error(tmp_path, tokenizer, rows(GOOD, {**GOOD, "rejected": "yes"}), on_identical="error")
    assert "bad.jsonl:2: chosen and rejected are identical" in message


def test_label_not_boolean(tmp_path, tokenizer):
    message = setup_error(tmp_path, tokenizer, rows({"prompt": "p", "completion": "c", "label": 1}))
    assert "bad.jsonl:1: field 'label' must be true or false, got a number" in message


def test_split_empty_after_filtering(tmp_path, tokenizer):
    message = setup_error(tmp_path, tokenizer, rows({**GOOD, "rejected": "yes"}))
    assert "data.train: no examples left in" in message and "1 identical of 1 dropped" in message


def test_every_example_dropped_by_truncation(tmp_path, tokenizer):
    # One token left: the prompt is cut away and both responses come out as "y", the same tokens: no signal.
    same_start = {"prompt": "p", "chosen": "yes", "rejected": "yep"}
    message = setup_error(tmp_path, tokenizer, rows(same_start, same_start), max_length=1)
    assert "data.train: all 2 examples of" in message and "dropped by truncation" in message
    assert "raise data.max_length" in message


def test_implicit_prompt_with_nothing_shared(tmp_path, tokenizer):
    message = setup_error(tmp_path, tokenizer, rows({"chosen": "abc", "rejected": "xyz"}))
    assert "bad.jsonl:1: chosen and rejected share no prefix" in message


def test_conversational_without_chat_template(tmp_path, tokenizer):
    record = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}],
              "rejected": [{"role": "assistant", "content": "b"}]}
    message = setup_error(tmp_path, tokenizer, rows(record))
    assert "bad.jsonl" in message and "has no chat template" in message


def test_no_pad_token(tmp_path):
    tokenizer = train_bpe(pad=False)
    with pytest.raises(UserInputError, match="data.tokenizer: .* has no pad token"):
        PreferenceDataModule(tokenizer=tokenizer)
    tokenizer.save_pretrained(tmp_path / "tok")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_tokenizer(str(tmp_path / "tok"))
    assert loaded.pad_token == loaded.eos_token == "</s>"
    assert any("no pad token" in str(w.message) for w in caught)


def test_val_fraction_with_val_is_an_error(tokenizer):
    with pytest.raises(UserInputError, match="data.val_fraction: give data.val or data.val_fraction"):
        PreferenceDataModule(train="a.jsonl", val="b.jsonl", val_fraction=0.1, tokenizer=tokenizer)


def test_csv_label_strings_name_the_row(tmp_path, tokenizer):
    path = tmp_path / "kto.csv"
    path.write_text("prompt,completion,label\np,good,true\np,bad,maybe\n")
    dm = PreferenceDataModule(train=str(path), tokenizer=tokenizer)
    with pytest.raises(UserInputError, match=r"kto.csv:row 1: field 'label' must be true or false, got str"):
        dm.setup("fit")


@pytest.mark.parametrize(("text", "expected"), [
    ("prompt,chosen,rejected\na,b,c\nd,e,f\ng,h,i,j\n", "cannot read {path} as csv: Error tokenizing data. C error: "
                                                          "Expected 3 fields in line 4, saw 4"),
    ("", "{path} contains no records"),
    ("prompt,chosen,rejected\n", "{path} contains no records"),
])
def test_an_unreadable_or_empty_csv_says_why(tmp_path, tokenizer, text, expected):
    """Was: "An error occurred while generating the dataset" (datasets' wrapper of the reader's error, which names
    the line), and for a header-only file 'Instruction "train" corresponds to no data!'."""
    path = tmp_path / "pairs.csv"
    path.write_text(text)
    dm = PreferenceDataModule(train=str(path), tokenizer=tokenizer, cache=False)
    with pytest.raises(UserInputError) as info:
        dm.setup("fit")
    assert str(info.value) == "data.train: " + expected.format(path=path)


def test_unknown_sharegpt_speaker(tmp_path, tokenizer):
    tokenizer.chat_template = TEMPLATE
    record = {"prompt": [{"from": "human", "value": "hi"}], "chosen": [{"from": "bot", "value": "a"}],
              "rejected": [{"from": "gpt", "value": "b"}]}
    try:
        message = setup_error(tmp_path, tokenizer, rows(record))
    finally:
        tokenizer.chat_template = None
    assert "bad.jsonl:1: field 'chosen'[0] has ShareGPT speaker 'bot'; expected one of ['human', 'gpt', 'system']" in message


def test_hh_transcript_that_does_not_parse(tmp_path, tokenizer):
    tokenizer.chat_template = TEMPLATE
    good = {"chosen": "\n\nHuman: hi\n\nAssistant: yes", "rejected": "\n\nHuman: hi\n\nAssistant: no"}
    try:
        no_turns = setup_error(tmp_path, tokenizer, rows(good, {**good, "rejected": "User: hi. Bot: no"}))
        last_human = setup_error(tmp_path, tokenizer, rows({**good, "chosen": good["chosen"] + "\n\nHuman: ok?"}),
                                 transcript="hh")
    finally:
        tokenizer.chat_template = None
    assert "bad.jsonl:2: field 'rejected' is not an HH transcript: it has text before its first 'Human:'" in no_turns
    assert "set data.transcript: none" in no_turns
    assert "bad.jsonl:1: field 'chosen' is not an HH transcript ending with an 'Assistant:' turn" in last_human


def test_transcript_hh_on_data_with_a_prompt_column(tmp_path, tokenizer):
    message = setup_error(tmp_path, tokenizer, rows(GOOD), transcript="hh")
    assert "data.transcript hh needs chosen/rejected transcript strings" in message and "data is standard" in message


def test_unpaired_conversation_not_ending_with_the_assistant(tmp_path, tokenizer):
    tokenizer.chat_template = TEMPLATE
    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"},
                           {"role": "user", "content": "bye"}], "label": True}
    try:
        message = setup_error(tmp_path, tokenizer, rows(record))
    finally:
        tokenizer.chat_template = None
    assert "bad.jsonl:1: field 'messages' must end with the assistant message to score (the completion)" in message


BAD_ROWS = [GOOD, {**GOOD, "rejected": 3}, {**GOOD, "prompt": " "}, {"prompt": "p", "chosen": "c"},
            {**GOOD, "chosen": None}, GOOD]


def test_on_invalid_drop_skips_and_counts_by_reason(tmp_path, tokenizer, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(line + "\n" for line in rows(*BAD_ROWS)))
    dm = PreferenceDataModule(train=str(path), tokenizer=tokenizer, on_invalid="drop")
    dm.setup("fit")
    assert dm.stats["train"].kept == 2
    assert dm.stats["train"].dropped == {"wrong type": 2, "empty field": 1, "missing field": 1}
    err = capsys.readouterr().err
    assert "dropped 4 rows of" in err and "2 wrong type, 1 empty field, 1 missing field" in err
    for lineno in (2, 3, 4, 5):  # each dropped row's location, once
        assert err.count(f"d.jsonl:{lineno}:") == 1
    table = Console(width=200, record=True, file=io.StringIO())
    table.print(summary_table(dm.stats))
    assert "│ 2 wrong type, 1 empty field, 1 missing field │" in table.export_text()  # the summary's dropped column


def test_on_invalid_error_stops_at_the_first_bad_row(tmp_path, tokenizer):
    message = setup_error(tmp_path, tokenizer, rows(*BAD_ROWS))
    assert "bad.jsonl:2: field 'rejected' must be a string, got a number" in message
    assert message.endswith("(or set data.on_invalid: drop to skip such rows)")


def test_on_invalid_drop_split_left_empty_still_fails(tmp_path, tokenizer):
    message = setup_error(tmp_path, tokenizer, rows(*BAD_ROWS[1:5]), on_invalid="drop")
    assert "data.train: no examples left in" in message and "2 wrong type, 1 empty field, 1 missing field of 4" in message
    assert "the first invalid one: " in message and "bad.jsonl:1: field 'rejected' must be a string" in message


def test_on_invalid_drop_still_stops_on_source_errors(tmp_path, tokenizer):
    record = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}],
              "rejected": [{"role": "assistant", "content": "b"}]}
    assert "has no chat template" in setup_error(tmp_path, tokenizer, rows(record), on_invalid="drop")
    assert "cannot tell the data format" in setup_error(tmp_path, tokenizer, rows({"q": "a"}), on_invalid="drop")
    assert "bad.jsonl:2: invalid JSON" in setup_error(tmp_path, tokenizer, [*rows(GOOD), "{oops"], on_invalid="drop")


def test_template_that_cannot_render_a_row(tmp_path, tokenizer, capsys):
    # Refuses two user turns in a row, as templates that demand alternating roles do.
    tokenizer.chat_template = (
        "{% for m in messages %}{% if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]['role'] %}"
        "{{ raise_exception('roles must alternate') }}{% endif %}" + TEMPLATE.split("{% for m in messages %}", 1)[1]
    )
    answer = {"chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}
    good = {"prompt": [{"role": "user", "content": "hi"}], **answer}
    bad = {"prompt": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}], **answer}
    try:
        message = setup_error(tmp_path, tokenizer, rows(good, bad))
        path = tmp_path / "d.jsonl"
        path.write_text("".join(line + "\n" for line in rows(good, bad)))
        dm = PreferenceDataModule(train=str(path), tokenizer=tokenizer, on_invalid="drop")
        dm.setup("fit")
    finally:
        tokenizer.chat_template = None
    assert "bad.jsonl:2: the chat template cannot render this conversation: roles must alternate" in message
    assert dm.stats["train"].kept == 1 and dm.stats["train"].dropped == {"template error": 1}
    assert "d.jsonl:2: the chat template cannot render" in capsys.readouterr().err


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "gzip"])
def test_a_jsonl_file_in_another_encoding_says_which(tmp_path, tokenizer, encoding):
    """A BOM is read past, as in CSV (was: 'invalid JSON (Unexpected UTF-8 BOM (decode using utf-8-sig))'); UTF-16
    and gzip without .gz name themselves (were: 'not UTF-8 text ... iconv -f latin1', the wrong fix)."""
    import gzip

    text = "".join(json.dumps({"prompt": f"p{i}", "chosen": "a", "rejected": "b"}) + "\n" for i in range(2))
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(gzip.compress(text.encode()) if encoding == "gzip" else text.encode(encoding))
    dm = PreferenceDataModule(train=str(path), tokenizer=tokenizer, cache=False, val=None)
    if encoding == "utf-8-sig":
        dm.setup("fit")
        assert dm.stats["train"].kept == 2
        return
    expected = {"utf-16": "UTF-16 text, not UTF-8 JSON lines; save it as UTF-8 (e.g. iconv -f utf-16 -t utf-8)",
                "gzip": "gzip-compressed, not UTF-8 JSON lines; name it pairs.jsonl.gz, or decompress it"}[encoding]
    with pytest.raises(UserInputError) as info:
        dm.setup("fit")
    assert str(info.value) == f"{path}: {expected}"
