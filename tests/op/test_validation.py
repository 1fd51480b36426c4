"""Bad input to the op raises ValueError naming the problem, before any computation."""

import pytest
import torch

import cgc_kernels
from cgc_kernels import reference
from tests.cases import Case, make_inputs

BASE = Case(M=6, d_in=4, d_out=3, T=3, S=2, K=1, r=2)


def _args(**over):
    args = make_inputs(BASE, torch.float32)
    args.update(over)
    return args


def _ids(*vals):
    return torch.tensor(vals)


# (name, overrides, text the message must contain)
BAD_INPUTS = [
    ("task id T", dict(task_ids=_ids(0, 1, 2, 3, 0, 1)), "found task id 3"),
    ("task id -2", dict(task_ids=_ids(0, -2, 0, 0, 0, 0)), "found task id -2"),
    ("float task ids", dict(task_ids=torch.zeros(6)), "task_ids must be an integer"),
    ("2-D task ids", dict(task_ids=torch.zeros(2, 3, dtype=torch.int64)), "task_ids must be 1-D"),
    ("ids shorter than x", dict(task_ids=_ids(0, 1)), "task_ids has 2 entries but x has 6"),
    ("int x", dict(x=torch.zeros(6, 4, dtype=torch.int64)), "x must be float16"),
    ("1-D x", dict(x=torch.zeros(24)), "x must be 2-D"),
    ("x d_in mismatch", dict(x=torch.zeros(6, 5)), "shared_a is [C, S*r, d_in]"),
    ("expert dtype", dict(task_a=torch.zeros(3, 2, 4, dtype=torch.float64)), "task_a has dtype"),
    ("gate width", dict(gates=torch.zeros(3, 4)), "gates has 4 columns"),
    ("gate rows", dict(gates=torch.zeros(2, 3)), "gates must be [T, S+K]"),
    ("per-token gate rows", dict(per_token_gates=True), "gates must be [M, S+K]"),
    ("task_b rank", dict(task_b=torch.zeros(3, 3, 3)), "task_b must be [T, d_out, K*r]"),
    ("task_b d_out", dict(task_b=torch.zeros(3, 4, 2)), "task_b has d_out=4 but shared_b has d_out=3"),
    ("shared_b rank", dict(shared_b=torch.zeros(1, 3, 3)), "shared_b must be [C, d_out, S*r]"),
    ("clusters without map", dict(shared_a=torch.zeros(2, 4, 4), shared_b=torch.zeros(2, 3, 4)),
     "task_cluster [T] is required"),
    ("cluster out of range", dict(task_cluster=_ids(0, 1, 0)), "task_cluster values must lie in [0, 1)"),
    ("dropout 1", dict(dropout_p=1.0), "dropout_p must lie in [0, 1)"),
    ("out shape", dict(out=torch.zeros(6, 4)), "out must be [M, d_out]"),
    ("scaling tensor", dict(scaling=torch.tensor(2.0)), "scaling must be a Python float"),
    ("device mismatch", dict(task_ids=_ids(0, 1, 2, 0, 1, 2).to("meta")), "task_ids"),
]


@pytest.mark.parametrize("op", [reference.cgc_lora, cgc_kernels.cgc_lora], ids=["reference", "dispatch"])
@pytest.mark.parametrize("name,over,message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_value_error(op, name, over, message):
    with pytest.raises(ValueError) as err:
        op(**_args(**over))
    assert message in str(err.value)


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="backend must be one of"):
        cgc_kernels.cgc_lora(**_args(), backend="cuda")
