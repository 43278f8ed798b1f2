"""The bundled tool model ``cpmjax-tools``: what ships (size, dtype, tokenizer) and that it
calls tools in the format the agents read."""

import json
import os

from cpmjax.tools.experiment import call_validity
from cpmjax.tools.synth import make_tasks, task_registry
from cpmjax.tools.training import SPECIAL_TOKENS, tool_format, tool_model_dir


def test_the_bundled_tool_model_is_small_bfloat16_with_the_tool_tokens():
    from safetensors import safe_open

    import cpmjax

    path = tool_model_dir()
    total = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    assert total <= 40 * 2 ** 20
    with safe_open(os.path.join(path, "model.safetensors"), "np") as f:
        dtypes = {str(f.get_slice(k).get_dtype()) for k in f.keys()}
    assert dtypes == {"BF16"}
    tokenizer = cpmjax.load_tokenizer(path)
    for index, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer(token, add_special_tokens=False)["input_ids"] == [index]
    assert tokenizer.chat_template
    with open(os.path.join(path, "config.json")) as f:
        assert json.load(f)["vocab_size"] >= len(tokenizer)


def test_the_bundled_tool_model_calls_the_calculator():
    import cpmjax
    from cpmjax.tools import react

    path = tool_model_dir()
    model, tokenizer = cpmjax.from_pretrained(path), cpmjax.load_tokenizer(path)
    task = make_tasks(4242, 1, ("arithmetic",))[0]
    registry = task_registry(task)
    result = react(model, tokenizer, task.question, registry, max_steps=2, max_new_tokens=48,
                   format=tool_format(path))
    first = result.steps[0]
    assert first.kind == "calls", first.text
    assert first.calls[0]["name"] == "calculator"
    assert call_validity(result, registry)[1] >= 1
