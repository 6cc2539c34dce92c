"""RULER-style long-context tasks built locally (issue 21, part 1), with CPython's pydoc text as
the haystack; no download.

  haystack.py  pydoc_data.topics cleaned to prose paragraphs; `Stream` (words, sentence and
               paragraph boundaries) rendered to n words with needles inserted
  tasks.py     the generators (TASKS), `make_sample`, `make_suite`
  prompt.py    chat / plain prompt formats, fitting the haystack to a token budget, the
               context/question split and the answer's ids
  sample.py    `Sample` and the two protocols (query-agnostic, query-aware)
  score.py     `exact_match`, `string_match`, `token_logprobs`, `answer_loglik`

    tok = kvjax.load_tokenizer(...)       # or the tokenizer load_model returns
    suite = make_suite(tok, lengths=(1024, 2048, 4096), n_per_task=10, seed=0)
    for (task, length), samples in suite.items():
        for s in samples:
            x = s.inputs("query_agnostic")      # compress x.compress_ids, then x.prompt_ids
            ...
            ok = exact_match(generated_text, s)
"""
from .haystack import Stream, prose_paragraphs, word_pool
from .prompt import Draft, Question, encode_prompt, has_chat_template
from .sample import PROTOCOLS, ProtocolInputs, Sample
from .score import AnswerLoglik, answer_loglik, exact_match, normalize, string_match, token_logprobs
from .tasks import TASKS, make_sample, make_suite, rng_for

__all__ = ["AnswerLoglik", "Draft", "PROTOCOLS", "ProtocolInputs", "Question", "Sample", "Stream", "TASKS",
           "answer_loglik", "encode_prompt", "exact_match", "has_chat_template", "make_sample", "make_suite",
           "normalize", "prose_paragraphs", "rng_for", "string_match", "token_logprobs", "word_pool"]
