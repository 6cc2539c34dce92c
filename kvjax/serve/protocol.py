"""Requests in, errors out: the OpenAI request shapes `kvjax serve` accepts, checked on the host.

Every bad request becomes an `APIError` (status, message, type, param) that the app turns
into the OpenAI error body `{"error": {"message", "type", "param", "code"}}`; nothing
reaches the engine before the whole request is checked. Unknown fields are ignored (as
the OpenAI API does: clients send `user`, `stream_options` and the like); known fields of
the wrong type, out-of-range values and features kvjax does not have (n > 1, penalties,
tools) are refused with the field's name as `param`. temperature, top_k and top_p go through
`kvjax.sampling.check_sampling`, the range check `generate` and `Engine` use too.

`prepare_completion` and `prepare_chat` turn a validated body into a `Prepared` request:
token-id prompts, one `kvjax.SamplingParams`, stop strings and the response options.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, ValidationError

from ..engine.api import SamplingParams
from ..sampling import SamplingError, check_sampling

MAX_LOGPROBS = 20      # top alternatives per position (OpenAI allows 5 on completions, 20 on chat)
MAX_STOP = 16          # stop strings per request
MAX_PROMPTS = 64       # prompts in one batched /v1/completions request
MAX_JSON_DEPTH = 32    # nesting of arrays and objects in a request body


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
    logit_bias: Optional[dict] = None


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
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: Optional[str] = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = None
    tools: Optional[list] = None
    response_format: Optional[dict] = None


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
    if req.n is not None and req.n != 1:
        raise invalid(f"n must be 1 (one choice per prompt), got {req.n}", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(req, name)
        if value not in (None, 0, 0.0):
            raise invalid(f"{name} is not supported by kvjax serve (only 0), got {value}", name)
    if req.logit_bias:
        raise invalid("logit_bias is not supported by kvjax serve", "logit_bias")
    knobs = _sampling_knobs(req)
    if req.seed is not None and not 0 <= req.seed < 2**63:
        raise invalid(f"seed must be in [0, 2**63), got {req.seed}", "seed")
    stop = req.stop
    stop = () if stop is None else (stop,) if isinstance(stop, str) else tuple(stop)
    if len(stop) > MAX_STOP:
        raise invalid(f"stop takes at most {MAX_STOP} strings, got {len(stop)}", "stop")
    if any(s == "" for s in stop):
        raise invalid("stop strings must not be empty", "stop")
    return dict(**knobs, seed=req.seed, stop_token_ids=tuple(limits.eos_ids)), stop


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
    if req.best_of not in (None, 1):
        raise invalid(f"best_of must be 1, got {req.best_of}", "best_of")
    if req.suffix:
        raise invalid("suffix (insertion) is not supported by kvjax serve", "suffix")
    prompt = req.prompt
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
    if req.stream and len(prompts_in) > 1:
        raise invalid("stream takes one prompt per request", "prompt")
    logprobs = req.logprobs
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise invalid(f"logprobs must be in [0, {MAX_LOGPROBS}], got {logprobs}", "logprobs")
    echo = bool(req.echo)
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
    asked = req.max_tokens
    sampling = []
    for ids in prompts:
        n_new = _fit_max_tokens(asked, 16, len(ids), limits, "max_tokens", allow_zero=echo)
        sampling.append(SamplingParams(
            max_tokens=max(n_new, 1), logprobs=logprobs,
            prompt_logprobs=logprobs if (echo and logprobs is not None) else None, **sampling_kw))
    return Prepared(prompts, texts, sampling, stop=stop, score_only=echo and asked == 0, echo=echo,
                    logprobs=logprobs, stream=bool(req.stream),
                    include_usage=bool(req.stream_options and req.stream_options.include_usage))


def chat_messages(messages: list[ChatMessage]) -> list[dict]:
    """Validated messages -> [{"role", "content"}] with text parts joined."""
    if not messages:
        raise invalid("messages is empty: give at least one message", "messages")
    out = []
    for m in messages:
        content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    return out


def prepare_chat(req: ChatCompletionRequest, prompt_ids: list, limits: Limits) -> Prepared:
    """A chat request whose messages were rendered and encoded to `prompt_ids`."""
    sampling_kw, stop = _common(req, limits)
    if req.tools:
        raise invalid("tools are not supported by kvjax serve", "tools")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise invalid(f"response_format {req.response_format.get('type')!r} is not supported "
                      "(only 'text')", "response_format")
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
    sampling = SamplingParams(max_tokens=n_new, logprobs=logprobs, **sampling_kw)
    return Prepared([prompt_ids], [None], [sampling], stop=stop,
                    logprobs=logprobs, stream=bool(req.stream),
                    include_usage=bool(req.stream_options and req.stream_options.include_usage))


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def to_jsonable(x: Any):
    """numpy scalars and the like -> plain Python (for json.dumps)."""
    if hasattr(x, "item"):
        return x.item()
    raise TypeError(f"not JSON serializable: {type(x).__name__}")
