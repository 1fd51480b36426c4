"""Providers: each way of computing a case that a suite times side by side (the op's backends,
the MOELoRA-style loop, torch.compile, PEFT, the bare frozen layer), and the reference result
every provider is checked against before it is timed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from benchmarks.cases import BenchCase, Problem, clone_layer
from benchmarks.op_inputs import TOLERANCES
from cgc_kernels import CGCLoRALinear, cgc_lora, reference


def export_task(layer: CGCLoRALinear, task: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [(S+K) r, d_in], B [d_out, (S+K) r]) of one task as a single LoRA with scaling 1:
    B A equals the task's merged update s * sum_e g_e B_e A_e."""
    with torch.no_grad():
        S, r = layer.num_shared_experts, layer.rank
        col = layer.task_gates()[task].repeat_interleave(r).to(layer.task_b.dtype)
        c = int(layer.task_cluster[task])
        a = torch.cat([layer.shared_a[c], layer.task_a[task]], 0)
        b = torch.cat([layer.shared_b[c] * col[: S * r], layer.task_b[task] * col[S * r:]], 1) * layer.scaling
    return a.clone(), b.clone()


def peft_layer(layer: CGCLoRALinear, tasks: list[int]) -> nn.Module:
    """A PEFT LoRA Linear over the same frozen base, one adapter "task{t}" of rank (S+K) r per task,
    each the export of that task (so a mixed batch through `adapter_names` is the CGC function)."""
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLinear

    R = (layer.num_shared_experts + layer.num_task_experts) * layer.rank
    config = LoraConfig(r=R, lora_alpha=R)
    pl = None
    for t in tasks:
        name = f"task{t}"
        if pl is None:
            pl = PeftLinear(layer.base_layer, name, config=config, r=R, lora_alpha=R)
        else:
            pl.update_layer(name, r=R, lora_alpha=R, config=config)
        a, b = export_task(layer, t)
        with torch.no_grad():
            pl.lora_A[name].weight.copy_(a)
            pl.lora_B[name].weight.copy_(b)
    w = layer.base_layer.weight
    return pl.to(device=w.device, dtype=w.dtype)

# ---- providers -----------------------------------------------------------------------------


@dataclass
class Runner:
    """What a provider gives the harness for one case.

    fn: x [M, d_in] -> [M, d_out], differentiable (or under no_grad for inference).
    params: trainable tensors whose .grad is cleared between rounds.
    check: "same" (the CGC function: compared with the reference), "task0" (a single LoRA equal
        to task 0's update: compared with the reference on all-task-0 ids), "dropout" (the op with
        dropout: `check_dropout`), "none" (a floor).
    """

    fn: Callable[[torch.Tensor], torch.Tensor]
    params: list[torch.Tensor]
    check: str = "same"


@dataclass(frozen=True)
class Provider:
    name: str
    description: str
    levels: tuple[str, ...]  # of "op", "layer", "infer"
    needs_cuda: bool = False
    # cpu / ci sizes: run only on these cases (torch.compile costs ~20 s per compiled graph on 2 cores)
    cpu_case_filter: Callable[[BenchCase], bool] | None = None
    gpu_case_filter: Callable[[BenchCase], bool] | None = None
    modes: tuple[str, ...] = ("forward", "backward", "full")
    dropout: bool = False  # runs a case's dropout_p (at the op level)

    def skip_reason(self, level: str, case: BenchCase, size: str, mode: str = "forward") -> str | None:
        if level not in self.levels:
            return f"{self.name} has no {level}-level benchmark"
        if case.dropout_p and not (self.dropout and level == "op"):
            return f"{self.name} has no dropout benchmark at the {level} level (only cgc_lora's backends, op level)"
        if mode not in self.modes:
            return f"{self.name} has no {mode} pass"
        if self.needs_cuda and not torch.cuda.is_available():
            return f"{self.name} runs the Triton kernels, which need a CUDA device"
        filt = self.gpu_case_filter if size == "gpu" else self.cpu_case_filter
        if filt is not None and not filt(case):
            return f"{self.name} runs on a subset of the {size} cases (compile time)"
        return None


def _compile_subset(case: BenchCase) -> bool:
    return (case.S, case.K, case.r) == (2, 1, 8) and case.mix == "uniform" and case.T == 4 and case.M == 8192


