"""Tests for the arithmetic task: problems, the seeded disjoint split, the character tokenizer."""

import pytest
from transformers import AutoTokenizer

from rlft.data import arithmetic
from rlft.data.arithmetic import Problem, build_tokenizer, check_task, split_problems
from rlft.data.tokenizer import EOS_TOKEN, PAD_TOKEN, load_tokenizer
from rlft.errors import RlftError


def test_prompts_and_answers():
    assert (Problem(12, "+", 34).prompt, Problem(12, "+", 34).answer) == ("12+34=", "46")
    assert Problem(3, "-", 7).answer == "-4"
    assert Problem(0, "-", 0).answer == "0"
    assert Problem(12, "*", 11).answer == "132"
    assert Problem(5, "+", 7).record() == {"text": "5+7=", "answer": "12"}
    assert arithmetic.max_prompt_length(99, "+") == len("99+99=")
    assert arithmetic.max_answer_length(99, "+") == len("198")
    assert arithmetic.max_answer_length(99, "+-") == len("198")
    assert arithmetic.max_answer_length(9, "-") == len("-9")
    assert arithmetic.max_answer_length(99, "-*") == len("9801")


def test_every_index_is_a_distinct_problem():
    total = arithmetic.num_problems(7, "+-*")
    assert total == 3 * 8 * 8
    problems = [arithmetic.problem_at(i, 7, "+-*") for i in range(total)]
    assert len({p.prompt for p in problems}) == total
    assert {p.op for p in problems} == set("+-*")
    assert all(0 <= p.a <= 7 and 0 <= p.b <= 7 for p in problems)
    assert arithmetic.num_problems(7, "+-+") == arithmetic.num_problems(7, "+-")  # ops deduplicated


@pytest.mark.parametrize("num_train", [0, 50])
def test_split_is_disjoint_deduplicated_and_seeded(num_train):
    train, test = split_problems(9, "+-", num_test=40, num_train=num_train, seed=3)
    assert len(test) == 40 and len(train) == (num_train or 200 - 40)
    train_prompts, test_prompts = {p.prompt for p in train}, {p.prompt for p in test}
    assert len(train_prompts) == len(train) and len(test_prompts) == len(test)  # no duplicates
    assert not train_prompts & test_prompts
    assert {p.op for p in test} == {"+", "-"}
    again = split_problems(9, "+-", num_test=40, num_train=num_train, seed=3)
    assert again == (train, test)  # the same seed gives the same split, in the same order
    other = split_problems(9, "+-", num_test=40, num_train=num_train, seed=4)
    assert {p.prompt for p in other[1]} != test_prompts


def test_whole_task_is_covered_when_num_train_is_zero():
    train, test = split_problems(5, "*", num_test=6, seed=0)
    assert sorted(p.prompt for p in train + test) == sorted(f"{a}*{b}=" for a in range(6) for b in range(6))


def test_tokenizer_one_token_per_character_and_round_trip(tmp_path):
    build_tokenizer(str(tmp_path))
    for tok in (load_tokenizer(str(tmp_path)), AutoTokenizer.from_pretrained(str(tmp_path))):
        assert (tok.eos_token, tok.eos_token_id) == (EOS_TOKEN, 0)
        assert (tok.pad_token, tok.pad_token_id) == (PAD_TOKEN, 1)
        assert len(tok) == 2 + len(arithmetic.ALPHABET)
        assert [tok.decode([i]) for i in range(2, len(tok))] == list(arithmetic.ALPHABET)
        for text in ("12+34=", "99*99=9801", "3-7=-4", "0", "1234567890+-*="):
            ids = tok.encode(text, add_special_tokens=False)
            assert len(ids) == len(text) and ids == [2 + arithmetic.ALPHABET.index(c) for c in text]
            assert tok.decode(ids) == text
        ids = tok.encode("46", add_special_tokens=False) + [tok.eos_token_id, tok.pad_token_id]
        assert tok.decode(ids, skip_special_tokens=True) == "46"
    assert arithmetic.decode_answer(tok, ids, 0) == ("46", True)
    assert arithmetic.decode_answer(tok, ids[:2], 0) == ("46", False)
    assert arithmetic.decode_answer(tok, [0, 4], 0) == ("", True)


@pytest.mark.parametrize("kwargs, field", [
    (dict(max_operand=9, ops=""), "task.ops"),
    (dict(max_operand=9, ops="+/"), "task.ops"),
    (dict(max_operand=9, ops=None), "task.ops"),
    (dict(max_operand=0, ops="+"), "task.max_operand"),
    (dict(max_operand=2.5, ops="+"), "task.max_operand"),
    (dict(max_operand=9, ops="+", num_test=0), "task.num_test"),
    (dict(max_operand=9, ops="+", num_test=-1), "task.num_test"),
    (dict(max_operand=9, ops="+", num_test=10, num_train=-5), "task.num_train"),
    (dict(max_operand=9, ops="+", num_test=100), "task.max_operand"),  # 100 problems: none to train on
    (dict(max_operand=9, ops="+", num_test=50, num_train=51), "task.num_train"),
])
def test_config_errors_name_the_field(kwargs, field):
    kwargs = {"num_test": 10, **kwargs}
    with pytest.raises(RlftError, match=field.replace(".", r"\.")):
        check_task(**kwargs)
    with pytest.raises(RlftError, match=field.replace(".", r"\.")):
        split_problems(**kwargs)


def test_smallest_valid_tasks():
    check_task(1, "*", num_test=3)  # 4 problems: 3 test, 1 train
    train, test = split_problems(1, "*", num_test=3)
    assert len(train) == 1 and len(test) == 3
