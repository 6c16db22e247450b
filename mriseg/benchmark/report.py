"""The report: speed-ups against the baselines, the two-device projection, the conclusion, tables."""

from __future__ import annotations

import math
import statistics
import tempfile
from collections.abc import Sequence
from typing import Any


from mriseg.errors import MrisegError
from mriseg.benchmark.config import DATA_PARALLEL_ADVICE, BenchmarkConfig, ModelFactory, registry_factory, validate
from mriseg.benchmark.stages import bubble_fraction, encoder_decoder_cut, predicted_step_time
from mriseg.benchmark.measure import _percentiles
from mriseg.benchmark.workers import _Job, _launch


def _group_times(profile: list[dict[str, float]], cut: int) -> list[tuple[float, float]]:
    groups = (profile[:cut], profile[cut:])
    return [(sum(r["forward_s"] for r in g), sum(r["backward_s"] for r in g)) for g in groups]


Baseline = tuple[str, float]
"""(what a speed-up divides by, in words; that run's median step time in seconds)."""


def _entry(mode: str, config: BenchmarkConfig, times: Sequence[float], baseline: Baseline, single_median: float,
           **extra: Any) -> dict[str, Any]:
    step = _percentiles(times)
    entry = {"mode": mode, "step_s": step, "samples_per_s": config.batch_size / step["median"],
             "speedup": baseline[1] / step["median"], "baseline": baseline[0],
             "speedup_vs_single": single_median / step["median"]}
    entry.update(extra)
    return entry


def _bound(config: BenchmarkConfig) -> float:
    """The most a run on the configured devices can gain over one of them: one per device in use."""
    return 1.0 if config.one_process else float(len(config.devices))


def _baseline_entries(config: BenchmarkConfig, first: dict[str, Any], single: Baseline) -> list[dict[str, Any]]:
    entries = []
    for (name, micro_batches), run in first["baselines"].items():
        mode = {"single": "single", "accumulated": "single, accumulated",
                "two threads": "one process, 2 threads"}[name]
        entries.append(_entry(mode, config, run["times"], single, single[1], devices=[config.devices[0]],
                              micro_batches=micro_batches if name == "accumulated" else None,
                              peak_memory_bytes=[run["peak"]], bytes_sent_per_step=0,
                              bound=2.0 if name == "two threads" else None))  # one device: no bound
    return entries


