"""Bad input at every public entry: the op `cgc_kernels.cgc_lora` (each backend), CGCLoRALinear and
CGCModel. ONE table: each case names its entry point, builds its input, and expects either a
ValueError whose message contains the given text (naming the argument), or CORRECT: the call
succeeds and its own checks compare the result with an independent computation.

Op cases already in tests/op/test_validation.py (ids out of range in a small batch, float ids, int x,
shape and rank mismatches, gate shapes, task_ids on another device) are not repeated here; this
table adds the cases that table lacks (one bad id among many, other id dtypes, other tensors on a
foreign device, non-contiguous and zero-size input, NaN/Inf propagation) and the same questions at
the layer and the model. The "meta" device plays the foreign device on a CPU-only machine.

NaN and Inf must be propagated faithfully, never masked: a NaN in token m's x (or in the experts
or gate of token m's task) makes token m's delta NaN, and every other token's delta equals the
clean computation. Tokens of task -1 get no adapter, so their delta stays exactly 0.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import cgc_kernels
from cgc_kernels import CGCLoRAConfig, CGCLoRALinear, CGCModel, build_routing
from cgc_kernels.adapter.gates import TaskGate
from tests.cases import BACKENDS, DIFF, TOLERANCES, Case, device_of, make_inputs
from tests.models import randn_trainable
from tests.oracle import naive_cgc_lora

CORRECT = "correct result"
TOL32 = TOLERANCES[torch.float32]
TOL64 = TOLERANCES[torch.float64]
META = torch.device("meta")
# Op problem: two clusters (tasks 0, 2 in cluster 0; task 1 in cluster 1), S = 2 shared and K = 1
# task expert of rank 2, some tokens of task -1.
OP_CASE = Case(M=10, d_in=6, d_out=5, T=3, S=2, K=1, r=2, C=2, ids="with_unrouted")



# ---- the op ---------------------------------------------------------------------------------------
def op_args(**over) -> dict:
    """float32 op arguments of OP_CASE (B nonzero, gates softmaxed), with `over` replacing some."""
    args = make_inputs(OP_CASE, torch.float32, seed=3)
    args.update(over)
    return args


def op(backend: str, **args) -> torch.Tensor:
    """The op on `backend`'s device (CUDA for Triton on a GPU; cases are written with CPU tensors):
    CPU tensors move there (gradients flow back to them), the result comes back to CPU, and an
    `out=` tensor receives it in place, so `got is out` still holds."""
    device = device_of(backend)
    if device == "cpu":
        return cgc_kernels.cgc_lora(**args, backend=backend)
    moved = {k: (v.to(device) if isinstance(v, torch.Tensor) and v.device.type == "cpu" else v)
             for k, v in args.items()}
    got = cgc_kernels.cgc_lora(**moved, backend=backend)
    out = args.get("out")
    if isinstance(out, torch.Tensor) and out.device.type == "cpu":
        with torch.no_grad():
            out.copy_(got)
        return out
    return got.cpu() if got.device.type != "meta" else got


def oracle(args: dict) -> torch.Tensor:
    a = {k: v for k, v in args.items() if k not in ("out", "backend", "dropout_p")}
    return naive_cgc_lora(**a)


def op_call(backend: str, **over) -> Callable[[], torch.Tensor]:
    return lambda: op(backend, **op_args(**over))


def op_correct(backend: str, **over) -> Callable[[], None]:
    """The op on the modified arguments equals the oracle on contiguous copies of them."""

    def run():
        args = op_args(**over)
        plain = {k: v.contiguous().clone() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
        got = op(backend, **args)
        want = oracle(plain)
        if "out" in args and args["out"] is not None:
            want = want + plain["out"].double()
            assert got is args["out"], "out= must be returned"
        assert got.shape == want.shape and got.dtype == args["x"].dtype
        torch.testing.assert_close(got.double(), want, **TOL32)

    return run


def _noncontig(t: torch.Tensor) -> torch.Tensor:
    """The same values as `t` in a non-contiguous layout (every other element of a wider tensor)."""
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    wide[..., ::2] = t
    view = wide[..., ::2]
    assert not view.is_contiguous() or t.shape[-1] <= 1
    return view


def _transposed(t: torch.Tensor) -> torch.Tensor:
    """The same values as 3-D `t`, stored transposed in its last two dims (column-major)."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def op_nan(backend: str, where: str, value: float = float("nan")) -> Callable[[], None]:
    """A NaN/Inf put into one place; the rows it reaches are non-finite, every other row equals the
    clean result, and the task -1 rows stay exactly 0."""

    def run():
        clean = op_args()
        ids, cluster = clean["task_ids"], clean["task_cluster"]
        bad = copy.deepcopy(clean)
        if where == "x":
            m = int((ids == 1).nonzero()[0])
            bad["x"][m, 2] = value
            hit = torch.zeros_like(ids, dtype=torch.bool)
            hit[m] = True
        elif where == "x of a task -1 token":
            m = int((ids == -1).nonzero()[0])
            bad["x"][m, 0] = value
            hit = torch.zeros_like(ids, dtype=torch.bool)  # no adapter: nothing reached
        elif where == "task_a[1]":
            bad["task_a"][1, 0, 3] = value
            hit = ids == 1
        elif where == "shared_b[cluster 0]":
            bad["shared_b"][0, 4, 1] = value
            hit = (ids >= 0) & (cluster[ids.clamp(min=0)] == 0)
        elif where == "gates[2]":
            bad["gates"][2, 0] = value
            hit = ids == 2
        else:
            raise AssertionError(where)
        assert hit.any() or where.startswith("x of"), "the case must reach some rows"
        for t in DIFF:
            bad[t].requires_grad_(True)
        got = op(backend, **bad)
        want = oracle(clean)
        assert not torch.isfinite(got[hit]).all(dim=1).any(), f"every row reached by the {where} must be non-finite"
        torch.testing.assert_close(got[~hit].double(), want[~hit], **TOL32)
        assert torch.equal(got[ids == -1], torch.zeros_like(got[ids == -1]))
        if where == "x":  # backward: dx of the other rows does not involve x, so it stays finite and equal
            dy = torch.randn_like(got)
            (got * dy).sum().backward()
            clean_x = clean["x"].clone().requires_grad_(True)
            ref = cgc_kernels.reference.cgc_lora(**{**clean, "x": clean_x})
            (ref * dy).sum().backward()
            torch.testing.assert_close(bad["x"].grad[~hit], clean_x.grad[~hit], **TOL32)

    return run


