"""Requests in, errors out: the OpenAI request shapes `kvjax serve` accepts, checked on the host.

Every bad request becomes an `APIError` (status, message, type, param) that the app turns
into the OpenAI error body `{"error": {"message", "type", "param", "code"}}`; nothing
reaches the engine before the whole request is checked. Unknown fields are ignored (as
the OpenAI API does: clients send `user`, `stream_options` and the like); known fields of
the wrong type, out-of-range values and features kvjax does not have (tools, suffix) are
refused with the field's name as `param`. temperature, top_k and top_p go through
`kvjax.sampling.check_sampling`, the logit controls (presence / frequency / repetition
penalties, logit_bias, min_p, min_tokens) through `kvjax.sampling_params.check_controls`:
the range checks `generate` and `Engine` use too.

`prepare_completion` and `prepare_chat` turn a validated body into a `Prepared` request:
token-id prompts, one `kvjax.SamplingParams` per prompt, stop strings, the number of
choices (n, best_of) and the response options. `Prepared.requests()` lists the engine
requests: best_of candidates per prompt, each with its own seed (`choice_seed`).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, ValidationError

from ..engine.api import SamplingParams
from ..sampling import check_sampling
from ..sampling_params import MAX_BIAS, SamplingError, check_controls
from ..structured.formats import FormatError, json_schema_spec, spec_from_request
from .tools import ToolError, ToolPlan, check_tools, forced_schema, template_messages

MAX_LOGPROBS = 20      # top alternatives per position (OpenAI allows 5 on completions, 20 on chat)
MAX_STOP = 16          # stop strings per request
MAX_PROMPTS = 64       # prompts in one batched /v1/completions request
MAX_JSON_DEPTH = 32    # nesting of arrays and objects in a request body
MAX_N = 128            # choices per prompt (n) and candidates per prompt (best_of), OpenAI's bound
MAX_SEQUENCES = 1024   # engine requests one HTTP request may make: prompts x best_of


class APIError(Exception):
    """A request the server refuses: HTTP status + the OpenAI error object's fields."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    """The OpenAI error object: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


# ---------------------------------------------------------------- request models
class _Request(BaseModel):
    # strict: "5" is not an int and true is not 1 (an int still passes as a float);
    # extra fields are accepted and ignored.
    model_config = ConfigDict(extra="allow", strict=True)


class StreamOptions(_Request):
    include_usage: bool = False


class _Sampling(_Request):
    model: Optional[str] = None
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None               # extension (vLLM's spelling); -1 or 0 disables
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    n: Optional[int] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict] = None          # {"token id": bias}: JSON keys are strings
    repetition_penalty: Optional[float] = None   # extensions (vLLM's names) from here on
    min_p: Optional[float] = None
    min_tokens: Optional[int] = None
    ignore_eos: Optional[bool] = None
    # structured output: OpenAI's response_format; vLLM's guided_* and structured_outputs
    # arrive as extra fields (see kvjax/structured/formats.py)
    response_format: Optional[dict] = None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: Optional[int] = None
    echo: Optional[bool] = False
    best_of: Optional[int] = None
    suffix: Optional[str] = None


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[TextPart]]] = None   # None: an assistant turn of tool calls
    name: Optional[str] = None
    tool_calls: Optional[list[dict]] = None     # an assistant's earlier calls
    tool_call_id: Optional[str] = None          # a tool result's call


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = None
    tools: Optional[list] = None
    tool_choice: Optional[Union[str, dict]] = None
    parallel_tool_calls: Optional[bool] = None


class TokenizeRequest(_Request):
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    add_special_tokens: Optional[bool] = True
    add_generation_prompt: Optional[bool] = True


class DetokenizeRequest(_Request):
    model: Optional[str] = None
    tokens: list[int]