def _report(config: BenchmarkConfig, ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """The report of every mode, from what each rank measured."""
    first = ranks[0]
    profiles: dict[int, list[dict[str, float]]] = first["profiles"]
    full = profiles[config.batch_size]
    single_median = statistics.median(first["single"]["times"])
    single: Baseline = ("single (whole batch, one device)", single_median)
    cuts: dict[str, int] = first["cuts"]
    names = [r["name"] for r in full]
    entries = _baseline_entries(config, first, single)
    entries += [_split_entry(config, ranks, key, cuts, names, single) for key in first["runs"]]
    if "data_parallel" in first:
        entries.append(_data_parallel_entry(config, ranks, single))
    report: dict[str, Any] = {
        "model": config.model, "input_shape": [config.batch_size, config.channels, *config.input_size],
        "devices": config.devices,
        "device_note": ("both stages in one process on one device: machinery overhead, no parallelism"
                        if config.one_process else "one process per device, 1 thread each, gloo"
                        if config.devices[0] == "cpu" else "one process per GPU, NCCL"),
        "amp": config.amp, "steps": config.steps, "warmup": config.warmup,
        "memory_kind": first["single"]["memory_kind"],
        "stages": _stage_rows(full, profiles),
        "cuts": {split: _cut_record(full, names, cut) for split, cut in cuts.items()},
        "results": entries,
    }
    if len(config.devices) == 1 or config.one_process:
        report["projection"] = _projection(config, profiles, cuts, first["copy_bandwidth"], single_median)
    report["conclusion"] = _conclusion(config, entries)
    return report


def _split_entry(config: BenchmarkConfig, ranks: list[dict[str, Any]], key: tuple[int, str, int],
                 cuts: dict[str, int], names: list[str], single: Baseline) -> dict[str, Any]:
    """A naive or pipelined split: the step time is the slower rank's, per step. A pipeline is
    compared with the faster way one device does the same samples: the whole batch, or the same
    micro-batches accumulated (same per-chunk work); the naive split with the whole batch."""
    cut, schedule, micro_batches = key
    accumulated = ranks[0]["baselines"].get(("accumulated", micro_batches))
    baseline = single
    if accumulated is not None and statistics.median(accumulated["times"]) < single[1]:
        # the best one device does with the same samples: the same micro-batches when they run faster
        baseline = (f"single, {micro_batches} micro-batches accumulated", statistics.median(accumulated["times"]))
    label = " = ".join(split for split, split_cut in cuts.items() if split_cut == cut)
    per_rank = [r["runs"][key] for r in ranks]
    times = [max(values) for values in zip(*(r["times"] for r in per_rank))]
    micro_profile = ranks[0]["profiles"][math.ceil(config.batch_size / micro_batches)]
    predicted = predicted_step_time(_group_times(micro_profile, cut), micro_batches, schedule)
    events = [e for r in per_rank for e in r["events"]]
    origin = min((e[3] for e in events), default=0.0)
    entry = _entry("naive split" if schedule == "naive" else "pipelined", config, times, baseline, single[1],
                   split=label, bound=_bound(config),
                   cut=cut, groups=[names[:cut], names[cut:]],
                   schedule=None if schedule == "naive" else schedule, micro_batches=micro_batches,
                   bubble_fraction=bubble_fraction(2, micro_batches),
                   predicted_step_s=predicted, predicted_speedup=baseline[1] / predicted,
                   peak_memory_bytes=[r["peak"] for r in per_rank] if not config.one_process else [per_rank[0]["peak"]],
                   bytes_sent_per_step=sum(r["sent_forward"] + r["sent_backward"] for r in per_rank),
                   bytes_sent_forward=sum(r["sent_forward"] for r in per_rank),
                   bytes_sent_backward=sum(r["sent_backward"] for r in per_rank),
                   timeline=[{"stage": s, "kind": k, "micro_batch": c, "start_s": a - origin, "end_s": b - origin}
                             for s, k, c, a, b in sorted(events, key=lambda e: e[3])])
    entry["efficiency"] = entry["speedup"] / entry["predicted_speedup"]
    return entry


def _data_parallel_entry(config: BenchmarkConfig, ranks: list[dict[str, Any]], single: Baseline) -> dict[str, Any]:
    per_rank = [r["data_parallel"] for r in ranks]
    times = [max(values) for values in zip(*(r["times"] for r in per_rank))]
    dp_profile = ranks[0]["profiles"][math.ceil(config.batch_size / config.world_size)]
    predicted = sum(r["forward_s"] + r["backward_s"] for r in dp_profile)
    entry = _entry("data parallel", config, times, single, single[1], micro_batches=None, bound=_bound(config),
                   predicted_step_s=predicted, predicted_speedup=single[1] / predicted,
                   peak_memory_bytes=[r["peak"] for r in per_rank],
                   bytes_sent_per_step=ranks[0]["data_parallel"]["allreduce_bytes"])
    entry["efficiency"] = entry["speedup"] / entry["predicted_speedup"]
    return entry


def _stage_rows(full: list[dict[str, float]], profiles: dict[int, list[dict[str, float]]]) -> list[dict[str, Any]]:
    """Each stage's profile, with its forward+backward time at every micro-batch size measured."""
    rows = []
    for record in full:
        row = dict(record)
        row["micro_batch_s"] = {size: p[[r["name"] for r in p].index(record["name"])]["forward_s"]
                                + p[[r["name"] for r in p].index(record["name"])]["backward_s"]
                                for size, p in profiles.items()}
        rows.append(row)
    return rows


def _cut_record(full: list[dict[str, float]], names: list[str], cut: int) -> dict[str, Any]:
    groups = (full[:cut], full[cut:])
    return {"cut": cut, "groups": [names[:cut], names[cut:]],
            "work_s": [sum(r["forward_s"] + r["backward_s"] for r in g) for g in groups],
            "saved_activation_bytes": [sum(r["saved_activation_bytes"] for r in g) for g in groups],
            "parameters": [sum(r["parameters"] for r in g) for g in groups]}


def _projection(config: BenchmarkConfig, profiles: dict[int, list[dict[str, float]]], cuts: dict[str, int],
                bandwidth: float, single_median: float) -> dict[str, Any]:
    """Two-device step times projected from one device's stage times and its measured copy bandwidth."""
    full = profiles[config.batch_size]
    names = [r["name"] for r in full]
    rows = []
    for split, cut in (cuts or {"encoder-decoder": encoder_decoder_cut(names)}).items():
        boundary = full[cut - 1]["output_bytes"]
        for schedule in config.schedules:
            for micro_batches in sorted({1, *config.micro_batches}):
                micro = profiles.get(math.ceil(config.batch_size / micro_batches))
                if micro is None:
                    continue
                compute = predicted_step_time(_group_times(micro, cut), micro_batches, schedule)
                # Activations forward and their gradients back, not overlapped: the pessimistic case.
                transfer = 2 * boundary / bandwidth
                rows.append({"split": split, "schedule": schedule, "micro_batches": micro_batches,
                             "projected_step_s": compute + transfer, "transfer_s": transfer,
                             "projected_speedup": single_median / (compute + transfer)})
    return {"note": "PROJECTION from measured stage times and copy bandwidth, not a two-device measurement",
            "copy_bandwidth_bytes_per_s": bandwidth, "rows": rows}


TWO_DEVICE_MODES = ("naive split", "pipelined", "data parallel", "one process, 2 threads")


def _conclusion(config: BenchmarkConfig, entries: list[dict[str, Any]]) -> list[str]:
    lines = []
    by_mode: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        by_mode.setdefault(entry["mode"], []).append(entry)
    for naive in by_mode.get("naive split", []):
        lines.append(f"naive split ({naive['split']}): {naive['speedup']:.2f}x single; the two halves run "
                     f"one after the other and {naive['bytes_sent_per_step'] / 2**20:.1f} MiB of activations, "
                     "skips and their gradients cross between devices every step")
    if by_mode.get("pipelined"):
        best = max(by_mode["pipelined"], key=lambda e: e["speedup"])
        lines.append(f"best pipeline: {best['schedule']} with {best['micro_batches']} micro-batches, split "
                     f"{best['split']}: {best['speedup']:.2f}x {best['baseline']} ({best['speedup_vs_single']:.2f}x "
                     f"single), {best['efficiency']:.0%} of the {best['predicted_speedup']:.2f}x its stage times "
                     "predict")
    if by_mode.get("data parallel"):
        lines.append(f"data parallel: {by_mode['data parallel'][0]['speedup']:.2f}x single")
    for entry in entries:
        if entry.get("bound") is not None and entry["speedup"] > entry["bound"] * 1.02:
            lines.append(f"WARNING: {entry['mode']} measured {entry['speedup']:.2f}x {entry['baseline']}, above the "
                         f"{entry['bound']:.1f}x bound of its devices: noise or a baseline that is not like for like")
    candidates = [e for e in entries if e["mode"] in TWO_DEVICE_MODES]
    if candidates:
        fastest = min(candidates, key=lambda e: e["step_s"]["median"])
        how = fastest["mode"] + (f" ({fastest['schedule']}, {fastest['micro_batches']} micro-batches)"
                                 if fastest["mode"] == "pipelined" else "")
        lines.append(f"fastest way to use both devices for {config.model} at batch {config.batch_size}: {how}, "
                     f"{fastest['samples_per_s']:.2f} samples/s, {fastest['speedup_vs_single']:.2f}x one device")
    lines.append(DATA_PARALLEL_ADVICE)
    return lines


def run_benchmark(config: BenchmarkConfig, factory: ModelFactory | None = None) -> dict[str, Any]:
    """Measure every mode for ``config`` and return the report (see docs/benchmark.md for its fields).

    ``factory`` builds the model (it must be picklable and follow the stage
    contract); by default the registry builds ``config.model``.
    """
    validate(config)
    factory = factory or registry_factory(config)
    try:
        model = factory()
    except (KeyError, ValueError, TypeError) as error:
        raise MrisegError(f"cannot build model {config.model!r}: {error}") from error
    validate(config, model)
    del model
    with tempfile.TemporaryDirectory(prefix="mriseg-bench-") as folder:
        ranks = _launch(_Job(config, factory, folder))
    return _report(config, ranks)


def _baseline_short(entry: dict[str, Any]) -> str:
    if entry["mode"] == "single":
        return "-"
    return f"accum. m={entry['micro_batches']}" if "accumulated" in entry["baseline"] else "single"


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f}"


