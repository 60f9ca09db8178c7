"""Nine moodswapper style adapters from ONE joint subject-conditioned run on SmolLM2.

Trains a rank-r adapter per style jointly on mixed-style batches, exports nine PEFT folders,
generates greedy answers to held-out prompts (through a running server when ``--server`` is
given: upload + /v1/chat/completions; else in-process, all nine styles in one mixed batch),
and scores style by validation loss: entry (i, j) = mean token loss of adapter i on style j's
held-out-prompt answers. A style adapter should fit its own style best (diagonal lowest per
column).

    python -m benchmarks.bench_moodswapper_subjects --steps 30 --batch 4 --lr 5e-3 --val-per-style 2 --max-new-tokens 30
    lorafold serve --port 8011 &   # then the same with --server http://127.0.0.1:8011
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from benchmarks._common import write_json
from lorafold.server.models.chat import chat_prompt_ids
from lorafold.server.models.loader import load_base_model
from lorafold.training.data import recipes
from lorafold.training.data.jsonl import encode_row, parse_row
from lorafold.training.subject.layer import subject_batch
from lorafold.training.subject.train import SubjectRow, subject_eval_losses, train_subjects

STYLES = list(recipes.STYLES)


def to_rows(raw: list[dict], tokenizer, max_length: int) -> list[SubjectRow]:
    out = []
    for i, obj in enumerate(raw):
        ex = encode_row(parse_row(Path("moodswapper"), i + 1, {"messages": obj["messages"]}), tokenizer, max_length)
        if ex.n_labels:
            out.append(SubjectRow(ex.input_ids, ex.labels, obj["subject"]))
    return out


def per_style(rows: list, n: int) -> list:
    picked: dict[str, list] = {}
    for r in rows:
        if len(picked.setdefault(r["subject"], [])) < n:
            picked[r["subject"]].append(r)
    return [r for s in STYLES for r in picked.get(s, [])]


@torch.no_grad()
def generate_in_process(model, tokenizer, prompts: list[tuple[str, str]], max_new: int) -> list[str]:
    """Greedy answers for ``(style, prompt)`` pairs: one left-padded batch, each row routed to its style."""
    ids = [chat_prompt_ids(tokenizer, [{"role": "user", "content": p}]) for _, p in prompts]
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    subj = torch.tensor([STYLES.index(s) for s, _ in prompts])
    with subject_batch(subj, len(STYLES)):  # HF generate keeps all rows: routing stays valid every step
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                             pad_token_id=pad)
    return [tokenizer.decode(o[width:], skip_special_tokens=True).strip() for o in out]


def generate_via_server(url: str, folders: dict[str, Path], prompts: list[tuple[str, str]], max_new: int,
                        admin_key: str | None = None, api_key: str | None = None) -> tuple[list[str], list[dict]]:
    """Upload the nine folders as ``mood-STYLE``, check the registry lists them, ask each its prompts.

    Returns the answers and the server's registry entries of the nine adapters.
    """
    from lorafold.clients.client import LorafoldClient

    names = {style: f"mood-{style}" for style in folders}
    with LorafoldClient(url, api_key=api_key, admin_key=admin_key, timeout=600) as client:
        for style, folder in folders.items():
            client.register_adapter(names[style], upload_dir=folder)
        listed = {a.name: a for a in client.list_adapters()}
        missing = sorted(set(names.values()) - set(listed))
        if missing:
            raise RuntimeError(f"the server does not list {missing} after upload")
        served = {m.id for m in client.models()}
        if not set(names.values()) <= served:
            raise RuntimeError(f"/v1/models lacks {sorted(set(names.values()) - served)}")
        answers = []
        for style, prompt in prompts:
            reply = client.chat([{"role": "user", "content": prompt}], model=names[style], max_tokens=max_new,
                                temperature=0.0)
            answers.append((reply.choices[0].message.content or "").strip())
        registry = [{"name": a.name, "rank": a.rank, "targets": list(a.targets), "source": a.source,
                     "size_bytes": a.size_bytes, "requests_served": client.get_adapter(a.name).requests_served}
                    for a in (listed[n] for n in names.values())]
    return answers, registry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--optimizer", default="adamw")
    parser.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"])
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--val-per-style", type=int, default=4)
    parser.add_argument("--prompts-per-style", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)  # 1 is 5-7x faster than 2 on the loaded 2-core box
    parser.add_argument("--server", default=None, help="base URL of a running lorafold server (else in-process)")
    parser.add_argument("--admin-key", default=None, help="the server's admin key (default: LORAFOLD_ADMIN_KEY)")
    parser.add_argument("--api-key", default=None, help="an inference key of the server (default: LORAFOLD_API_KEY)")
    parser.add_argument("--adapters-out", default="/tmp/lorafold_moodswapper_adapters")
    parser.add_argument("--out", default="benchmarks/results/moodswapper_subjects.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    base = load_base_model()
    tok = base.tokenizer
    data = recipes.moodswapper(seed=0)
    train = to_rows(data["train"], tok, args.max_length)
    val = to_rows(per_style(data["val"], args.val_per_style), tok, args.max_length)
    result = train_subjects(base.model, train, STYLES, args.optimizer, rank=args.rank, targets=args.targets,
                            steps=args.steps, batch_size=args.batch, lr=args.lr, pad_id=tok.eos_token_id,
                            out_dir=args.adapters_out)
    t_train = time.perf_counter() - t0
    # (i, j): adapter i on style j's validation answers
    matrix = {a: subject_eval_losses(base.model, val, STYLES, as_subject=a, pad_id=tok.eos_token_id) for a in STYLES}
    print(f"\nvalidation loss, rows = adapter, columns = data style ({args.val_per_style} answers per style)")
    print(f"{'':<10}" + "".join(f"{s[:8]:>9}" for s in STYLES))
    for a in STYLES:
        print(f"{a:<10}" + "".join(f"{matrix[a][s]:>9.3f}" for s in STYLES))
    diag_best = sum(min(STYLES, key=lambda a: matrix[a][s]) == s for s in STYLES)
    diag = sum(matrix[s][s] for s in STYLES) / 9
    off = sum(matrix[a][s] for a in STYLES for s in STYLES if a != s) / 72
    print(f"own-style adapter best in {diag_best}/9 columns; mean diagonal {diag:.3f} vs off-diagonal {off:.3f}")

    held = [r["messages"][0]["content"] for r in data["test"] if r["subject"] == STYLES[0]][: args.prompts_per_style]
    prompts = [(s, p) for s in STYLES for p in held]
    local = generate_in_process(base.model, tok, prompts, args.max_new_tokens)
    registry: list[dict] | None = None
    if args.server:
        answers, registry = generate_via_server(args.server, result.folders, prompts, args.max_new_tokens,
                                                args.admin_key, args.api_key)
        print(f"server lists all {len(registry)} adapters: {', '.join(r['name'] for r in registry)}")
    else:
        answers = local
    same = sum(a == b for a, b in zip(answers, local))
    for (s, p), a in zip(prompts, answers):
        print(f"[{s}] {p}\n    -> {a}")
    if args.server:
        print(f"served answer == in-process greedy answer for {same}/{len(prompts)} prompts")
    elapsed = time.perf_counter() - t0
    print(f"train {t_train:.0f} s ({args.steps} steps x {args.batch}); total {elapsed:.0f} s; "
          f"loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}")
    write_json(args.out, {
        "args": {**vars(args), "admin_key": bool(args.admin_key) or None, "api_key": bool(args.api_key) or None},
        "losses": result.losses, "val_loss_matrix": matrix, "own_style_best_columns": diag_best,
        "mean_diagonal": diag, "mean_off_diagonal": off, "generated_by": "server" if args.server else "in-process",
        "registered": registry, "served_equals_in_process": same if args.server else None, "generations": [
            {"style": s, "prompt": p, "answer": a, "in_process": b} for (s, p), a, b in zip(prompts, answers, local)],
        "adapters": {s: str(f) for s, f in result.folders.items()}, "train_seconds": t_train, "seconds": elapsed,
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
