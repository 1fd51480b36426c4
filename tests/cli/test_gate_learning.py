"""Gates that learn: the gate learning-rate group (checked against Adam's first step, which moves
every parameter by its learning rate), MOELoRA's random task-embedding gate per layer and model-wide
(checked against a hand computation, the naive loop oracle and finite differences), and the gate
movement report."""

import json
import os

import pytest
import torch

from cgc_kernels import CGCLoRAConfig, CGCModel, TaskGate
from cgc_kernels.adapter.gate_report import GateTable, gate_movement, gate_snapshot, gate_table_from_dir
from cgc_kernels.adapter.param_groups import gate_parameters, parameter_groups
from cgc_kernels.cli import main
from cgc_kernels.data import demo_tasks
from cgc_kernels.data.reader import read_jsonl
from cgc_kernels.multitask.models import tiny_model
from cgc_kernels.multitask.recipe import TrainSettings, train_loop
from tests.oracle import naive_cgc_lora

TASKS = list(demo_tasks.TASKS)


def _cgc(seed=0, **kw):
    model, tok = tiny_model()
    cfg = dict(tasks=TASKS, num_shared_experts=2, num_task_experts=1, rank=4, alpha=8,
               target_modules=["q_proj", "v_proj"])
    cfg.update(kw)
    torch.manual_seed(seed)
    return CGCModel(model, CGCLoRAConfig(**cfg)), tok


def _rows(every=30):
    return read_jsonl(os.path.join(demo_tasks.data_dir(), demo_tasks.FILES[0]))[::every]


# ---- parameter groups ---------------------------------------------------------------------------
@pytest.mark.parametrize("gate", [dict(), dict(gate_scope="model"),  # a gate per layer; one for the model
                                  dict(gate_embedding_dim=8, gate_init="random")])  # MOELoRA's
def test_groups_split_the_trainable_parameters(gate):
    cgc, _ = _cgc(**gate)
    groups = parameter_groups(cgc, 1e-3, gate_lr_ratio=20.0, weight_decay=0.1)
    assert [g["name"] for g in groups] == ["experts", "gates"]
    experts, gates = ({id(p) for p in g["params"]} for g in groups)
    trainable = {id(p) for p in cgc.parameters() if p.requires_grad}
    assert experts | gates == trainable and not experts & gates
    # Gate parameters are exactly those under a gate module, counted once (model-wide: in every layer).
    by_name = {id(p) for n, p in cgc.named_parameters() if p.requires_grad and ".gate." in n}
    assert gates == by_name and len(groups[1]["params"]) == len(gates)
    assert groups[0]["lr"] == 1e-3 and groups[1]["lr"] == pytest.approx(2e-2)
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert len(gate_parameters(cgc)) == len(gates)


@pytest.mark.parametrize("bad, match", [(dict(lr=0.0), "lr"), (dict(lr=float("nan")), "lr"),
                                        (dict(gate_lr_ratio=-1.0), "gate_lr_ratio"),
                                        (dict(gate_lr_ratio=float("inf")), "gate_lr_ratio"),
                                        (dict(weight_decay=-0.1), "weight_decay")])
def test_groups_reject_bad_values(bad, match):
    cgc, _ = _cgc()
    kw = dict(lr=1e-3) | bad
    with pytest.raises(ValueError, match=match):
        parameter_groups(cgc, kw.pop("lr"), **kw)


@pytest.mark.parametrize("ratio", [0.0, 1.0, 30.0])
def test_first_adam_step_moves_each_group_by_its_learning_rate(ratio):
    # Adam's first update is lr * g / (|g| + eps): every parameter with a gradient moves by its
    # group's learning rate (no warm-up, the cosine schedule is at 1 on step one). B starts at
    # zero, and so does every gate gradient (dgates = s <B^T dy, A x>): B drawn here.
    cgc, tok = _cgc()
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in cgc.adapted_layers().values():
            layer.shared_b.normal_(0, 0.1)
            layer.task_b.normal_(0, 0.1)
    gates = gate_parameters(cgc)
    experts = [p for p in cgc.parameters() if p.requires_grad and all(p is not g for g in gates)]
    before = [p.detach().clone() for p in gates + experts]
    lr = 1e-3
    train_loop(cgc, tok, _rows(), TASKS, TrainSettings(steps=1, batch_size=8, lr=lr, warmup_steps=0,
                                                        max_length=48, gate_lr_ratio=ratio), progress=False)
    moved = [float((p.detach() - b).abs().max()) for p, b in zip(gates + experts, before, strict=True)]
    gate_moves, expert_moves = moved[:len(gates)], moved[len(gates):]
    assert max(expert_moves) == pytest.approx(lr, rel=1e-3)
    assert max(gate_moves) == pytest.approx(lr * ratio, rel=1e-3, abs=0.0)


