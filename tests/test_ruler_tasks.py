"""kvjax.ruler (issue 21 part 1): RULER-style tasks on the pydoc haystack.

Determinism, answers derivable from the context, context lengths fitted to the target for the
bundled byte tokenizer and SmolLM2's GGUF tokenizer (built from the file's metadata only, no
weights), the chat/plain split and the answer ids round-tripping, scoring, refusals."""
import copy
import re
from collections import Counter

import numpy as np
import pytest

from kvjax.gguf import GGUFFile, GGUFTokenizer
from kvjax.models import model_path
from kvjax.ruler import (TASKS, answer_loglik, encode_prompt, exact_match, make_sample, make_suite, normalize,
                         prose_paragraphs, string_match, token_logprobs, word_pool)
from kvjax.ruler.haystack import Stream
from kvjax.tokenizer import ByteTokenizer, load_tokenizer
from test_gguf import need_packaged

LENGTHS = (1024, 2048)


@pytest.fixture(scope="module")
def byte():
    tok = load_tokenizer(model_path("text"))
    assert isinstance(tok, ByteTokenizer)
    return tok


@pytest.fixture(scope="module")
def smol():
    """SmolLM2's tokenizer and chat template from its GGUF metadata (no tensor is read)."""
    return GGUFTokenizer(GGUFFile(need_packaged("smollm2-135m-instruct")))


@pytest.fixture(scope="module")
def byte_suite(byte):
    return make_suite(byte, lengths=LENGTHS, n_per_task=2, seed=0)


@pytest.fixture(scope="module")
def smol_suite(smol):
    return make_suite(smol, lengths=LENGTHS, n_per_task=2, seed=0)


def check_answer_in_context(tok, s):
    """The sample's answer follows from the decoded context ids alone."""
    text = tok.decode(s.context_ids)
    assert text.endswith(s.context_text[-200:].lstrip()) or s.context_text.endswith(text[-200:])
    for needle in s.metadata.get("needles", ()):
        assert needle in text
    if s.task.startswith("niah"):
        for key in s.metadata["keys"]:
            assert key in s.metadata["question"]
        found = {}
        for k, v in re.findall(r"special magic numbers for ([a-z]+-[a-z]+) is: (\d{7})\.", text):
            found.setdefault(k, []).append(v)
        if s.task == "niah_multivalue":
            assert tuple(found[s.metadata["keys"][0]]) == s.answers
        else:
            assert tuple(found[k][0] for k in s.metadata["keys"]) == s.answers
            assert all(len(found[k]) == 1 for k in s.metadata["keys"])
        assert len(found) == {"niah_single": 1, "niah_multivalue": 1}.get(s.task, 4)
    elif s.task == "variable_tracking":
        assign = dict(re.findall(r"VAR ([A-Z]{5}) = ([A-Z]{5}|\d{5})\.", text))
        assert len(assign) == 5

        def resolve(v):
            while v in assign:
                v = assign[v]
            return v
        holders = [v for v in assign if resolve(v) == s.metadata["value"]]
        assert sorted(holders) == sorted(s.answers)
        assert list(s.answers) == [v for v in re.findall(r"VAR ([A-Z]{5}) =", text)]  # in chain order
    elif s.task == "common_words":
        items = re.findall(r"\d+\. ([a-z]+)", text[text.index("1. "):])
        assert len(items) == s.metadata["n_items"]
        counts = Counter(items).most_common()
        k = len(s.answers)
        assert {w for w, _ in counts[:k]} == set(s.answers)
        assert counts[k - 1][1] > counts[k][1]           # the top k are unambiguous
    elif s.task == "passage_qa":
        passage = s.metadata["passage_text"]
        cue = s.metadata["cue"]
        assert f"{cue} {s.answer_text}" in passage
        assert f"Passage {s.metadata['passage']}:\n{passage}\n" in text
        assert text.count(cue) == 1 and cue in s.metadata["question"]
    elif s.task == "passage_copy":   # the opening + the answer is a whole passage of the context
        cue, opening, k = s.metadata["cue"], s.metadata["opening"], s.metadata["passage"]
        assert f"Passage {k}:\n{opening} {s.answer_text}\n" in text + "\n" and opening.startswith(cue + " ")
        assert 6 < s.metadata["words"] <= 160 and len(s.answer_text.split()) == s.metadata["words"] - 6
        assert text.count(cue) == 1 and cue in s.metadata["question"] and s.question_text.endswith(opening)
        assert opening not in s.metadata["question"]      # the prefix's last words occur only in the passage
    else:
        raise AssertionError(s.task)


