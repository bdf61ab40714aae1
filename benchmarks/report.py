"""Turn the benchmark records into markdown tables and PNG plots: ``python -m benchmarks.report``.

Reads every ``benchmarks/results/*.jsonl`` (or the files given), keeps the latest figure of each
(device, case, provider) and writes, under ``benchmarks/results/``:

* ``summary.md``: per device, the targets the issue sets and one compact table per op (forward+backward,
  the preferred dtype and vocabulary), for the README; also printed;
* ``<device>.md``: every case of every op;
* ``<device>-<op>-<mode>-<dtype>.png``: time and peak memory against tokens, one line per provider, one
  column per vocabulary.

Ops are handled generically: a case is every record field that is neither provider nor measurement (see
`benchmarks.records`), so other ops' shape fields (``batch``, ``steps``...) become table columns.
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

from benchmarks.records import METADATA_FIELDS, PROVIDER_FIELDS, load_records, results_dir

OURS = "apa_fast"
MODE_ORDER = {"forward": 0, "backward": 1, "full": 2}
PREFERRED = {"mode": "full", "dtype": "bfloat16", "vocab": 50400}  # what the README's compact tables show
SHORT_DTYPE = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}
MEASURED = ("ms", "peak_mem_mb", "gbps", "floor_fraction", "copy_gbps", "memory_metric", "floor_bytes",
            "bytes_by_design")
HEADLINE = {"op": "apa_loss", "mode": "full", "tokens": 16384, "vocab": 50400, "dtype": "bfloat16"}
# Baselines the README no longer compares against (their records stay, in the per-device tables):
# `apa_fast.reference` timed as the baseline before December 4, 2026.
SUPERSEDED = {"reference", "reference_compiled", "matmul+reference"}
CPU_MEMORY_TARGET = {"op": "apa_loss", "mode": "full", "tokens": 2048, "vocab": 50400, "dtype": "float32"}


# ----------------------------------------------------------------------------------------------------
# Records -> latest figure per (device, case, provider label).
# ----------------------------------------------------------------------------------------------------
def case_key(record: dict) -> tuple:
    """The fields naming what was measured, as a hashable, sortable tuple of (name, value)."""
    skip = set(METADATA_FIELDS) | set(PROVIDER_FIELDS) | {"device"}
    return tuple(sorted((k, v) for k, v in record.items() if k not in skip and v is not None))


def _label(record: dict, backends_per_provider: dict) -> str:
    label = record["provider"] + (f"-{record['variant']}" if record.get("variant") else "")
    if len(backends_per_provider[(record["op"], label)]) > 1:  # e.g. one op timed on two backends
        label += f" ({record.get('backend')})"
    return label


def latest_figures(records: list[dict]) -> dict:
    """{device: {case_key: {label: figures}}}: per field, the latest non-empty value (records in date order).

    An ``error`` (out of memory) shows only while it is the latest word on that measurement.
    """
    backends = collections.defaultdict(set)
    for record in records:
        backends[(record.get("op"), record["provider"] + (f"-{record['variant']}" if record.get("variant") else ""))
                 ].add(record.get("backend"))
    table = collections.defaultdict(lambda: collections.defaultdict(dict))
    for record in sorted(records, key=lambda r: r.get("date") or ""):
        if not record.get("provider"):
            continue
        figures = table[record["device"]][case_key(record)].setdefault(_label(record, backends), {})
        figures.update({k: record.get(k) for k in MEASURED if record.get(k) is not None})
        figures["error"] = record.get("error")
        if record.get("error"):
            figures.pop("ms", None)
    return table


# ----------------------------------------------------------------------------------------------------
# Markdown.
# ----------------------------------------------------------------------------------------------------
def _format_ms(ms: float) -> str:
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _cell(figures: dict | None) -> str:
    if not figures:
        return "—"
    if figures.get("error"):
        return figures["error"].replace("out of memory", "OOM")
    parts = []
    if figures.get("ms") is not None:
        parts.append(f"{_format_ms(figures['ms'])} ms")
    if figures.get("peak_mem_mb") is not None:
        parts.append(f"{figures['peak_mem_mb']:.0f} MiB")
    return " · ".join(parts) or "—"


def _ratio(numerator, denominator) -> str:
    if numerator is None or not denominator:
        return "—"
    return f"{numerator / denominator:.2f}×"


def _order_labels(labels) -> list[str]:
    return sorted(labels, key=lambda label: (not label.startswith(OURS), label != OURS, label))


def _shape_columns(keys) -> list[str]:
    names = []
    for key in keys:
        names += [name for name, _ in key if name not in names and name != "op"]
    first = [n for n in ("mode", "tokens", "vocab", "dtype") if n in names]
    return first + sorted(n for n in names if n not in first)


def _row_sort(key: tuple):
    fields = dict(key)
    return (MODE_ORDER.get(fields.get("mode"), 9), str(fields.get("dtype")), fields.get("vocab") or 0,
            fields.get("tokens") or 0, key)


def _show(name, value) -> str:
    if name == "dtype":
        return SHORT_DTYPE.get(value, str(value))
    if isinstance(value, int) and value >= 10000:
        return f"{value:,}"
    return str(value)


def _our_label(labels: list[str]) -> str:
    """The apa_fast column the speed-ups refer to: no variant, and a compiled backend over the torch one."""
    plain = [label for label in labels if label == OURS or label.startswith(OURS + " (")]
    fallback = plain[0] if plain else labels[0]  # an op benchmarked under other names: its first provider
    return next((label for label in plain if not label.endswith("(torch)")), fallback)


def op_table(cases: dict) -> list[str]:
    """Markdown rows for one op: a cell per provider (time · peak memory), speed-ups and floor fraction."""
    keys = sorted(cases, key=_row_sort)
    labels = _order_labels({label for key in keys for label in cases[key]})
    columns = _shape_columns(keys)
    ours = _our_label(labels)
    others = [label for label in labels if not label.startswith(OURS) and label != ours]
    header = columns + labels + [f"{ours} vs {other}" for other in others] + [f"{ours} % of copy BW"]
    rows = []
    for key in keys:
        fields, row = dict(key), cases[key]
        ours_ms = (row.get(ours) or {}).get("ms")
        speedups = [_ratio((row.get(other) or {}).get("ms"), ours_ms) for other in others]
        floor = (row.get(ours) or {}).get("floor_fraction")
        cells = ([_show(c, fields.get(c, "")) for c in columns] + [_cell(row.get(label)) for label in labels]
                 + speedups + [f"{100 * floor:.0f}%" if floor else "—"])
        rows.append(cells)
    return _markdown(header, rows)


def _markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table without the columns that hold no figure at all."""
    keep = [i for i in range(len(header)) if any(row[i] != "—" for row in rows)]
    lines = ["| " + " | ".join(header[i] for i in keep) + " |", "|" + "---|" * len(keep)]
    return lines + ["| " + " | ".join(row[i] for i in keep) + " |" for row in rows]