def op_cases(backend: str) -> list[tuple]:
    b = backend
    M = OP_CASE.M
    many = torch.randint(0, 3, (257,), generator=torch.Generator().manual_seed(0))
    many_bad = many.clone()
    many_bad[200] = 3
    big = torch.randint(0, 3, (M,), generator=torch.Generator().manual_seed(1))
    big[7] = 2**40
    two_c = dict(shared_a=torch.zeros(2, 4, 6), shared_b=torch.zeros(2, 5, 4))
    return [
        # one bad id in a long batch where every other id is fine: the range check sees all of them
        ("op", "one id = T among 257", dict(x=torch.zeros(257, 6), task_ids=many_bad), "found task id 3"),
        ("op", "id 2**40", op_call(b, task_ids=big), "found task id 1099511627776"),
        ("op", "bool task ids", op_call(b, task_ids=torch.ones(M, dtype=torch.bool)), "task_ids must be an integer"),
        ("op", "int32 task ids", op_correct(b, task_ids=op_args()["task_ids"].int()), CORRECT),
        ("op", "uint8 task ids", op_correct(b, task_ids=op_args()["task_ids"].clamp(min=0).to(torch.uint8)),
         CORRECT),
        ("op", "float64 gates, float32 x", op_correct(b, gates=op_args()["gates"].double()), CORRECT),
        ("op", "int gates", op_call(b, gates=torch.ones(3, 3, dtype=torch.int64)), "gates must be a floating"),
        ("op", "1-D gates", op_call(b, gates=torch.ones(9)), "gates must be 2-D"),
        ("op", "3-D gates", op_call(b, gates=torch.ones(3, 1, 3)), "gates must be 2-D"),
        ("op", "3-D x", op_call(b, x=torch.zeros(2, 5, 6)), "x must be 2-D"),
        ("op", "task_cluster float", op_call(b, task_cluster=torch.tensor([0.0, 1.0, 0.0])),
         "task_cluster must be an integer"),
        ("op", "task_cluster length", op_call(b, task_cluster=torch.tensor([0, 1])), "task_cluster must be [T]"),
        ("op", "two clusters, task_cluster None", op_call(b, task_cluster=None, **two_c),
         "task_cluster [T] is required"),
        # every tensor argument on a foreign device, one at a time
        ("op", "x on meta", op_call(b, x=torch.zeros(M, 6, device=META)), "but x is on meta"),
        ("op", "gates on meta", op_call(b, gates=torch.zeros(3, 3, device=META)), "gates is on meta"),
        ("op", "shared_a on meta", op_call(b, shared_a=torch.zeros(2, 4, 6, device=META)), "shared_a is on meta"),
        ("op", "shared_b on meta", op_call(b, shared_b=torch.zeros(2, 5, 4, device=META)), "shared_b is on meta"),
        ("op", "task_a on meta", op_call(b, task_a=torch.zeros(3, 2, 6, device=META)), "task_a is on meta"),
        ("op", "task_b on meta", op_call(b, task_b=torch.zeros(3, 5, 2, device=META)), "task_b is on meta"),
        ("op", "task_cluster on meta", op_call(b, task_cluster=torch.tensor([0, 1, 0], device=META)),
         "task_cluster is on meta"),
        ("op", "out on meta", op_call(b, out=torch.zeros(M, 5, device=META)), "out is on meta"),
        ("op", "int out", op_call(b, out=torch.zeros(M, 5, dtype=torch.int64)), "out must be a floating"),
        # layouts and sizes that must simply work
        ("op", "non-contiguous x", op_correct(b, x=_noncontig(op_args()["x"])), CORRECT),
        ("op", "non-contiguous task_ids", op_correct(b, task_ids=_noncontig(op_args()["task_ids"])), CORRECT),
        ("op", "non-contiguous gates", op_correct(b, gates=_noncontig(op_args()["gates"])), CORRECT),
        ("op", "transposed experts", op_correct(b, **{k: _transposed(op_args()[k]) for k in
                                                    ("shared_a", "shared_b", "task_a", "task_b")}), CORRECT),
        ("op", "non-contiguous out", op_correct(b, out=_noncontig(torch.randn(M, 5))), CORRECT),
        ("op", "M = 0", op_correct(b, x=torch.zeros(0, 6), task_ids=torch.zeros(0, dtype=torch.int64)), CORRECT),
        ("op", "M = 0 with out", op_correct(b, x=torch.zeros(0, 6), task_ids=torch.zeros(0, dtype=torch.int64),
                                           out=torch.zeros(0, 5)), CORRECT),
        ("op", "d_out = 0", op_correct(b, shared_b=torch.zeros(2, 0, 4), task_b=torch.zeros(3, 0, 2)), CORRECT),
        ("op", "d_in = 0", op_correct(b, x=torch.zeros(M, 0), shared_a=torch.zeros(2, 4, 0),
                                     task_a=torch.zeros(3, 2, 0)), CORRECT),
        # NaN / Inf propagate to exactly the rows they reach
        ("op", "NaN in one token's x", op_nan(b, "x"), CORRECT),
        ("op", "Inf in one token's x", op_nan(b, "x", float("inf")), CORRECT),
        ("op", "NaN in a task -1 token's x", op_nan(b, "x of a task -1 token"), CORRECT),
        ("op", "NaN in one task's A", op_nan(b, "task_a[1]"), CORRECT),
        ("op", "Inf in one cluster's shared B", op_nan(b, "shared_b[cluster 0]", float("inf")), CORRECT),
        ("op", "NaN in one task's gate", op_nan(b, "gates[2]"), CORRECT),
    ]


