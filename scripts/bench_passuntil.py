"""PassUntil sampling throughput: ``cpmjax.scaling.pass_until`` (batched) against a plain Python
loop that calls ``cpmjax.generate`` once per sample, on the same model and instances.

What is measured:
- The model: the bundled ``cpmjax-tiny`` (MiniCPM, 4 layers, hidden 256, vocab 32768) in
  float32, with its tokenizer; instances: ``--instances`` generated instances of ``--task``
  (``cpmjax.scaling.get_task(task).generate(n, seed=0)``), the task's stop string and
  ``max_new_tokens``, temperature 1.
- A checker that never passes, so both sides spend exactly ``--max-samples`` samples on every
  instance (``instances * max_samples`` samples per run): the work is fixed, the throughput is
  samples / wall seconds of the whole run (sampling, decoding the text, checking).
- ``pass_until`` at each ``--batch-sizes``; the loop: for every instance, ``max_samples`` calls
  ``cpmjax.generate(model, [prompt], max_new_tokens, temperature=1, seed=k,
  stop_token_ids=...)`` each followed by decoding and the check (what a sampler without batching
  does). Compilation is excluded: one warm-up run of each before timing.
- Repeats alternate the methods (loop, then each batch size) so that the load of the machine
  is shared; the table gives medians over repeats and the ratio of medians.

Usage: python scripts/bench_passuntil.py [--task arithmetic] [--instances 4] [--max-samples 64]
           [--batch-sizes 64 256] [--repeats 3] [--out docs/benchmarks]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import cpmjax
from cpmjax.report import machine_info, markdown_table, write_json, write_text
from cpmjax.scaling import get_task, pass_until
from cpmjax.scaling.passuntil import stop_token_ids


def never(instance, completion) -> bool:
    return False


def loop_once(model, tokenizer, prompts, task, max_samples: int, stops) -> int:
    """One sample per ``cpmjax.generate`` call, ``max_samples`` per instance; returns the
    number of samples."""
    count = 0
    for index, ids in enumerate(prompts):
        for k in range(max_samples):
            result = cpmjax.generate(model, [ids], task.max_new_tokens, temperature=1.0,
                                     seed=index * max_samples + k, stop_token_ids=stops)
            text = tokenizer.decode(result.row(0), skip_special_tokens=True)
            never(None, text.split(task.stop, 1)[0])
            count += 1
    return count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="arithmetic")
    parser.add_argument("--instances", type=int, default=4)
    parser.add_argument("--max-samples", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="docs/benchmarks")
    args = parser.parse_args()

    path = cpmjax.default_model_path()
    model = cpmjax.from_pretrained(path, dtype="float32")
    tokenizer = cpmjax.load_tokenizer(path)
    task = get_task(args.task)
    instances = task.generate(args.instances, seed=0)
    prompts = [list(tokenizer(x.prompt, add_special_tokens=True)["input_ids"])
               for x in instances]
    stops = stop_token_ids(tokenizer, model.config.vocab_size, task.stop)
    total = args.instances * args.max_samples

    def run_pass_until(batch_size: int) -> int:
        result = pass_until(model, tokenizer, instances, check=never,
                            max_samples=args.max_samples, batch_size=batch_size,
                            max_new_tokens=task.max_new_tokens, stop=task.stop,
                            progress=False)
        return result.total_samples

    methods = {"generate loop (1 sample / call)":
               lambda: loop_once(model, tokenizer, prompts, task, args.max_samples, stops)}
    for b in args.batch_sizes:
        methods[f"pass_until batch {b}"] = lambda b=b: run_pass_until(b)
    for name, fn in methods.items():  # warm-up: compile every shape
        t0 = time.perf_counter()
        assert fn() == total
        print(f"[bench] warm-up {name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    seconds: dict[str, list[float]] = {name: [] for name in methods}
    for repeat in range(args.repeats):
        for name, fn in methods.items():
            t0 = time.perf_counter()
            assert fn() == total
            seconds[name].append(time.perf_counter() - t0)
            print(f"[bench] repeat {repeat} {name}: {seconds[name][-1]:.2f} s",
                  file=sys.stderr)
    baseline = statistics.median(seconds[next(iter(methods))])
    rows = []
    for name in methods:
        median = statistics.median(seconds[name])
        rows.append({"method": name, "samples": total, "median s": median,
                     "samples/s": total / median, "vs loop": baseline / median,
                     "all s": [round(s, 3) for s in seconds[name]]})
    table = markdown_table(["method", "samples", "median s", "samples/s", "vs loop"], rows,
                           align="lrrrr")
    settings = {"model": "cpmjax-tiny (bundled), float32", "task": task.name,
                "instances": args.instances, "max_samples": args.max_samples,
                "max_new_tokens": task.max_new_tokens, "stop": task.stop,
                "temperature": 1.0, "repeats": args.repeats, "batch_sizes": args.batch_sizes}
    write_json(os.path.join(args.out, "passuntil_throughput.json"),
               {"meta": machine_info(), "settings": settings, "rows": rows})
    text = (
        "# PassUntil sampling throughput\n\n"
        "`cpmjax.scaling.pass_until` (batched rows over the active instances) against a plain "
        "Python loop of `cpmjax.generate` calls, one sample per call, on the same model and "
        "instances. Measured by `scripts/bench_passuntil.py` "
        f"(`--task {task.name} --instances {args.instances} --max-samples {args.max_samples} "
        f"--batch-sizes {' '.join(map(str, args.batch_sizes))} --repeats {args.repeats}`).\n\n"
        f"- Model: the bundled cpmjax-tiny (4 layers, hidden 256, vocab 32768), float32, on "
        f"{machine_info()['backend']} ({machine_info()['cpus']} CPUs, shared with other jobs "
        "while measuring).\n"
        f"- Work: {args.instances} `{task.name}` instances (generated, seed 0), a checker that "
        f"never passes, so every method draws exactly {args.max_samples} samples per instance "
        f"({total} samples per run) of up to {task.max_new_tokens} new tokens at temperature 1, "
        "stopping at the task's newline.\n"
        "- Time: wall seconds of a whole run (sampling, decoding, checking), compilation "
        "excluded (one warm-up run of each method first); methods alternate within each "
        f"repeat; medians over {args.repeats} repeats; `vs loop` is the ratio of medians.\n\n"
        f"{table}\n")
    write_text(os.path.join(args.out, "passuntil_throughput.md"), text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
