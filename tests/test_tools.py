"""cpmjax.tools without a sandbox of its own: call formats (render -> parse round trips and
refusals), the registry's schemas and validation, the calculator's safety, the ReAct and DFSDT
agents driven by scripted policies, and `cpmjax chat` on the bundled model."""

from __future__ import annotations

import json
import time

import pytest

from cpmjax.errors import (
    ConfigError,
    PromptTooLongError,
    ToolArgumentsError,
    ToolCallParseError,
    ToolDefinitionError,
    ToolExecutionError,
    UnknownToolError,
)
from cpmjax.tools import (
    GIVE_UP,
    Completion,
    Sandbox,
    ToolCall,
    ToolRegistry,
    calculator_tool,
    dfsdt,
    evaluate,
    key_value_tool,
    parse_reply,
    parse_tool_calls,
    python_tool,
    react,
    render_reply,
    render_tool_calls,
)

TRICKY = [
    ToolCall("calculator", {"expression": "(12 + 30) * 2"}),
    ToolCall("write", {"text": 'she said "hi"\nand it\'s \\ done\t\u00e9\u4e2d', "n": -3,
                       "x": 2.5e-7, "flag": True, "none": None}),
    ToolCall("nest", {"rows": [[1, 2], [], ["a", {"k": [None, False]}]],
                      "meta": {"a b": {"c": -0.0}, "": "empty key"}}),
    ToolCall("empty", {}),
]


# -- formats --------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["minicpm3", "react"])
@pytest.mark.parametrize("calls", [TRICKY, TRICKY[:1], TRICKY[1:2], TRICKY[2:]])
def test_render_parse_round_trip_is_exact(fmt, calls):
    text = render_tool_calls(calls, fmt, thought="first add, then\nmultiply")
    parsed = parse_tool_calls(text, fmt)
    assert parsed == calls
    assert json.dumps([c.to_dict() for c in parsed]) == json.dumps([c.to_dict() for c in calls])
    reply = parse_reply(text, fmt)
    assert reply.thought == "first add, then\nmultiply" and reply.answer is None


def test_minicpm3_reply_shape_and_answers():
    text = render_tool_calls(TRICKY[:1], "minicpm3", thought="t")
    assert text.startswith("<|thought_start|>\nt\n<|thought_end|>\n<|tool_call_start|>\n```python\n")
    assert text.endswith("```\n<|tool_call_end|>")
    answer = render_reply("minicpm3", thought="easy", answer="42")
    reply = parse_reply(answer, "minicpm3")
    assert (reply.answer, reply.thought, reply.calls) == ("42", "easy", [])
    assert parse_tool_calls("just text, no call", "minicpm3") == []
    react_answer = parse_reply("Thought: done\nFinal Answer: 42", "react")
    assert (react_answer.answer, react_answer.thought) == ("42", "done")


@pytest.mark.parametrize("body", [
    "calculator('2+2')",                      # positional
    "calculator(expression=x)",               # a name
    "calculator(expression=__import__('os').system('id'))",  # a call
    "calculator(expression='1'+'2')",         # an expression
    "os.system(cmd='id')",                    # an attribute as the function
    "calculator(**{'expression': '1'})",      # ** arguments
    "x = calculator(expression='1')",         # not a bare call
    "calculator(expression='1'",              # not Python
    "",                                       # empty
    "f(a={1, 2})",                            # a set
    "f(a={1: 2})",                            # a non-string key
])
def test_minicpm3_refuses_non_literal_calls(body):
    text = f"<|tool_call_start|>\n```python\n{body}\n```\n<|tool_call_end|>"
    with pytest.raises(ToolCallParseError):
        parse_tool_calls(text, "minicpm3")
    assert parse_reply(text, "minicpm3").error is not None


