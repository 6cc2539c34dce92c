"""`kvjax serve`'s n, best_of and logit controls, in process (Starlette's TestClient) on the
bundled text model.

One app and engine serve the module (2 slots, context 64, nothing warmed up: each program
shape compiles on first use, ~5 s each on a 2-core CPU; so the prompts all take the same
prefill width (17-32 tokens, as the chat prompt), requests without logit controls ask for
logprobs (as best_of does internally) and those with controls run one row: six programs in
all). Oracles: the server itself asked differently (choice c of a
seeded n > 1 request is the n = 1 answer with seed + c; best_of's picks are the candidates of
highest summed token logprob among the n = best_of answers with the same seed), the byte
tokenizer (a +100 logit bias on one token makes every token that one), and the pure
selection function.
"""
from __future__ import annotations

import json

import pytest

from kvjax.tokenizer import ByteTokenizer

PROMPT = "def fib(n):\n    return fib("       # 28 tokens: the chat prompt's prefill width
OTHER = "class Stack:\n    def push("
EOS = ByteTokenizer.EOS


@pytest.fixture(scope="module")
def api():
    from starlette.testclient import TestClient

    from kvjax.cli import build_parser
    from kvjax.serve import cli as serve_cli

    args = build_parser().parse_args(["serve", "--model", "text", "--max-slots", "2", "--max-len", "64",
                                      "--warmup", "none", "--compilation-cache", "none"])
    app, engine, _ = serve_cli.build(args)
    try:
        yield TestClient(app, base_url="http://127.0.0.1")
    finally:
        engine.close()


def ok(api, body, path="/v1/completions") -> dict:
    r = api.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def texts(answer) -> list:
    return [c["text"] for c in answer["choices"]]


def events(api, body, path="/v1/completions") -> list:
    """The JSON chunks of a streamed answer (checked to end with [DONE])."""
    with api.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200
        data = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


# ---------------------------------------------------------------- n
def test_n_sampled_choices_follow_the_seed_rule(api):
    """n=3, temperature 1, a seed: indices 0..2, the same answer twice, not all equal; choice c
    is the n=1 answer with seed + c; usage counts the prompt once and every choice's tokens."""
    body = {"prompt": PROMPT, "n": 3, "temperature": 1.0, "seed": 11, "max_tokens": 8, "logprobs": 0}
    a, b = ok(api, body), ok(api, body)
    assert [c["index"] for c in a["choices"]] == [0, 1, 2]
    assert texts(a) == texts(b) and len(set(texts(a))) > 1, texts(a)
    for c in range(3):
        assert texts(ok(api, {**body, "n": 1, "seed": 11 + c})) == [texts(a)[c]]
    use = a["usage"]
    assert use["prompt_tokens"] == len(ByteTokenizer().encode(PROMPT))
    assert use["completion_tokens"] == sum(len(c["logprobs"]["tokens"]) for c in a["choices"])


def test_n_greedy_choices_are_identical_and_indexed_per_prompt(api):
    """Greedy n=2 over two prompts: index = prompt * n + choice, each prompt's choices equal
    its n=1 answer; the chat route answers n messages too."""
    body = {"prompt": [PROMPT, OTHER], "n": 2, "temperature": 0, "max_tokens": 6, "logprobs": 0}
    r = ok(api, body)
    one = texts(ok(api, {**body, "n": 1}))
    assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
    assert texts(r) == [one[0], one[0], one[1], one[1]]
    tok = ByteTokenizer()
    assert r["usage"]["prompt_tokens"] == len(tok.encode(PROMPT)) + len(tok.encode(OTHER))
    chat = ok(api, {"messages": [{"role": "user", "content": "hi"}], "n": 2, "temperature": 0,
                    "max_tokens": 4, "logprobs": True}, "/v1/chat/completions")
    assert [c["index"] for c in chat["choices"]] == [0, 1]
    assert chat["choices"][0]["message"] == chat["choices"][1]["message"]
    assert chat["usage"]["completion_tokens"] == sum(len(c["logprobs"]["content"]) for c in chat["choices"])


