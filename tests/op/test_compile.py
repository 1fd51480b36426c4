"""torch.compile(fullgraph=True) through the custom ops: no graph break, forward and backward match eager."""

from __future__ import annotations

import pytest
import torch

from cgc_kernels.op import autograd
from cgc_kernels.op.dispatch import cgc_lora
from cgc_kernels.op.routing import build_routing
from cgc_kernels.op.validation import CGCCall
from tests.cases import TOLERANCES, TRITON_DEVICES, Case, make_inputs


class TinyCGC(torch.nn.Module):
    """A frozen base linear plus a CGC-LoRA branch added into its output (as the layer does)."""

    def __init__(self, args: dict, dropout_p: float = 0.0, backend: str = "triton"):
        super().__init__()
        self.backend = backend
        d_in, d_out = args["x"].shape[1], args["task_b"].shape[1]
        self.base = torch.nn.Linear(d_in, d_out)
        self.base.requires_grad_(False)
        for k in ("shared_a", "shared_b", "task_a", "task_b"):
            setattr(self, k, torch.nn.Parameter(args[k].clone()))
        self.logits = torch.nn.Parameter(torch.log(args["gates"].clone()))
        self.task_cluster = args["task_cluster"]
        self.dropout_p = dropout_p

    def forward(self, x, routing):
        out = self.base(x)
        gates = torch.softmax(self.logits, -1)
        return cgc_lora(x, routing, gates, self.shared_a, self.shared_b, self.task_a, self.task_b, 2.0,
                        task_cluster=self.task_cluster, dropout_p=self.dropout_p, out=out, backend=self.backend)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("op_backend", ["triton", "torch"])
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(compile_backend, op_backend, device):
    case = Case(M=30, d_in=33, d_out=17, T=3, S=2, K=1, r=4, C=2, ids="with_unrouted")
    args = make_inputs(case, dtype=torch.float32, device=device)
    routing = build_routing(args["task_ids"], case.T, args["task_cluster"])  # built outside: no sync inside
    torch.manual_seed(0)
    eager = TinyCGC(args, backend=op_backend).to(device)
    compiled_mod = TinyCGC(args, backend=op_backend).to(device)
    compiled_mod.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_mod, fullgraph=True, backend=compile_backend)
    results = []
    for mod, fn in ((eager, eager), (compiled_mod, compiled)):
        x = args["x"].clone().requires_grad_()
        y = fn(x, routing)
        y.square().sum().backward()
        results.append([y.detach(), x.grad] + [p.grad for p in mod.parameters() if p.requires_grad])
    tol = TOLERANCES[torch.float32]
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(b, a, **tol)


def test_torch_backend_custom_ops_pass_opcheck():
    case = Case(M=12, d_in=17, d_out=9, T=2, S=1, K=1, r=2, C=2)
    args = make_inputs(case, dtype=torch.float32)
    fwd_args = (args["x"].requires_grad_(), args["task_ids"], args["gates"].requires_grad_(), args["shared_a"],
                args["shared_b"], args["task_a"], args["task_b"].requires_grad_(), args["task_cluster"], 2.0,
                False, 0.0)
    torch.library.opcheck(torch.ops.cgc_kernels.torch_fwd.default, fwd_args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("base_dtype", [None, torch.float64], ids=["no-base", "float64-base"])
@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_custom_ops_pass_opcheck(device, base_dtype):
    # Schema, fake (meta) implementations and autograd registration agree with the real kernels;
    # with a base of another dtype than x the kernel writes base + delta in x's dtype, and so must
    # the fake say.
    case = Case(M=12, d_in=17, d_out=9, T=2, S=1, K=1, r=2)
    args = make_inputs(case, dtype=torch.float32, device=device)
    rt = build_routing(args["task_ids"], case.T)
    base = None if base_dtype is None else torch.randn(case.M, case.d_out, dtype=base_dtype, device=device)
    call = CGCCall(args["x"].requires_grad_(), rt, args["gates"], args["shared_a"], args["shared_b"], args["task_a"],
                   args["task_b"].requires_grad_(), 2.0)
    fwd_args = (*autograd.kernel_args(call, rt, None), base)
    torch.library.opcheck(torch.ops.cgc_kernels.lora_fwd.default, fwd_args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_compile_fullgraph_inference_in_place(device):
    # Without autograd the op adds into the base output in place (the mutating custom op); the
    # compiled graph functionalises that mutation and must give the eager result.
    case = Case(M=20, d_in=33, d_out=17, T=2, S=1, K=1, r=4, ids="with_unrouted")
    args = make_inputs(case, dtype=torch.float32, device=device)
    routing = build_routing(args["task_ids"], case.T)
    mod = TinyCGC(args).to(device)
    compiled = torch.compile(mod, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        want = mod(args["x"], routing)
        got = compiled(args["x"], routing)
    torch.testing.assert_close(got, want, **TOLERANCES[torch.float32])
