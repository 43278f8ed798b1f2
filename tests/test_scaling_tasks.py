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


SOURCE = '''import os


def join_paths(base, other):
    result = os.path.join(base, other)
    if not result:
        return base
    return result
'''


def test_code_recall_cuts_before_a_recalled_identifier(tmp_path):
    import re

    from cpmjax.scaling import EVAL_TASKS, make_text_task

    task = get_task("code_recall")
    assert "code_recall" in EVAL_TASKS and "code_recall" not in TASKS  # never trained on
    sources = [(f"m{i}.py", SOURCE.replace("join_paths", f"join_paths{i}")) for i in range(6)]
    instances = task.from_sources(sources, 8, seed=0)
    assert instances == task.from_sources(sources, 8, seed=0)
    assert len({x.prompt for x in instances}) == 8
    for x in instances:
        # the answer is a whole identifier that already occurs in the prompt, whose text is
        # a prefix of its source up to the cut
        source = dict(sources)[x.id.split(":", 1)[1]]
        assert source.startswith(x.prompt[x.prompt.index("\n") + 1:].split("\n", 1)[0]) or \
            x.prompt in source
        assert source[source.index(x.prompt) + len(x.prompt):].startswith(x.answer)
        assert re.search(rf"\b{x.answer}\b", x.prompt)
        assert 4 <= len(x.answer) <= 16 and x.answer not in {"self", "return", "None"}
        assert not (x.prompt[-1:].isalnum() or x.prompt[-1:] == "_")
        # the checker reads the leading identifier
        assert task.check(x, x.answer) and task.check(x, x.answer + "(1)\n")
        assert not task.check(x, x.answer + "s") and not task.check(x, " " + x.answer)
        assert not task.check(x, x.answer[:-1])
    assert {x.answer for x in instances} <= {"base", "other", "result"}
    with pytest.raises(InputError, match="only"):
        task.from_sources(sources[:1], 50, seed=0)
    with pytest.raises(ConfigError, match="make_text_task"):
        task.generate(3, seed=0)

    paths = []
    for key, text in sources:
        (tmp_path / key).write_text(text)
        paths.append((key, str(tmp_path / key)))
    summary = make_text_task(tmp_path / "tasks", paths, n_test=5, seed=1)
    loaded = load_instances(tmp_path / "tasks" / "code_recall")
    assert loaded == task.from_sources(sources, 5, seed=1) and summary["test"] == 5
    assert json.loads((tmp_path / "tasks" / "code_recall" / "sources.json").read_text())[
        "sources"] == sorted({x.id.split(":", 1)[1] for x in loaded})
    with pytest.raises(InputError, match="nothing.py"):
        make_text_task(tmp_path, [("x", str(tmp_path / "nothing.py"))], n_test=1)
    with pytest.raises(ConfigError, match="text task"):
        make_text_task(tmp_path, paths, n_test=1, name="arithmetic")


def test_unseen_text_files_are_outside_the_family_corpus(tmp_path):
    import os

    import yaml
    from helpers import micro_family_config

    from cpmjax.scaling import load_family_config, unseen_text_files
    from cpmjax.scaling.family import prepare_family_data

    path = micro_family_config(tmp_path)
    data = yaml.safe_load(open(path))["data"]
    config = load_family_config(micro_family_config(tmp_path, data={**data, "text_bytes": 4900}))
    with pytest.raises(MissingPathError, match="corpus"):
        unseen_text_files(config)
    prepare_family_data(config, log=lambda *a: None)
    corpus = os.listdir(os.path.join(config.out_dir, "corpus", "text"))
    unseen = unseen_text_files(config)
    assert corpus and unseen and len(corpus) + len(unseen) == 12
    names = {os.path.basename(f.path) for f in unseen}
    assert not any(c.endswith("__" + n + ".txt") for c in corpus for n in names)
    from cpmjax.scaling import corpus_text_keys

    held = corpus_text_keys(config)
    assert len(held) == len(corpus) and not held & {f.key for f in unseen}
    assert corpus_text_keys(config, training_only=True) < held  # 20% of the files held out
