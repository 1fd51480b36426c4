"""The training recipe that the demo, clustering and the method comparison share: prompts, a fast
training loop, evaluation.

Rows are plain dicts {"task", "prompt", "response"} or {"task", "messages", "response"} as
data/formats.py reads them from any accepted file ("response" is not needed to generate). A prompt
is wrapped in the tokenizer's chat template when it has one; the loss is on the response (and the
end-of-turn token) only: here the last assistant turn of a conversation, in encode_for_trainer
(the command's `train`) every assistant turn.

Batches are LEFT padded, with position ids counted from each row's first real token, so that
every row's response ends at the last position: training then computes the LM head only over
the last few positions (`logits_to_keep`), which is most of a small model's step on a CPU.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from ..adapter.param_groups import DEFAULT_GATE_LR_RATIO, parameter_groups
from ..data.encode import (
    encode_prompt_response,
    encode_row,
    prompt_text,  # noqa: F401  (re-exported: the prompt as the model sees it)
    row_prompt_text,
)
from ..data.reader import tasks_of

IGNORE_INDEX = -100
# The demo tasks' system prompt.
DEMO_SYSTEM = "Answer briefly."


# ---- prompts -----------------------------------------------------------------------------------
def encode(tokenizer, rows: list[dict], system: str | None, max_length: int) -> list[dict]:
    """Token ids of each row: {"prompt": [...], "response": [...] (with the end-of-turn token)}.
    A conversation's prompt is every turn before its last assistant turn, the response."""
    return [dict(zip(("prompt", "response"), encode_prompt_response(
        tokenizer, row_prompt_text(tokenizer, r, system), r.get("response", ""), max_length), strict=True))
        for r in rows]


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids) [B, L], padded on the left."""
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, L - len(s):] = torch.tensor(s)
            mask[i, L - len(s):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


def training_batch(encoded: list[dict], pad_id: int) -> dict:
    """A left-padded batch; labels are IGNORE_INDEX except on response tokens. `keep`: how many
    final positions hold every logit the loss needs (longest response + 1)."""
    seqs = [e["prompt"] + e["response"] for e in encoded]
    ids, mask, pos = left_pad(seqs, pad_id)
    labels = torch.full_like(ids, IGNORE_INDEX)
    L = ids.shape[1]
    for i, e in enumerate(encoded):
        n = len(e["response"])
        labels[i, L - n:] = ids[i, L - n:]
    keep = max(len(e["response"]) for e in encoded) + 1
    return {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "labels": labels, "keep": keep}


# ---- training ----------------------------------------------------------------------------------
@dataclass
class TrainSettings:
    """gate_lr_ratio: the gates' learning rate over the experts' (their own AdamW group, see
    adapter/param_groups.py); 1 trains everything at `lr`."""

    steps: int = 64
    batch_size: int = 16
    lr: float = 2e-3
    warmup_steps: int = 6
    max_length: int = 96
    seed: int = 0
    gate_lr_ratio: float = DEFAULT_GATE_LR_RATIO


def mixed_batches(n_rows: int, batch_size: int, steps: int, seed: int):
    """Row indices of each step: passes over a shuffled order, so tasks mix within every batch."""
    rng = random.Random(seed)
    order: list[int] = []
    for _ in range(steps):
        while len(order) < batch_size:
            perm = list(range(n_rows))
            rng.shuffle(perm)
            order += perm
        yield order[:batch_size]
        order = order[batch_size:]


def response_loss(cgc, batch: dict, task_ids: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy over response tokens, with the LM head over the last `keep` positions only."""
    keep = batch["keep"]
    out = cgc(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
              position_ids=batch["position_ids"], task_ids=task_ids, logits_to_keep=keep)
    logits = out.logits[:, -keep:-1].float()  # position p predicts token p + 1
    labels = batch["labels"][:, -keep + 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=IGNORE_INDEX)