def report_tables(report: dict[str, Any]) -> list[Any]:
    """Rich renderables for a terminal: per-stage times, one row per configuration, the conclusion."""
    from rich.table import Table

    stages = Table(title=f"Stages of {report['model']}, batch {report['input_shape'][0]} on {report['devices'][0]}")
    for column in ("stage", "forward ms", "backward ms", "saved for backward MiB", "output MiB"):
        stages.add_column(column, justify="left" if column == "stage" else "right")
    for row in report["stages"]:
        stages.add_row(row["name"], f"{row['forward_s'] * 1000:.1f}", f"{row['backward_s'] * 1000:.1f}",
                       _mib(row["saved_activation_bytes"]), _mib(row["output_bytes"]))
    cuts = Table(title="Where each split cuts (device 0 | device 1)")
    for column in ("split", "device 0 stages", "device 1 stages", "compute s", "saved for backward MiB",
                   "parameters"):
        cuts.add_column(column)
    for split, cut in report["cuts"].items():
        groups = cut["groups"]
        cuts.add_row(split, f"{groups[0][0]}..{groups[0][-1]}", f"{groups[1][0]}..{groups[1][-1]}",
                     " | ".join(f"{t:.2f}" for t in cut["work_s"]),
                     " | ".join(_mib(b) for b in cut["saved_activation_bytes"]),
                     " | ".join(f"{n:,}" for n in cut["parameters"]))
    results = Table(title=f"{report['model']} {'x'.join(map(str, report['input_shape']))}, "
                          f"{','.join(report['devices'])} ({report['device_note']})",
                    caption=f"step: median (p10-p90) of {report['steps']} steps; predicted: from the stage times; "
                            f"sent: bytes between devices per step; peak: {report['memory_kind']} per device")
    columns = ("mode", "split", "schedule", "m", "step ms", "samples/s", "speed-up", "over",
               "predicted", "bubble", "sent MiB", "peak MiB")
    for column in columns:
        results.add_column(column, justify="left" if column in ("mode", "split", "schedule") else "right")
    for entry in report["results"]:
        step = entry["step_s"]
        predicted = entry.get("predicted_speedup")
        results.add_row(
            entry["mode"], entry.get("split", "-"), entry.get("schedule") or "-",
            str(entry.get("micro_batches") or "-"),
            f"{step['median'] * 1000:.0f} ({step['p10'] * 1000:.0f}-{step['p90'] * 1000:.0f})",
            f"{entry['samples_per_s']:.2f}", f"{entry['speedup']:.2f}x", _baseline_short(entry),
            "-" if predicted is None else f"{predicted:.2f}x",
            "-" if "bubble_fraction" not in entry else f"{entry['bubble_fraction']:.0%}",
            _mib(entry["bytes_sent_per_step"]), " / ".join(_mib(p) for p in entry["peak_memory_bytes"]))
    renderables: list[Any] = [stages, cuts, results]
    projection = report.get("projection")
    if projection:
        table = Table(title=projection["note"])
        for column in ("split", "schedule", "m", "projected step ms", "of which transfers ms", "projected speed-up"):
            table.add_column(column)
        for row in projection["rows"]:
            table.add_row(row["split"], row["schedule"], str(row["micro_batches"]),
                          f"{row['projected_step_s'] * 1000:.0f}", f"{row['transfer_s'] * 1000:.1f}",
                          f"{row['projected_speedup']:.2f}x")
        renderables.append(table)
    renderables.extend(report["conclusion"])
    return renderables
