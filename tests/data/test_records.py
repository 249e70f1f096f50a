"""Tests for the user's own data: local files and TFDS specs read as rows, their fields, prompts
rendered with a tokenizer's chat template, and a checkpoint's EOS ids."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow_datasets as tfds
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from rlft.data.records import column, eos_token_ids, parse_tfds_spec, read_rows, render_prompt
from rlft.data.tokenizer import load_tokenizer
from rlft.errors import RlftError

ROWS = [
    {"prompt": "What is 2+2?", "answer": "4"},
    {"prompt": "Say hi, then stop.", "answer": "hi"},
    {"prompt": "NA", "answer": "007"},  # text that pandas would turn into NaN and 7
]
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]


def _write(path, text):
    path.write_text(text)
    return str(path)


# --- reading files -----------------------------------------------------------------------------


@pytest.mark.parametrize("extension", ["jsonl", "json", "csv", "parquet"])
def test_each_format_reads_the_same_rows(tmp_path, extension):
    path = tmp_path / f"rows.{extension}"
    if extension == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")  # a trailing blank line
    elif extension == "json":
        path.write_text(json.dumps(ROWS, indent=2))
    elif extension == "csv":
        path.write_text('prompt,answer\n"What is 2+2?",4\n"Say hi, then stop.",hi\nNA,007\n')
    else:
        pq.write_table(pa.Table.from_pylist(ROWS), path)
    assert read_rows(str(path), flag="data.train") == ROWS


@pytest.mark.parametrize("blank", ["", "\n"])
def test_a_field_may_hold_strings_and_messages(tmp_path, blank):
    rows = [{"prompt": "a", "answer": 1}, {"prompt": MESSAGES, "answer": "b"}]
    # datasets 5.2 reads this, but not with a blank line in the file: rlft retries without them
    path = _write(tmp_path / "mixed.jsonl", f"{json.dumps(rows[0])}\n{blank}{json.dumps(rows[1])}\n{blank}")
    assert read_rows(path, flag="data.train") == rows


def test_chat_messages_and_missing_fields_in_jsonl(tmp_path):
    path = _write(tmp_path / "chat.jsonl", "\n".join(json.dumps(r) for r in [
        {"prompt": MESSAGES, "answer": "a"},
        {"prompt": [{"role": "user", "content": "x"}]},  # no answer: datasets fills in None
    ]))
    rows = read_rows(path, flag="data.train")
    assert rows[0]["prompt"] == MESSAGES and rows[1]["prompt"] == [{"role": "user", "content": "x"}]
    assert column(rows, "prompt", "data.prompt_field", f"data.train={path}") == [MESSAGES, rows[1]["prompt"]]
    with pytest.raises(RlftError) as e:
        column(rows, "answer", "data.answer_field", f"data.train={path}")
    assert str(e.value) == (f"data.answer_field='answer': row 2 of data.train={path} has no field 'answer' "
                            f"(its fields: ['prompt']); set --config.data.answer_field=NAME to the field "
                            f"holding it")
    with pytest.raises(RlftError, match=r"row 1 of .* has no field 'question' \(its fields: \['answer', 'prompt'\]\)"):
        column(rows, "question", "data.prompt_field", f"data.train={path}")


@pytest.mark.parametrize("name, content, message", [
    ("missing.jsonl", None, "data.train={path}: file not found"),
    ("rows.txt", "x", "data.train={path}: unknown file type '.txt'; expected one of .jsonl, .json, .csv, "
                      ".parquet, or tfds:NAME[/CONFIG][:VERSION]:SPLIT"),
    ("empty.jsonl", "", "data.train={path}: the file is empty (no rows)"),
    ("blank.jsonl", "\n  \n", "data.train={path}: the file is empty (no rows)"),
    ("header.csv", "prompt,answer\n", "data.train={path}: the file is empty (no rows)"),
    ("empty.json", "[]", "data.train={path}: the file is empty (no rows)"),
    ("bad.jsonl", '{"prompt": "a"}\n\n{"prompt": "b",\n{"prompt": "c"}\n',
     "data.train={path}: line 3 is not valid JSON (Expecting property name enclosed in double quotes at column 16)"),
    ("bad.json", '[{"prompt": "a"},\n {"prompt": }]',
     "data.train={path}: malformed JSON at line 2 column 13 (Expecting value)"),
    ("scalar.jsonl", '{"prompt": "a"}\n3\n', "data.train={path}: line 2 is a number, not a JSON object"),
    ("scalar.json", '[{"prompt": "a"}, "b"]', "data.train={path}: row 2 is a string, not a JSON object"),
    ("wide.csv", "prompt,answer\na,1,2\n", "data.train={path}: line 2 has more cells than the header row (line 1)"),
    ("ragged.csv", "prompt,answer\na,1\nb,2,3\n",
     "data.train={path}: could not be read as CSV (ParserError: Error tokenizing data. C error: Expected 2 "
     "fields in line 3, saw 3)"),
])
def test_bad_files_are_one_clear_error(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(RlftError) as e:
        read_rows(str(path), flag="data.train")
    assert str(e.value) == message.format(path=path)


def test_bad_parquet_files(tmp_path):
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.Table.from_pylist([], schema=pa.schema([("prompt", pa.string())])), empty)
    with pytest.raises(RlftError, match=r"^data.eval=.*empty.parquet: the file is empty \(no rows\)$"):
        read_rows(str(empty), flag="data.eval")
    broken = _write(tmp_path / "broken.parquet", "PAR1 not parquet")
    with pytest.raises(RlftError, match=r"^data.eval=.*broken.parquet: could not be read as PARQUET \(ArrowInvalid"):
        read_rows(broken, flag="data.eval")


# --- TFDS --------------------------------------------------------------------------------------


def test_tfds_spec_syntax():
    assert parse_tfds_spec("tfds:imdb_reviews:train", "data.train") == ("imdb_reviews", None, None, "train")
    spec = parse_tfds_spec("tfds:imdb_reviews/plain_text:1.0.0:train[:10%]", "data.train")
    assert spec == ("imdb_reviews", "plain_text", "1.0.0", "train[:10%]")
    assert spec.builder == "imdb_reviews/plain_text:1.0.0"
    for bad in ("tfds:imdb_reviews", "tfds:", "tfds:a b:train", "tfds:x/y/z:train"):
        with pytest.raises(RlftError) as e:
            read_rows(bad, flag="data.eval")
        assert str(e.value) == (f"data.eval={bad!r}: not a TFDS dataset spec; expected "
                                f"tfds:NAME[/CONFIG][:VERSION]:SPLIT, e.g. tfds:imdb_reviews/plain_text:train")


class RlftTestPrompts(tfds.core.GeneratorBasedBuilder):
    """Three prompt rows: text features and an integer."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(
            {"prompt": tfds.features.Text(), "answer": tfds.features.Text(), "n": np.int32}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(3):
            yield i, {"prompt": f"prompt {i}", "answer": str(i), "n": i}