def _materialize(case: tuple, backend: str) -> tuple:
    """Cases given as a dict of overrides call the op with them."""
    entry, name, run, expect = case
    if isinstance(run, dict):
        over = run
        run = lambda: op(backend, **op_args(**over))
    return entry, name, run, expect


# ---- the layer -----------------------------------------------------------------------------------
D_IN, D_OUT = 12, 8


def random_layer(**kw) -> CGCLoRALinear:
    """A float64 layer (T=3 tasks in two clusters, S=2, K=1, r=2) with nonzero B and uneven gates."""
    torch.manual_seed(0)
    layer = CGCLoRALinear(nn.Linear(D_IN, D_OUT).double(), 3, 2, 1, 2, 4.0, task_cluster=[0, 1, 0], **kw)
    with torch.no_grad():
        for p in (layer.shared_b, layer.task_b):
            p.normal_()
        for p in layer.gate.parameters():
            p.normal_()
    return layer


def layer_ids(shape, seed=0) -> torch.Tensor:
    return torch.randint(-1, 3, shape, generator=torch.Generator().manual_seed(seed))


def layer_want(layer: CGCLoRALinear, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """base(x) + the oracle delta, from contiguous copies: [..., d_out] float64."""
    x2 = x.reshape(-1, D_IN).contiguous()
    delta = naive_cgc_lora(x2, ids.reshape(-1), layer.task_gates(), layer.shared_a, layer.shared_b,
                           layer.task_a, layer.task_b, layer.scaling, task_cluster=layer.task_cluster)
    return (layer.base_layer(x2) + delta).reshape(*x.shape[:-1], D_OUT)


def layer_call(x, ids, **kw) -> Callable[[], torch.Tensor]:
    return lambda: random_layer(**kw)(x, ids)


def layer_correct(x, ids) -> Callable[[], None]:
    def run():
        layer = random_layer()
        with torch.no_grad():
            got = layer(x, ids)
            want = layer_want(layer, x, ids)
        assert got.shape == (*x.shape[:-1], D_OUT)
        torch.testing.assert_close(got, want, **TOL64)

    return run


def layer_nan(where: str) -> Callable[[], None]:
    def run():
        layer = random_layer()
        x = torch.randn(3, 5, D_IN, dtype=torch.float64)
        ids = layer_ids((3, 5), seed=4)
        ids[1, 2] = 1  # the token the NaN goes into has a task
        with torch.no_grad():
            want = layer_want(layer, x, ids)
            if where == "x":
                x = x.clone()
                x[1, 2, 5] = float("nan")
                hit = torch.zeros_like(ids, dtype=torch.bool)
                hit[1, 2] = True
            else:  # task_b of task 1: its tokens only (the base output of task -1 rows is untouched)
                layer.task_b[1, 3, 0] = float("nan")
                hit = ids == 1
            got = layer(x, ids)
        # a NaN in x reaches every output of its token; one in B[t] row 3 reaches output 3 of task t
        assert torch.isnan(got[hit]).any(dim=-1).all(), f"tokens reached by the NaN in {where} must be NaN"
        torch.testing.assert_close(got[~hit], want[~hit], **TOL64)

    return run


def layer_cases() -> list[tuple]:
    x = torch.randn(4, D_IN, dtype=torch.float64)
    ids = torch.tensor([0, 1, 2, -1])
    x3 = torch.randn(2, 16, D_IN, dtype=torch.float64)
    ids3_bad = torch.randint(0, 3, (2, 16), generator=torch.Generator().manual_seed(2))
    ids3_bad[1, 9] = 3
    wrong_t = build_routing(ids, 4)
    wrong_rows = build_routing(torch.tensor([0, 1]), 3)
    permuted = torch.randn(5, 3, D_IN, dtype=torch.float64).permute(1, 0, 2)  # non-contiguous [3, 5, d]
    return [
        ("layer", "int x", layer_call(x.long(), ids), "x must be a floating tensor"),
        ("layer", "x on meta", layer_call(x.to(META), ids), "x is on meta"),
        ("layer", "task_ids on meta", layer_call(x, ids.to(META)), "task_ids is on meta"),
        ("layer", "x with other features", layer_call(torch.zeros(4, D_IN + 1, dtype=torch.float64), ids),
         "x has 13 features but the layer expects 12"),
        ("layer", "float task ids", layer_call(x, ids.double()), "task_ids must be an integer"),
        ("layer", "ids shorter than x", layer_call(x, ids[:3]), "task_ids has 3 entries but x has 4 rows"),
        ("layer", "ids shaped unlike x", layer_call(x3, torch.zeros(16, 2, dtype=torch.int64)), "task_ids shaped"),
        ("layer", "one id = T among 32", layer_call(x3, ids3_bad), "found task id 3"),
        ("layer", "id -2", layer_call(x, torch.tensor([0, -2, 1, 1])), "found task id -2"),
        ("layer", "gate module of other T", lambda: random_layer(gate=TaskGate(2, 3)),
         "gate module is for [T, S+K] = [2, 3]"),
        ("layer", "gate module of other S+K", lambda: random_layer(gate=TaskGate(3, 4)),
         "gate module is for [T, S+K] = [3, 4]"),
        ("layer", "routing for other T", layer_call(x, wrong_t), "routing was built for 4 tasks"),
        ("layer", "routing of other M", layer_call(x, wrong_rows), "routing covers 2 tokens but x has 4"),
        ("layer", "zero tokens", layer_correct(torch.zeros(0, D_IN, dtype=torch.float64),
                                              torch.zeros(0, dtype=torch.int64)), CORRECT),
        ("layer", "zero-length sequences", layer_correct(torch.zeros(2, 0, D_IN, dtype=torch.float64),
                                                         torch.zeros(2, 0, dtype=torch.int64)), CORRECT),
        ("layer", "non-contiguous x", layer_correct(permuted, layer_ids((3, 5))), CORRECT),
        ("layer", "non-contiguous ids", layer_correct(x, _noncontig(ids)), CORRECT),
        ("layer", "NaN in one token's x", layer_nan("x"), CORRECT),
        ("layer", "NaN in one task's B", layer_nan("task_b"), CORRECT),
    ]


# ---- the model -----------------------------------------------------------------------------------
VOCAB, HIDDEN = 64, 32


@functools.lru_cache(maxsize=1)
def _model_template() -> CGCModel:
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB))
    cgc = CGCModel(base.double().eval(), CGCLoRAConfig(
        tasks=["qa", "sum", "cls"], clusters={"qa": "a", "sum": "b", "cls": "a"}, num_shared_experts=2,
        num_task_experts=1, rank=2, alpha=4, target_modules=["q_proj", "v_proj"]))
    randn_trainable(cgc, 0.3)
    return cgc


