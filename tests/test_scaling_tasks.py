"""The wind tunnel's task suite: deterministic generation, disjoint splits, exact checkers."""

from __future__ import annotations

import json

import pytest

from cpmjax.errors import ConfigError, InputError, MissingPathError
from cpmjax.scaling import TASKS, Instance, get_task, load_instances, make_task_suite


@pytest.mark.parametrize("name", sorted(TASKS))
def test_generate_is_deterministic_and_distinct(name):
    task = get_task(name)
    a = task.generate(300, seed=7)
    assert a == task.generate(300, seed=7)
    assert a[:50] == task.generate(50, seed=7)  # a prefix of a longer draw
    assert a != task.generate(300, seed=8)
    assert len({x.prompt for x in a}) == 300
    assert len({x.id for x in a}) == 300


def test_answers_match_a_reference():
    for x in get_task("arithmetic").generate(500, seed=0):
        body = x.prompt.removeprefix("Q: ").removesuffix("=")
        a, op, b = (body.partition("+") if "+" in body else body.partition("-"))
        assert len(a) <= 3 and len(b) <= 3
        expected = int(a) + int(b) if op == "+" else int(a) - int(b)
        assert expected >= 0 and x.answer == str(expected)
    for x in get_task("kv_retrieval").generate(500, seed=0):
        pairs, _, query = x.prompt.removeprefix("kv: ").partition(" | ")
        table = dict(p.split("=") for p in pairs.split())
        assert 2 <= len(table) <= 5 and len(x.answer) == 3
        assert table[query.removesuffix("=")] == x.answer
    for x in get_task("python_expr").generate(500, seed=0):
        assert x.prompt.startswith(">>> ") and x.prompt.endswith("\n")
        # Python itself, with all builtins, is the reference
        assert repr(eval(x.prompt[4:-1])) == x.answer  # noqa: S307


@pytest.mark.parametrize("name", sorted(TASKS))
def test_checker_is_exact(name):
    task = get_task(name)
    for x in task.generate(100, seed=3):
        answer = x.answer
        assert task.check(x, answer)
        assert task.check(x, answer + task.stop + "junk after the stop")
        assert task.check(x, " " + answer + " \n")
        near_misses = [answer[:-1], answer + answer[-1], "", "0" + answer, answer[1:],
                       answer[:-1] + ("x" if answer[-1] != "x" else "y"),
                       answer[0] + " " + answer[1:]]
        for wrong in near_misses:
            if wrong.strip() != answer:
                assert not task.check(x, wrong), (x, wrong)
        assert not task.check(x, task.stop + answer)  # the answer after the stop is too late


def test_suite_split_is_disjoint_and_loadable(tmp_path):
    summary = make_task_suite(tmp_path, n_train=400, n_test=60, seed=1)
    assert set(summary) == set(TASKS)
    for name, task in TASKS.items():
        test = load_instances(tmp_path / name)
        train = load_instances(tmp_path / name, split="train")
        assert len(test) == 60 and len(train) == 400
        assert test == load_instances(tmp_path / name / "test.jsonl")
        assert not {x.prompt for x in test} & {x.prompt for x in train}
        text = (tmp_path / name / "train.txt").read_text()
        documents = text.split("\n\n")
        assert len(documents) > 1
        # every train instance is in the documents, written as it should be completed
        for x in train:
            assert x.prompt + x.answer + task.stop in text
        # no test prompt starts an instance of the training text (prompts end in "=" or a
        # newline, so a prompt never matches a longer one by prefix)
        for x in test:
            assert ("\n" + x.prompt) not in ("\n" + text), x
    # the same seed writes the same files
    again = tmp_path / "again"
    make_task_suite(again, n_train=400, n_test=60, seed=1)
    for name in TASKS:
        for f in ("train.jsonl", "test.jsonl", "train.txt"):
            assert (again / name / f).read_bytes() == (tmp_path / name / f).read_bytes()


def test_bad_input(tmp_path):
    with pytest.raises(ConfigError, match="arithmetic"):
        get_task("arithmetics")
    with pytest.raises(InputError):
        make_task_suite(tmp_path, n_train=10, n_test=0)
    with pytest.raises(InputError):
        get_task("arithmetic").generate(-1, seed=0)
    with pytest.raises(MissingPathError):
        load_instances(tmp_path / "nothing")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "1", "prompt": "x"}) + "\n")
    with pytest.raises(InputError, match="bad.jsonl:1"):
        load_instances(bad)
    assert Instance("a", "b", "c") == Instance("a", "b", "c")