def train_loop(cgc, tokenizer, rows: list[dict], tasks: list[str], settings: TrainSettings,
               system: str | None = None, progress: bool = True) -> list[float]:
    """AdamW with linear warm-up and cosine decay on mixed-task batches, the gates at
    `settings.gate_lr_ratio` times the experts' learning rate; returns the loss of each step."""
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    encoded = encode(tokenizer, rows, system, settings.max_length)
    tids_all = torch.tensor([tasks.index(r["task"]) for r in rows])
    params = [p for p in cgc.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("the model has no trainable parameters")
    opt = torch.optim.AdamW(parameter_groups(cgc, settings.lr, gate_lr_ratio=settings.gate_lr_ratio))
    sched = get_cosine_schedule_with_warmup(opt, settings.warmup_steps, settings.steps)
    torch.manual_seed(settings.seed)
    cgc.train()
    losses = []
    bar = tqdm(mixed_batches(len(rows), settings.batch_size, settings.steps, settings.seed),
               total=settings.steps, desc="training", disable=not progress, unit="step")
    for idx in bar:
        # Rows grouped by task (a stable sort; the loss is a mean over tokens, so row order does not
        # change it): each task is then a slice of every adapted layer's input, with no gather.
        idx = sorted(idx, key=lambda i: int(tids_all[i]))
        batch = training_batch([encoded[i] for i in idx], tokenizer.pad_token_id)
        loss = response_loss(cgc, batch, tids_all[idx])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    cgc.eval()
    return losses


# ---- generation and evaluation -----------------------------------------------------------------
@torch.no_grad()
def generate_answers(cgc, tokenizer, rows: list[dict], tasks: list[str], *, system: str | None = None,
                     max_new_tokens: int = 32, batch_size: int = 32, progress: bool = False,
                     desc: str = "generating", temperature: float = 0.0, top_p: float = 1.0) -> list[str]:
    """Answers to each row's prompt, greedy unless temperature > 0 (then sampled, nucleus top_p);
    each batch mixes tasks (rows in the given order). The progress bar counts rows."""
    from tqdm.auto import tqdm

    eos = tokenizer.eos_token_id
    prompts = [tokenizer(row_prompt_text(tokenizer, r, system), add_special_tokens=False).input_ids
               for r in rows]
    answers = []
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
    bar = tqdm(total=len(rows), desc=desc, disable=not progress, unit="row")
    for s in range(0, len(rows), batch_size):
        # Each batch's rows grouped by task for the model (slices, not gathers, in every layer);
        # the answers come back in the caller's order.
        chunk_rows = list(range(s, min(s + batch_size, len(rows))))
        grouped = sorted(chunk_rows, key=lambda i: tasks.index(rows[i]["task"]))
        ids, mask, _ = left_pad([prompts[i] for i in grouped], tokenizer.pad_token_id)
        tids = torch.tensor([tasks.index(rows[i]["task"]) for i in grouped])
        out = cgc.generate(input_ids=ids, attention_mask=mask, task_ids=tids, max_new_tokens=max_new_tokens,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=eos, **sampling)
        decoded = {}
        for i, row in zip(grouped, out[:, ids.shape[1]:].tolist(), strict=True):
            if eos in row:
                row = row[: row.index(eos)]
            decoded[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
        answers += [decoded[i] for i in chunk_rows]
        bar.update(len(chunk_rows))
    bar.close()
    return answers


def evaluate(cgc, tokenizer, rows: list[dict], tasks: list[str], *, system: str | None = None,
             max_new_tokens: int = 12, batch_size: int = 32, progress: bool = True,
             desc: str = "evaluating") -> tuple[dict[str, float], list[str]]:
    """({task: exact-match accuracy of the greedy answer}, answers)."""
    answers = generate_answers(cgc, tokenizer, rows, tasks, system=system, max_new_tokens=max_new_tokens,
                               batch_size=batch_size, progress=progress, desc=desc)
    hits: dict[str, list[int]] = {t: [] for t in tasks_of(rows)}
    for r, a in zip(rows, answers, strict=True):
        hits[r["task"]].append(int(a == r["response"].strip()))
    return {t: sum(h) / len(h) for t, h in hits.items()}, answers


def interleave(rows: list[dict]) -> list[dict]:
    """Rows reordered round-robin across tasks, so every evaluation batch mixes tasks."""
    by_task: dict[str, list[dict]] = {}
    for r in rows:
        by_task.setdefault(r["task"], []).append(r)
    out = []
    for i in range(max(len(v) for v in by_task.values())):
        out += [v[i] for v in by_task.values() if i < len(v)]
    return out


def accuracy_table(before: dict[str, float], after: dict[str, float], counts: dict[str, int]) -> str:
    """A per-task table of held-out exact match before and after training."""
    w = max(8, *(len(t) for t in after))
    lines = [f"{'task':<{w}}  {'held-out':>8}  {'before':>6}  {'after':>6}", "-" * (w + 28)]
    for t in after:
        lines.append(f"{t:<{w}}  {counts[t]:>8}  {before[t]:>6.2f}  {after[t]:>6.2f}")
    mean_b = sum(before.values()) / len(before)
    mean_a = sum(after.values()) / len(after)
    lines.append(f"{'mean':<{w}}  {sum(counts.values()):>8}  {mean_b:>6.2f}  {mean_a:>6.2f}")
    return "\n".join(lines)


def format_seconds(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{math.floor(s / 60)} min {s % 60:.0f} s"


# ---- transformers.Trainer ----------------------------------------------------------------------
def encode_for_trainer(tokenizer, rows: list[dict], tasks: list[str], system: str | None,
                       max_length: int) -> list[dict]:
    """Examples for CGCDataCollator: {"input_ids", "labels", "task_ids"}, the loss on the answers
    (every assistant turn of a conversation); ValueError naming the row if none fits max_length."""
    out = []
    for i, r in enumerate(rows):
        try:
            ids, labels = encode_row(tokenizer, r, max_length, system)
        except ValueError as e:
            raise ValueError(f"row {i + 1}: {e}") from None
        out.append({"input_ids": ids, "labels": labels, "task_ids": tasks.index(r["task"])})
    return out