# ---- MOELoRA's gate -----------------------------------------------------------------------------
def test_random_gate_is_moeloras_softmax_of_a_linear_map():
    torch.manual_seed(0)
    gate = TaskGate(3, 5, embedding_dim=16, init="random")
    assert gate.proj.bias is None  # MOELoRA's Linear(task embedding -> experts, bias=False)
    emb, w = gate.embedding.detach().double(), gate.proj.weight.detach().double()
    logits = emb @ w.T
    want = torch.exp(logits - logits.max(-1, keepdim=True).values)
    want = want / want.sum(-1, keepdim=True)
    torch.testing.assert_close(gate().double(), want, rtol=1e-6, atol=1e-7)
    # Randomly initialised: tasks start from different, uneven mixtures (uniform would be 0.2 each).
    g = gate().detach()
    assert float((g - 0.2).abs().max()) > 0.05 and float((g[0] - g[1]).abs().max()) > 0.01
    with pytest.raises(ValueError, match="embedding_dim"):
        TaskGate(3, 5, init="random")
    with pytest.raises(ValueError, match="init"):
        TaskGate(3, 5, 4, init="normal")


@pytest.mark.parametrize("kw, match", [(dict(gate_init="random"), "gate_embedding_dim"),
                                       (dict(gate_init="random", gate_embedding_dim=4, gate="token"), "task"),
                                       (dict(gate_init="zeros"), "gate_init")])
def test_config_rejects_bad_gate_init(kw, match):
    with pytest.raises(ValueError, match=match):
        CGCLoRAConfig(tasks=["a", "b"], **kw)


@pytest.mark.parametrize("scope", ["layer", "model"])
def test_model_with_random_gate_equals_the_oracle(scope):
    cgc, _ = _cgc(gate_embedding_dim=8, gate_init="random", gate_scope=scope)
    torch.manual_seed(1)
    with torch.no_grad():  # non-zero B, so the experts contribute
        for layer in cgc.adapted_layers().values():
            layer.shared_b.normal_(0, 0.3)
            layer.task_b.normal_(0, 0.3)
    layers = list(cgc.adapted_layers().values())
    gate_objects = {id(layer.gate.parts[0]) for layer in layers}
    assert len(gate_objects) == (1 if scope == "model" else len(layers))
    ids = torch.tensor([0, 2, 3, 1])
    x = torch.randn(4, layers[0].in_features)
    for layer in layers:
        g = layer.gate.parts[0]
        logits = g.embedding.detach().double() @ g.proj.weight.detach().double().T  # [T, S+K] by hand
        gates = torch.softmax(logits, -1)
        want = naive_cgc_lora(x, ids, gates, layer.shared_a.detach(), layer.shared_b.detach(),
                              layer.task_a.detach(), layer.task_b.detach(), layer.scaling)
        with torch.no_grad():
            got = layer(x, ids) - layer.base_layer(x)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_model_wide_gate_gradient_sums_every_layer():
    # One gate for the whole model: its gradient is what finite differences of the loss say
    # (every layer's use of it included). float64, but Llama's RMSNorm computes in float32, so the
    # step is 1e-3 and the tolerance 2e-3 (each of the four adapted layers adds its share).
    cgc, _ = _cgc(gate_embedding_dim=6, gate_init="random", gate_scope="model")
    cgc.double()
    torch.manual_seed(2)
    with torch.no_grad():
        for layer in cgc.adapted_layers().values():
            layer.shared_b.normal_(0, 0.5)
            layer.task_b.normal_(0, 0.5)
    ids = torch.randint(5, 100, (3, 7))
    tids = torch.tensor([0, 3, 1])
    weight = next(iter(cgc.adapted_layers().values())).gate.parts[0].proj.weight

    probe = torch.randn(3, 7, cgc.config.vocab_size, dtype=torch.float64)

    def loss():  # a float64 function of the logits (transformers' own loss upcasts to float32 only)
        return (cgc(input_ids=ids, task_ids=tids).logits * probe).sum()

    loss().backward()
    direction = torch.randn_like(weight)
    eps = 1e-3
    with torch.no_grad():
        weight += eps * direction
        up = loss()
        weight -= 2 * eps * direction
        down = loss()
        weight += eps * direction
    fd = float((up - down) / (2 * eps))
    assert fd == pytest.approx(float((weight.grad * direction).sum()), rel=2e-3)
    assert abs(fd) > 1e-6  # the gate matters to the loss