def test_unterminated_and_react_errors():
    with pytest.raises(ToolCallParseError, match="closing"):
        parse_tool_calls("<|tool_call_start|>\nf(a=1)", "minicpm3")
    for text in ["Action: calculator\nAction Input: not json",
                 "Action: calculator\nAction Input: [1, 2]",
                 "Action: calculator\nThought: forgot the input",
                 "Action: two words\nAction Input: {}"]:
        with pytest.raises(ToolCallParseError):
            parse_tool_calls(text, "react")
    assert parse_reply("I am rambling", "react").error is not None
    assert parse_tool_calls("I am rambling", "react") == []
    # a Python-style dict is read as a literal (never evaluated)
    assert parse_tool_calls("Action: f\nAction Input: {'a': None}\n", "react") == [
        ToolCall("f", {"a": None})]
    with pytest.raises(ConfigError):
        parse_tool_calls("x", "json")


# -- registry -------------------------------------------------------------------------------

def test_registry_schema_from_hints_and_docstring_and_validation_before_the_call():
    registry = ToolRegistry()
    seen = []

    @registry.register
    def convert(value: float, unit: str, digits: int | None = None) -> str:
        """Convert a length to metres.

        Args:
            value: The number to convert.
            unit: The unit of the value.
            digits: Digits to round to.
        """
        seen.append((value, unit, digits))
        return f"{value} {unit}"

    schema = registry.schemas()[0]["function"]
    assert schema["name"] == "convert" and schema["description"] == "Convert a length to metres."
    props = schema["parameters"]["properties"]
    assert props["value"]["type"] == "number" and props["unit"]["description"]
    assert props["digits"]["type"] == ["integer", "null"]
    assert schema["parameters"]["required"] == ["value", "unit"]
    bad = [{"unit": "m"},                                  # missing
           {"value": 1, "unit": "m", "colour": "red"},     # extra
           {"value": "one", "unit": "m"},                  # wrong type
           {"value": 1, "unit": "m", "digits": 1.5},       # wrong type (optional)
           {"value": True, "unit": "m"}]                   # a bool is not a number
    for arguments in bad:
        with pytest.raises(ToolArgumentsError, match="convert"):
            registry.validate(ToolCall("convert", arguments))
        observation = registry.execute(ToolCall("convert", arguments))
        assert observation.error == "invalid_arguments"
    assert seen == []  # nothing was called
    with pytest.raises(UnknownToolError, match="convert"):
        registry.validate(ToolCall("nope", {}))
    assert registry.execute(ToolCall("convert", {"value": 2, "unit": "ft", "digits": None})).ok
    assert seen == [(2, "ft", None)]


def test_registry_refuses_bad_definitions():
    def undocumented(x: int) -> int:
        return x

    def keyword_arg(lambda_: int) -> int:
        """Bad.

        Args:
            lambda_: fine name, but registered under a keyword below.
        """
        return lambda_

    registry = ToolRegistry()
    with pytest.raises(ToolDefinitionError, match="undocumented"):
        registry.register(undocumented)
    with pytest.raises(ToolDefinitionError, match="identifier"):
        registry.register(keyword_arg, name="class")
    registry.add(calculator_tool())
    with pytest.raises(ToolDefinitionError, match="already"):
        registry.add(calculator_tool())
    with pytest.raises(ConfigError, match="reserved"):
        registry.register(keyword_arg, name=GIVE_UP)
        dfsdt(None, None, "q", registry, policy=lambda p: "x")


def test_tool_failures_and_oversized_results_are_observations():
    registry = ToolRegistry([key_value_tool({"paris": "France"})], max_observation_chars=50)

    @registry.register
    def boom(n: int) -> str:
        """Fail.

        Args:
            n: A number.
        """
        if n == 0:
            raise ZeroDivisionError("n is zero")
        return "x" * n

    assert registry.execute(ToolCall("lookup", {"key": "paris"})).content == "France"
    missing = registry.execute(ToolCall("lookup", {"key": "rome"}))
    assert missing.error == "tool_error" and "paris" in missing.content
    raised = registry.execute(ToolCall("boom", {"n": 0}))
    assert raised.error == "tool_error" and "ZeroDivisionError" in raised.content
    big = registry.execute(ToolCall("boom", {"n": 10_000}))
    assert big.error == "output_limit" and len(big.content) < 200


