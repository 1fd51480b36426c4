"""Render a benchmark results JSON (written by `pytest benchmarks/`) as markdown tables and a plot.

    python -m benchmarks.report .benchmarks/cgc-results-cpu.json --md table.md --png speedup.png

Tables: per level and mode, each case's median time per provider and the speedup over
moelora_loop; the layer's cost over a bare frozen Linear; on CUDA the LoRA branch's achieved
bandwidth as a share of the device's measured copy bandwidth (roofline %); model-level tokens/s.
The plot: speedup over moelora_loop of every provider, per case, one panel per level.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict

BASELINE = "moelora_loop"
PROVIDER_ORDER = ["fused", "cuda_ref", "torch", "reference", "torch_compile", "moelora_loop", "peft_lora",
                  "peft_mixed", "bare_linear", "cgc", "moelora", "peft"]


def _providers(rows: list[dict]) -> list[str]:
    present = {r["provider"] for r in rows}
    return [p for p in PROVIDER_ORDER if p in present] + sorted(present - set(PROVIDER_ORDER))


def _fmt_time(s: float | None) -> str:
    if s is None:
        return "–"
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def _by(rows, *keys):
    out = defaultdict(list)
    for r in rows:
        out[tuple(r[k] for k in keys)].append(r)
    return out


def _case_label(r: dict) -> str:
    label = f"M={r['M']} T={r['T']} S,K,r={r['S']},{r['K']},{r['r']} {r['mix']}"
    return label + (f" ({r['shape']})" if r.get("shape") else "")


def timing_table(rows: list[dict], level: str, mode: str) -> str:
    """One row per case: median time of each provider (p20–p80 omitted for width), and the
    speedup of each provider over moelora_loop."""
    rows = [r for r in rows if r["level"] == level and r["mode"] == mode]
    if not rows:
        return ""
    providers = _providers(rows)
    speed = [p for p in providers if p not in (BASELINE, "bare_linear")]  # the floor has its own table
    head = ["case"] + providers + [f"{p} ×" for p in speed if any(r["provider"] == BASELINE for r in rows)]
    lines = [f"| {' | '.join(head)} |", "|" + "---|" * len(head)]
    for _case, group in _by(rows, "case").items():
        t = {r["provider"]: r["median_s"] for r in group}
        cells = [_case_label(group[0])] + [_fmt_time(t.get(p)) for p in providers]
        if BASELINE in t:
            cells += [f"{t[BASELINE] / t[p]:.2f}" if p in t else "–" for p in speed]
        lines.append(f"| {' | '.join(cells)} |")
    return "\n".join(lines)


def layer_cost_table(rows: list[dict], level: str = "layer", mode: str = "full") -> str:
    """Each provider's time over the bare frozen Linear's, per case (1.00 = free adapters)."""
    rows = [r for r in rows if r["level"] == level and r["mode"] == mode]
    providers = [p for p in _providers(rows) if p != "bare_linear"]
    if not rows or not any(r["provider"] == "bare_linear" for r in rows):
        return ""
    head = ["case", "bare Linear"] + [f"{p} / bare" for p in providers]
    lines = [f"| {' | '.join(head)} |", "|" + "---|" * len(head)]
    for _case, group in _by(rows, "case").items():
        t = {r["provider"]: r["median_s"] for r in group}
        if "bare_linear" not in t:
            continue
        cells = [_case_label(group[0]), _fmt_time(t["bare_linear"])]
        cells += [f"{t[p] / t['bare_linear']:.2f}" if p in t else "–" for p in providers]
        lines.append(f"| {' | '.join(cells)} |")
    return "\n".join(lines)


def roofline_table(rows: list[dict], copy_bw: float) -> str:
    """Achieved bandwidth of the LoRA branch (least activation traffic / median) vs copy bandwidth."""
    rows = [r for r in rows if r["level"] == "op" and r.get("lora_bytes")]
    if not rows:
        return ""
    providers = _providers(rows)
    head = ["mode", "case"] + [f"{p} GB/s (%)" for p in providers]
    lines = [f"| {' | '.join(head)} |", "|" + "---|" * len(head)]
    for (mode, _case), group in _by(rows, "mode", "case").items():
        cells = [mode, _case_label(group[0])]
        got = {r["provider"]: r["lora_bytes"] / r["median_s"] for r in group}
        cells += [f"{got[p] / 1e9:.0f} ({100 * got[p] / copy_bw:.0f}%)" if p in got else "–"
                  for p in providers]
        lines.append(f"| {' | '.join(cells)} |")
    return "\n".join(lines)


def throughput_table(rows: list[dict], level: str) -> str:
    """Model level: tokens/s of each provider per case."""
    rows = [r for r in rows if r["level"] == level]
    if not rows:
        return ""
    providers = _providers(rows)
    head = ["case"] + [f"{p} tok/s" for p in providers]
    lines = [f"| {' | '.join(head)} |", "|" + "---|" * len(head)]
    for (case,), group in _by(rows, "case").items():
        tps = {r["provider"]: r["tokens_per_s"] for r in group}
        cells = [f"{tps[p]:,.0f}" if p in tps else "–" for p in providers]
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def speedup_summary(rows: list[dict], provider: str, level: str, mode: str):
    """(min, median, max) over cases of moelora_loop's median time / `provider`'s, or None."""
    t = defaultdict(dict)
    for r in rows:
        if r["level"] == level and r["mode"] == mode:
            t[r["case"]][r["provider"]] = r["median_s"]
    ratios = sorted(v[BASELINE] / v[provider] for v in t.values() if BASELINE in v and provider in v)
    if not ratios:
        return None
    return ratios[0], statistics.median(ratios), ratios[-1]


def summary_table(rows: list[dict]) -> str:
    """Per level and mode: min / median / max over cases of each provider's speedup over moelora_loop,
    and of its time over the bare frozen Linear (layer levels)."""
    lines = ["| level | mode | provider | × moelora_loop (min / median / max) | / bare Linear (median) |",
             "|---|---|---|---|---|"]
    for (level, mode), group in _by(rows, "level", "mode").items():
        t = defaultdict(dict)
        for r in group:
            t[r["case"]][r["provider"]] = r["median_s"]
        for p in _providers(group):
            if p in (BASELINE, "bare_linear"):
                continue
            s = speedup_summary(rows, p, level, mode)
            cost = sorted(v[p] / v["bare_linear"] for v in t.values() if p in v and "bare_linear" in v)
            lines.append(f"| {level} | {mode} | {p} | "
                         + (f"{s[0]:.2f} / {s[1]:.2f} / {s[2]:.2f}" if s else "–") + " | "
                         + (f"{statistics.median(cost):.2f}" if cost else "–") + " |")
    return "\n".join(lines)


def render_markdown(data: dict) -> str:
    env, rows = data["environment"], data["results"]
    out = [
        f"Date {env['date']}; size `{env['size']}`; {env.get('dtype', '')}; CPU {env['cpu']} "
        f"({env['cpu_count']} cores); GPU {env['gpu'] or 'none'}; torch {env['torch']}; "
        f"triton {env['triton']}; commit `{env['git_commit'][:12]}`; measured copy bandwidth "
        f"{env['copy_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s.",
        "",
        "Median of the timed rounds; `P ×` = moelora_loop's time / P's (higher is faster).",
        "",
        "### Summary over cases",
        "",
        summary_table(rows),
    ]
    titles = [("op", "forward", "Op level (LoRA branch alone): forward"),
              ("op", "backward", "Op level: backward"),
              ("op", "full", "Op level: forward + backward"),
              ("layer", "full", "Layer level (frozen base + experts + gate): training, forward + backward"),
              ("infer", "forward", "Layer level: mixed-task inference (no grad, one task per sequence)")]
    for level, mode, title in titles:
        table = timing_table(rows, level, mode)
        if table:
            out += ["", f"### {title}", "", table]
    for level, mode, title in [("layer", "full", "training"), ("infer", "forward", "inference")]:
        table = layer_cost_table(rows, level, mode)
        if table:
            out += ["", f"### Layer cost over a bare frozen Linear ({title})", "", table]
    if env.get("gpu"):
        table = roofline_table(rows, env["copy_bandwidth_bytes_per_s"])
        if table:
            out += ["", "### LoRA branch bandwidth vs measured copy bandwidth (roofline)", "", table]
    for level, title in [("model-train", "Model level: training step"),
                         ("model-generate", "Model level: mixed-task generation")]:
        table = throughput_table(rows, level)
        if table:
            out += ["", f"### {title}", "", table]
    return "\n".join(out) + "\n"


def render_plot(data: dict, path: str) -> None:
    """Bar chart: speedup over moelora_loop (log scale) of each provider per case, one panel per
    level (op forward+backward, layer training, layer inference)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["results"]
    panels = [(lv, md, t) for lv, md, t in [("op", "full", "op: forward+backward"),
                                           ("layer", "full", "layer: training step"),
                                           ("infer", "forward", "layer: mixed inference")]
              if any(r["level"] == lv and r["mode"] == md for r in rows)]
    if not panels:
        return
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 3.2 * len(panels)), squeeze=False)
    for ax, (level, mode, title) in zip(axes[:, 0], panels, strict=True):
        sel = [r for r in rows if r["level"] == level and r["mode"] == mode]
        cases = list(dict.fromkeys(r["case"] for r in sel))
        t = defaultdict(dict)
        for r in sel:
            t[r["case"]][r["provider"]] = r["median_s"]
        providers = [p for p in _providers(sel) if p not in (BASELINE, "bare_linear")]
        width = 0.8 / max(len(providers), 1)
        for i, p in enumerate(providers):
            xs = [j + i * width for j, c in enumerate(cases) if p in t[c] and BASELINE in t[c]]
            ys = [t[c][BASELINE] / t[c][p] for c in cases if p in t[c] and BASELINE in t[c]]
            ax.bar(xs, ys, width, label=p)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_yscale("log")
        ax.set_ylabel("× vs moelora_loop")
        ax.set_title(title, fontsize=10)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
        labels = [c.split("-", 1)[1] if c.startswith("M") else c for c in cases]
        ax.set_xticklabels([lb.replace(f"{sel[0]['d_in']}x{sel[0]['d_out']}-", "") for lb in labels],
                           rotation=60, ha="right", fontsize=7)
        ax.legend(fontsize=7, ncol=len(providers))
    env = data["environment"]
    fig.suptitle(f"CGC-LoRA speedup over the MOELoRA loop ({env['size']}: {env['gpu'] or env['cpu']}, "
                 f"{env.get('dtype', '')})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", help="JSON written by pytest benchmarks/ (--bench-out)")
    ap.add_argument("--md", help="write the markdown here (it is always printed)")
    ap.add_argument("--png", help="write the speedup plot here")
    args = ap.parse_args(argv)
    with open(args.results) as f:
        data = json.load(f)
    md = render_markdown(data)
    print(md)
    if args.md:
        with open(args.md, "w") as f:
            f.write(md)
    if args.png:
        render_plot(data, args.png)


if __name__ == "__main__":
    main()
