"""The tool-model data: the synthetic transcript generator, the tokenizer with the tool-call
special tokens, the assistant-only loss mask and the packing of rows."""

import random
import re

import numpy as np
import pytest

from cpmjax.errors import ConfigError
from cpmjax.tools import ToolCall, ToolRegistry, evaluate, parse_reply, parse_tool_calls, synth
from cpmjax.tools.dfsdt import GIVE_UP
from cpmjax.tools.experiment import (
    TaskRecord,
    call_validity,
    held_out_tasks,
    summarize,
    training_questions,
)
from cpmjax.tools.formats import IM_END, chat_text
from cpmjax.tools.synth import (
    KINDS,
    answer_is_correct,
    make_task,
    make_tasks,
    make_transcripts,
    task_registry,
)
from cpmjax.tools.training import (
    CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    encode_transcript,
    load_tool_config,
    pack_transcripts,
    train_tool_tokenizer,
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [t.text for t in make_transcripts(123, 150)]
    return train_tool_tokenizer(texts, tmp_path_factory.mktemp("tok"), vocab_size=400)


@pytest.fixture(scope="module")
def transcripts(tokenizer):
    return make_transcripts(7, 300, tokenizer)


def test_generator_is_deterministic_and_mixes_every_kind_and_variant():
    a, b = make_transcripts(3, 120), make_transcripts(3, 120)
    assert [t.text for t in a] == [t.text for t in b]
    assert [t.spans for t in a] == [t.spans for t in b]
    assert [t.text for t in make_transcripts(4, 120)] != [t.text for t in a]
    many = make_transcripts(5, 400)
    assert {t.task.kind for t in many} == set(KINDS)
    assert {t.variant for t in many} == {"react", "dfsdt", "direct"}
    assert any(t.untrained_spans for t in many)  # mistakes and their recoveries
    assert any(r.note for t in many for r in t.replies)  # DFSDT re-expansions
    assert any(c.name == GIVE_UP for t in many for r in t.replies for c in r.calls)
    # the lookup tasks never go to the direct (no tools) variant: they cannot be answered
    assert not any(t.variant == "direct" and t.task.kind.startswith("lookup") for t in many)


def test_task_answers_match_an_independent_computation():
    rng = random.Random(0)
    for _ in range(200):
        task = make_task(rng, rng.choice(KINDS))
        data = dict(task.data)
        if task.kind in ("arithmetic", "convert"):
            value = evaluate(data["expression"])
            assert float(task.answer) == float(value)
        elif task.kind == "lookup":
            assert dict(task.store)[data["key"]] == task.answer
        elif task.kind == "lookup_arith":
            assert int(dict(task.store)[data["key"]]) * data["count"] == int(task.answer)
        assert answer_is_correct(task, f"so it is {task.answer}.")
    arithmetic = make_task(random.Random(1), "arithmetic")
    assert not answer_is_correct(arithmetic, f"{int(arithmetic.answer) + 1}")
    assert not answer_is_correct(arithmetic, None)
    assert not answer_is_correct(arithmetic, "no number here")


def test_every_rendered_call_parses_back_and_validates(transcripts):
    checked = 0
    for transcript in transcripts:
        registry = task_registry(transcript.task)
        all_spans = sorted(transcript.spans + transcript.untrained_spans)
        assert len(all_spans) == len(transcript.replies)
        for reply, (start, end) in zip(transcript.replies, all_spans, strict=True):
            # the reply sits in the transcript text at its span, closed by <|im_end|>
            assert transcript.text[start:end] == reply.text + IM_END
            assert parse_tool_calls(reply.text) == reply.calls
            parsed = parse_reply(transcript.text[start:end - len(IM_END)])
            assert parsed.error is None and parsed.calls == reply.calls
            if any(c.name == GIVE_UP for c in reply.calls):
                assert reply.calls == [ToolCall(GIVE_UP, {})] and not reply.observations
                continue
            for call, observation in zip(reply.calls, reply.observations, strict=True):
                if not reply.trained:
                    continue  # the deliberate mistakes
                registry.validate(call)  # raises if the call fails the schema
                assert observation.ok, observation
                checked += 1
            gives_up = [c for c in reply.calls if c.name == GIVE_UP]
            assert all(c.arguments == {} for c in gives_up)
            if reply.trained and not reply.calls:
                assert parsed.answer is not None
        last = transcript.replies[-1]
        if not last.calls and transcript.variant != "direct" and not last.note:
            assert answer_is_correct(transcript.task, parse_reply(last.text).answer)
    assert checked > 300


def test_mistakes_fail_and_are_recovered_from(transcripts):
    with_mistake = [t for t in transcripts if t.untrained_spans]
    assert with_mistake
    for transcript in with_mistake:
        wrong = [r for r in transcript.replies if not r.trained]
        assert len(wrong) == 1 and not wrong[0].observations[0].ok
        after = transcript.replies[transcript.replies.index(wrong[0]) + 1]
        assert after.trained and after.calls  # the recovery (or give_up in DFSDT)


_TURN = re.compile(r"<\|im_start\|>(\w+)\n(.*?)<\|im_end\|>", re.S)


def test_loss_mask_covers_exactly_the_trained_assistant_turns(tokenizer, transcripts):
    for transcript in transcripts[:120]:
        # reference: the assistant turns found by reading the ChatML text back
        turns = [(m.start(2), m.end(2) + len(IM_END)) for m in _TURN.finditer(transcript.text)
                 if m.group(1) == "assistant"]
        assert sorted(transcript.spans + transcript.untrained_spans) == turns
        ids, assistant = encode_transcript(tokenizer, transcript)
        assert tokenizer.decode(ids.tolist()) == transcript.text
        masked_text = "".join(tokenizer.decode([int(i)]) for i in ids[assistant])
        assert masked_text == "".join(transcript.text[s:e] for s, e in transcript.spans)
        # the untrained (mistaken) turns contribute no token
        for start, end in transcript.untrained_spans:
            piece = transcript.text[start:end]
            assert piece not in masked_text or piece in "".join(
                transcript.text[s:e] for s, e in transcript.spans)


def test_rendering_matches_the_agents_prompt(tokenizer):
    transcript = make_transcripts(11, 1, tokenizer, variants={"react": 1.0},
                                  kinds={"arithmetic": 1.0})[0]
    start = transcript.spans[0][0]
    from cpmjax.tools.agents import system_prompt
    from cpmjax.tools.formats import get_format

    fmt = get_format("minicpm3")
    system = system_prompt(fmt, task_registry(transcript.task))
    assert transcript.text[:start] == fmt.prompt(tokenizer, system, transcript.task.question, [])
    # the template is ChatML, the same text as the agents' fallback without a template
    messages = [{"role": "system", "content": "s"}, {"role": "tool", "content": "42"}]
    assert chat_text(tokenizer, messages) == chat_text(None, messages)
    assert tokenizer.chat_template == CHAT_TEMPLATE


def test_special_tokens_are_single_ids(tokenizer):
    for index, token in enumerate(SPECIAL_TOKENS):
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        assert ids == [index], (token, ids)
        assert tokenizer.convert_ids_to_tokens(index) == token
    ids = tokenizer("<|thought_start|>\nx<|tool_call_start|>", add_special_tokens=False)
    assert ids["input_ids"][0] == SPECIAL_TOKENS.index("<|thought_start|>")
    assert ids["input_ids"][-1] == SPECIAL_TOKENS.index("<|tool_call_start|>")
    # digits are one token each
    pieces = tokenizer.convert_ids_to_tokens(tokenizer("x 40917", add_special_tokens=False)
                                             ["input_ids"])
    assert [p for p in pieces if p.strip("Ġ").isdigit()] == list("40917")
    assert tokenizer.eos_token_id == 2 and tokenizer.pad_token_id == 3


def test_packing_keeps_transcripts_apart_and_masks_only_assistant_targets():
    rng = np.random.default_rng(0)
    encoded = []
    for n in (5, 7, 3, 12, 4):
        ids = rng.integers(10, 50, n).astype(np.int32)
        encoded.append((ids, rng.random(n) < 0.5))
    encoded.append((np.arange(20, dtype=np.int32), np.ones(20, bool)))  # too long: dropped
    packed = pack_transcripts(encoded, seq_len=12)
    assert packed.dropped == 1
    arrays = packed.arrays
    # reference: rebuild every row's target mask from the transcripts it holds
    used, expected_rows = 0, [[]]
    for ids, assistant in encoded[:-1]:
        if used + len(ids) > 13:
            expected_rows.append([])
            used = 0
        expected_rows[-1].append((ids, assistant))
        used += len(ids)
    assert packed.rows == len(expected_rows)
    for row, members in enumerate(expected_rows):
        tokens = np.concatenate([m[0] for m in members])
        flags = np.concatenate([m[1] for m in members])
        segments = np.concatenate([np.full(len(m[0]), i + 1) for i, m in enumerate(members)])
        positions = np.concatenate([np.arange(len(m[0])) for m in members])
        n = len(tokens)
        assert (arrays["input_ids"][row, : n - 1] == tokens[:-1]).all()
        assert (arrays["targets"][row, : n - 1] == tokens[1:]).all()
        assert (arrays["segment_ids"][row, :n] == segments[:n]).all()
        assert (arrays["positions"][row, :n] == positions[:n]).all()
        want = flags[1:] & (segments[1:] == segments[:-1])
        assert (arrays["loss_mask"][row, : n - 1] == want).all()
        assert (arrays["loss_mask"][row, n - 1:] == 0).all()
        assert (arrays["targets"][row, n - 1:] == 3).all()  # padding


def test_held_out_tasks_never_repeat_a_training_question():
    phases = [{"seed": 0, "transcripts": 300}, {"seed": 1, "transcripts": 100,
                                                 "variants": {"direct": 1.0},
                                                 "kinds": {"arithmetic": 1.0}}]
    seen = training_questions(phases)
    assert seen == ({t.task.question for t in make_transcripts(0, 300)}
                    | {t.task.question for t in make_transcripts(
                        1, 100, variants={"direct": 1.0}, kinds={"arithmetic": 1.0})})
    tasks = held_out_tasks({"arithmetic": 30, "lookup": 10}, seed=5, exclude=seen)
    assert len(tasks) == 40 and not any(t.question in seen for t in tasks)
    assert {t.kind for t in tasks} == {"arithmetic", "lookup"}
    # the exclusion bites: a set built from the held-out questions themselves is redrawn
    again = held_out_tasks({"arithmetic": 30}, seed=5, exclude={t.question for t in tasks})
    assert not {t.question for t in again} & {t.question for t in tasks}
    assert make_tasks(1, 5, ("arithmetic",)) == make_tasks(1, 5, ("arithmetic",))


def test_call_validity_counts_scripted_steps():
    from cpmjax.tools import react

    task = make_tasks(2, 1, ("arithmetic",))[0]
    registry = task_registry(task)
    expression = dict(task.data)["expression"]
    replies = iter([
        "<|tool_call_start|>\n```python\ncalculator(1)\n```\n<|tool_call_end|>",
        "<|tool_call_start|>\n```python\ncalc(expression='1')\n```\n<|tool_call_end|>",
        "<|tool_call_start|>\n```python\ncalculator(expression=3)\n```\n<|tool_call_end|>",
        f"<|tool_call_start|>\n```python\ncalculator(expression='{expression}')\n```\n"
        "<|tool_call_end|>",
        f"The answer is {task.answer}."])
    result = react(None, None, task.question, registry, max_steps=6,
                   policy=lambda prompt: next(replies))
    assert call_validity(result, registry) == (4, 1)
    record = TaskRecord(task.kind, task.question, task.answer, "react", result.answer,
                        answer_is_correct(task, result.answer), result.stopped,
                        result.model_calls, 4, 1, 0, 0.0)
    rows = summarize([record])
    assert rows[0]["success"] == 1.0 and rows[0]["valid_rate"] == 0.25


def test_config_overrides_and_errors(tmp_path):
    config = load_tool_config("configs/tool-model.yaml",
                              ["run.steps=5", "tools.transcripts=10", "optim.decay_steps=2"])
    assert config.train.run.steps == 5 and config.tools.transcripts == 10
    with pytest.raises(ConfigError, match="nonsense"):
        load_tool_config("configs/tool-model.yaml", ["tools.nonsense=1"])
    with pytest.raises(ConfigError, match="byte-level minimum"):
        train_tool_tokenizer(["x"], tmp_path, vocab_size=100)
    with pytest.raises(ConfigError, match="kind"):
        make_task(random.Random(0), "poetry")


def test_registry_schema_of_the_task_tools():
    from cpmjax.errors import ToolArgumentsError, UnknownToolError

    task = make_tasks(0, 1, ("lookup",))[0]
    registry = task_registry(task)
    assert isinstance(registry, ToolRegistry)
    assert sorted(registry.names) == ["calculator", "lookup"]
    with pytest.raises(ToolArgumentsError):
        registry.validate(ToolCall("lookup", {"key": 3}))
    with pytest.raises(UnknownToolError):
        registry.validate(ToolCall("calc", {"expression": "1"}))
    key = dict(task.data)["key"]
    assert registry.execute(ToolCall("lookup", {"key": key})).content == task.answer


def test_chat_model_path_names_the_bundled_models(tmp_path):
    import os

    import cpmjax
    from cpmjax.errors import MissingPathError
    from cpmjax.tools.cli import model_path
    from cpmjax.tools.training import tool_model_dir

    assert model_path(str(tmp_path)) == str(tmp_path)
    assert model_path("cpmjax-tiny") == cpmjax.default_model_path()
    assert model_path("cpmjax-tools") == tool_model_dir()
    bundled = os.path.isfile(os.path.join(tool_model_dir(), "config.json"))
    assert model_path(None) == (tool_model_dir() if bundled else cpmjax.default_model_path())
    with pytest.raises(MissingPathError, match="no-such-model"):
        model_path("no-such-model")


def test_compact_format_describes_each_tool_in_one_line_and_parses_like_minicpm3(tokenizer):
    from cpmjax.tools.agents import system_prompt
    from cpmjax.tools.formats import get_format

    task = make_tasks(21, 1, ("lookup",))[0]
    registry = task_registry(task)
    compact = system_prompt(get_format("compact"), registry)
    full = system_prompt(get_format("minicpm3"), registry)
    lines = compact.split("Tools:\n", 1)[1].splitlines()
    assert [line.split("(")[0] for line in lines] == [s["function"]["name"]
                                                      for s in registry.schemas()]
    assert lines[0].startswith("calculator(expression: str) - ")
    assert len(tokenizer(compact)["input_ids"]) < len(tokenizer(full)["input_ids"]) / 3
    # the training data render the agents' prompt in this format; calls parse as minicpm3
    transcript = synth.make_transcript(task, random.Random(0), "react", tokenizer,
                                       format="compact", mistake_rate=0.0)
    start = transcript.spans[0][0]
    fmt = get_format("compact")
    system = system_prompt(fmt, task_registry(transcript.task))
    assert transcript.text[:start] == fmt.prompt(tokenizer, system, transcript.task.question, [])
    reply = transcript.replies[0].text
    assert parse_reply(reply, "compact").calls == parse_reply(reply, "minicpm3").calls == \
        [synth.expert_first_call(task)]


def test_repeat_curriculum_copies_the_question():
    many = make_transcripts(8, 200, kinds={"repeat": 0.5, "arithmetic": 0.5})
    repeats = [t for t in many if t.task.kind == "repeat"]
    assert repeats and all(t.variant == "direct" for t in repeats)
    for t in repeats:
        text = t.task.question.removeprefix("Repeat: ")
        assert t.task.answer == text
        assert t.text[t.spans[0][0]:t.spans[0][1]] == text + IM_END
    with pytest.raises(ConfigError, match="unknown task kind"):
        make_tasks(0, 1, ("nope",))


def test_first_call_probe_masks_exactly_the_expert_call_and_scores_a_perfect_model(tokenizer):
    from cpmjax.tools.training import ToolDataConfig, first_call_probe, probe_rows

    tools = ToolDataConfig(format="compact", probe_tasks=8)
    rows, kinds = probe_rows(tokenizer, tools, 256, seed=5)
    assert kinds == ["arithmetic", "convert", "lookup", "lookup_arith"] * 2
    tasks = make_tasks(5, 8, ("arithmetic", "convert", "lookup", "lookup_arith"))
    for i, task in enumerate(tasks):
        masked = rows["targets"][i][rows["call_mask"][i]]
        call = synth.expert_first_call(task)
        args = ", ".join(f"{k}={v!r}" for k, v in call.arguments.items())
        assert tokenizer.decode(masked.tolist()) == f"{call.name}({args})"
    vocab = len(tokenizer)

    class Oracle:  # predicts every target, except the first call's last token in row 0
        def __call__(self, ids, positions):
            start = self.offset
            self.offset += len(ids)
            targets = rows["targets"][start: start + len(ids)].copy()
            if start == 0:
                last = np.flatnonzero(rows["call_mask"][0])[-1]
                targets[0, last] = (targets[0, last] + 1) % vocab
            return np.eye(vocab, dtype=np.float32)[targets]

    oracle = Oracle()
    oracle.offset = 0
    scores = first_call_probe(oracle, rows, kinds, batch=3)
    assert scores["first_call_exact"] == 7 / 8
    assert scores["arithmetic"] == 0.5 and scores["lookup"] == 1.0


def test_tool_format_file(tmp_path):
    from cpmjax.tools.training import TOOL_FORMAT_FILE, tool_format

    assert tool_format(str(tmp_path)) == "minicpm3"
    (tmp_path / TOOL_FORMAT_FILE).write_text('{"format": "compact"}')
    assert tool_format(str(tmp_path)) == "compact"