def _by_op(cases: dict) -> dict:
    grouped = collections.defaultdict(dict)
    for key, row in cases.items():
        grouped[dict(key)["op"]][key] = row
    return grouped


def compact(cases: dict) -> dict:
    """The README's subset: per field, the value with the most rows (the preferred mode, dtype, vocab on ties)."""
    keys = list(cases)
    for name in sorted({n for key in keys for n, _ in key} - {"op", "tokens"}):
        values = collections.Counter(dict(key).get(name) for key in keys)
        if len(values) > 1:
            most = max(values.values())  # the value with the most rows; ties go to the preferred one
            keep = PREFERRED.get(name) if values.get(PREFERRED.get(name)) == most else values.most_common(1)[0][0]
            keys = [key for key in keys if dict(key).get(name) == keep]
    shown = {key: {label: figures for label, figures in cases[key].items() if label not in SUPERSEDED} for key in keys}
    return {key: row for key, row in shown.items() if row}


def _find(cases: dict, wanted: dict) -> dict:
    for key, row in cases.items():
        if all(dict(key).get(k) == v for k, v in wanted.items()):
            return row
    return {}


def targets(cases: dict) -> list[str]:
    """The issue's targets, where the records hold the figures they need."""
    lines = []
    headline = _find(cases, HEADLINE)
    ours = headline.get(OURS, {})
    if ours.get("ms"):
        logits_mib = HEADLINE["tokens"] * HEADLINE["vocab"] * 2 / 2**20
        inplace_peak = headline.get(f"{OURS}-inplace", {}).get("peak_mem_mb")
        lines += [
            f"- apa_loss, bf16, 16,384 × 50,400, forward+backward: {_format_ms(ours['ms'])} ms; "
            f"{_ratio(headline.get('eager', {}).get('ms'), ours['ms'])} faster than plain eager (target 3×), "
            f"{_ratio(headline.get('eager_compiled', {}).get('ms'), ours['ms'])} than torch.compile of it "
            "(target 1.3×)",
            f"- bandwidth: {100 * (ours.get('floor_fraction') or 0):.0f}% of the measured copy bandwidth "
            f"({ours.get('copy_gbps') or 0:.0f} GB/s) over the floor's bytes, 2L (target 70%)",
            f"- peak memory above the inputs: {ours.get('peak_mem_mb') or 0:.0f} MiB "
            f"({(ours.get('peak_mem_mb') or 0) / logits_mib:.2f} gradient buffers of {logits_mib:.0f} MiB; "
            f"in-place {inplace_peak or 0:.0f} MiB) against "
            f"{headline.get('eager', {}).get('peak_mem_mb') or 0:.0f} MiB plain eager (target ≤ 1 buffer, 0 in place)",
        ]
        lines += _design_lines(headline)
    memory = _find(cases, CPU_MEMORY_TARGET)
    reference_peak = memory.get("eager", {}).get("peak_mem_mb")
    if reference_peak and memory.get(OURS, {}).get("memory_metric") == "rss_hwm":
        logits_mib = 2048 * 50400 * 4 / 2**20
        for label in (OURS, f"{OURS}-inplace"):
            peak = memory.get(label, {}).get("peak_mem_mb")
            if peak is not None:
                lines.append(f"- CPU peak RSS, fp32 2,048 × 50,400 forward+backward, {label}: {peak:.0f} MiB "
                             f"against {reference_peak:.0f} MiB for plain eager = {peak / reference_peak:.2f} "
                             f"(target ≤ 0.25; logits are {logits_mib:.0f} MiB)")
    return lines