def fresh_model() -> CGCModel:
    return copy.deepcopy(_model_template())


def tokens(batch=4, seq=6, seed=3) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def model_call(**kw) -> Callable:
    return lambda: fresh_model()(**kw)


def model_noncontig() -> None:
    cgc = fresh_model()
    ids = tokens(batch=4, seq=12)
    tids = torch.tensor([[0, 1, 2, -1] * 3] * 4)  # per token
    with torch.no_grad():
        want = cgc(input_ids=ids[:, ::2].contiguous(), task_ids=tids[:, ::2].contiguous()).logits
        got = cgc(input_ids=ids[:, ::2], task_ids=tids[:, ::2]).logits
    assert torch.equal(got, want)


def model_nan(where: str) -> Callable[[], None]:
    """One sequence or one task poisoned: its logits are NaN, every other sequence's equal the clean run."""

    def run():
        cgc = fresh_model()
        names = ["qa", "sum", "cls", None, "sum"]
        tids = torch.tensor([-1 if n is None else cgc.task_index(n) for n in names])
        emb = cgc.get_input_embeddings()(tokens(batch=5)).detach()
        with torch.no_grad():
            want = cgc(inputs_embeds=emb, task_ids=tids).logits
            if where == "inputs_embeds":
                emb = emb.clone()
                emb[2, 3, 7] = float("nan")
                hit = torch.tensor([False, False, True, False, False])
            elif where == "task_b[sum]":
                for layer in cgc.adapted_layers().values():
                    layer.task_b[cgc.task_index("sum"), 0, 0] = float("nan")
                hit = tids == cgc.task_index("sum")
            else:  # the gate logits of task "cls" in one layer (cluster "a" is [qa, cls]). A v_proj:
                # torch's causal CPU SDPA turns a query row that is all NaN into zeros, so a NaN put into
                # q_proj's output is lost by the base model's attention, not by the adapter.
                layer = cgc.adapted_layers()["model.layers.0.self_attn.v_proj"]
                layer.gate.parts[cgc.clusters.index("a")].logits[1, 0] = float("nan")
                hit = tids == cgc.task_index("cls")
            got = cgc(inputs_embeds=emb, task_ids=tids).logits
        assert hit.any()
        # attention carries a NaN forward within its own sequence (causal), never into another one
        reached = got[hit][:, 3:] if where == "inputs_embeds" else got[hit]
        assert torch.isnan(reached).all(), f"every logit after the NaN in {where} must be NaN"
        torch.testing.assert_close(got[~hit], want[~hit], **TOL64)

    return run