@pytest.mark.parametrize("scope", ["layer", "model"])
def test_random_gate_save_load_round_trip(scope, tmp_path):
    cgc, _ = _cgc(gate_embedding_dim=8, gate_init="random", gate_scope=scope)
    cgc.save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / "cgc_config.json").read_text())["gate_init"] == "random"
    fresh, _ = tiny_model()
    torch.manual_seed(123)  # another random draw, which loading must overwrite
    loaded = CGCModel.from_pretrained(fresh, str(tmp_path))
    for (n, a), (_, b) in zip(cgc.gate_weights().items(), loaded.gate_weights().items(), strict=True):
        assert torch.equal(a, b), n
    from_dir = gate_table_from_dir(str(tmp_path))
    assert torch.equal(from_dir.weights, cgc.gate_table().weights)


# ---- gate movement ------------------------------------------------------------------------------
def _table(weights):
    return GateTable(tasks=["a", "b"], clusters=["c", "c"], layers=["l0", "l1"], experts=["shared0", "task0"],
                     num_shared=1, weights=torch.tensor(weights))


def test_movement_summary_by_hand():
    start = _table([[[0.5, 0.5], [0.5, 0.5]], [[0.5, 0.5], [0.5, 0.5]]])
    end = _table([[[0.7, 0.3], [0.4, 0.6]], [[0.5, 0.5], [0.5, 0.5]]])
    m = gate_movement(start, end).summary()
    assert m["a"] == pytest.approx(dict(start_min=0.5, start_max=0.5, end_min=0.4, end_max=0.7,
                                        mean_change=0.05, max_change=0.2))
    assert m["b"]["max_change"] == 0.0 and m["b"]["mean_change"] == 0.0
    assert gate_movement(start, end).largest_change() == pytest.approx(0.2)
    text = gate_movement(start, end).format()
    assert "0.400..0.700" in text and "2 layers" in text
    other = GateTable(tasks=["a"], clusters=["c"], layers=["l0", "l1"], experts=["shared0", "task0"], num_shared=1,
                      weights=torch.full((1, 2, 2), 0.5))
    with pytest.raises(ValueError, match="different adapters"):
        gate_movement(start, other)


def test_a_larger_gate_learning_rate_moves_the_gates_more():
    moved = {}
    for ratio in (0.0, 1.0, 50.0):
        cgc, tok = _cgc()
        start = gate_snapshot(cgc)
        train_loop(cgc, tok, _rows(), TASKS, TrainSettings(steps=3, batch_size=8, lr=2e-3, warmup_steps=0,
                                                            max_length=48, gate_lr_ratio=ratio), progress=False)
        moved[ratio] = gate_movement(start, cgc).largest_change()
    assert moved[0.0] == 0.0  # frozen gates stay exactly at their start
    assert 0.0 < moved[1.0] < moved[50.0]
    assert gate_snapshot(_cgc(gate="token")[0]) is None  # token gates have no table


def test_train_command_gate_lr_ratio_and_movement_report(tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows(20)))
    out = tmp_path / "run"
    lr, ratio = 1e-2, 40.0
    rc = main(["train", "--tiny", "--data", str(data), "--out", str(out), "--steps", "2", "--batch-size", "8",
               "--lr", str(lr), "--warmup-steps", "0", "--rank", "4", "--gate-lr-ratio", str(ratio),
               "--target-modules", "q_proj,v_proj"])
    assert rc == 0
    assert "gate movement" in capsys.readouterr().out
    # Zero-initialised logits after 2 Adam steps at lr * ratio (cosine factors 1 and 0.5) move by
    # at most 1.5 * lr * ratio = 0.6 (Adam's second step can exceed its rate by 0.14%), and the
    # gate weights far more than one learning rate for all could move them (logits by 1.5 * lr).
    moved = float(gate_table_from_dir(str(out)).weights.sub(1 / 3).abs().max())
    assert 3 * 1.5 * lr < moved
    from safetensors.torch import load_file

    logits = [v for k, v in load_file(str(out / "cgc_adapter.safetensors")).items() if "gate" in k]
    assert max(float(v.abs().max()) for v in logits) <= 1.5 * lr * ratio * 1.0015
    capsys.readouterr()
    assert main(["train", "--tiny", "--data", str(data), "--out", str(tmp_path / "x"), "--gate-lr-ratio", "-1"]) == 2
    assert "--gate-lr-ratio" in capsys.readouterr().err and not (tmp_path / "x").exists()