def _design_lines(headline: dict) -> list[str]:
    """Each provider's bytes by design at the headline shape (in L, the logits' bytes) and the rate it reached."""
    logits_bytes = HEADLINE["tokens"] * HEADLINE["vocab"] * 2
    shown = [(label, figures) for label, figures in sorted(headline.items())
             if figures.get("ms") and figures.get("bytes_by_design")]
    if not shown:
        return []
    cells = [f"{label} {figures['bytes_by_design'] / logits_bytes:.3g}L in {_format_ms(figures['ms'])} ms "
             f"({figures['bytes_by_design'] / (figures['ms'] * 1e6):.0f} GB/s)" for label, figures in shown]
    return ["- bytes by design (L = the logits' bytes, 1.65 GB): " + "; ".join(cells)]


def device_section(device: str, cases: dict, *, full: bool) -> list[str]:
    lines = [f"### {device}", ""]
    goal_lines = targets(cases)
    if goal_lines and not full:
        lines += ["Targets:", "", *goal_lines, ""]
    for op, op_cases in sorted(_by_op(cases).items()):
        shown = op_cases if full else compact(op_cases)
        constant = {} if full else _constant_fields(shown)
        title = f"**{op}**" + (f" ({', '.join(f'{k} {_show(k, v)}' for k, v in constant.items())})" if constant else "")
        lines += [title, "", *op_table(shown), ""]
    return lines


def _constant_fields(cases: dict) -> dict:
    keys = list(cases)
    common = {name: value for name, value in keys[0] if name not in ("op", "tokens")}
    return {name: value for name, value in common.items() if all(dict(k).get(name) == value for k in keys)}


