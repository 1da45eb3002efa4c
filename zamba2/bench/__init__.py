"""Speed and memory benchmark on random weights: ours vs transformers 5.23, ratios measured in one run.

    python -m zamba2.bench --arch 1.2b --dtype bf16 --compare

Measured for each implementation, best of --repeats, ours and the reference taking turns (ABBA) so that
drift of a shared machine hits both:
    prefill   tokens/s of one forward over a prompt of each --lengths tokens (batch 1, into a cache)
    ttft      seconds from a 512-token prompt to its first greedy token, cache allocation included
    decode    tokens/s of --decode-steps one-token steps after a 128-token prompt, at --batch and --batched
    memory    peak RSS of the implementation's own fresh process, per phase, shown as "weights + X"
    bound     batch-1 GEMVs give the memory bandwidth (best of: a buffer as large as the model's linear
              weights, timed before the run, and each model's own linear weights, timed in every repeat);
              decode cannot beat bandwidth / bytes one step streams, and is reported as a fraction of that
    load      (--load) from_pretrained seconds and peak RSS of a freshly written random checkpoint

Each implementation runs in a worker subprocess (`--worker ours|ref`) that builds its model once, then
answers each command from stdin with one JSON line on stdout; `--no-subprocess` runs both here (tests), the
RSS figures then being those of the one shared process. transformers is imported only by the reference worker.

    models.py   random-weight builders, ours and the reference, and the quantisation-quality figures
    memory.py   bytes held and streamed per step, memory bandwidth, peak RSS
    runner.py   one implementation's timed calls, and the worker subprocess that serves them
    report.py   the run in ABBA order, its summary and ratios, checkpoint load, the table and the plot
    cli.py      the command line
"""

from zamba2.bench.cli import LONG_PROMPT, build_parser, main
from zamba2.bench.memory import (
    GB,
    linear_weight_bytes,
    measure_bandwidth,
    peak_rss_bytes,
    reread_bytes,
    reset_peak_rss,
    streamed_bytes,
    weight_bytes,
)
from zamba2.bench.models import DTYPES, build_ours, build_reference, fill_, quality, reference_key
from zamba2.bench.report import (
    combine_bandwidth,
    format_table,
    machine_info,
    measure,
    measure_load,
    plot,
    speedups,
    summarise,
)
from zamba2.bench.runner import DECODE_PROMPT, TTFT_PROMPT, Runner, WorkerProcess, prompt

__all__ = [
    "DECODE_PROMPT",
    "DTYPES",
    "GB",
    "LONG_PROMPT",
    "TTFT_PROMPT",
    "Runner",
    "WorkerProcess",
    "build_ours",
    "build_parser",
    "build_reference",
    "combine_bandwidth",
    "fill_",
    "format_table",
    "linear_weight_bytes",
    "machine_info",
    "main",
    "measure",
    "measure_bandwidth",
    "measure_load",
    "peak_rss_bytes",
    "plot",
    "prompt",
    "quality",
    "reference_key",
    "reread_bytes",
    "reset_peak_rss",
    "speedups",
    "streamed_bytes",
    "summarise",
    "weight_bytes",
]