@pytest.mark.parametrize("name", ["byte", "smol"])
def test_suite_lengths_and_answers(name, request):
    suite = request.getfixturevalue(f"{name}_suite")
    tok = request.getfixturevalue(name)
    assert list(suite) == [(t, n) for t in TASKS for n in LENGTHS]
    for (task, length), samples in suite.items():
        assert [s.index for s in samples] == [0, 1]
        for s in samples:
            assert s.task == task and s.length == length
            assert 0.97 * length <= len(s.context_ids) <= length, (task, length, len(s.context_ids))
            assert s.metadata["n_context_tokens"] == len(s.context_ids)
            assert s.chat == (name == "smol")
            check_answer_in_context(tok, s)
            # the answer ids are the answer, as the model would write it after the prompt
            assert tok.decode(s.answer_ids).strip() == s.answer_text
            assert s.metadata["split_clean"] and s.metadata["answer_clean"]
            text = s.context_text + s.question_text
            assert list(s.prompt_ids) == encode_prompt(tok, text, s.chat)
            assert encode_prompt(tok, text + " " + s.answer_text, s.chat) == list(s.prompt_ids + s.answer_ids)
            assert list(s.context_ids) == encode_prompt(tok, s.context_text, s.chat)
            # the scorer accepts the answer itself
            assert exact_match(s.answer_text, s) and string_match(s.answer_text, s) == 1.0
        assert samples[0].context_ids != samples[1].context_ids


def test_deterministic(byte, smol):
    for tok in (byte, smol):
        for task in TASKS:
            a = make_sample(tok, task, 1024, seed=5, index=3)
            b = make_sample(tok, task, 1024, seed=5, index=3)
            assert a == b and a.metadata == b.metadata
            assert make_sample(tok, task, 1024, seed=6, index=3).context_ids != a.context_ids
    # and across processes: string seeding (not hash()), sorted topics; pin one draw
    s = make_sample(byte, "niah_single", 1024, seed=0, index=0)
    assert len(prose_paragraphs()) > 500 and len(word_pool()) > 1000
    assert s.answers == make_sample(byte, "niah_single", 2048, seed=0, index=0).answers


def test_chat_split_round_trips(smol):
    """context_ids + question_ids == the ids of the whole rendered conversation."""
    marker = "\x00"
    head, tail = smol.apply_chat_template([{"role": "user", "content": marker}], tokenize=False).split(marker)
    for task in TASKS:
        s = make_sample(smol, task, 1024, seed=1, index=0, answer_prefix=False)
        text = s.context_text + s.question_text
        assert text.startswith(head) and text.endswith(tail)
        messages = [{"role": "user", "content": text[len(head):len(text) - len(tail)]}]
        assert smol.apply_chat_template(messages, tokenize=False) == text
        assert list(s.context_ids + s.question_ids) == smol.apply_chat_template(messages)
        assert s.question_text.endswith("<|im_start|>assistant\n")
        assert s.metadata["question"] in s.question_text and s.metadata["question"] not in s.context_text
        assert smol.decode(s.answer_ids) == s.answer_text        # no space after the assistant's "\n"
        # with RULER's answer prefix: the same conversation, then the prefix
        p = make_sample(smol, task, 1024, seed=1, index=0)
        assert p.context_ids == s.context_ids
        assert p.question_text == s.question_text + p.metadata["answer_prefix"]