# -- calculator -----------------------------------------------------------------------------

def test_calculator_values():
    assert evaluate("(12 + 30) * 2 ** 3 / 7") == 48.0
    assert evaluate("-7 // 2 + 10 % 4") == -2
    assert evaluate("123456789 * 987654321") == 121932631112635269
    assert evaluate("2 ** -1") == 0.5


@pytest.mark.parametrize("expression", [
    "x + 1", "__import__('os').system('id')", "(1).__class__", "abs(-1)", "[1][0]",
    "lambda: 1", "'a' * 3", "1 if 1 else 2", "2 << 10", "9 ** 9 ** 9", "10 ** 100000",
    "(2 ** 4000) * (2 ** 4000)", "1.5 ** 100000", "1e308 * 10", "1 / 0", "1 +" * 400 + "1",
    "(" * 300 + "1" + ")" * 300, "True + 1", "1j",
])
def test_calculator_refuses_and_stays_fast(expression):
    start = time.perf_counter()
    with pytest.raises(ToolExecutionError, match="calculator"):
        evaluate(expression)
    assert time.perf_counter() - start < 0.5


# -- agents with scripted policies ----------------------------------------------------------

class Script:
    """A policy that replies from a list and records every prompt it was shown."""

    def __init__(self, replies):
        self.replies = list(replies)
        self.prompts = []

    def __call__(self, prompt):
        self.prompts.append(prompt)
        return Completion(self.replies[len(self.prompts) - 1], prompt_tokens=len(prompt),
                          new_tokens=3)


def _call(name, fmt="minicpm3", **arguments):
    return render_reply(fmt, thought=f"use {name}", calls=[ToolCall(name, arguments)])


@pytest.mark.parametrize("fmt", ["minicpm3", "react"])
def test_react_turns_every_kind_of_bad_call_into_an_observation(fmt):
    registry = ToolRegistry(
        [calculator_tool(), python_tool(Sandbox(timeout_s=0.5, max_output_bytes=1000))])
    garbage = ("<|tool_call_start|>\n```python\ncalculator(1 +)\n```\n<|tool_call_end|>"
               if fmt == "minicpm3" else "Action: calculator\nAction Input: {oops")
    script = Script([
        garbage,                                                     # unparseable
        _call("weather", fmt, city="Paris"),                         # unknown tool
        _call("calculator", fmt, expr="1+1"),                        # fails the schema
        _call("calculator", fmt, expression="1/0"),                  # the tool fails
        _call("python", fmt, code="while True:\n    pass"),          # times out
        _call("python", fmt, code="print('x' * 100000)"),            # too much output
        _call("calculator", fmt, expression="6*7"),                  # works
        render_reply(fmt, thought="done", answer="42"),
    ])
    result = react(None, None, "What is 6*7?", registry, max_steps=10, format=fmt,
                   policy=script)
    assert (result.answer, result.stopped, result.model_calls) == ("42", "answer", 8)
    errors = [s.observations[0].error for s in result.steps[:7]]
    assert errors == ["unparseable", "unknown_tool", "invalid_arguments", "tool_error",
                      "timeout", "output_limit", None]
    assert [s.kind for s in result.steps] == ["unparseable"] + ["calls"] * 6 + ["answer"]
    # each observation is in the next prompt, so the model sees it
    assert "Error (unknown_tool)" in script.prompts[2] and "weather" in script.prompts[2]
    assert "Error (timeout)" in script.prompts[5]
    assert script.prompts[7].count("Error (") == 6 and "42" in script.prompts[7]
    trace = json.loads(result.to_json())
    assert trace["model_calls"] == 8 and trace["new_tokens"] == 24
    assert trace["steps"][6]["calls"] == [{"name": "calculator",
                                           "arguments": {"expression": "6*7"}}]
    assert all("seconds" in s and "thought" in s for s in trace["steps"])


