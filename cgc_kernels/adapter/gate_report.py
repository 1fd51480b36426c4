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


def _natural_key(name: str) -> list:
    """Sort key with numbers compared as numbers: layers.2 before layers.10."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


@dataclass
class GateTable:
    """Every task's expert mixture per layer.

    Attributes:
        tasks: [T] global task names.
        clusters: [T] cluster name of each task.
        layers: [L] adapted module paths (natural order), or ["(model)"] for a model-wide gate.
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
    names = sorted(layers, key=_natural_key)
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
    layers = sorted({layer for layer, _ in params}, key=_natural_key)
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


def _short_layer_names(layers: list[str]) -> list[str]:
    """Layer paths without their common dotted prefix ("model.layers.")."""
    if len(layers) < 2:
        return list(layers)
    prefix = os.path.commonprefix(layers)
    prefix = prefix[: prefix.rfind(".") + 1]
    return [name[len(prefix):] for name in layers]


def plot_gate_heatmap(table: GateTable, path: str | os.PathLike) -> None:
    """Write a PNG: one panel per task, rows = layers, columns = experts (shared first), colour =
    gate weight in [0, 1]; the panel title gives the task's mean shared share."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    T, L, E = table.weights.shape
    labels = _short_layer_names(table.layers)
    label_w = max(len(s) for s in labels) * 0.07
    fig_w = min(4 + label_w + T * (0.5 + 0.45 * E), 40)
    fig_h = min(1.6 + 0.28 * L, 40)
    fig, axes = plt.subplots(1, T, figsize=(fig_w, fig_h), squeeze=False, sharey=True)
    split = table.split()
    annotate = L * E <= 120
    image = None
    for i, ax in enumerate(axes[0]):
        w = table.weights[i].numpy()
        image = ax.imshow(w, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        t = table.tasks[i]
        ax.set_title(f"{t} ({table.clusters[i]})\nshared {split[t]['shared']:.2f}", fontsize=9)
        ax.set_xticks(range(E), table.experts, rotation=90, fontsize=7)
        ax.set_yticks(range(L), labels, fontsize=7)
        if table.num_shared and table.num_shared < E:
            ax.axvline(table.num_shared - 0.5, color="white", linewidth=1.5)  # shared | task-specific
        if annotate:
            for (r, c), v in ((rc, w[rc]) for rc in ((r, c) for r in range(L) for c in range(E))):
                ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=6,
                        color="black" if v > 0.6 else "white")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="gate weight")
    # Above the two-line panel titles (bbox_inches="tight" keeps it in the file).
    fig.suptitle("CGC-LoRA expert mixture per task and layer", fontsize=10, y=1.0 + 0.45 / fig_h)
    fig.savefig(path, dpi=110, bbox_inches="tight")
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