def _compile_subset_cpu(case: BenchCase) -> bool:
    return (case.S, case.K, case.r) == (2, 1, 8) and case.mix == "uniform" and case.T == 4


PROVIDERS: dict[str, Provider] = {
    p.name: p
    for p in [
        Provider("fused", "cgc_lora, Triton kernels (backend='triton')", ("op", "layer", "infer"),
                 needs_cuda=True, dropout=True),
        Provider("fused_v1", "the first kernel generation (benchmarks/fused_v1.py)", ("op",),
                 needs_cuda=True),
        Provider("cuda_ref", "csrc_ref's hand-written CUDA forward (fp32, no tensor cores)", ("op",),
                 needs_cuda=True, modes=("forward",)),
        Provider("torch", "cgc_lora, the fast PyTorch backend (backend='torch'; the CPU default)",
                 ("op", "layer", "infer"), dropout=True),
        Provider("reference", "cgc_lora, PyTorch reference (backend='reference')", ("op", "layer", "infer"),
                 dropout=True),
        Provider("moelora_loop", "MOELoRA-style: one Linear pair per expert, all experts on all tokens",
                 ("op", "layer", "infer")),
        Provider("torch_compile", "torch.compile of the reference op / layer (graph breaks allowed)",
                 ("op", "layer"), cpu_case_filter=_compile_subset_cpu, gpu_case_filter=_compile_subset),
        Provider("peft_lora", "one PEFT LoRA of rank (S+K) r: the floor of any LoRA",
                 ("op", "layer", "infer")),
        Provider("peft_mixed", "PEFT adapter_names= mixed batch, one adapter per task", ("infer",)),
        Provider("bare_linear", "the frozen base nn.Linear alone: the layer's floor", ("layer", "infer")),
    ]
}


# Providers that are a backend of cgc_lora itself.
OP_BACKENDS = {"fused": "triton", "torch": "torch", "reference": "reference"}


def _op_args(p: Problem, layer: CGCLoRALinear):
    return (layer.shared_a, layer.shared_b, layer.task_a, layer.task_b, layer.scaling)


def make_runner(provider: str, level: str, p: Problem) -> Runner:
    """The runner of `provider` at `level` ("op": the LoRA branch alone; "layer": base + branch,
    training; "infer": base + branch under no_grad, one task per sequence)."""
    case = p.case
    if provider in OP_BACKENDS:
        backend = OP_BACKENDS[provider]
        layer = p.cached(f"layer-{backend}", lambda: clone_layer(p.layer, backend))
        if level == "op":
            gates = p.gates.clone().requires_grad_()
            fn = lambda x: cgc_lora(x, p.routing, gates, *_op_args(p, layer), dropout_p=case.dropout_p,
                                    backend=backend)
            return Runner(fn, [gates, *_lora_params(layer)], check="dropout" if case.dropout_p else "same")
        return Runner(lambda x: layer(x, p.routing), list(layer.parameters()))
    if provider == "fused_v1":
        from benchmarks.fused_v1 import fused_v1

        layer = p.cached("layer-triton", lambda: clone_layer(p.layer, "triton"))
        gates = p.gates.clone().requires_grad_()
        return Runner(lambda x: fused_v1(x, p.routing, gates, *_op_args(p, layer)), [gates, *_lora_params(layer)])
    if provider == "cuda_ref":
        from cgc_kernels.op import csrc_ref

        p.cached("csrc-load", csrc_ref.load)  # build once, outside the timed region
        w32 = p.cached("fp32-experts", lambda: [w.detach().float() for w in _op_args(p, p.layer)[:4]])
        gates = p.gates.float()

        def fn(x):
            return csrc_ref.forward(x.float(), p.task_ids, gates, *w32, p.layer.scaling).to(x.dtype)

        return Runner(fn, [])
    if provider == "moelora_loop":
        moe = p.moe
        if level == "op":
            gates = p.gates.clone().requires_grad_()
            return Runner(lambda x: moe.lora_delta(x, p.task_ids, gates), [gates, *moe.parameters()])
        if level == "infer":
            B = p.sample_ids.shape[0]
            return Runner(lambda x: moe(x.view(B, -1, case.d_in), p.sample_ids).view(case.M, -1), [])
        return Runner(lambda x: moe(x, p.task_ids), list(moe.parameters()))
    if provider == "torch_compile":
        layer = p.cached("layer-compile", lambda: clone_layer(p.layer, "reference"))
        if level == "op":
            gates = p.gates.clone().requires_grad_()
            op = p.cached("compiled-op", lambda: torch.compile(reference.cgc_lora))
            fn = lambda x: op(x, p.task_ids, gates, *_op_args(p, layer))
            return Runner(fn, [gates, *_lora_params(layer)])
        compiled = p.cached("compiled-layer", lambda: torch.compile(layer))
        return Runner(lambda x: compiled(x, p.task_ids), list(layer.parameters()))
    if provider == "peft_lora":
        pl = p.cached("peft-single", lambda: peft_layer(p.layer, [0]))
        params = [q for q in pl.parameters() if q.requires_grad]
        if level == "op":
            A, Bm = pl.lora_A["task0"], pl.lora_B["task0"]
            return Runner(lambda x: Bm(A(x)) * pl.scaling["task0"], params, check="task0")
        return Runner(lambda x: pl(x), params, check="task0")
    if provider == "peft_mixed":
        pl = p.cached("peft-mixed", lambda: peft_layer(p.layer, list(range(case.T))).eval())
        names = [f"task{int(t)}" for t in p.sample_ids.tolist()]
        B = len(names)
        return Runner(lambda x: pl(x.view(B, -1, case.d_in), adapter_names=names).view(case.M, -1), [])
    if provider == "bare_linear":
        base = p.layer.base_layer
        return Runner(lambda x: base(x), [], check="none")
    raise ValueError(f"unknown provider {provider!r}")


