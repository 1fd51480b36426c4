"""`cgc-lora export` (one task as a PEFT adapter or a merged model) and `cgc-lora generate`."""

from __future__ import annotations

import json
import os

from .common import check_task, export_task, load_trained, log, read_meta


def cmd_export(args) -> int:
    meta = read_meta(args.dir)
    check_task(args.task, meta)
    cgc, tokenizer = load_trained(args.dir, meta, args.model)
    export_task(cgc, tokenizer, args.task, args.out, merged=args.merged)
    kind = "merged model" if args.merged else "PEFT adapter"
    log(f"{kind} for task {args.task!r} written to {os.path.abspath(args.out)}")
    return 0


def cmd_generate(args) -> int:
    from ..data.reader import check_tasks, read_jsonl
    from ..multitask.recipe import generate_answers

    rows = read_jsonl(args.input, need_response=False)
    meta = read_meta(args.dir)
    check_tasks(rows, meta["tasks"], args.input)
    cgc, tokenizer = load_trained(args.dir, meta, args.model)
    answers = generate_answers(cgc, tokenizer, rows, list(cgc.tasks), system=meta.get("system"),
                               max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    lines = [json.dumps(dict(r, output=a), ensure_ascii=False) for r, a in zip(rows, answers, strict=True)]
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
        log(f"{len(lines)} answers written to {args.output}")
    else:
        for line in lines:
            print(line)
    return 0