def test_tfds_rows_from_a_prepared_dataset(tmp_path):
    RlftTestPrompts(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    rows = read_rows("tfds:rlft_test_prompts:train", flag="data.train", data_dir=str(tmp_path))
    assert rows == [{"prompt": f"prompt {i}", "answer": str(i), "n": i} for i in range(3)]
    assert read_rows("tfds:rlft_test_prompts:1.0.0:train[1:]", "data.train", str(tmp_path)) == rows[1:]
    with pytest.raises(RlftError, match=r"^data.train=tfds:rlft_test_prompts:test: could not read the TFDS "
                                        r"dataset \(data_dir=.*downloads none\): .*test"):
        read_rows("tfds:rlft_test_prompts:test", "data.train", str(tmp_path))
    with pytest.raises(RlftError, match=r"DatasetNotFoundError: Dataset rlft_no_such_set not found\.$"):
        read_rows("tfds:rlft_no_such_set:train", "data.train", str(tmp_path))


# --- prompts and EOS ids -----------------------------------------------------------------------

WORDS = ["<unk>", "<s>", "</s>", "<eot>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>",
         "hi", "there", "be", "brief", "x"]
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <eot> "
            "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _save_tokenizer(path, chat_template=None, eos_ids=None):
    """A Llama-like word-level tokenizer saved to `path`: BOS added by default, EOS "</s>" (id 2),
    "<eot>" (id 3) a second EOS listed in generation_config.json when `eos_ids` is given."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                 unk_token="<unk>", chat_template=chat_template,
                                 additional_special_tokens=["<eot>", "<|user|>", "<|assistant|>", "<|system|>"])
    hf.save_pretrained(str(path))
    if eos_ids is not None:
        (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": eos_ids}))
    return load_tokenizer(str(path))


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    """(tokenizer dir, tokenizer) with a chat template and generation_config.json EOS ids [2, 3]."""
    path = tmp_path_factory.mktemp("chat_tokenizer")
    return path, _save_tokenizer(path, TEMPLATE, eos_ids=[3, 2])


def test_chat_template_renders_messages_and_strings(chat_tokenizer):
    _, tok = chat_tokenizer
    text, ids = render_prompt(MESSAGES, tok, chat_template=True)
    assert text == "<s><|system|> be brief <eot> <|user|> hi there <eot> <|assistant|>"
    assert ids == [1, 7, 10, 11, 3, 5, 8, 9, 3, 6]  # one BOS: the template's
    text, ids = render_prompt("hi there", tok, chat_template=True)
    assert (text, ids) == ("<s><|user|> hi there <eot> <|assistant|>", [1, 5, 8, 9, 3, 6])
    # datasets gives every message the keys any message has, None where absent: they are dropped
    assert render_prompt([{"role": "user", "content": "hi there", "name": None}], tok, True) == (text, ids)


def test_plain_prompts_get_the_tokenizers_special_tokens(chat_tokenizer):
    _, tok = chat_tokenizer
    assert render_prompt("hi there", tok, chat_template=False) == ("hi there", [1, 8, 9])
    with pytest.raises(RlftError) as e:
        render_prompt(MESSAGES, tok, chat_template=False, where="row 2 of data.train=p.jsonl")
    assert str(e.value) == ("row 2 of data.train=p.jsonl: the prompt is a list of chat messages, which only a "
                            "chat template turns into text; set --config.data.chat_template=true")


def test_bad_prompts_and_templates(chat_tokenizer, tmp_path):
    path, tok = chat_tokenizer
    plain = _save_tokenizer(tmp_path / "plain")
    with pytest.raises(RlftError) as e:
        render_prompt("hi", plain, chat_template=True)
    assert str(e.value) == (f"data.chat_template=true but the tokenizer at {tmp_path / 'plain'} has no chat "
                            f"template (no chat_template in tokenizer_config.json, no chat_template.jinja); "
                            f"set --config.data.chat_template=false to use the prompts as plain text")
    with pytest.raises(RlftError, match=r"^row 1 of f.jsonl: message 2 of the prompt is not \{'role': str, "):
        render_prompt([MESSAGES[0], {"role": "user"}], tok, True, where="row 1 of f.jsonl")
    for bad in (3, [], b"hi"):
        with pytest.raises(RlftError, match="^the prompt: "):
            render_prompt(bad, tok, True)
    strict = load_tokenizer(str(path))
    strict.chat_template = "{{ raise_exception('Conversation roles must alternate') }}"
    with pytest.raises(RlftError, match=r"^r: the tokenizer's chat template \(data.chat_template=true\) refused "
                                        r"the messages: Conversation roles must alternate$"):
        render_prompt("hi", strict, True, where="r")


def test_eos_ids_join_the_tokenizer_and_generation_config(chat_tokenizer, tmp_path):
    path, tok = chat_tokenizer
    assert eos_token_ids(tok, path) == [2, 3]  # sorted, unique
    assert eos_token_ids(tok) == eos_token_ids(tok, tmp_path) == [2]  # no generation_config.json
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 5}))
    assert eos_token_ids(tok, tmp_path) == [2, 5]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": None}))
    assert eos_token_ids(tok, tmp_path) == [2]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": ["2"]}))
    with pytest.raises(RlftError, match=r"generation_config.json: eos_token_id=\['2'\] must be a token id"):
        eos_token_ids(tok, tmp_path)
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [2, ')
    with pytest.raises(RlftError, match=r"generation_config.json: malformed JSON"):
        eos_token_ids(tok, tmp_path)