def test_best_of_returns_the_candidates_of_highest_logprob(api):
    body = {"prompt": PROMPT, "temperature": 1.0, "seed": 5, "max_tokens": 6}
    candidates = ok(api, {**body, "n": 4, "logprobs": 0})["choices"]
    sums = [sum(c["logprobs"]["token_logprobs"]) for c in candidates]
    order = sorted(range(4), key=lambda j: -sums[j])
    assert sums[order[1]] - sums[order[2]] > 1e-3, sums       # no near tie at the cut
    best = ok(api, {**body, "n": 2, "best_of": 4})
    assert texts(best) == [candidates[j]["text"] for j in order[:2]]
    assert [c["index"] for c in best["choices"]] == [0, 1]
    assert all(c["logprobs"] is None for c in best["choices"])       # not asked for
    # usage counts the discarded candidates' tokens too (they were generated)
    assert best["usage"]["completion_tokens"] == sum(len(c["logprobs"]["tokens"]) for c in candidates)
    with_lp = ok(api, {**body, "n": 1, "best_of": 4, "logprobs": 0})["choices"][0]
    assert with_lp["logprobs"] == candidates[order[0]]["logprobs"]


def test_pick_best_orders_by_score_and_keeps_ties_stable():
    from kvjax.serve.generation import pick_best

    assert pick_best(["a", "b", "c", "d"], 2, [-3.0, -1.0, -2.0, -1.0]) == ["b", "d"]
    assert pick_best(["a", "b"], 2, [float("-inf"), -5.0]) == ["b", "a"]


# ---------------------------------------------------------------- streaming
def test_stream_n_interleaves_choices_with_their_own_finish(api):
    body = {"prompt": PROMPT, "n": 2, "temperature": 1.0, "seed": 3, "max_tokens": 8, "logprobs": 0}
    whole = ok(api, body)
    chunks = events(api, body)
    got, tokens, finishes = {0: "", 1: ""}, {0: [], 1: []}, []
    for c in chunks:
        (choice,) = c["choices"]
        got[choice["index"]] += choice["text"]
        tokens[choice["index"]] += (choice["logprobs"] or {}).get("tokens", [])
        if choice["finish_reason"]:
            finishes.append(choice["index"])
    assert sorted(finishes) == [0, 1] and [got[0], got[1]] == texts(whole)
    assert [tokens[0], tokens[1]] == [c["logprobs"]["tokens"] for c in whole["choices"]]
    assert [("usage" in c) for c in chunks].count(True) == 1 and "usage" in chunks[-1]
    for k in ("prompt_tokens", "completion_tokens"):
        assert chunks[-1]["usage"][k] == whole["usage"][k]
    chat = events(api, {"messages": [{"role": "user", "content": "hi"}], "n": 2, "max_tokens": 3,
                        "temperature": 0, "logprobs": True}, "/v1/chat/completions")
    roles = [c["choices"][0]["index"] for c in chat if c["choices"][0]["delta"].get("role")]
    ends = [c["choices"][0]["index"] for c in chat if c["choices"][0]["finish_reason"]]
    assert sorted(roles) == [0, 1] and sorted(ends) == [0, 1]


def test_echo_stop_and_logprobs_work_per_choice(api):
    """n=2 with echo, logprobs and a stop string: each choice echoes the prompt, scores it, stops
    at its own first stop string; streamed, each index concatenates to its whole answer."""
    body = {"prompt": PROMPT, "n": 2, "temperature": 1.0, "seed": 8, "max_tokens": 8, "logprobs": 0,
            "echo": True, "stop": ["e", "t"]}
    whole = ok(api, body)["choices"]
    for c in whole:
        assert c["text"].startswith(PROMPT) and not {"e", "t"} & set(c["text"][len(PROMPT):])
        assert c["logprobs"]["token_logprobs"][0] is None                 # the BOS: nothing before it
        assert len(c["logprobs"]["tokens"]) > len(ByteTokenizer().encode(PROMPT))
    got = {0: "", 1: ""}
    for chunk in events(api, body):
        (choice,) = chunk["choices"]
        got[choice["index"]] += choice["text"]
    assert [got[0], got[1]] == [c["text"] for c in whole]


