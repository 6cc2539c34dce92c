"""Chat templates: `apply_chat_template` gives exactly transformers' ids and text for the same
folder (several template styles, template sources), clear errors, the byte-level template.

Tokenizers are trained here (a byte-level BPE on a few strings, with each style's special
tokens) and saved with their template; transformers' AutoTokenizer and kvjax.load_tokenizer
both read the folder.
"""
import json

import pytest

import kvjax
from conftest import require_module

# Qwen2-style ChatML: a default system message when none is given.
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# Llama 3: bos_token, whitespace control, `trim` filter.
LLAMA3 = (
    "{{- bos_token }}\n{%- for message in messages %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' }}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n")
# Gemma: bos_token, raise_exception on bad role order, system folded into the first turn,
# trim_blocks/lstrip_blocks on indented blocks.
GEMMA = """{{ bos_token }}
{% if messages[0]['role'] == 'system' %}
    {% set first_user_prefix = messages[0]['content'] + '\n\n' %}
    {% set loop_messages = messages[1:] %}
{% else %}
    {% set first_user_prefix = "" %}
    {% set loop_messages = messages %}
{% endif %}
{% for message in loop_messages %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {% endif %}
    {% set role = 'model' if message['role'] == 'assistant' else message['role'] %}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {{ message['content'] | trim }}
    {{ '<end_of_turn>\n' }}
{% endfor %}
{% if add_generation_prompt %}
    {{ '<start_of_turn>model\n' }}
{% endif %}
"""
# Tools through tojson (non-ASCII kept, not HTML-escaped), a custom variable, loop controls.
TOOLS = (
    "{% if tools %}<tools>{{ tools | tojson }}</tools>\n{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'skip' %}{% continue %}{% endif %}"
    "<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% if not enable_thinking %}<think></think>{% endif %}"
    "{% endif %}")

STYLES = {
    "chatml": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], CHATML,
               {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}),
    "llama3": (["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], LLAMA3,
               {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
    "gemma": (["<pad>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], GEMMA,
              {"bos_token": {"__type": "AddedToken", "content": "<bos>", "special": True},
               "eos_token": "<eos>", "pad_token": "<pad>"}),
    "tools": (["<s>", "</s>"], TOOLS, {"bos_token": "<s>", "eos_token": "</s>"}),
}

CHATS = [
    [{"role": "user", "content": "Hello there, how are you?"}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "  It is 4.  "},
     {"role": "user", "content": "Ünïcödé 🙂 and <|im_end|> typed by a user"}],
]


def _make(folder, specials, template, cfg, where="config"):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Hello there, how are you?", "You are a helpful assistant.",
                             "What is 2+2? It is 4.", "model user system"] * 3, trainer)
    tok.save(str(folder / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", **cfg}
    if where == "config":
        cfg["chat_template"] = template
    elif where == "jinja":
        (folder / "chat_template.jinja").write_text(template)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    return {name: _make(root / name, *spec) for name, spec in STYLES.items()}


def _hf(folder):
    transformers = require_module("transformers", "the reference chat template rendering is transformers'")
    return transformers.AutoTokenizer.from_pretrained(str(folder))


@pytest.mark.parametrize("style", sorted(STYLES))
def test_ids_and_text_equal_transformers(folders, style):
    ref, tok = _hf(folders[style]), kvjax.load_tokenizer(folders[style])
    chats = CHATS if style != "gemma" else [CHATS[0], CHATS[1][:3] + [CHATS[1][3]]]
    for chat in chats:
        for gen in (True, False):
            kw = {"tools": [{"name": "get_weather", "description": "Météo <b>now</b>"}],
                  "enable_thinking": False} if style == "tools" else {}
            want = ref.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True,
                                           return_dict=False, **kw)
            assert tok.apply_chat_template(chat, add_generation_prompt=gen, **kw) == want
            text = ref.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False, **kw)
            assert tok.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False, **kw) == text
    # kvjax's default adds the generation prompt (transformers' does not).
    assert tok.apply_chat_template(CHATS[0]) == ref.apply_chat_template(
        CHATS[0], add_generation_prompt=True, return_dict=False)


def test_template_sources_and_names(tmp_path, folders):
    specials, template, cfg = STYLES["chatml"]
    jinja = _make(tmp_path / "jinja", specials, template, cfg, where="jinja")
    assert kvjax.load_tokenizer(jinja).apply_chat_template(CHATS[1]) == \
        kvjax.load_tokenizer(folders["chatml"]).apply_chat_template(CHATS[1])
    # A list of named templates: "default" unless tools are given and "tool_use" exists.
    named = _make(tmp_path / "named", specials, [{"name": "default", "template": template},
                                                 {"name": "tool_use", "template": STYLES["tools"][1]}],
                  cfg)
    ref, tok = _hf(named), kvjax.load_tokenizer(named)
    tools = [{"name": "f"}]
    for kw in ({}, {"tools": tools}, {"chat_template": "tool_use"}):
        assert tok.apply_chat_template(CHATS[0], **kw) == ref.apply_chat_template(
            CHATS[0], add_generation_prompt=True, return_dict=False, **kw)
    # The saved tokenizer keeps its template.
    tok.save(tmp_path / "saved")
    assert kvjax.load_tokenizer(tmp_path / "saved").apply_chat_template(CHATS[0], tools=tools) == \
        tok.apply_chat_template(CHATS[0], tools=tools)


def test_errors(tmp_path, folders):
    none = _make(tmp_path / "none", ["<s>"], None, {}, where="nowhere")
    with pytest.raises(ValueError, match="has no chat template"):
        kvjax.load_tokenizer(none).apply_chat_template(CHATS[0])
    gemma = kvjax.load_tokenizer(folders["gemma"])
    with pytest.raises(ValueError, match="roles must alternate"):       # the template's raise_exception
        gemma.apply_chat_template([{"role": "assistant", "content": "hi"}])
    tok = kvjax.load_tokenizer(folders["chatml"])
    bad = [("hello", "must be a list"), ([], "messages is empty"), (["hi"], r"messages\[0\] must be a dict"),
           ([{"content": "x"}], r"messages\[0\] needs a non-empty str 'role'"),
           ([{"role": "user"}], r"messages\[0\] \(role 'user'\) has no 'content'"),
           ([{"role": "user", "content": 3}], r"messages\[0\]\['content'\] must be a str or a list")]
    for messages, message in bad:
        for t in (tok, kvjax.ByteTokenizer()):
            with pytest.raises(ValueError, match=message):
                t.apply_chat_template(messages)
    with pytest.raises(ValueError, match="syntax error"):
        tok.apply_chat_template(CHATS[0], chat_template="{% for %}")


def test_byte_tokenizer_template():
    tok = kvjax.ByteTokenizer()
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi! 🙂"}]
    text = "<|system|>\nBe brief.\n<|user|>\nHi! 🙂\n<|assistant|>\n"
    assert tok.apply_chat_template(chat, tokenize=False) == text
    assert tok.apply_chat_template(chat) == [tok.BOS] + list(text.encode())
    assert tok.apply_chat_template(chat, add_generation_prompt=False, tokenize=False) == \
        text[:-len("<|assistant|>\n")]
    no_bos = kvjax.ByteTokenizer(add_bos=False)
    assert no_bos.apply_chat_template(chat, enable_thinking=False) == list(text.encode())
    with pytest.raises(ValueError, match=r"must be a str for the byte-level"):
        tok.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "x"}]}])
    assert isinstance(tok, kvjax.Tokenizer)