def test_plain_and_byte_chat_formats(byte, smol):
    s = make_sample(byte, "niah_single", 1024, seed=0, index=0)
    assert not s.chat and s.context_ids[0] == byte.BOS                       # plain: <bos> first
    assert s.question_text.startswith("\n\nQuestion: ") and "\nAnswer: The special magic number" in s.question_text
    assert list(s.prompt_ids) == byte.encode(s.context_text + s.question_text)
    c = make_sample(byte, "niah_single", 1024, seed=0, index=0, chat=True)    # the byte format
    assert c.chat and c.context_text.startswith("<|user|>\n") and "\n<|assistant|>\n" in c.question_text
    content = (c.context_text + c.question_text).split("<|user|>\n")[1].split("\n<|assistant|>\n")[0]
    assert list(c.prompt_ids[:-len(byte.encode(c.metadata["answer_prefix"], False))]) == \
        byte.apply_chat_template([{"role": "user", "content": content}])
    p = make_sample(smol, "niah_single", 1024, seed=0, index=0, chat=False)
    assert not p.chat and "<|im_start|>" not in p.context_text
    assert list(p.prompt_ids) == smol.encode(p.context_text + p.question_text)


def test_protocols(byte):
    s = make_sample(byte, "niah_multikey", 1024, seed=0, index=0)
    a = s.inputs("query_agnostic")
    assert a.compress_ids == s.context_ids and a.prompt_ids == s.question_ids and a.n_from_prefill == 0
    assert a.feed_ids == s.question_ids + s.answer_ids[:-1]
    w = s.inputs("query_aware")
    assert w.compress_ids == s.context_ids + s.question_ids and w.prompt_ids == () and w.n_from_prefill == 1
    assert w.feed_ids == s.answer_ids[:-1]
    with pytest.raises(ValueError, match="protocol must be one of"):
        s.inputs("query-aware")


def test_needle_depth(byte):
    early = make_sample(byte, "niah_single", 2048, depth=0.0)
    late = make_sample(byte, "niah_single", 2048, depth=1.0)
    mid = make_sample(byte, "niah_single", 2048, depth=0.5)
    pos = {n: s.context_text.index(s.metadata["needles"][0]) / len(s.context_text)
           for n, s in (("early", early), ("late", late), ("mid", mid))}
    assert pos["early"] < 0.15 and pos["late"] > 0.85 and 0.3 < pos["mid"] < 0.7
    assert early.metadata["needle_depths"] == [0.0] and late.metadata["needle_depths"] == [1.0]


def test_stream_boundaries():
    st = Stream.from_paragraph(3)
    assert st.paragraphs[0] == 3 and st.sentence_starts[0] == 0
    assert set(st.paragraph_starts) <= set(st.sentence_starts)
    text = st.render(40, {0: ["AAA."], 40: ["ZZZ."]})
    assert text.startswith("AAA.\n") and text.endswith(" ZZZ.")    # a needle at a paragraph start: own line
    assert text.count("\n") == sum(0 < p < 40 for p in st.paragraph_starts) + 1
    for d in (0.0, 0.3, 1.0):
        b = st.boundary(d, 200)
        assert b == 200 or b in st.sentence_starts


