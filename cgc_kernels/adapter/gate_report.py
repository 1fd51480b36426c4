"""Gate inspection: how much of each task's update comes from shared versus task-specific experts.

    table = gate_table(cgc)                      # or gate_table_from_dir(dir): no base model needed
    table.weights                                # [T, L, S+K] task x layer x expert, rows sum to 1
    shared_specific_split(cgc)                   # {task: {"shared": 0.62, "specific": 0.38}}
    write_gate_report(table, "gates.png")        # prints the split, writes the heatmap + a CSV
    start = gate_snapshot(cgc); train(...); print(gate_movement(start, cgc).format())   # what training moved
    cgc-lora inspect DIR [--out gates.png]       # the same from a save_pretrained directory

A task gate is a softmax over the S shared experts of the task's cluster (columns 0..S-1) and
its own K experts (columns S..S+K-1), so "shared share" = the sum of the first S columns. With
gate_scope="layer" every adapted layer has its own row (L = number of adapted layers); with
gate_scope="model" one gate serves every layer (L = 1, layer "(model)"). Token gates depend on
the input and have no table (ValueError).
"""

from __future__ import annotations

import csv
import os
import re
import sys
from dataclasses import dataclass

import torch

from .config import CGCLoRAConfig
from .gates import TaskGate

MODEL_WIDE = "(model)"


# Within a block, the order its forward runs the projections: attention, then the MLP.
_FORWARD = ("q_proj", "k_proj", "v_proj", "qkv_proj", "c_attn", "query", "key", "value", "o_proj", "out_proj",
            "dense", "gate_proj", "up_proj", "c_fc", "fc1", "w1", "w3", "down_proj", "c_proj", "fc2", "w2")


def _block_of(name: str) -> str:
    """The block index in a module path (model.layers.12.mlp.down_proj -> "12"), or "-"."""
    m = re.search(r"\.(\d+)(?:\.|$)", "." + name)
    return m.group(1) if m else "-"


def _forward_key(name: str) -> tuple:
    """Sort key of adapted modules in forward order: by block number, attention before MLP, then
    the projections' order within each (q, k, v, o; gate, up, down), other names alphabetically."""
    block = _block_of(name)
    tail = name.rsplit(".", 1)[-1]
    return (int(block) if block != "-" else 1 << 30, 0 if re.search(r"attn|attention", name) else 1,
            _FORWARD.index(tail) if tail in _FORWARD else len(_FORWARD), name)


@dataclass
class GateTable:
    """Every task's expert mixture per layer.

    Attributes:
        tasks: [T] global task names.
        clusters: [T] cluster name of each task.
        layers: [L] adapted module paths in forward order, or ["(model)"] for a model-wide gate.
        experts: [S+K] column names: "shared0".."shared{S-1}" (the task's cluster's), then
            "task0".."task{K-1}" (the task's own).
        num_shared: S.
        weights: [T, L, S+K] float32; every [t, l, :] sums to 1.
    """

    tasks: list[str]
    clusters: list[str]
    layers: list[str]
    experts: list[str]
    num_shared: int
    weights: torch.Tensor

    def shared_share(self) -> torch.Tensor:
        """[T, L] gate weight on the shared experts (1 - this is on the task's own experts)."""
        return self.weights[..., : self.num_shared].sum(-1)

    def split(self) -> dict[str, dict[str, float]]:
        """{task: {"shared", "specific": mean over layers; "shared_min", "shared_max": over layers}}."""
        share = self.shared_share()
        return {
            t: {"shared": float(share[i].mean()), "specific": float(1 - share[i].mean()),
                "shared_min": float(share[i].min()), "shared_max": float(share[i].max())}
            for i, t in enumerate(self.tasks)
        }

    def rows(self) -> list[tuple[str, str, str, str, float]]:
        """(task, cluster, layer, expert, weight) for every entry, task-major."""
        return [
            (t, self.clusters[i], layer, e, float(self.weights[i, j, k]))
            for i, t in enumerate(self.tasks)
            for j, layer in enumerate(self.layers)
            for k, e in enumerate(self.experts)
        ]

    def format(self) -> str:
        """The shared / task-specific split per task as a text table."""
        split = self.split()
        width = max(4, *(len(t) for t in self.tasks))
        cw = max(7, *(len(c) for c in self.clusters))
        lines = [f"{'task':<{width}}  {'cluster':<{cw}}  shared  specific  shared over layers (min..max)"]
        for i, t in enumerate(self.tasks):
            s = split[t]
            lines.append(f"{t:<{width}}  {self.clusters[i]:<{cw}}  {s['shared']:6.3f}  {s['specific']:8.3f}  "
                         f"{s['shared_min']:.3f}..{s['shared_max']:.3f}")
        n = len(self.layers)
        scope = "one model-wide gate" if self.layers == [MODEL_WIDE] else f"{n} layer{'s' * (n != 1)}"
        lines.append(f"({scope}; S={self.num_shared} shared, K={len(self.experts) - self.num_shared} "
                     f"task-specific experts per task)")
        return "\n".join(lines)

    def to_csv(self, path: str | os.PathLike) -> None:
        """One row per (task, layer, expert): task, cluster, layer, expert, weight."""
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["task", "cluster", "layer", "expert", "weight"])
            for row in self.rows():
                w.writerow([*row[:4], f"{row[4]:.6f}"])


