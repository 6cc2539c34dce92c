"""Training data: the pydoc byte corpus split and the key-value recall task.

Everything here is exact integer bookkeeping, so the tests compare exactly (no tolerance).
"""
import numpy as np
import pytest

from kvjax import ByteTokenizer, data


def test_split_is_deterministic_disjoint_and_complete():
    train, held = data.split_topics(10)
    assert (train, held) == data.split_topics(10)
    assert not set(train) & set(held)
    assert sorted(train + held) == sorted(data.pydoc_topics())
    # About one topic in ten is held out (a stable hash, not an exact count).
    assert 0.03 < len(held) / (len(train) + len(held)) < 0.3


def test_text_streams_are_the_documents_as_bytes():
    topics = data.pydoc_topics()
    train, held = data.split_topics(10)
    stream = data.text_stream("heldout", 10)
    assert stream.dtype == np.int32
    # Documents are <bos> bytes <eos>, in topic order.
    assert (stream == data.BOS_ID).sum() == (stream == data.EOS_ID).sum() == len(held)
    first = data.encode_document(topics[held[0]])
    np.testing.assert_array_equal(stream[:len(first)], first)
    tok = ByteTokenizer()
    assert tok.decode(first) == topics[held[0]]
    assert len(data.text_stream("train", 10)) == sum(
        len(topics[n].encode("utf-8")) + 2 for n in train)
    with pytest.raises(ValueError, match="split"):
        data.text_stream("test")
    with pytest.raises(ValueError, match="heldout_every"):
        data.split_topics(1)


def test_text_batches_are_windows_of_the_stream():
    stream = np.arange(1000, dtype=np.int32)
    a = data.text_batch(stream, np.random.default_rng(3), 4, 16)
    b = data.text_batch(stream, np.random.default_rng(3), 4, 16)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (4, 17)
    np.testing.assert_array_equal(a - a[:, :1], np.broadcast_to(np.arange(17), (4, 17)))


def test_eval_windows_predict_every_token_once():
    stream = np.arange(101, dtype=np.int32)
    w = data.text_eval_windows(stream, 10)
    assert w.shape == (10, 11)
    targets = w[:, 1:].ravel()
    np.testing.assert_array_equal(targets, np.arange(1, 101))
    assert data.text_eval_windows(stream, 10, max_windows=3).shape == (3, 11)


TASK = data.RecallTask(num_pairs=12, key_len=1, value_len=2)


def _row_text(tokens):
    return ByteTokenizer().decode(tokens)


def test_recall_layout_and_distinct_keys():
    b = data.recall_batch(TASK, np.random.default_rng(0), 8, num_queries=3)
    assert b.tokens.shape == (8, TASK.seq_len(3))
    assert (b.tokens[:, 0] == data.BOS_ID).all()
    P = TASK.pair_len
    for r in range(8):
        text = _row_text(b.tokens[r])
        pairs = [text[i * P:(i + 1) * P] for i in range(TASK.num_pairs)]
        keys = [p[:TASK.key_len] for p in pairs]
        assert len(set(keys)) == len(keys)
        assert all(p.endswith(";") for p in pairs)
        queries = text[TASK.num_pairs * P:].split(";")[:-1]
        assert len(queries) == 3
        for j, q in enumerate(queries):
            assert q.startswith("?")
            key, value = q[1:1 + TASK.key_len], q[1 + TASK.key_len:]
            assert pairs[keys.index(key)] == key + value + ";"
            assert _row_text(b.answers[r, j]) == value
    # The answer mask covers exactly the value tokens of the queries.
    assert b.answer_mask.sum() == 8 * 3 * TASK.value_len
    np.testing.assert_array_equal(b.tokens[b.answer_mask].reshape(8, 3, 2), b.answers)


@pytest.mark.parametrize("num_pairs", [None, 5])
def test_recall_distance_is_exact(num_pairs):
    n = num_pairs or TASK.num_pairs
    distances = [i * TASK.pair_len + 1 for i in range(1, n + 1)]
    if num_pairs is None:
        assert distances == TASK.distances()
    rng = np.random.default_rng(1)
    for d in distances:
        b = data.recall_batch(TASK, rng, 4, distance=d, num_pairs=num_pairs)
        assert (b.distances == d).all()
        start = int(b.answer_starts[0, 0])
        src = start - d  # the queried pair's first value token
        np.testing.assert_array_equal(b.tokens[:, src:src + TASK.value_len], b.answers[:, 0])
        # ... preceded by the queried key, the same tokens as the query's key.
        np.testing.assert_array_equal(b.tokens[:, src - TASK.key_len:src],
                                      b.tokens[:, start - TASK.key_len:start])
    per_row = np.array([distances[0], distances[-1], distances[2], distances[1]])
    assert (data.recall_batch(TASK, rng, 4, distance=per_row, num_pairs=num_pairs).distances[:, 0]
            == per_row).all()