# ---------------------------------------------------------------- parsing
def parse_body(raw: bytes, model_cls: type[_Request]):
    """Bytes of a request body -> a validated `model_cls`, or APIError 400 (not JSON, nested
    deeper than MAX_JSON_DEPTH, a string that is not valid Unicode, a field's type or range)."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise invalid(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raise invalid(f"the request body is nested deeper than {MAX_JSON_DEPTH} levels",
                      code="invalid_json") from None
    if not isinstance(data, dict):
        raise invalid(f"the request body must be a JSON object, got {type(data).__name__}",
                      code="invalid_json")
    check_json(data)
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(p) for p in err["loc"] if not _is_union_branch(p)]
        param = ".".join(loc) or None
        value = err.get("input")
        shown = json.dumps(value)[:80] if _jsonable(value) else repr(value)[:80]
        more = f" (and {len(e.errors()) - 1} more problem(s))" if len(e.errors()) > 1 else ""
        raise invalid(f"{param or 'body'}: {err['msg']}, got {shown}{more}", param=param) from None


def check_json(data) -> None:
    """APIError 400 for a body nested deeper than MAX_JSON_DEPTH or holding a string (a key or
    a value) that is not valid Unicode (a lone surrogate such as "\\ud800" parses in JSON but
    cannot be encoded, so no tokenizer can read it). Iterative: no recursion to exhaust."""
    stack = [(data, 1, "body")]
    while stack:
        value, depth, where = stack.pop()
        if isinstance(value, str):
            _check_text(value, where)
            continue
        if not isinstance(value, (dict, list)):
            continue
        if depth > MAX_JSON_DEPTH:
            raise invalid(f"the request body is nested deeper than {MAX_JSON_DEPTH} levels (at {where})",
                          code="invalid_json")
        if isinstance(value, dict):
            for k, v in value.items():
                _check_text(k, where)
                stack.append((v, depth + 1, f"{where}.{k}" if where != "body" else k))
        elif value and not isinstance(value[0], int):   # a list of token ids (the long ones) is
            stack.extend((v, depth + 1, f"{where}.{i}") for i, v in enumerate(value))   # typed by pydantic


def _check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise invalid(f"{where} is not valid Unicode: {e.reason} at character {e.start} "
                      f"({text[e.start]!r})", param=None if where == "body" else where) from None


def _is_union_branch(part) -> bool:
    # pydantic puts the union branch it tried into loc ("list[int]", "str", ...)
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part)


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


# ---------------------------------------------------------------- preparing
@dataclass
class Limits:
    """What the loaded model and engine allow."""

    model_id: str
    context: int              # prompt + max_tokens must fit (the engine's max_len)
    vocab_size: int
    eos_ids: tuple = ()
    grammar: Any = None       # GrammarSpec -> compiled grammar for this tokenizer (structured output)


@dataclass
class Prepared:
    """A checked request, ready for the engine."""

    prompts: list                   # list[list[int]]: token ids per prompt
    prompt_texts: list              # list[str | None]: the prompt as text, for echo
    sampling: list                  # list[SamplingParams], one per prompt (max_tokens fitted)
    stop: tuple = ()
    score_only: bool = False        # echo with max_tokens 0: the prompt's logprobs, no new token
    echo: bool = False
    logprobs: Optional[int] = None  # top alternatives per position, None: no logprobs
    stream: bool = False
    include_usage: bool = False
    n: int = 1                      # choices returned per prompt
    best_of: int = 1                # candidates generated per prompt (>= n): the n with the
                                    # highest cumulative log-probability are returned
    tools: Optional[ToolPlan] = None  # chat: the functions the answer may call (serve/tools.py)

    def requests(self):
        """(prompt index, candidate, prompt ids, SamplingParams) of every engine request,
        prompt-major: best_of candidates per prompt, candidate c drawing with
        `choice_seed(seed, c)`."""
        for i, (ids, sp) in enumerate(zip(self.prompts, self.sampling)):
            for c in range(self.best_of):
                yield i, c, ids, (sp if c == 0 else replace(sp, seed=choice_seed(sp.seed, c)))

    @property
    def size(self) -> int:
        """Engine requests: prompts x best_of."""
        return len(self.prompts) * self.best_of


def choice_seed(seed: Optional[int], candidate: int) -> Optional[int]:
    """The seed of candidate `candidate` (0-based) of a prompt whose request gave `seed`:
    seed + candidate (vLLM's rule), wrapped into [0, 2**63). Candidate 0 keeps the request's
    seed, so choice 0 of an n > 1 request is the n = 1 answer with the same seed. Without a
    seed (None) each candidate is a separate engine request, whose random stream the engine
    derives from its request id: they differ from each other and from run to run."""
    return None if seed is None else (seed + candidate) % 2**63


def check_model(req, limits: Limits):
    if req.model is not None and req.model != limits.model_id:
        raise APIError(404, f"the model {req.model!r} does not exist; this server serves "
                       f"{limits.model_id!r}", "invalid_request_error", "model", "model_not_found")


def _sampling_knobs(req: _Sampling) -> dict:
    """temperature, top_k, top_p as SamplingParams takes them, checked by the one range
    check every entry point shares (`kvjax.sampling.check_sampling`).

    The OpenAI defaults first: temperature 1 (pass 0 for greedy decoding), top_p 1, no
    top-k; top_k -1 (vLLM's spelling) disables top-k as 0 does. JSON's NaN and Infinity
    parse as floats; check_sampling refuses them (temperature and top_p must be finite)."""
    knobs = dict(temperature=1.0 if req.temperature is None else req.temperature,
                 top_k=0 if req.top_k in (None, -1) else req.top_k,
                 top_p=1.0 if req.top_p is None else req.top_p)
    try:
        check_sampling(**knobs)
    except SamplingError as e:
        hint = "; -1 also disables it" if e.param == "top_k" else ""
        raise invalid(f"{e}{hint}", e.param) from None
    return knobs


def _common(req: _Sampling, limits: Limits) -> tuple[dict, tuple]:
    """The fields every endpoint shares -> (SamplingParams keyword arguments, stop strings)."""
    check_model(req, limits)
    knobs = _sampling_knobs(req)
    controls = _controls(req, limits)
    if req.seed is not None and not 0 <= req.seed < 2**63:
        raise invalid(f"seed must be in [0, 2**63), got {req.seed}", "seed")
    stop = req.stop
    stop = () if stop is None else (stop,) if isinstance(stop, str) else tuple(stop)
    if len(stop) > MAX_STOP:
        raise invalid(f"stop takes at most {MAX_STOP} strings, got {len(stop)}", "stop")
    if any(s == "" for s in stop):
        raise invalid("stop strings must not be empty", "stop")
    # ignore_eos: the engine stops only at stop_token_ids, so leaving the model's EOS out of
    # them ignores it (stop strings still apply; EOS tokens stay out of the text either way)
    stop_ids = () if req.ignore_eos else tuple(limits.eos_ids)
    return dict(**knobs, **controls, seed=req.seed, stop_token_ids=stop_ids, guide=_guide(req, limits)), stop


def _guide(req: _Sampling, limits: Limits):
    """The compiled grammar of the request's structured-output fields (response_format,
    guided_*, structured_outputs), or None; a 400 naming the field when one is malformed,
    the grammar engine rejects it, or the server cannot constrain output."""
    spec = None
    try:
        spec = spec_from_request({**(req.model_extra or {}), "response_format": req.response_format})
        if spec is None:
            return None
        if limits.grammar is None:
            raise invalid("structured output is not available on this server", spec.param)
        return limits.grammar(spec)
    except FormatError as e:
        raise invalid(e.message, e.param) from None
    except (ImportError, ValueError) as e:   # no llguidance (the message says how); a tokenizer without EOS
        raise invalid(str(e), spec.param if spec is not None else "response_format") from None


def _controls(req: _Sampling, limits: Limits) -> dict:
    """The logit controls as SamplingParams takes them (the defaults where not given), checked
    by `kvjax.sampling_params.check_controls`, the range check `generate` and `Engine` share.
    min_tokens is checked against max_tokens later, per prompt (`_check_min_tokens`)."""
    ctl = dict(presence_penalty=_or(req.presence_penalty, 0.0), frequency_penalty=_or(req.frequency_penalty, 0.0),
               repetition_penalty=_or(req.repetition_penalty, 1.0), min_p=_or(req.min_p, 0.0),
               min_tokens=_or(req.min_tokens, 0), logit_bias=logit_bias(req.logit_bias, limits.vocab_size))
    try:
        check_controls(limits.vocab_size, **ctl)
    except SamplingError as e:
        raise invalid(str(e), e.param) from None
    for name in ("presence_penalty", "frequency_penalty", "repetition_penalty", "min_p"):
        ctl[name] = float(ctl[name])          # JSON integers (checked: in range) as floats
    return ctl


def _or(value, default):
    return default if value is None else value


def logit_bias(raw: Optional[dict], vocab_size: int) -> Optional[dict]:
    """A request's logit_bias (a JSON object: token ids written as decimal strings -> bias)
    -> {int token id: float bias}, None when absent or empty; a key that is not a token id in
    [0, vocab_size), or a bias that is not a finite number in [-MAX_BIAS, MAX_BIAS], is a 400
    naming the entry and the limit."""
    if not raw:
        return None
    out = {}
    for key, value in raw.items():
        if not (key.isascii() and key.isdigit()) or len(key) > 18 or int(key) >= vocab_size:
            raise invalid(f"logit_bias key {_shown(key)} is not a token id: keys are token ids written "
                          f"as decimal strings (e.g. \"42\") in [0, {vocab_size})", "logit_bias")
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (number and (isinstance(value, int) or math.isfinite(value)) and -MAX_BIAS <= value <= MAX_BIAS):
            raise invalid(f"logit_bias for token {key} must be a finite number in [-{MAX_BIAS:g}, "
                          f"{MAX_BIAS:g}], got {_shown(value)}", "logit_bias")
        out[int(key)] = float(value)
    return out


def _shown(value, limit: int = 40) -> str:
    """A request value in a message: as JSON, cut to `limit` characters ("..." marks a cut)."""
    text = json.dumps(value) if _jsonable(value) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _check_min_tokens(min_tokens: int, max_tokens: int, asked: Optional[int], param: str):
    """min_tokens <= the request's max_tokens (`asked`, or its default when not given)."""
    try:
        check_controls(1, min_tokens=min_tokens, max_tokens=max_tokens)
    except SamplingError as e:
        why = "" if asked is not None else f" ({param} was not given: its default here is {max_tokens})"
        raise invalid(f"{e}{why}", e.param) from None


def _choices(req: _Sampling) -> int:
    """n: choices per prompt, 1 to MAX_N."""
    n = 1 if req.n is None else req.n
    if not 1 <= n <= MAX_N:
        raise invalid(f"n must be in [1, {MAX_N}], got {n}", "n")
    return n


def _best_of(req: CompletionRequest, n: int, prompts: int) -> int:
    """best_of: candidates per prompt, n to MAX_N (default n); more than n cannot stream."""
    best_of = n if req.best_of is None else req.best_of
    if not 1 <= best_of <= MAX_N:
        raise invalid(f"best_of must be in [1, {MAX_N}], got {best_of}", "best_of")
    if best_of < n:
        raise invalid(f"best_of ({best_of}) must be at least n ({n}): n choices are picked from "
                      "best_of candidates", "best_of")
    if req.stream and best_of > n:
        raise invalid(f"best_of ({best_of}) > n ({n}) cannot be streamed (the best candidates are "
                      "known only at the end); drop stream or best_of", "best_of")
    if prompts * best_of > MAX_SEQUENCES:
        raise invalid(f"{prompts} prompt(s) x {best_of} choices make {prompts * best_of} sequences; "
                      f"at most {MAX_SEQUENCES} per request", "best_of" if req.best_of is not None else "n")
    return best_of


def _check_ids(ids: list, limits: Limits, param: str):
    if not ids:
        raise invalid(f"{param} is empty: a prompt needs at least one token", param)
    bad = [t for t in ids if not 0 <= t < limits.vocab_size]
    if bad:
        raise invalid(f"{param} holds token id {bad[0]}, outside the vocabulary [0, "
                      f"{limits.vocab_size})", param)
    if len(ids) >= limits.context:
        raise invalid(f"{param} has {len(ids)} tokens, but the context is {limits.context} "
                      f"tokens (prompt + max_tokens); shorten it", param, "context_length_exceeded")


def _fit_max_tokens(asked: Optional[int], default: Optional[int], n_prompt: int, limits: Limits,
                    param: str, allow_zero: bool = False) -> int:
    """max_tokens as asked (checked against the context), or the default clipped to it."""
    room = limits.context - n_prompt
    if asked is None:
        return room if default is None else min(default, room)
    low = 0 if allow_zero else 1
    if asked < low:
        why = " (0 is allowed only with echo, to score the prompt)" if not allow_zero else ""
        raise invalid(f"{param} must be >= {low}{why}, got {asked}", param)
    if asked > room:
        raise invalid(f"{param} is {asked}, but the prompt has {n_prompt} tokens and the context "
                      f"is {limits.context}: at most {room} new tokens fit", param,
                      "context_length_exceeded")
    return asked


def prepare_completion(req: CompletionRequest, tokenizer, limits: Limits) -> Prepared:
    sampling_kw, stop = _common(req, limits)
    if req.suffix:
        raise invalid("suffix (insertion) is not supported by kvjax serve", "suffix")
    prompts, texts = _completion_prompts(req.prompt, tokenizer, limits)
    n = _choices(req)
    best_of = _best_of(req, n, len(prompts))
    logprobs = req.logprobs
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise invalid(f"logprobs must be in [0, {MAX_LOGPROBS}], got {logprobs}", "logprobs")
    echo = bool(req.echo)
    asked = req.max_tokens
    # best_of ranks candidates by their summed token logprobs: the engine records them even
    # when the client asked for none (the answer then carries none)
    engine_logprobs = 0 if (logprobs is None and best_of > n) else logprobs
    sampling = []
    for ids in prompts:
        n_new = _fit_max_tokens(asked, 16, len(ids), limits, "max_tokens", allow_zero=echo)
        _check_min_tokens(sampling_kw["min_tokens"], n_new, asked, "max_tokens")
        sampling.append(SamplingParams(
            max_tokens=max(n_new, 1), logprobs=engine_logprobs,
            prompt_logprobs=logprobs if (echo and logprobs is not None) else None, **sampling_kw))
    return Prepared(prompts, texts, sampling, stop=stop, score_only=echo and asked == 0, echo=echo,
                    logprobs=logprobs, stream=bool(req.stream),
                    include_usage=bool(req.stream_options and req.stream_options.include_usage),
                    n=n, best_of=best_of)


def _completion_prompts(prompt, tokenizer, limits: Limits) -> tuple[list, list]:
    """A completion request's prompt (text, token ids, or a list of either) -> (token ids per
    prompt, the text per prompt or None for token ids), each checked against the model."""
    if isinstance(prompt, str):
        prompts_in = [prompt]
    elif not prompt:
        raise invalid("prompt is an empty list", "prompt")
    elif isinstance(prompt[0], int):
        prompts_in = [prompt]
    else:
        prompts_in = list(prompt)
    if len(prompts_in) > MAX_PROMPTS:
        raise invalid(f"prompt holds {len(prompts_in)} prompts; at most {MAX_PROMPTS} per request",
                      "prompt")
    prompts, texts = [], []
    for i, p in enumerate(prompts_in):
        param = "prompt" if len(prompts_in) == 1 else f"prompt.{i}"
        if isinstance(p, str):
            ids = tokenizer.encode(p)           # special tokens (BOS) as `kvjax generate` does
            texts.append(p)
        else:
            ids = list(p)
            texts.append(None)
        _check_ids(ids, limits, param)
        prompts.append(ids)
    return prompts, texts


def chat_messages(messages: list[ChatMessage]) -> list[dict]:
    """Validated messages -> [{"role", "content"}] with text parts joined."""
    if not messages:
        raise invalid("messages is empty: give at least one message", "messages")
    out = []
    for m in messages:
        if m.content is None and not (m.role == "assistant" and m.tool_calls):
            raise invalid(f"a {m.role} message needs content", "messages")
        content = m.content if isinstance(m.content, str) or m.content is None else \
            "".join(p.text for p in m.content)
        msg = {"role": "system" if m.role == "developer" else m.role, "content": content}
        msg.update({k: v for k, v in (("tool_calls", m.tool_calls), ("tool_call_id", m.tool_call_id),
                                      ("name", m.name)) if v is not None})
        out.append(msg)
    return template_messages(out)


def prepare_chat(req: ChatCompletionRequest, prompt_ids: list, limits: Limits) -> Prepared:
    """A chat request whose messages were rendered and encoded to `prompt_ids`."""
    sampling_kw, stop = _common(req, limits)
    plan = _tool_plan(req, limits, sampling_kw)
    top = req.top_logprobs
    if top is not None and not 0 <= top <= MAX_LOGPROBS:
        raise invalid(f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {top}", "top_logprobs")
    if top is not None and not req.logprobs:
        raise invalid("top_logprobs needs logprobs: true", "top_logprobs")
    logprobs = (top or 0) if req.logprobs else None
    _check_ids(prompt_ids, limits, "messages")
    if req.max_completion_tokens is not None and req.max_tokens is not None \
            and req.max_completion_tokens != req.max_tokens:
        raise invalid("max_tokens and max_completion_tokens differ; give one", "max_tokens")
    asked, param = ((req.max_completion_tokens, "max_completion_tokens")
                    if req.max_completion_tokens is not None else (req.max_tokens, "max_tokens"))
    n_new = _fit_max_tokens(asked, None, len(prompt_ids), limits, param)
    _check_min_tokens(sampling_kw["min_tokens"], n_new, asked, param)
    sampling = SamplingParams(max_tokens=n_new, logprobs=logprobs, **sampling_kw)
    n = _choices(req)
    return Prepared([prompt_ids], [None], [sampling], stop=stop,
                    logprobs=logprobs, stream=bool(req.stream),
                    include_usage=bool(req.stream_options and req.stream_options.include_usage),
                    n=n, best_of=n, tools=plan)


def tool_plan(req: ChatCompletionRequest) -> ToolPlan | None:
    """The request's tools and tool_choice, checked (400 naming the field)."""
    try:
        return check_tools(req.tools, req.tool_choice)
    except ToolError as e:
        raise invalid(str(e), e.param) from None


def _tool_plan(req: ChatCompletionRequest, limits: Limits, sampling_kw: dict) -> ToolPlan | None:
    """tool_plan, and for a forced call ("required" or a named function) the grammar that
    makes the answer that call's JSON (into sampling_kw["guide"])."""
    plan = tool_plan(req)
    if plan is None or not plan.forced:
        return plan
    if sampling_kw.get("guide") is not None:
        raise invalid("a forced tool call (tool_choice) and response_format / guided_* cannot be combined",
                      "tool_choice")
    if limits.grammar is None:
        raise invalid("forced tool calls need structured output, which this server does not have",
                      "tool_choice")
    try:
        # compact JSON (no free whitespace): a call's arguments need none, and small models pad
        sampling_kw["guide"] = limits.grammar(replace(json_schema_spec(forced_schema(plan), "tools"),
                                                      whitespace_flexible=False))
    except FormatError as e:
        raise invalid(e.message, "tools") from None
    except (ImportError, ValueError) as e:
        raise invalid(str(e), "tool_choice") from None
    return plan


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def to_jsonable(x: Any):
    """numpy scalars and the like -> plain Python (for json.dumps)."""
    if hasattr(x, "item"):
        return x.item()
    raise TypeError(f"not JSON serializable: {type(x).__name__}")