def _expert_names(S: int, K: int) -> list[str]:
    return [f"shared{i}" for i in range(S)] + [f"task{j}" for j in range(K)]


def _check_task_gate(config: CGCLoRAConfig) -> None:
    if config.gate != "task":
        raise ValueError("this adapter has token gates: their expert mixture depends on each token, "
                         "so there is no per-task gate table")


def gate_table(cgc) -> GateTable:
    """The GateTable of a live CGCModel (its current gate weights)."""
    config = cgc.cgc_config
    _check_task_gate(config)
    layers = cgc.adapted_layers()
    names = sorted(layers, key=_forward_key)
    with torch.no_grad():
        if config.gate_scope == "model":
            names, weights = [MODEL_WIDE], layers[names[0]].task_gates().detach().float().cpu()[:, None]
        else:
            weights = torch.stack([layers[n].task_gates().detach().float().cpu() for n in names], dim=1)
    cluster_names = cgc.clusters
    return GateTable(tasks=list(cgc.tasks), clusters=[cluster_names[c] for c in cgc.task_cluster],
                     layers=names, experts=_expert_names(config.num_shared_experts, config.num_task_experts),
                     num_shared=config.num_shared_experts, weights=weights)


_GATE_KEY = re.compile(r"^(?:(?P<layer>.+)\.)?gate\[(?P<cluster>[^\]]+)\]\.(?P<param>.+)$")


def gate_table_from_dir(directory: str | os.PathLike) -> GateTable:
    """The GateTable of an adapter saved by CGCModel.save_pretrained, read from its files alone
    (the gates do not depend on the base model, so none is loaded)."""
    from safetensors.torch import load_file

    from .save_load import WEIGHTS_NAME

    config = CGCLoRAConfig.from_pretrained(directory)
    _check_task_gate(config)
    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}")
    params: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in load_file(path).items():
        m = _GATE_KEY.match(key)
        if m:
            params.setdefault((m["layer"] or MODEL_WIDE, m["cluster"]), {})[m["param"]] = value
    clusters = config.cluster_names
    tasks_of = {c: [t for t in config.tasks if (config.clusters or {}).get(t, c) == c] for c in clusters}
    layers = sorted({layer for layer, _ in params}, key=_forward_key)
    if not layers:
        raise ValueError(f"{path} holds no gate weights (is it a CGC-LoRA adapter?)")
    per_layer = []
    for layer in layers:
        parts = []
        for c in clusters:
            if (layer, c) not in params:
                raise ValueError(f"{path} lacks the gate of cluster {c!r} for {layer}")
            gate = TaskGate(len(tasks_of[c]), config.num_experts, config.gate_embedding_dim, config.gate_init)
            gate.load_state_dict(params[(layer, c)])
            with torch.no_grad():
                parts.append(gate().float())
        per_layer.append(torch.cat(parts, dim=0))  # [T, S+K] in the config's cluster order
    # Global task order is the clusters' task lists concatenated (as CGCModel numbers them).
    order = [t for c in clusters for t in tasks_of[c]]
    return GateTable(tasks=order, clusters=[config.clusters[t] if config.clusters else clusters[0] for t in order],
                     layers=layers, experts=_expert_names(config.num_shared_experts, config.num_task_experts),
                     num_shared=config.num_shared_experts, weights=torch.stack(per_layer, dim=1))