# ---------------------------------------------------------------- bad values
BAD = [  # (id, body fields, param)
    ("logit_bias-key-not-an-id", {"logit_bias": {"tok": 1}}, "logit_bias"),
    ("logit_bias-negative-key", {"logit_bias": {"-1": 1}}, "logit_bias"),
    ("logit_bias-out-of-vocab", {"logit_bias": {"259": 1}}, "logit_bias"),
    ("logit_bias-huge-key", {"logit_bias": {"9" * 5000: 1}}, "logit_bias"),
    ("logit_bias-101", {"logit_bias": {"97": 101}}, "logit_bias"),
    ("logit_bias-huge-int", {"logit_bias": {"97": 10**400}}, "logit_bias"),
    ("logit_bias-string", {"logit_bias": {"97": "x"}}, "logit_bias"),
    ("logit_bias-bool", {"logit_bias": {"97": True}}, "logit_bias"),
    ("logit_bias-list", {"logit_bias": [1]}, "logit_bias"),
    ("presence_penalty-2.5", {"presence_penalty": 2.5}, "presence_penalty"),
    ("frequency_penalty--3", {"frequency_penalty": -3}, "frequency_penalty"),
    ("min_p-1.5", {"min_p": 1.5}, "min_p"),
    ("repetition_penalty-0", {"repetition_penalty": 0}, "repetition_penalty"),
    ("min_tokens-over-max_tokens", {"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
    ("min_tokens-negative", {"min_tokens": -1}, "min_tokens"),
    ("ignore_eos-string", {"ignore_eos": "yes"}, "ignore_eos"),
    ("n-0", {"n": 0}, "n"),
    ("n-129", {"n": 129}, "n"),
    ("best_of-below-n", {"n": 3, "best_of": 2}, "best_of"),
    ("best_of-129", {"best_of": 129}, "best_of"),
    ("best_of-streamed", {"best_of": 2, "stream": True}, "best_of"),
    ("too-many-sequences", {"prompt": ["x"] * 9, "best_of": 128}, "best_of"),
]


@pytest.mark.parametrize("fields,param", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_control_gets_400_naming_it(api, fields, param):
    raw = json.dumps({"prompt": "x", "max_tokens": 4, **fields}).encode()
    r = api.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"], err
    if param in ("logit_bias", "presence_penalty", "min_p", "repetition_penalty"):
        chat = api.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                      **{k: v for k, v in fields.items() if k != "prompt"}})
        assert chat.status_code == 400 and chat.json()["error"]["param"] == param, chat.text


def test_bad_values_are_named_with_their_limit(api):
    msg = api.post("/v1/completions", json={"prompt": "x", "logit_bias": {"97": 101}}).json()["error"]["message"]
    assert "101" in msg and "100" in msg
    msg = api.post("/v1/completions", json={"prompt": "x", "logit_bias": {"300": 1}}).json()["error"]["message"]
    assert "300" in msg and "259" in msg


def test_too_many_sequences_for_the_queue_is_a_400():
    """n x prompts past --max-waiting can never be admitted: 400 naming n, not a 429."""
    from starlette.testclient import TestClient

    from kvjax.serve.app import create_app

    class Idle:
        def waiting(self):
            return 0

        def submit(self, *a):
            raise AssertionError("the request reached the engine")

    client = TestClient(create_app(Idle(), ByteTokenizer(), "m", context=64, vocab_size=259, max_waiting=8),
                        base_url="http://127.0.0.1")
    r = client.post("/v1/completions", json={"prompt": "x", "n": 9, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text


# ---------------------------------------------------------------- the controls reach the engine
def test_logit_bias_forces_a_token(api):
    body = {"prompt": PROMPT, "temperature": 0, "max_tokens": 5, "logit_bias": {"97": 100}}
    r = ok(api, body)
    assert texts(r) == ["aaaaa"] and r["usage"]["completion_tokens"] == 5
    chat = ok(api, {"messages": [{"role": "user", "content": "hi"}], **body}, "/v1/chat/completions")
    assert chat["choices"][0]["message"]["content"] == "aaaaa"


def test_stop_strings_count_from_min_tokens(api):
    """vLLM's rule: a stop string is looked for only once min_tokens tokens are generated."""
    body = {"prompt": PROMPT, "temperature": 0, "max_tokens": 6, "logit_bias": {"97": 100}, "stop": ["a"]}
    assert ok(api, body)["choices"][0]["text"] == ""
    held = ok(api, {**body, "min_tokens": 3})["choices"][0]
    assert held["text"] == "aa" and held["finish_reason"] == "stop"


def test_ignore_eos_and_min_tokens(api):
    """EOS pushed to the top: the answer stops at once; ignore_eos runs it to max_tokens;
    min_tokens 3 holds EOS back for three tokens."""
    body = {"prompt": PROMPT, "temperature": 0, "max_tokens": 6, "logit_bias": {str(EOS): 100}}
    plain = ok(api, body)["choices"][0]
    assert plain["finish_reason"] == "stop" and plain["text"] == ""
    ignored = ok(api, {**body, "ignore_eos": True})
    assert ignored["choices"][0]["finish_reason"] == "length"
    assert ignored["usage"]["completion_tokens"] == 6 and ignored["choices"][0]["text"] == ""
    held = ok(api, {**body, "min_tokens": 3})
    assert held["choices"][0]["finish_reason"] == "stop" and held["usage"]["completion_tokens"] == 4


def test_penalties_are_accepted(api):
    body = {"prompt": PROMPT, "temperature": 0.5, "seed": 1, "max_tokens": 4, "presence_penalty": 1.5,
            "frequency_penalty": -1, "repetition_penalty": 1.3, "min_p": 0.1, "min_tokens": 2}
    r = ok(api, body)
    assert texts(ok(api, body)) == texts(r)                     # seeded: the same answer again


# ---------------------------------------------------------------- structured output
COLOR = {"type": "object", "required": ["c"], "additionalProperties": False,
         "properties": {"c": {"enum": ["red", "blue"]}}}


def test_structured_output_on_both_routes(api):
    """Choices, a regex, a compact JSON schema (completions, n=2 sampled) and OpenAI's
    response_format (chat): every answer matches its constraint (jsonschema is the oracle)."""
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("llguidance")
    yes_no = ok(api, {"prompt": PROMPT, "max_tokens": 8, "temperature": 1.0, "seed": 3, "n": 2,
                      "structured_outputs": {"choice": ["yes", "no"]}})
    assert all(t in ("yes", "no") for t in texts(yes_no)) and yes_no["choices"][0]["finish_reason"] == "stop"
    code = ok(api, {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "guided_regex": "[a-z]{2}[0-9]"})
    assert len(texts(code)[0]) == 3 and texts(code)[0][2].isdigit()
    obj = ok(api, {"prompt": PROMPT, "max_tokens": 20, "temperature": 1.0, "seed": 5, "n": 2,
                   "structured_outputs": {"json": COLOR, "disable_any_whitespace": True}})
    for t in texts(obj):
        jsonschema.validate(json.loads(t), COLOR)
    chat = ok(api, {"messages": [{"role": "user", "content": "pick"}], "max_tokens": 30, "temperature": 0,
                    "response_format": {"type": "json_schema",
                                        "json_schema": {"name": "c", "schema": {"enum": ["red", "blue"]}}}},
              "/v1/chat/completions")
    assert json.loads(chat["choices"][0]["message"]["content"]) in ("red", "blue")


@pytest.mark.parametrize("extra, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strng"}}}},
     "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"guided_regex": "(?=a)b"}, "guided_regex"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_"),
])
def test_bad_structured_output_is_a_400(api, extra, param):
    pytest.importorskip("llguidance")
    r = api.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, **extra})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith(param), r.text