def model_cases() -> list[tuple]:
    ids = tokens()
    per_token = torch.randint(0, 3, (4, 6), generator=torch.Generator().manual_seed(5))
    per_token[2, 4] = 3
    return [
        ("model", "1-D input_ids", model_call(input_ids=ids[0], task_ids=[0]), "input_ids must be [batch, seq]"),
        ("model", "2-D inputs_embeds", model_call(inputs_embeds=torch.zeros(6, HIDDEN, dtype=torch.float64),
                                                  task_ids=[0]), "inputs_embeds must be [batch, seq, hidden]"),
        ("model", "generate on 1-D input_ids",
         lambda: fresh_model().generate(input_ids=ids[0], task_ids=[0], max_new_tokens=1),
         "input_ids must be [batch, seq]"),
        ("model", "task ids on meta", model_call(input_ids=ids, task_ids=torch.zeros(4, dtype=torch.long,
                                                                                     device=META)), "meta device"),
        ("model", "bool task ids", model_call(input_ids=ids, task_ids=torch.ones(4, dtype=torch.bool)),
         "task_ids must be an integer"),
        ("model", "3-D task ids", model_call(input_ids=ids, task_ids=torch.zeros(4, 6, 1, dtype=torch.long)),
         "task_ids must be [batch] or [batch, seq]"),
        ("model", "one per-token id = T among 24", model_call(input_ids=ids, task_ids=per_token), "found task id 3"),
        ("model", "id 2**40 in a list", model_call(input_ids=ids, task_ids=[0, 2**40, 1, 0]),
         "found task id 1099511627776"),
        ("model", "non-contiguous input_ids and task ids", model_noncontig, CORRECT),
        ("model", "NaN in one sequence's inputs_embeds", model_nan("inputs_embeds"), CORRECT),
        ("model", "NaN in one task's experts", model_nan("task_b[sum]"), CORRECT),
        ("model", "NaN in one task's gate logits", model_nan("gate"), CORRECT),
    ]


# ---- the table -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class BadInput:
    entry: str  # op[backend] | layer | model
    name: str
    run: Callable
    expect: str  # text the ValueError must contain, or CORRECT


def table() -> list:
    rows = []
    for bp in BACKENDS:
        backend = bp.values[0]
        for case in op_cases(backend):
            entry, name, run, expect = _materialize(case, backend)
            rows.append(pytest.param(BadInput(f"op[{backend}]", name, run, expect), marks=bp.marks,
                                     id=f"op[{backend}]-{name}"))
    for entry, name, run, expect in layer_cases() + model_cases():
        rows.append(pytest.param(BadInput(entry, name, run, expect), id=f"{entry}-{name}"))
    return rows


TABLE = table()


@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")  # Inf * 0 in the interpreter
@pytest.mark.parametrize("case", TABLE)
def test_bad_input(case: BadInput):
    if case.expect == CORRECT:
        case.run()
        return
    with pytest.raises(ValueError) as err:
        case.run()
    assert case.expect in str(err.value), f"{case.entry} / {case.name}: {err.value}"