# ----------------------------------------------------------------------------------------------------
# Plots.
# ----------------------------------------------------------------------------------------------------
def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("_")


def plot_groups(cases: dict) -> dict:
    """{(op, mode, dtype, other fields): {vocab: {label: [(tokens, figures)]}}} for cases with tokens."""
    groups = collections.defaultdict(lambda: collections.defaultdict(lambda: collections.defaultdict(list)))
    for key, row in cases.items():
        fields = dict(key)
        if fields.get("tokens") is None:
            continue
        group = tuple(sorted(((k, v) for k, v in key if k not in ("tokens", "vocab")), key=_plot_field_order))
        for label, figures in row.items():
            groups[group][fields.get("vocab")][label].append((fields["tokens"], figures))
    return groups


def _plot_field_order(item) -> tuple:
    order = {"op": 0, "mode": 1, "dtype": 2}
    return order.get(item[0], 3), item[0]


def _swept(lines: dict) -> bool:
    """A panel is worth drawing when some provider was measured at two token counts or more."""
    return any(len({tokens for tokens, _ in points}) >= 2 for points in lines.values())


def write_plots(device: str, cases: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for group, panels in sorted(plot_groups(cases).items(), key=lambda item: str(item[0])):
        vocabs = sorted((v for v in panels if _swept(panels[v])), key=lambda v: v or 0)
        if not vocabs:
            continue
        # One colour per provider across the panels, whichever providers a panel lacks.
        labels = _order_labels({label for vocab in vocabs for label in panels[vocab]})
        colours = {label: f"C{i}" for i, label in enumerate(labels)}
        fig, axes = plt.subplots(2, len(vocabs), figsize=(4.2 * len(vocabs), 6.4), squeeze=False)
        for column, vocab in enumerate(vocabs):
            for label in _order_labels(panels[vocab]):
                points = sorted(panels[vocab][label], key=lambda p: p[0])
                for row, metric in enumerate(("ms", "peak_mem_mb")):
                    xs = [t for t, f in points if f.get(metric) is not None]
                    ys = [f[metric] for _, f in points if f.get(metric) is not None]
                    if xs:
                        axes[row][column].plot(xs, ys, marker="o", label=label, color=colours[label])
            axes[0][column].set_title(f"vocab {vocab:,}" if vocab else "")
            for row, ylabel in enumerate(("median time (ms)", "peak memory above inputs (MiB)")):
                axis = axes[row][column]
                axis.set_xscale("log", base=2)
                # Memory may be ~0 (the in-place backward): symlog shows 0 where a log axis would drop it.
                if row == 0:
                    axis.set_yscale("log")
                else:
                    axis.set_yscale("symlog", linthresh=1.0)
                    axis.set_ylim(bottom=0, top=axis.get_ylim()[1] * 2)
                axis.set_xlabel("tokens")
                axis.set_ylabel(ylabel)
                axis.grid(True, which="both", alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.suptitle(f"{device}: " + ", ".join(f"{k} {_show(k, v)}" for k, v in group))
        fig.tight_layout()
        path = out_dir / (slug(device) + "-" + "-".join(slug(_show(k, v)) for k, v in group) + ".png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# ----------------------------------------------------------------------------------------------------
def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", type=Path, help="JSONL record files (default: benchmarks/results/*.jsonl)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the results folder)")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    out_dir = args.out or results_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    table = latest_figures(load_records(args.files or None))
    summary = ["## Benchmarks", "",
               "Median time · peak memory above the inputs (CUDA allocator peak on GPUs; peak resident set of a "
               "fresh process on CPUs, forward+backward only). Speed-ups: the other provider's time over "
               "apa_fast's. Regenerate with `python -m benchmarks.report`.", ""]
    for device in sorted(table):
        summary += device_section(device, table[device], full=False)
        (out_dir / f"{slug(device)}.md").write_text("\n".join(device_section(device, table[device], full=True)) + "\n")
        if not args.no_plots:
            plots = write_plots(device, table[device], out_dir)
            summary += [f"![{p.stem}]({p.name})" for p in plots] + [""]
    text = "\n".join(summary) + "\n"
    (out_dir / "summary.md").write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