def gate_snapshot(cgc) -> GateTable | None:
    """The GateTable of a CGCModel now (to compare after training), or None for token gates."""
    return None if cgc.cgc_config.gate != "task" else gate_table(cgc)


@dataclass
class GateMovement:
    """How a run moved the task gates: two GateTables of the same adapter, before and after.

    `summary()` per task: the shared share's range over layers at the start and at the end
    ("start_min".."start_max", "end_min".."end_max"), its mean change over layers, and the
    largest change of any expert's weight in any layer ("max_change"; what MOELoRA's all-shared
    gates move, where the shared share is always 1).
    """

    start: GateTable
    end: GateTable

    def __post_init__(self):
        a, b = self.start, self.end
        if (a.tasks, a.layers, a.experts) != (b.tasks, b.layers, b.experts):
            raise ValueError("gate tables of different adapters: tasks, layers or experts differ")

    def summary(self) -> dict[str, dict[str, float]]:
        s0, s1 = self.start.shared_share(), self.end.shared_share()  # [T, L]
        change = (self.end.weights - self.start.weights).abs().amax(dim=(1, 2))  # [T]
        return {t: {"start_min": float(s0[i].min()), "start_max": float(s0[i].max()),
                    "end_min": float(s1[i].min()), "end_max": float(s1[i].max()),
                    "mean_change": float((s1[i] - s0[i]).mean()), "max_change": float(change[i])}
                for i, t in enumerate(self.end.tasks)}

    def largest_change(self) -> float:
        """The largest change of any gate weight (any task, layer, expert)."""
        return float((self.end.weights - self.start.weights).abs().max())

    def format(self) -> str:
        """One line per task: shared share min..max over layers before -> after, mean change of the
        shared share, largest change of any expert weight."""
        summary = self.summary()
        width = max(4, *(len(t) for t in self.end.tasks))
        n = len(self.end.layers)
        over = "the model-wide gate" if self.end.layers == [MODEL_WIDE] else f"{n} layer{'s' * (n != 1)}"
        lines = [f"{'task':<{width}}  shared share over {over} (min..max): start -> end   "
                 f"mean change  largest expert-weight change"]
        for t, m in summary.items():
            lines.append(f"{t:<{width}}  {m['start_min']:.3f}..{m['start_max']:.3f} -> {m['end_min']:.3f}.."
                         f"{m['end_max']:.3f}   {m['mean_change']:+.3f}   {m['max_change']:.3f}")
        return "\n".join(lines)


def gate_movement(start: GateTable, end) -> GateMovement:
    """The GateMovement from `start` (a gate_snapshot) to `end` (a GateTable or the CGCModel now)."""
    return GateMovement(start, end if isinstance(end, GateTable) else gate_table(end))


def shared_specific_split(cgc_or_table) -> dict[str, dict[str, float]]:
    """{task: {"shared": mean gate weight on shared experts, "specific": on the task's own,
    "shared_min"/"shared_max": over layers}} of a CGCModel or a GateTable."""
    table = cgc_or_table if isinstance(cgc_or_table, GateTable) else gate_table(cgc_or_table)
    return table.split()