def test_exact_match_normalisation(byte):
    s = make_sample(byte, "niah_single", 1024, seed=0, index=0)
    v = s.answer_text
    assert normalize(f'  "{v}."  ') == v and normalize("Hello   World!") == "hello world"
    for ok in (v, f" {v}.", f"{v}\nQuestion: what else?", f"\n\n  **{v}**", f"'{v}'"):
        assert exact_match(ok, s), ok
    for bad in (f"The number is {v}.", f"{v}0", "", f"{v} and 1234567"):
        assert not exact_match(bad, s), bad
    assert string_match(f"The number is {v}.", s) == 1.0 and string_match("no idea", s) == 0.0

    m = make_sample(byte, "niah_multivalue", 1024, seed=0, index=0)
    a, b, c, d = m.answers
    assert m.is_list and m.answer_text == f"{a}, {b}, {c}, {d}"
    for ok in (f"{d}, {c}, {b} and {a}.", f" {a} {b} {c} {d} 5555555", f"{a};{b};{c};{d}\nmore"):
        assert exact_match(ok, m), ok
    for bad in (f"{a}, {b}, {c}", f"{a}, {b}, {c}\n{d}", f"{a}{b}, {c}, {d}"):
        assert not exact_match(bad, m), bad
    assert string_match(f"{a} and {b}", m) == 0.5

    w = make_sample(byte, "common_words", 1024, seed=0, index=0)
    assert exact_match(", ".join(x.upper() for x in reversed(w.answers)), w)
    q = make_sample(byte, "passage_qa", 1024, seed=0, index=0)
    assert not q.is_list and len(q.answer_text.split()) == 3
    assert exact_match(q.answer_text.upper() + ".", q) and not exact_match(q.answer_text.split()[0], q)
    with pytest.raises(TypeError):
        exact_match(None, s)


def test_answer_loglik():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 11)).astype(np.float32)
    targets = [3, 0, 10, 5]
    lp = token_logprobs(logits, targets)
    ref = [float(np.log(np.exp(r.astype(np.float64))[t] / np.exp(r.astype(np.float64)).sum()))
           for r, t in zip(logits, targets)]
    np.testing.assert_allclose(lp, ref, rtol=1e-12)
    r = answer_loglik(lp)
    assert r.n_tokens == 4 and np.isclose(r.sum, sum(ref)) and np.isclose(r.mean, sum(ref) / 4)
    with pytest.raises(ValueError, match="targets"):
        token_logprobs(logits, [0, 1, 2, 11])
    with pytest.raises(ValueError, match="logits must be"):
        token_logprobs(logits, [0, 1])
    with pytest.raises(ValueError, match="at least one token"):
        answer_loglik([])
    with pytest.raises(ValueError, match="<= 0"):
        answer_loglik([0.5])


def test_refusals(byte, smol):
    with pytest.raises(ValueError, match=r"unknown task 'niah'; the tasks are niah_single, "):
        make_sample(byte, "niah", 1024)
    with pytest.raises(ValueError, match="unknown task"):
        make_suite(byte, tasks=["niah_single", "qa"])
    with pytest.raises(ValueError, match=r"length=100 tokens is too small for task 'niah_multiquery': .* take \d+"):
        make_sample(byte, "niah_multiquery", 100)
    with pytest.raises(ValueError, match="too small for task 'common_words'"):
        make_sample(smol, "common_words", 20)
    with pytest.raises(ValueError, match="more than task 'niah_single'.s haystack holds"):
        make_sample(byte, "niah_single", 10 ** 6)
    for bad in (0, -5, 1.5, True, "1k"):
        with pytest.raises(ValueError, match="length"):
            make_sample(byte, "niah_single", bad)
    with pytest.raises(ValueError, match="seed must be an int"):
        make_sample(byte, "niah_single", 1024, seed=-1)
    with pytest.raises(ValueError, match="num_needles must be an int >= 2"):
        make_sample(byte, "niah_multikey", 1024, num_needles=1)
    with pytest.raises(ValueError, match="depth must be"):
        make_sample(byte, "niah_single", 1024, depth=1.5)
    with pytest.raises(ValueError, match="task 'niah_single': .*unexpected keyword"):
        make_sample(byte, "niah_single", 1024, top_k=3)
    with pytest.raises(ValueError, match="n_per_task must be an int >= 1"):
        make_suite(byte, n_per_task=0)
    no_template = copy.copy(smol)
    no_template.chat_template = None
    with pytest.raises(ValueError, match="has no chat template; pass chat=False"):
        make_sample(no_template, "niah_single", 1024, chat=True)
    assert not make_sample(no_template, "niah_single", 1024).chat          # auto: the plain format
