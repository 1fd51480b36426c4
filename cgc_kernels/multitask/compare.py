"""CGC-LoRA against its baselines at an equal trainable-parameter budget, on the same data and steps.

Every method is a CGCModel on the same frozen base; only the expert layout differs:

    shared LoRA     S=1, K=0          one LoRA for all tasks (plain LoRA on the mixed data)
    per-task LoRA   S=0, K=1          one LoRA per task, no sharing (multi-LoRA)
    MOELoRA         S=E, K=0          E experts, all shared, mixed by a task gate
    CGC-LoRA        S shared + K task experts per task, mixed by a task gate
    CGC-LoRA (N clusters)             optional: S shared experts per cluster of a clusters file

The budget is counted in rank units per adapted layer (C*S*r + T*K*r, every unit the same
d_in + d_out parameters), so each method's expert rank r is solved from it; the trainable counts
(gate logits included) must agree within 5%, else ValueError.

The seesaw measure: how many tasks end below their per-task LoRA score (the no-sharing baseline,
which no task can blame on another), on the scores averaged over seeds.

    result = compare_methods(base, tokenizer, train_rows, eval_rows, steps=40, seeds=(0, 1))
    print(result.markdown()); result.plot("compare.png")
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch

from ..adapter.config import CGCLoRAConfig
from ..adapter.gate_report import gate_movement, gate_snapshot
from ..adapter.model import CGCModel
from ..adapter.param_groups import DEFAULT_GATE_LR_RATIO
from ..data.reader import tasks_of
from .recipe import TrainSettings, evaluate, interleave, train_loop

DEFAULT_TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]
PARAM_TOLERANCE = 0.05
REFERENCE = "per_task_lora"


@dataclass(frozen=True)
class Method:
    """One expert layout. clusters: {task: cluster} or None (one cluster). gate_lr_ratio and gate
    (CGCLoRAConfig's gate_scope / gate_embedding_dim / gate_init) override the comparison's gate
    settings for this method alone (None: the comparison's)."""

    key: str
    label: str
    num_shared_experts: int
    num_task_experts: int
    rank: int
    clusters: dict | None = None
    gate_lr_ratio: float | None = None
    gate: dict | None = None
    description: str | None = None  # the layout column for a method that is not a CGCModel layout

    def rank_units(self, num_tasks: int) -> int:
        """C*S*r + T*K*r: the stacked LoRA rank of one adapted layer."""
        c = 1 if self.clusters is None else len(set(self.clusters.values()))
        return (c * self.num_shared_experts + num_tasks * self.num_task_experts) * self.rank

    def layout(self) -> str:
        if self.description:
            return self.description
        c = 1 if self.clusters is None else len(set(self.clusters.values()))
        parts = []
        if self.num_shared_experts:
            parts.append(f"{self.num_shared_experts} shared" + (f" x {c} clusters" if c > 1 else ""))
        if self.num_task_experts:
            parts.append(f"{self.num_task_experts} per task")
        return f"{' + '.join(parts)}, r={self.rank}"

    def config(self, tasks: list[str], target_modules, alpha_per_rank: float, **gate) -> CGCLoRAConfig:
        """The CGCLoRAConfig of this layout; `gate`: the comparison's gate_scope / gate_embedding_dim /
        gate_init, under this method's own `gate` overrides."""
        gate = {**gate, **(self.gate or {})}
        # The same scaling alpha / r = alpha_per_rank for every method, whatever its rank.
        return CGCLoRAConfig(tasks=list(tasks), clusters=self.clusters, num_shared_experts=self.num_shared_experts,
                             num_task_experts=self.num_task_experts, rank=self.rank,
                             alpha=alpha_per_rank * self.rank, target_modules=target_modules, **gate)


def plan_methods(num_tasks: int, *, task_rank: int = 8, cgc_shared: int = 4, cgc_task: int = 1,
                 moe_experts: int = 8, clusters: dict | None = None) -> list[Method]:
    """The compared methods at the budget of T per-task LoRAs of rank `task_rank` (T * task_rank
    rank units per layer), each method's expert rank solved from it.

    Raises ValueError if a layout cannot meet the budget within 5% with an integer rank (pick
    other expert counts, or a budget they divide)."""
    if num_tasks < 1 or task_rank < 1:
        raise ValueError(f"need num_tasks >= 1 and task_rank >= 1, got {num_tasks}, {task_rank}")
    if cgc_shared < 1 or cgc_task < 1 or moe_experts < 1:
        raise ValueError(f"cgc_shared, cgc_task and moe_experts must be >= 1, got {cgc_shared}, {cgc_task}, "
                         f"{moe_experts}")
    budget = num_tasks * task_rank
    layouts = [("shared_lora", "shared LoRA", 1, 0, None), (REFERENCE, "per-task LoRA", 0, 1, None),
               ("moelora", "MOELoRA", moe_experts, 0, None), ("cgc_lora", "CGC-LoRA", cgc_shared, cgc_task, None)]
    if clusters is not None:
        n_c = len(set(clusters.values()))
        layouts.append(("cgc_clustered", f"CGC-LoRA ({n_c} clusters)", max(1, round(cgc_shared / n_c)),
                        cgc_task, dict(clusters)))
    methods = []
    for key, label, s, k, cl in layouts:
        per_rank = Method(key, label, s, k, 1, cl).rank_units(num_tasks)
        r = max(1, round(budget / per_rank))
        m = Method(key, label, s, k, r, cl)
        if abs(m.rank_units(num_tasks) - budget) > PARAM_TOLERANCE * budget:
            raise ValueError(f"{label} ({s} shared, {k} per task) cannot meet the budget of {budget} rank units "
                             f"per layer within 5%: rank {r} gives {m.rank_units(num_tasks)}; choose other "
                             f"expert counts or task_rank")
        methods.append(m)
    return methods


def trainable_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


@dataclass
class Comparison:
    """What `compare_methods` measured.

    scores[method key][seed index][task]: held-out exact match; params[key]: trainable count;
    losses[key][seed index]: the training losses; seconds[key][seed index]: train + eval wall time;
    gates[key][seed index]: {task: gate movement} (GateMovement.summary(): the shared share's range
    over layers at the start and the end, its mean change, the largest expert-weight change)."""

    tasks: list[str]
    methods: list[Method]
    seeds: list[int]
    scores: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    params: dict[str, int] = field(default_factory=dict)
    losses: dict[str, list[list[float]]] = field(default_factory=dict)
    seconds: dict[str, list[float]] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    eval_counts: dict[str, int] = field(default_factory=dict)
    gates: dict[str, list[dict[str, dict[str, float]]]] = field(default_factory=dict)

    # ---- statistics --------------------------------------------------------------------------
    def mean_score(self, key: str, task: str | None = None) -> float:
        """Mean over seeds of a task's score, or (task None) of the average over tasks."""
        vals = [self._value(s, task) for s in self.scores[key]]
        return sum(vals) / len(vals)

    def spread(self, key: str, task: str | None = None) -> float:
        """Sample standard deviation over seeds (0 with one seed)."""
        vals = [self._value(s, task) for s in self.scores[key]]
        if len(vals) < 2:
            return 0.0
        m = sum(vals) / len(vals)
        return math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))

    def _value(self, scores: dict[str, float], task: str | None) -> float:
        return scores[task] if task is not None else sum(scores[t] for t in self.tasks) / len(self.tasks)

    def seesaw(self, key: str) -> int | None:
        """Tasks whose mean score is below the per-task LoRA's (None for that baseline itself)."""
        if key == REFERENCE or REFERENCE not in self.scores:
            return None
        return sum(self.mean_score(key, t) < self.mean_score(REFERENCE, t) - 1e-9 for t in self.tasks)

    def seesaw_per_seed(self, key: str) -> list[int] | None:
        if key == REFERENCE or REFERENCE not in self.scores:
            return None
        return [sum(s[t] < ref[t] - 1e-9 for t in self.tasks)
                for s, ref in zip(self.scores[key], self.scores[REFERENCE], strict=True)]

    def worst_delta(self, key: str) -> float | None:
        """The lowest (mean score - per-task LoRA mean score) over tasks."""
        if key == REFERENCE or REFERENCE not in self.scores:
            return None
        return min(self.mean_score(key, t) - self.mean_score(REFERENCE, t) for t in self.tasks)

    # ---- output ------------------------------------------------------------------------------
    def markdown(self) -> str:
        """Per-method table: parameters, layout, each task's held-out exact match, the average,
        the seesaw count and the worst per-task change against per-task LoRA."""
        multi = len(self.seeds) > 1

        def cell(key, task=None):
            m = self.mean_score(key, task)
            return f"{m:.3f} ± {self.spread(key, task):.3f}" if multi else f"{m:.3f}"

        head = ["method", "experts", "trainable params"] + self.tasks + ["average", "tasks below per-task LoRA",
                                                                        "worst task vs per-task"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for m in self.methods:
            if m.key not in self.scores:
                continue
            saw, worst = self.seesaw(m.key), self.worst_delta(m.key)
            saw_s = "(reference)" if saw is None else f"{saw} / {len(self.tasks)}"
            if saw is not None and multi:
                saw_s += " (per seed: " + ", ".join(str(v) for v in self.seesaw_per_seed(m.key)) + ")"
            row = [m.label, m.layout(), f"{self.params[m.key]:,}"] + [cell(m.key, t) for t in self.tasks] + [
                f"**{cell(m.key)}**", saw_s, "—" if worst is None else f"{worst:+.3f}"]
            lines.append("| " + " | ".join(row) + " |")
        return "\n".join(lines)

    def gate_markdown(self) -> str:
        """Per method and task: the shared share's range over layers at the end of training
        (min..max over seeds' layer ranges) and the largest change of any gate weight, max over seeds."""
        head = ["method"] + self.tasks
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for m in self.methods:
            runs = self.gates.get(m.key)
            if not runs:
                continue
            cells = []
            for t in self.tasks:
                lo, hi = min(r[t]["end_min"] for r in runs), max(r[t]["end_max"] for r in runs)
                cells.append(f"{lo:.2f}..{hi:.2f} (Δ≤{max(r[t]['max_change'] for r in runs):.2f})")
            lines.append("| " + " | ".join([m.label, *cells]) + " |")
        return "\n".join(lines)

    def plot(self, path: str) -> str:
        """Grouped bars: held-out exact match per task and the average, one bar per method, error
        bars = standard deviation over seeds. Written with matplotlib's Agg backend."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        groups = self.tasks + ["average"]
        keys = [m for m in self.methods if m.key in self.scores]
        width = 0.8 / len(keys)
        fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(groups), 4.2))
        for i, m in enumerate(keys):
            xs = [g + (i - (len(keys) - 1) / 2) * width for g in range(len(groups))]
            tasks = [*self.tasks, None]
            means = [self.mean_score(m.key, t) for t in tasks]
            errs = [self.spread(m.key, t) for t in tasks] if len(self.seeds) > 1 else None
            ax.bar(xs, means, width, yerr=errs, capsize=2, label=f"{m.label} ({self.params[m.key] / 1e6:.2f} M)")
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("held-out exact match")
        n_seeds = len(self.seeds)
        ax.set_title(f"{self.settings.get('model', '')}: {self.settings.get('steps', '?')} steps, "
                     f"{n_seeds} seed{'s' if n_seeds > 1 else ''}" + (" (mean ± sd)" if n_seeds > 1 else ""))
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=min(3, len(keys)))
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def to_dict(self) -> dict:
        return {"tasks": self.tasks, "seeds": self.seeds, "methods": [asdict(m) for m in self.methods],
                "scores": self.scores, "params": self.params, "losses": self.losses, "seconds": self.seconds,
                "settings": self.settings, "eval_counts": self.eval_counts, "gates": self.gates}

    @classmethod
    def from_dict(cls, d: dict) -> Comparison:
        methods = [Method(**m) for m in d["methods"]]
        return cls(tasks=d["tasks"], methods=methods, seeds=d["seeds"], scores=d["scores"], params=d["params"],
                   losses=d["losses"], seconds=d["seconds"], settings=d["settings"],
                   eval_counts=d.get("eval_counts", {}), gates=d.get("gates", {}))


def compare_methods(base, tokenizer, train_rows: list[dict], eval_rows: list[dict], *,
                    methods: list[Method] | None = None, task_rank: int = 8, alpha_per_rank: float = 2.0,
                    target_modules=None, steps: int = 40, batch_size: int = 16, lr: float = 2e-3,
                    warmup_steps: int = 6, max_length: int = 96, seeds=(0,), system: str | None = None,
                    max_new_tokens: int = 12, log=None, model_name: str = "",
                    gate_lr_ratio: float = DEFAULT_GATE_LR_RATIO, gate_scope: str = "layer",
                    gate_embedding_dim: int | None = None, gate_init: str = "uniform") -> Comparison:
    """Train and evaluate each method on `base` (modified in place for each run, restored after).

    Args:
        base, tokenizer: a transformers causal LM and its tokenizer.
        train_rows, eval_rows: instruction rows {"task", "prompt", "response"}; every eval task
            must be a training task.
        methods: default `plan_methods(T, task_rank=task_rank)`.
        alpha_per_rank: scaling alpha / r, the same for every method.
        steps, batch_size, lr, warmup_steps, max_length: the same training for every method
            (AdamW, cosine decay, mixed-task batches in the same order for the same seed).
        seeds: each method runs once per seed; a seed fixes the initial experts and the data order.
        gate_lr_ratio: the gates' learning rate over the experts' (their own AdamW group), for
            every method whose own `gate_lr_ratio` is None.
        gate_scope, gate_embedding_dim, gate_init: the task gates' parameterisation (CGCLoRAConfig),
            the same for every method.

    Returns: a Comparison. Raises ValueError if the trainable counts differ by more than 5%.
    """
    log = log or (lambda msg: None)
    tasks = tasks_of(train_rows)
    unknown = sorted(set(tasks_of(eval_rows)) - set(tasks))
    if unknown:
        raise ValueError(f"eval_rows hold tasks not in train_rows: {unknown}")
    if steps < 1 or batch_size < 1 or not seeds:
        raise ValueError(f"need steps >= 1, batch_size >= 1 and at least one seed; got {steps}, {batch_size}, "
                         f"{list(seeds)}")
    methods = methods or plan_methods(len(tasks), task_rank=task_rank)
    targets = target_modules or DEFAULT_TARGETS
    eval_rows = interleave(eval_rows)
    result = Comparison(tasks=tasks, methods=list(methods), seeds=list(seeds),
                        eval_counts={t: sum(r["task"] == t for r in eval_rows) for t in tasks},
                        settings=dict(model=model_name, steps=steps, batch_size=batch_size, lr=lr,
                                      warmup_steps=warmup_steps, max_length=max_length,
                                      alpha_per_rank=alpha_per_rank, target_modules=targets,
                                      task_rank=task_rank, max_new_tokens=max_new_tokens, system=system,
                                      gate_lr_ratio=gate_lr_ratio, gate_scope=gate_scope,
                                      gate_embedding_dim=gate_embedding_dim, gate_init=gate_init,
                                      train_rows=len(train_rows), eval_rows=len(eval_rows)))
    gate = dict(gate_scope=gate_scope, gate_embedding_dim=gate_embedding_dim, gate_init=gate_init)
    # Equal budgets first, before any training time is spent.
    for m in methods:
        cgc = CGCModel(base, m.config(tasks, targets, alpha_per_rank, **gate))
        result.params[m.key] = trainable_parameters(cgc)
        cgc.unload()
    ref = result.params.get(REFERENCE, max(result.params.values()))
    off = {m.key: result.params[m.key] for m in methods if abs(result.params[m.key] - ref) > PARAM_TOLERANCE * ref}
    if off:
        raise ValueError(f"trainable parameter counts differ by more than 5% from {ref}: {off}")

    t_all = time.perf_counter()
    for seed in seeds:
        for m in methods:
            t0 = time.perf_counter()
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                cgc = CGCModel(base, m.config(tasks, targets, alpha_per_rank, **gate))
            try:
                order = list(cgc.tasks)  # global task order: what task ids index
                ratio = gate_lr_ratio if m.gate_lr_ratio is None else m.gate_lr_ratio
                settings = TrainSettings(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
                                         max_length=max_length, seed=seed, gate_lr_ratio=ratio)
                start = gate_snapshot(cgc)
                losses = train_loop(cgc, tokenizer, train_rows, order, settings, system=system, progress=False)
                moved = gate_movement(start, cgc)
                scores, _ = evaluate(cgc, tokenizer, eval_rows, order, system=system,
                                     max_new_tokens=max_new_tokens, progress=False)
            finally:
                cgc.unload()
            dt = time.perf_counter() - t0
            result.scores.setdefault(m.key, []).append({t: scores.get(t, float("nan")) for t in tasks})
            result.losses.setdefault(m.key, []).append(losses)
            result.seconds.setdefault(m.key, []).append(dt)
            result.gates.setdefault(m.key, []).append(moved.summary())
            avg = sum(scores.values()) / len(scores)
            log(f"  seed {seed} {m.label:<24} loss {sum(losses[-5:]) / len(losses[-5:]):.3f}  "
                + "  ".join(f"{t} {scores[t]:.2f}" for t in tasks if t in scores)
                + f"  avg {avg:.3f}  gates moved <= {moved.largest_change():.3f}  ({dt:.0f} s)")
    result.settings["wall_seconds"] = round(time.perf_counter() - t_all, 1)
    return result
