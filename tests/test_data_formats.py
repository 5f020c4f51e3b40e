"""Data formats (standard, conversational, implicit prompt, unpaired, unpair, column mapping), seam correctness
with a BPE and a byte-level tokenizer, and truncation."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from lightning_pref.data import PreferenceDataModule
from lightning_pref.data.tokenize import split_shared_text
from lightning_pref.errors import UserInputError
from tests.support import write_jsonl

#: A minimal chat template: each turn is ``<|role|>content</s>``; the generation prompt is ``<|assistant|>``.
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SENTENCES = [
    "hello world", "say hello to the model", "the model says hello", "yellow fellow mellow hello",
    "Human: hi there", "Assistant: Sure thing", "Assistant: No way", "what is the weather like today",
]


def train_bpe(pad: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 style) trained on a few sentences, adding BOS like Llama does."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(SENTENCES * 4, trainer)
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    extra = {"pad_token": "<pad>"} if pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", **extra)


@pytest.fixture(scope="module")
def bpe() -> PreTrainedTokenizerFast:
    return train_bpe()


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_PREF_CACHE", str(tmp_path / "cache"))


def load(tmp_path, tokenizer, records, **kwargs) -> PreferenceDataModule:
    dm = PreferenceDataModule(train=str(write_jsonl(tmp_path / "d.jsonl", records)), tokenizer=tokenizer, **kwargs)
    dm.setup("fit")
    return dm


def decoded(tokenizer, ids) -> str:
    return tokenizer.decode(ids, clean_up_tokenization_spaces=False)


def test_standard_format_detected(tmp_path, tokenizer):
    dm = load(tmp_path, tokenizer, [{"prompt": "Q: 1+1?", "chosen": " 2", "rejected": " 3"}])
    example = dm.datasets["train"][0]
    assert dm.stats["train"].format == "standard" and dm.stats["train"].kept == 1
    assert decoded(tokenizer, example.prompt) == "Q: 1+1?"
    assert decoded(tokenizer, example.chosen) == " 2</s>" and decoded(tokenizer, example.rejected) == " 3</s>"


@pytest.mark.parametrize("name", ["bpe", "byte"])
def test_seam_no_merge_across_prompt_and_response(tmp_path, bpe, tokenizer, name):
    tok = bpe if name == "bpe" else tokenizer
    dm = load(tmp_path, tok, [{"prompt": "Say hel", "chosen": "lo", "rejected": "lo world"}])
    example = dm.datasets["train"][0]
    standalone = tok("lo", add_special_tokens=False)["input_ids"]
    assert example.chosen == [*standalone, tok.eos_token_id]  # the response's own tokens, EOS once
    assert decoded(tok, example.chosen) == "lo" + tok.eos_token
    assert decoded(tok, example.rejected) == "lo world" + tok.eos_token
    if name == "bpe":
        assert example.prompt[:1] == [tok.bos_token_id] and example.prompt.count(tok.bos_token_id) == 1
        # The test bites: tokenized together, "hel" + "lo" merge into one token that crosses the seam.
        joint = tok("Say hello", add_special_tokens=False)["input_ids"]
        assert joint != example.prompt[1:] + standalone


@pytest.mark.parametrize("name", ["bpe", "byte"])
def test_conversational_rendered_with_chat_template(tmp_path, bpe, tokenizer, name):
    tok = bpe if name == "bpe" else tokenizer
    tok.chat_template = TEMPLATE
    try:
        dm = load(tmp_path, tok, [{
            "prompt": [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"}],
            "chosen": [{"role": "assistant", "content": "hello"}],
            "rejected": [{"role": "assistant", "content": "go away"}],
        }])
    finally:
        tok.chat_template = None
    example = dm.datasets["train"][0]
    assert dm.stats["train"].format == "conversational"
    assert decoded(tok, example.prompt).endswith("<|system|>be kind</s><|user|>hi</s><|assistant|>")
    # The template already ends the turn with EOS, so no second EOS is appended.
    assert decoded(tok, example.chosen) == "hello</s>" and example.chosen.count(tok.eos_token_id) == 1
    assert decoded(tok, example.rejected) == "go away</s>"


def test_chat_template_that_rewrites_the_prompt_is_an_error(tmp_path, tokenizer):
    # Renders assistant turns as <|bot|> but the generation prompt as <|assistant|>: no common prefix.
    tokenizer.chat_template = TEMPLATE.replace("<|{{ m['role'] }}|>", "{% if m['role'] == 'assistant' %}<|bot|>"
                                               "{% else %}<|{{ m['role'] }}|>{% endif %}")
    records = [{"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}],
                "rejected": [{"role": "assistant", "content": "b"}]}]
    with pytest.raises(UserInputError, match=r"d.jsonl:1: the chat template's rendering of prompt \+ chosen"):
        load(tmp_path, tokenizer, records)


def test_implicit_prompt_text_cut_at_token_boundary(tmp_path, bpe):
    chosen = "\n\nHuman: hi there\n\nAssistant: Sure thing"
    rejected = "\n\nHuman: hi there\n\nAssistant: No way"
    dm = load(tmp_path, bpe, [{"chosen": chosen, "rejected": rejected}])
    example = dm.datasets["train"][0]
    assert dm.stats["train"].format == "implicit_prompt"
    prompt = decoded(bpe, example.prompt[1:])  # after BOS
    assert chosen.startswith(prompt) and rejected.startswith(prompt) and prompt.endswith("Assistant:")
    # Cut between tokens of both texts: prompt tokens + response tokens == each text's own tokenization.
    for text, ids in ((chosen, example.chosen), (rejected, example.rejected)):
        assert example.prompt[1:] + ids[:-1] == bpe(text, add_special_tokens=False)["input_ids"]
        assert decoded(bpe, ids) == text[len(prompt) :] + "</s>"


def test_implicit_prompt_never_splits_a_byte_character(tokenizer):
    # "é" and "è" share their first UTF-8 byte: the common byte prefix ends inside a character.
    assert split_shared_text(tokenizer, "Rate: é", "Rate: è") == ("Rate: ", "é", "è")


def test_implicit_prompt_conversation_split_at_message_boundary(tmp_path, tokenizer):
    tokenizer.chat_template = TEMPLATE
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"},
             {"role": "user", "content": "joke?"}]
    try:
        dm = load(tmp_path, tokenizer, [{"chosen": [*turns, {"role": "assistant", "content": "sure"}],
                                         "rejected": [*turns, {"role": "assistant", "content": "no"}]}])
    finally:
        tokenizer.chat_template = None
    example = dm.datasets["train"][0]
    assert dm.stats["train"].format == "implicit_prompt (conversational)"
    assert decoded(tokenizer, example.prompt) == "<|user|>hi</s><|assistant|>hey</s><|user|>joke?</s><|assistant|>"
    assert decoded(tokenizer, example.chosen) == "sure</s>" and decoded(tokenizer, example.rejected) == "no</s>"


def test_unpaired_kto(tmp_path, tokenizer):
    records = [{"prompt": "p1", "completion": "good", "label": True},
               {"prompt": "p2", "completion": "bad", "label": False}]
    dm = load(tmp_path, tokenizer, records, batch_size=2)
    assert dm.stats["train"].format == "unpaired"
    batch = next(iter(dm.train_dataloader()))
    assert not batch.paired and batch.num_chosen == 1 and batch.num_rejected == 1


def test_unpaired_conversational(tmp_path, tokenizer):
    tokenizer.chat_template = TEMPLATE
    records = [{"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": c}],
                "label": c == "hello"} for c in ("hello", "go away")]
    try:
        dm = load(tmp_path, tokenizer, records)
    finally:
        tokenizer.chat_template = None
    assert dm.stats["train"].format == "unpaired (conversational)"
    examples = [dm.datasets["train"][i] for i in range(2)]
    assert [decoded(tokenizer, e.chosen) for e in examples] == ["hello</s>", "go away</s>"]
    assert [e.label for e in examples] == [True, False]


def test_unpair_turns_each_pair_into_two_examples(tmp_path, tokenizer):
    records = [{"prompt": f"p{i}", "chosen": "yes", "rejected": "no"} for i in range(3)]
    dm = load(tmp_path, tokenizer, records, unpair=True, batch_size=6)
    examples = [dm.datasets["train"][i] for i in range(len(dm.datasets["train"]))]
    assert dm.stats["train"].kept == 6 and [e.label for e in examples] == [True, False] * 3
    assert all(e.rejected is None for e in examples)
    batch = next(iter(dm.train_dataloader()))
    assert not batch.paired and batch.num_chosen == 3 and batch.num_rejected == 3


def test_columns_remapped(tmp_path, tokenizer):
    records = [{"question": "Q", "response_j": "good", "response_k": "bad", "extra": 1}]
    dm = load(tmp_path, tokenizer, records, columns={"prompt": "question", "chosen": "response_j",
                                                     "rejected": "response_k"})
    assert decoded(tokenizer, dm.datasets["train"][0].chosen) == "good</s>"


def test_format_override(tmp_path, tokenizer):
    # With format implicit_prompt the prompt column is ignored and the prompt comes from the shared prefix.
    records = [{"prompt": "ignored", "chosen": "Q: x A: yes", "rejected": "Q: x A: no"}]
    dm = load(tmp_path, tokenizer, records, format="implicit_prompt")
    assert decoded(tokenizer, dm.datasets["train"][0].prompt) == "Q: x A: "


def test_truncation_rules(tmp_path, tokenizer):
    records = [
        {"prompt": "p" * 20, "chosen": "c" * 10, "rejected": "r" * 3},
        {"prompt": "q" * 30, "chosen": "ok", "rejected": "no"},
    ]
    dm = load(tmp_path, tokenizer, records, max_length=16, max_prompt_length=12)
    first, second = dm.datasets["train"][0], dm.datasets["train"][1]
    # First: the prompt is cut to max_prompt_length=12, then further but not below 16 // 2 = 8 tokens to make
    # room for the 11-token chosen; responses keep their start, the prompt its end.
    assert first.prompt == tokenizer("p" * 8, add_special_tokens=False)["input_ids"]
    assert first.chosen == tokenizer("c" * 8, add_special_tokens=False)["input_ids"]
    assert decoded(tokenizer, first.rejected) == "rrr</s>"
    # Second: only max_prompt_length applies.
    assert len(second.prompt) == 12 and decoded(tokenizer, second.chosen) == "ok</s>"
    assert dm.stats["train"].kept == 2 and dm.stats["train"].length_max == 16


def test_pair_identical_after_truncation_is_dropped_and_counted(tmp_path, tokenizer):
    records = [{"prompt": "p", "chosen": "same start, then A", "rejected": "same start, then B"},
               {"prompt": "q", "chosen": "A", "rejected": "B"}]
    dm = load(tmp_path, tokenizer, records, max_length=8)
    assert dm.stats["train"].kept == 1 and dm.stats["train"].dropped == {"truncated": 1}


def chat_template(end_of_turn: str) -> str:
    """ChatML-shaped: ``<|im_start|>role\\ncontent`` + ``end_of_turn`` per turn."""
    return (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}" + end_of_turn + "{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


PAIR = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello"}],
        "rejected": [{"role": "assistant", "content": "go away"}]}


@pytest.mark.parametrize(
    ("end_of_turn", "chosen"),
    [
        ("</s>\n", "hello</s>"),  # ChatML: end-of-turn (here EOS) then a newline; the newline is not scored
        ("<end_of_turn>\n", "hello<end_of_turn>"),  # Gemma: the end-of-turn is not EOS; no EOS is added after it
        ("", "hello</s>"),  # nothing after the content: EOS appended once, as for plain text
        ("\n\n", "hello</s>"),  # only whitespace after the content: not scored, EOS appended
    ],
)
def test_response_ends_with_the_templates_end_of_turn(tmp_path, bpe, end_of_turn, chosen):
    # The BPE, not ByT5: ByT5's "</s>" swallows the whitespace next to it, which would hide the newline.
    bpe.chat_template = chat_template(end_of_turn)
    try:
        example = load(tmp_path, bpe, [PAIR]).datasets["train"][0]
    finally:
        bpe.chat_template = None
    assert example.prompt[:1] == [bpe.bos_token_id] and example.prompt.count(bpe.bos_token_id) == 1
    assert decoded(bpe, example.prompt[1:]) == "<|im_start|>user\nhi" + end_of_turn + "<|im_start|>assistant\n"
    assert decoded(bpe, example.chosen) == chosen and example.chosen.count(bpe.eos_token_id) == chosen.count("</s>")
    assert decoded(bpe, example.rejected) == chosen.replace("hello", "go away")


def test_sharegpt_messages_and_single_message_objects(tmp_path, tokenizer):
    # LLaMA-Factory's ShareGPT preference layout: the prompt as "conversations", chosen/rejected one message each.
    sharegpt = {"conversations": [{"from": "system", "value": "be kind"}, {"from": "human", "value": "hi"}],
                "chosen": {"from": "gpt", "value": "hello"}, "rejected": {"from": "gpt", "value": "go away"}}
    single = {"prompt": [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"}],
              "chosen": {"role": "assistant", "content": "hello"}, "rejected": {"role": "assistant", "content": "go away"}}
    tokenizer.chat_template = TEMPLATE
    try:
        a = load(tmp_path, tokenizer, [sharegpt], columns={"prompt": "conversations"})
        b = load(tmp_path, tokenizer, [single])
    finally:
        tokenizer.chat_template = None
    for dm in (a, b):
        example = dm.datasets["train"][0]
        assert dm.stats["train"].format == "conversational"
        assert decoded(tokenizer, example.prompt) == "<|system|>be kind</s><|user|>hi</s><|assistant|>"
        assert decoded(tokenizer, example.chosen) == "hello</s>" and decoded(tokenizer, example.rejected) == "go away</s>"


HH_CHOSEN = "\n\nHuman: hi\n\nAssistant: hey there\n\nHuman: a joke?\n\nAssistant: Sure: knock knock."
HH_REJECTED = "\n\nHuman: hi\n\nAssistant: hey there\n\nHuman: a joke?\n\nAssistant: No."


def test_hh_transcript_becomes_a_conversation(tmp_path, tokenizer):
    tokenizer.chat_template = TEMPLATE
    try:
        dm = load(tmp_path, tokenizer, [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}])
    finally:
        tokenizer.chat_template = None
    example = dm.datasets["train"][0]
    assert dm.stats["train"].format == "implicit_prompt (HH transcript)"
    assert decoded(tokenizer, example.prompt) == "<|user|>hi</s><|assistant|>hey there</s><|user|>a joke?</s><|assistant|>"
    assert decoded(tokenizer, example.chosen) == "Sure: knock knock.</s>" and decoded(tokenizer, example.rejected) == "No.</s>"


@pytest.mark.parametrize("case", ["no template", "transcript none"])
def test_hh_transcript_stays_text_without_template_or_when_off(tmp_path, tokenizer, case):
    tokenizer.chat_template = TEMPLATE if case == "transcript none" else None
    try:
        dm = load(tmp_path, tokenizer, [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}],
                  transcript="none" if case == "transcript none" else "auto")
    finally:
        tokenizer.chat_template = None
    example = dm.datasets["train"][0]
    assert dm.stats["train"].format == "implicit_prompt"
    assert decoded(tokenizer, example.prompt) == HH_CHOSEN[: -len("Sure: knock knock.")]  # the shared text
    assert decoded(tokenizer, example.chosen) == "Sure: knock knock.</s>"


def test_unpaired_conversation_last_assistant_turn_is_the_completion(tmp_path, tokenizer):
    records = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"},
                             {"role": "user", "content": "bye"}, {"role": "assistant", "content": c}], "label": ok}
               for c, ok in (("see you", True), ("whatever", False))]
    tokenizer.chat_template = TEMPLATE
    try:
        dm = load(tmp_path, tokenizer, records)
    finally:
        tokenizer.chat_template = None
    assert dm.stats["train"].format == "unpaired (conversational)"
    examples = [dm.datasets["train"][i] for i in range(2)]
    assert decoded(tokenizer, examples[0].prompt) == "<|user|>hi</s><|assistant|>hey</s><|user|>bye</s><|assistant|>"
    assert [decoded(tokenizer, e.chosen) for e in examples] == ["see you</s>", "whatever</s>"]
    assert [e.label for e in examples] == [True, False] and examples[0].rejected is None


def test_implicit_conversation_parting_at_a_user_turn_starts_the_responses_at_an_assistant_turn(tmp_path, tokenizer):
    def turns(question, answer):
        return [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"},
                {"role": "user", "content": question}, {"role": "assistant", "content": answer}]

    tokenizer.chat_template = TEMPLATE
    try:
        dm = load(tmp_path, tokenizer, [{"chosen": turns("joke?", "sure"), "rejected": turns("poem?", "no")}])
    finally:
        tokenizer.chat_template = None
    example = dm.datasets["train"][0]
    # Shared: [hi, hey]; the cut backs off to before the shared assistant turn, so each response opens with it.
    assert decoded(tokenizer, example.prompt) == "<|user|>hi</s><|assistant|>"
    assert decoded(tokenizer, example.chosen) == "hey</s><|user|>joke?</s><|assistant|>sure</s>"
    assert decoded(tokenizer, example.rejected) == "hey</s><|user|>poem?</s><|assistant|>no</s>"


def test_plain_text_prompt_cut_keeps_bos_then_its_end(tmp_path, bpe):
    dm = load(tmp_path, bpe, [{"prompt": "say hello to the model, the model says hello", "chosen": " yes",
                               "rejected": " no"}], max_prompt_length=5)
    prompt = dm.datasets["train"][0].prompt
    full = bpe("say hello to the model, the model says hello", add_special_tokens=False)["input_ids"]
    assert len(full) > 5 and prompt == [bpe.bos_token_id, *full[-4:]]