def test_react_stops_at_max_steps_and_on_policy_errors():
    registry = ToolRegistry([calculator_tool()])
    looping = react(None, None, "q", registry, max_steps=3,
                    policy=lambda p: _call("calculator", expression="1+1"))
    assert (looping.answer, looping.stopped, looping.model_calls) == (None, "max_steps", 3)

    def too_long(prompt):
        raise PromptTooLongError("the prompt has 2000 tokens")

    failed = react(None, None, "q", registry, max_steps=3, policy=too_long)
    assert (failed.stopped, failed.model_calls) == ("policy_error", 1)
    assert "PromptTooLongError" in failed.steps[0].text
    with pytest.raises(ConfigError):
        react(None, None, "q", registry, max_steps=0, policy=too_long)


def test_prompt_goes_through_the_chat_template_with_tool_messages():
    import cpmjax

    tokenizer = cpmjax.load_tokenizer(cpmjax.default_model_path())
    tokenizer.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}[/]{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}")
    script = Script([_call("calculator", expression="2+3"), render_reply("minicpm3",
                                                                         answer="5")])
    result = react(None, tokenizer, "2+3?", ToolRegistry([calculator_tool()]), policy=script)
    assert result.answer == "5"
    first, second = script.prompts
    assert first.startswith("[system]") and "def calculator(expression: str):" in first
    assert first.endswith("[user]2+3?[/][assistant]")
    assert "[tool]5[/][assistant]" in second and "<|tool_call_start|>" in second


# -- DFSDT ----------------------------------------------------------------------------------

GIVE = render_reply("minicpm3", thought="stuck", calls=[ToolCall(GIVE_UP, {})])


def test_dfsdt_expands_depth_first_lists_earlier_children_and_backtracks_on_give_up():
    registry = ToolRegistry([calculator_tool()])
    script = Script([
        _call("calculator", expression="1+1"),   # node 1: child of the root
        GIVE,                                    # node 2: child of 1, gives up
        _call("calculator", expression="2+2"),   # node 3: 1 again (note lists node 2)
        GIVE,                                    # node 4: child of 3, gives up
        GIVE,                                    # node 5: 3 again; 3 is now exhausted
        # node 1 is exhausted too (beam 2): back to the root, which lists node 1
        render_reply("minicpm3", thought="direct", answer="4"),  # node 6
    ])
    result = dfsdt(None, None, "What is two plus two?", registry, beam=2, max_steps=4,
                   max_model_calls=20, policy=script)
    assert (result.answer, result.stopped, result.model_calls) == ("4", "answer", 6)
    assert [(s.node, s.parent, s.depth) for s in result.steps] == [
        (1, 0, 1), (2, 1, 2), (3, 1, 2), (4, 3, 3), (5, 3, 3), (6, 0, 1)]
    assert [s.kind for s in result.steps] == ["calls", "give_up", "calls", "give_up",
                                              "give_up", "answer"]
    notes = [s.note for s in result.steps]
    assert notes[0] is None and notes[1] is None and notes[3] is None
    assert GIVE_UP in notes[2] and "gave up" in notes[2] and "different" in notes[2]
    assert GIVE_UP in notes[4]
    assert '"2+2"' not in notes[4] and '"1+1"' in notes[5] and "dead end" in notes[5]
    assert notes[2] in script.prompts[2] and notes[5] in script.prompts[5]
    # the re-expanded node's conversation is its path: node 3's prompt has node 1's result
    assert "expression='1+1'" in script.prompts[2] and "2+2" not in script.prompts[2]
    assert "expression='2+2'" in script.prompts[3] and "\n2<|im_end|>" in script.prompts[1]
    assert GIVE_UP in script.prompts[0]  # described as a tool
    assert json.loads(result.to_json())["search"] == "dfsdt"