def test_recall_rejects_unreachable_distances_and_bad_shapes():
    rng = np.random.default_rng(0)
    for bad in (0, 1, 2, TASK.distances()[-1] + TASK.pair_len):
        with pytest.raises(ValueError, match="distance"):
            data.recall_batch(TASK, rng, 2, distance=bad)
    with pytest.raises(ValueError, match="num_queries=1"):
        data.recall_batch(TASK, rng, 2, num_queries=2, distance=TASK.distances()[0])
    with pytest.raises(ValueError, match="num_queries"):
        data.recall_batch(TASK, rng, 2, num_queries=TASK.num_pairs + 1)
    with pytest.raises(ValueError, match="num_pairs"):
        data.recall_batch(TASK, rng, 2, num_pairs=TASK.num_pairs + 1)
    with pytest.raises(ValueError, match="num_pairs=30"):
        data.RecallTask(num_pairs=30, key_len=1, key_chars="abc")
    with pytest.raises(ValueError, match="key_chars"):
        data.RecallTask(key_chars="ab;")
    # Repeated queries may outnumber the pairs.
    b = data.recall_batch(TASK, rng, 2, num_queries=20, num_pairs=3, repeat_queries=True)
    assert b.answers.shape == (2, 20, 2) and (b.distances > 0).all()


def test_recall_accuracy_is_exact():
    b = data.recall_batch(TASK, np.random.default_rng(2), 10, num_queries=2)
    B, T = b.tokens.shape
    # Logits that predict token t + 1 at position t: a perfect model.
    logits = np.zeros((B, T, 259), np.float32)
    logits[np.arange(B)[:, None], np.arange(T - 1)[None, :], b.tokens[:, 1:]] = 1.0
    assert data.recall_accuracy(logits, b) == 1.0
    np.testing.assert_array_equal(data.recall_predictions(logits, b), b.answers)
    # Break the second value token of query 0 in rows 0-2: exactly 3 of 20 queries wrong.
    pos = b.answer_starts[:3, 0]  # logits at the first value token predict the second
    logits[np.arange(3), pos] = 0.0
    logits[np.arange(3), pos, ord("x")] = 1.0
    assert data.recall_accuracy(logits, b) == pytest.approx(17 / 20, abs=0)
    assert data.exact_match(np.array([[1, 2], [1, 3]]), np.array([[1, 2], [1, 2]])).tolist() == [True, False]
    with pytest.raises(ValueError, match="shape"):
        data.exact_match(np.zeros((2, 2)), np.zeros((2, 3)))


def test_max_queries_inverts_seq_len():
    for task in (TASK, data.RecallTask(num_pairs=6, key_len=1, value_len=1, echo_key=True)):
        for m in (1, 3, 7):
            assert task.max_queries(task.seq_len(m)) == m
            assert task.max_queries(task.seq_len(m) + task.query_len - 1) == m
        # Two pairs fewer free 2 * pair_len tokens: room for at least one more query.
        extra = 2 * task.pair_len // task.query_len
        assert extra >= 1 and task.max_queries(task.seq_len(2), num_pairs=task.num_pairs - 2) == 2 + extra


def test_recall_echo_key_format_and_distances():
    task = data.RecallTask(num_pairs=6, key_len=1, value_len=1, echo_key=True)
    assert task.pair_len == 4
    b = data.recall_batch(task, np.random.default_rng(6), 5, distance=task.distances()[2])
    for r in range(5):
        text = _row_text(b.tokens[r])
        pairs = [text[i * 4:(i + 1) * 4] for i in range(6)]
        assert all(p[0] == p[2] and p[1].isdigit() and p[3] == ";" for p in pairs)
        query = text[24:]
        assert query[0] == "?" and query[1] == query[3] == pairs[3][0] and query[2] == pairs[3][1]
    start = int(b.answer_starts[0, 0])
    np.testing.assert_array_equal(b.tokens[:, start - task.distances()[2]], b.answers[:, 0, 0])


def test_recall_prompts_stop_before_the_value():
    d = TASK.distances()[3]
    b = data.recall_batch(TASK, np.random.default_rng(4), 3, distance=d)
    prompts, answers = data.recall_prompts(b)
    assert prompts.shape == (3, TASK.seq_len(1) - TASK.value_len - 1)
    for r in range(3):
        assert _row_text(prompts[r]).rsplit(";", 1)[1].startswith("?")
    np.testing.assert_array_equal(answers, b.answers[:, 0])
    with pytest.raises(ValueError, match="single-query"):
        data.recall_prompts(data.recall_batch(TASK, np.random.default_rng(0), 2, num_queries=2))