def _lora_params(layer: CGCLoRALinear) -> list[torch.Tensor]:
    return [layer.shared_a, layer.shared_b, layer.task_a, layer.task_b]


# ---- expected results ----------------------------------------------------------------------


def expected(p: Problem, level: str, check: str, with_grad: bool):
    """(y, dx) of the reference for this problem; check="task0" runs every token as task 0."""
    key = f"expected-{level}-{check}-{with_grad}"

    def build():
        layer = p.cached("layer-expected", lambda: clone_layer(p.layer, "reference"))
        ids = p.task_ids if check == "same" else torch.zeros_like(p.task_ids)
        x = p.x.clone().requires_grad_(with_grad)
        with torch.set_grad_enabled(with_grad):
            y = layer(x, ids) if level != "op" else cgc_lora(
                x, ids, p.gates, *_op_args(p, layer), backend="reference")
        if not with_grad:
            return y.detach(), None
        y.backward(p.dy)
        return y.detach(), x.grad

    return p.cached(key, build)


def check_dropout(p: Problem, y: torch.Tensor, dx: torch.Tensor, what: str) -> None:
    """The op with dropout (y and dx of one call given p.dy) against the reference given the same
    mask. The op draws its mask itself, but the branch is linear in its input, so the mask can be
    read off the input gradient: dx = keep * (L^T dy) / (1 - p), where L^T dy, the reference's dx
    without dropout, is nonzero wherever a row is routed. The same mask must give y (forward and
    backward drew the same one), and about 1 - p of the routed entries must be kept."""
    drop = p.case.dropout_p
    _, dx_plain = expected(p, "op", "same", True)
    routed = (p.task_ids >= 0)[:, None] & (dx_plain != 0)
    keep = (dx != 0) | ~routed
    kept = keep[routed].float().mean().item()
    assert abs(kept - (1 - drop)) < 0.02, f"{what}: kept {kept:.3f} of the routed inputs, expected {1 - drop:g}"
    layer = p.cached("layer-expected", lambda: clone_layer(p.layer, "reference"))
    x = p.x.clone().requires_grad_()
    y_ref = reference.cgc_lora(x, p.task_ids, p.gates, *_op_args(p, layer), dropout_p=drop, dropout_mask=keep)
    y_ref.backward(p.dy)
    assert_matches(y, y_ref.detach(), f"{what} output (dropout, the mask read off dx)")
    assert_matches(dx, x.grad, f"{what} input gradient (dropout)")


def assert_matches(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Compare against the reference relative to its scale, with the dtype's tolerance."""
    tol = TOLERANCES[want.dtype]
    scale = want.float().abs().max().clamp(min=1e-6)
    torch.testing.assert_close(got.float() / scale, want.float() / scale, **tol, msg=lambda m: f"{what}: {m}")