def plot_gate_heatmap(table: GateTable, path: str | os.PathLike) -> None:
    """Write a PNG sized for a screen: per task, the gate weight on the shared experts by adapted
    module in forward order. Top: a heat strip (a row per task, a column per module, blocks
    separated by thin lines), its colour scale stretched over the values present so that small
    differences show. Bottom: a line per task of each block's mean. Both labelled by block."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    share = table.shared_share().numpy()
    T, L = share.shape
    blocks = [_block_of(name) for name in table.layers]
    order = list(dict.fromkeys(blocks))  # blocks in forward order
    lo, hi = float(share.min()), float(share.max())
    if hi - lo < 1e-3:  # all equal: a visible scale around the value
        lo, hi = lo - 5e-4, hi + 5e-4
    strip_h = 0.6 + 0.3 * T
    fig, (ax, ax_line) = plt.subplots(2, 1, figsize=(12, strip_h + 3.6),
                                      gridspec_kw={"height_ratios": [strip_h, 3.0]})
    image = ax.imshow(share, aspect="auto", cmap="viridis", vmin=lo, vmax=hi, interpolation="nearest")
    ax.set_yticks(range(T), table.tasks, fontsize=9)
    starts = [i for i in range(L) if i == 0 or blocks[i] != blocks[i - 1]]
    for s in starts[1:]:
        ax.axvline(s - 0.5, color="white", linewidth=0.6)
    every = max(1, len(starts) // 16)
    if L <= 48:  # few enough to name each module: block.projection
        ax.set_xticks(range(L), [f"{b}.{n.rsplit('.', 1)[-1]}" for b, n in zip(blocks, table.layers, strict=True)],
                      fontsize=7, rotation=90)
    else:
        ticks = [(s + (starts[k + 1] if k + 1 < len(starts) else L)) / 2 - 0.5 for k, s in enumerate(starts)]
        ax.set_xticks(ticks[::every], [blocks[s] for s in starts][::every], fontsize=8)
    ax.set_xlabel(f"block (forward order; {L} adapted module{'s' * (L != 1)}, one column each)", fontsize=9)
    fig.colorbar(image, ax=ax, pad=0.01, label="on shared", fraction=0.04)
    per_block = [[float(share[t, [i for i in range(L) if blocks[i] == b]].mean()) for b in order] for t in range(T)]
    x = range(len(order))
    for t in range(T):
        ax_line.plot(x, per_block[t], marker="o", markersize=3, linewidth=1.2, label=table.tasks[t])
    ax_line.set_xticks(list(x)[::every], order[::every], fontsize=8)
    ax_line.set_xlabel("block (forward order)", fontsize=9)
    ax_line.set_ylabel("weight on shared experts\n(mean over the block)", fontsize=9)
    ax_line.grid(alpha=0.3)
    ax_line.legend(fontsize=8, ncol=min(T, 6), loc="best")
    fig.suptitle(f"CGC-LoRA gates: weight on the {table.num_shared} shared expert(s) vs each task's "
                 f"{len(table.experts) - table.num_shared} own, per task and layer (scale {lo:.2f}..{hi:.2f})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_gate_report(source, out_png: str | os.PathLike | None = None, csv_path: str | os.PathLike | None = None,
                      file=None) -> GateTable:
    """Print the shared / task-specific split per task, write the heatmap PNG (if `out_png`) and
    the full table as CSV (if `csv_path`). `source`: a CGCModel, a GateTable, or a
    save_pretrained directory. Returns the GateTable."""
    if isinstance(source, GateTable):
        table = source
    elif isinstance(source, (str, os.PathLike)):
        table = gate_table_from_dir(source)
    else:
        table = gate_table(source)
    print(table.format(), file=file if file is not None else sys.stdout)
    if out_png is not None:
        plot_gate_heatmap(table, out_png)
    if csv_path is not None:
        table.to_csv(csv_path)
    return table
