"""Batches laid out grouped by task: the collator moves every column with its row, the training
loop and generation group rows and hand answers back in the caller's order, and a grouped batch
gives each sequence the same result as the caller's order."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cgc_kernels import CGCDataCollator, CGCLoRAConfig, CGCModel
from tests.cases import TOLERANCES


def test_collator_groups_rows_by_task_and_moves_every_column():
    examples = [
        {"input_ids": [5, 6, 7], "task_ids": 2, "prompt_length": 1},
        {"input_ids": [8], "task_ids": 0},
        {"input_ids": [9, 10], "task_ids": 2},
        {"input_ids": [11, 12], "task_ids": 1},
    ]
    batch = CGCDataCollator(pad_token_id=0)(examples)
    assert batch["task_ids"].tolist() == [0, 1, 2, 2]
    assert batch["input_ids"].tolist() == [[8, 0, 0], [11, 12, 0], [5, 6, 7], [9, 10, 0]]
    assert batch["labels"].tolist() == [[8, -100, -100], [11, 12, -100], [-100, 6, 7], [9, 10, -100]]
    assert batch["attention_mask"].tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1], [1, 1, 0]]
    as_given = CGCDataCollator(pad_token_id=0, group_by_task=False)(examples)
    assert as_given["task_ids"].tolist() == [2, 0, 2, 1]


def _model() -> CGCModel:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, attn_implementation="eager")
    cgc = CGCModel(LlamaForCausalLM(config).double(), CGCLoRAConfig(
        tasks=["a", "b", "c"], num_shared_experts=1, num_task_experts=1, rank=4,
        target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]))
    with torch.no_grad():
        for layer in cgc.adapted_layers().values():
            layer.shared_b.normal_(0.0, 0.2)
            layer.task_b.normal_(0.0, 0.2)
    return cgc


def test_grouped_batch_gives_every_sequence_the_same_logits_and_gradients():
    cgc = _model()
    ids = torch.randint(0, 64, (6, 9), generator=torch.Generator().manual_seed(1))
    tids = torch.tensor([2, 0, 1, 0, 2, 1])
    grouped = torch.sort(tids, stable=True).indices

    def run(rows):
        cgc.zero_grad(set_to_none=True)
        out = cgc(input_ids=ids[rows], labels=ids[rows], task_ids=tids[rows])
        out.loss.backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in cgc.named_parameters() if p.requires_grad}

    logits, grads = run(torch.arange(6))
    logits_g, grads_g = run(grouped)
    tol = TOLERANCES[torch.float64]
    torch.testing.assert_close(logits_g, logits[grouped], **tol)
    for n, g in grads.items():
        torch.testing.assert_close(grads_g[n], g, **tol)


def test_generate_answers_groups_rows_and_keeps_the_callers_order():
    from cgc_kernels.multitask.recipe import generate_answers

    class Tok:  # a tokenizer of single characters, enough for generate_answers
        pad_token_id, eos_token_id, chat_template = 0, 1, None

        def __call__(self, text, add_special_tokens=False):
            return type("Enc", (), {"input_ids": [2 + ord(c) % 60 for c in text]})()

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    cgc = _model().eval()
    rows = [{"task": t, "prompt": p} for t, p in [("c", "xy"), ("a", "hello"), ("b", "q"), ("a", "zz")]]
    got = generate_answers(cgc, Tok(), rows, ["a", "b", "c"], max_new_tokens=3, batch_size=4)
    # The same padded batch in the caller's order, straight through generate.
    from cgc_kernels.multitask.recipe import left_pad

    tok = Tok()
    ids, mask, _ = left_pad([tok(r["prompt"]).input_ids for r in rows], 0)
    out = cgc.generate(input_ids=ids, attention_mask=mask, task_ids=[r["task"] for r in rows], max_new_tokens=3,
                       do_sample=False, pad_token_id=0, eos_token_id=1)
    want = []
    for row in out[:, ids.shape[1]:].tolist():
        want.append(tok.decode(row[: row.index(1)] if 1 in row else row))
    assert got == want
