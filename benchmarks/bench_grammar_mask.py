"""Per-token cost of a structured-output mask on the packaged SmolLM2 tokenizer: llguidance
vs xgrammar, the two grammar engines the server could use.

For each engine: compile a JSON schema (and the any-JSON-object grammar), then walk a valid
output token by token, computing the allowed-token bitmask before each token and advancing
the matcher after it, as the sampler does. Prints a table and writes
benchmarks/results/grammar_mask.json.

    python -m benchmarks.bench_grammar_mask
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "verified": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "address", "verified"],
    "additionalProperties": False,
}
INSTANCE = {"name": "Ada Lovelace", "age": 36, "tags": ["math", "engines", "poetry"],
            "address": {"city": "London", "zip": "W1"}, "verified": True}


def bench_llguidance(tok, ids: list[int], schema: dict, repeats: int) -> dict:
    import llguidance
    import llguidance.hf
    import llguidance.torch as lltorch

    t0 = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tok)
    tok_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    grammar = llguidance.grammar_from("json_schema", json.dumps(schema))
    matcher = llguidance.LLMatcher(lltok, grammar)
    compile_s = time.perf_counter() - t0
    mask = lltorch.allocate_token_bitmask(1, lltok.vocab_size)
    per_token = []
    for _ in range(repeats):
        matcher.reset()
        for t in ids:
            s = time.perf_counter()
            lltorch.fill_next_token_bitmask(matcher, mask, 0)
            per_token.append(time.perf_counter() - s)
            assert matcher.consume_token(t), matcher.get_error()
    return {"tokenizer_setup_s": tok_s, "compile_s": compile_s, "mask_us_median": 1e6 * statistics.median(per_token),
            "mask_us_p99": 1e6 * sorted(per_token)[int(0.99 * len(per_token))]}


def bench_xgrammar(tok, ids: list[int], schema: dict, repeats: int, vocab: int) -> dict:
    import xgrammar as xgr

    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)
    compiler = xgr.GrammarCompiler(info)
    tok_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(schema))
    matcher = xgr.GrammarMatcher(compiled)
    compile_s = time.perf_counter() - t0
    mask = xgr.allocate_token_bitmask(1, info.vocab_size)
    per_token = []
    for _ in range(repeats):
        matcher.reset()
        for t in ids:
            s = time.perf_counter()
            matcher.fill_next_token_bitmask(mask, 0)
            per_token.append(time.perf_counter() - s)
            assert matcher.accept_token(t)
    return {"tokenizer_setup_s": tok_s, "compile_s": compile_s, "mask_us_median": 1e6 * statistics.median(per_token),
            "mask_us_p99": 1e6 * sorted(per_token)[int(0.99 * len(per_token))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/grammar_mask.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    from lorafold.server.models.loader import load_base_model

    base = load_base_model()
    tok, vocab = base.tokenizer, base.model.config.vocab_size
    ids = tok(json.dumps(INSTANCE), add_special_tokens=False)["input_ids"]
    rows = {"xgrammar": bench_xgrammar(tok, ids, SCHEMA, args.repeats, vocab)}
    try:  # the alternative it was chosen over; not a dependency: `pip install llguidance` to compare
        rows["llguidance"] = bench_llguidance(tok, ids, SCHEMA, args.repeats)
    except ImportError:
        print("llguidance is not installed: pip install llguidance to compare")
    print(f"SmolLM2 tokenizer, vocab {vocab}; {len(ids)} tokens per output x {args.repeats}")
    print(f"{'engine':<12}{'tokenizer setup s':>19}{'schema compile ms':>19}{'mask us p50':>13}{'mask us p99':>13}")
    for name, r in rows.items():
        print(f"{name:<12}{r['tokenizer_setup_s']:>19.2f}{1e3 * r['compile_s']:>19.1f}"
              f"{r['mask_us_median']:>13.1f}{r['mask_us_p99']:>13.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"vocab": vocab, "tokens": len(ids), "repeats": args.repeats, "engines": rows},
                                   indent=1))


if __name__ == "__main__":
    main()