def test_dfsdt_dead_ends_at_max_depth_and_stops_at_the_budget():
    registry = ToolRegistry([calculator_tool()])
    step = _call("calculator", expression="1+1")
    deep = dfsdt(None, None, "q", registry, beam=1, max_steps=2, max_model_calls=10,
                 policy=Script([step] * 10))
    # beam 1, depth 2: root -> 1 -> 2 (dead end), nothing left: exhausted after 2 calls
    assert (deep.stopped, deep.model_calls) == ("exhausted", 2)
    budget = dfsdt(None, None, "q", registry, beam=10, max_steps=3, max_model_calls=5,
                   policy=Script([GIVE] * 10))
    assert (budget.stopped, budget.model_calls, budget.answer) == ("budget", 5, None)
    assert [s.parent for s in budget.steps] == [0] * 5  # each give-up back to the root
    assert budget.steps[4].note.count("gave up") == 4
    narrow = dfsdt(None, None, "q", registry, beam=3, max_steps=3, max_model_calls=5,
                   policy=Script([GIVE] * 10))
    assert (narrow.stopped, narrow.model_calls) == ("exhausted", 3)
    with pytest.raises(ConfigError, match="beam"):
        dfsdt(None, None, "q", registry, beam=0, policy=Script([]))


# -- the command line on the bundled model --------------------------------------------------

@pytest.mark.parametrize("search", ["react", "dfsdt"])
def test_cli_chat_runs_the_bundled_model_and_stops(tmp_path, capsys, search):
    from cpmjax.cli import main

    trace_path = tmp_path / "trace.json"
    code = main(["chat", "--prompt", "What is 12*34?", "--tools", "calculator,python",
                 "--search", search, "--max-steps", "2", "--max-model-calls", "2",
                 "--max-new-tokens", "8", "--trace", str(trace_path)])
    assert code == 0
    trace = json.loads(trace_path.read_text())
    assert trace["search"] == search and 1 <= trace["model_calls"] <= 2
    assert trace["stopped"] in ("answer", "max_steps", "budget", "exhausted")
    assert all(s["new_tokens"] <= 8 for s in trace["steps"])
    assert "[answer]" in capsys.readouterr().err


def test_cli_chat_rejects_an_unknown_tool(capsys):
    from cpmjax.cli import main

    assert main(["chat", "--prompt", "x", "--tools", "calculator,rm"]) == 2
    assert "rm" in capsys.readouterr().err


def test_model_policy_ends_the_reply_at_a_stop_string_and_counts_tokens():
    import cpmjax
    from cpmjax.tools import ModelPolicy

    path = cpmjax.default_model_path()
    model, tokenizer = cpmjax.from_pretrained(path), cpmjax.load_tokenizer(path)
    shown = []
    cut = ModelPolicy(model, tokenizer, max_new_tokens=48, stop_strings=("e",),
                      on_text=shown.append)("def read_file(path):\n    \"\"\"Read the")
    assert "e" not in cut.text and cut.new_tokens < 48 and cut.prompt_tokens > 5
    assert "".join(shown) == cut.text and cut.seconds > 0
    kept = ModelPolicy(model, tokenizer, max_new_tokens=48, stop_strings=("e",),
                       keep_stop=("e",))("def read_file(path):\n    \"\"\"Read the")
    assert kept.text.endswith("e") and kept.text.count("e") == 1
    with pytest.raises(PromptTooLongError, match="1024"):
        ModelPolicy(model, tokenizer)("word " * 1100)


def test_cli_chat_reads_questions_from_stdin(monkeypatch, capsys):
    import io

    from cpmjax.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO("What is 2+2?\n\nexit\nnot asked\n"))
    assert main(["chat", "--tools", "none", "--max-steps", "1", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().err.count("[answer]") == 1
