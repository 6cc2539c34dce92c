"""`kvjax generate`: text equals transformers' greedy continuation, report fields, clean errors.

Checkpoints are built locally (hf_fixtures): transformers models with a trained byte-level
BPE tokenizer.json, and a kvjax model saved with a ByteTokenizer.
"""
import argparse
import json
import re
import subprocess
import sys

import numpy as np
import pytest

import kvjax
from kvjax.cli import build_parser, main
from conftest import require_module
from hf_fixtures import VARIANTS, hf_model, make_hf_tokenizer, random_params

PROMPT = "The quick brown fox"
NEW = 12


def _run(capsys, *argv):
    rc = main(["generate", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def _report(err):
    """The report's `name  value` lines as a dict."""
    return dict(re.findall(r"^(prompt tokens|new tokens|prefill|decode|KV cache|compile)\s+(.+)$",
                           err, re.M))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    torch = require_module("torch", "these checkpoints are written by transformers")
    require_module("transformers", "these checkpoints are written by transformers")
    dirs = {}
    for variant in sorted(VARIANTS):
        folder = tmp_path_factory.mktemp(f"cli-{variant}")
        model = hf_model(variant, seed=11)
        model.save_pretrained(folder)
        make_hf_tokenizer(folder, bos=variant != "gpt2")  # GPT-2's tokenizer adds no BOS
        dirs[variant] = (folder, model, torch)
    return dirs


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_text_matches_transformers(hf_dirs, capsys, variant):
    folder, model, torch = hf_dirs[variant]
    tok = kvjax.load_tokenizer(folder)
    ids = tok.encode(PROMPT)
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=NEW, do_sample=False, eos_token_id=tok.eos_id,
                             pad_token_id=tok.pad_id)[0, len(ids):].tolist()
    if tok.eos_id in ref:
        ref = ref[: ref.index(tok.eos_id)]
    rc, out, err = _run(capsys, "--model", folder, "--prompt", PROMPT, "--max-new-tokens", NEW)
    assert rc == 0, err
    assert out == tok.decode(ref) + "\n"
    report = _report(err)
    assert report["prompt tokens"] == str(len(ids))
    assert report["new tokens"] == str(len(ref))


def test_report_fields_and_no_cache_gives_same_text(hf_dirs, capsys):
    folder = hf_dirs["mistral"][0]
    rc, out, err = _run(capsys, "--model", folder, "--prompt", PROMPT, "--max-new-tokens", NEW)
    assert rc == 0
    report = _report(err)
    assert set(report) == {"prompt tokens", "new tokens", "prefill", "decode", "KV cache", "compile"}
    assert re.fullmatch(r"[\d,.]+ ms", report["prefill"])
    assert re.fullmatch(rf"[\d,.]+ tokens/s \({NEW - 1} steps\)", report["decode"])
    cfg, _ = kvjax.load_hf(folder)
    n = int(report["prompt tokens"])
    assert report["KV cache"] == f"{kvjax.cache_bytes(cfg, 1, n + NEW):,} bytes"
    assert "timings of a warm second run" in err        # the default times a warm call
    rc, out2, err2 = _run(capsys, "--model", folder, "--prompt", PROMPT, "--max-new-tokens", NEW,
                          "--no-cache", "--timing", "first")
    assert rc == 0 and out2 == out
    assert _report(err2)["KV cache"] == "0 bytes" and "no cache" in err2
    assert "they include first-call costs" in err2      # a single run says what it measured


def test_sampling_is_seeded(hf_dirs, capsys):
    folder = hf_dirs["qwen2"][0]
    args = ["--model", folder, "--prompt", PROMPT, "--max-new-tokens", 16, "--temperature", 5.0,
            "--top-k", 100, "--top-p", 0.95]
    outs = [_run(capsys, *args, "--seed", s)[1] for s in (1, 1, 2, 3)]
    assert outs[0] == outs[1]
    assert len(set(outs[1:])) > 1


def test_bfloat16(hf_dirs, capsys):
    rc, out, err = _run(capsys, "--model", hf_dirs["llama3"][0], "--prompt", PROMPT,
                        "--max-new-tokens", 4, "--dtype", "bfloat16")
    assert rc == 0 and "(bfloat16, KV cache" in err


def test_kvjax_checkpoint_with_byte_tokenizer(tmp_path, capsys):
    cfg = kvjax.ModelConfig.preset("llama-tiny")
    params = random_params(cfg, seed=3)
    tok = kvjax.ByteTokenizer()
    kvjax.save_hf(cfg, params, tmp_path, tokenizer=tok)
    ids = tok.encode("hello")
    gen = kvjax.generate(cfg, params, np.array([ids]), max_new_tokens=NEW, eos_token_id=tok.eos_id)
    want = np.asarray(gen.tokens)[0, : int(gen.lengths[0])].tolist()
    rc, out, err = _run(capsys, "--model", tmp_path, "--prompt", "hello", "--max-new-tokens", NEW)
    assert rc == 0
    assert out == tok.decode(want) + "\n"


def test_chat_flag_byte_template(tmp_path, capsys):
    """--chat/--system render the prompt with the tokenizer's chat template (the byte-level one):
    the same text as the rendered conversation given as a plain prompt (same ids: <bos> + bytes)."""
    cfg = kvjax.ModelConfig.preset("llama-tiny")
    kvjax.save_hf(cfg, random_params(cfg, seed=3), tmp_path, tokenizer=kvjax.ByteTokenizer())
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    text = kvjax.ByteTokenizer().apply_chat_template(chat, tokenize=False)
    runs = [_run(capsys, "--model", tmp_path, *argv, "--max-new-tokens", 6, "--timing", "first")
            for argv in (["--prompt", "hello", "--system", "Be brief."], ["--prompt", text])]
    assert runs[0][0] == 0 and runs[0][1] == runs[1][1] and runs[0][1].strip()
    assert _report(runs[0][2])["prompt tokens"] == str(1 + len(text.encode()))


def test_chat_template_and_eos_list_from_checkpoint(tmp_path, capsys):
    """An HF tokenizer's Jinja template drives --chat, and any id of generation_config.json's
    eos_token_id list stops the text (here one the model is known to emit mid-way)."""
    from kvjax.generate_cli import decode

    cfg = kvjax.ModelConfig.preset("llama-tiny")
    params = random_params(cfg, seed=5)
    kvjax.save_hf(cfg, params, tmp_path)
    make_hf_tokenizer(tmp_path)
    tcfg = tmp_path / "tokenizer_config.json"
    template = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}"
                "{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}")
    tcfg.write_text(json.dumps({**json.loads(tcfg.read_text()), "chat_template": template}))
    tok = kvjax.load_tokenizer(tmp_path)
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}])
    assert ids[0] == tok.bos_id and tok.decode(ids) == f"[user] {PROMPT}[assistant] "
    free = decode(cfg, params, ids, NEW, timing="first")["tokens"]     # the CLI's programs, no EOS
    cut = next(i for i in range(2, NEW) if free[i] not in free[:i])   # a token first seen at step i
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [tok.eos_id, free[cut]]}))
    rc, out, err = _run(capsys, "--model", tmp_path, "--prompt", PROMPT, "--chat",
                        "--max-new-tokens", NEW, "--timing", "first")
    assert rc == 0 and out == tok.decode(free[:cut]) + "\n"
    assert _report(err)["new tokens"] == str(cut)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    rc, out, err = _run(capsys, "--model", tmp_path, "--prompt", PROMPT, "--chat")
    assert rc == 2 and "--chat: " in err and "has no chat template" in err


def test_help_explains_every_flag(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    gen = sub.choices["generate"]
    flags = [a for a in gen._actions if a.option_strings and a.dest != "help"]
    assert {a.option_strings[0] for a in flags} == {
        "--model", "--prompt", "--max-new-tokens", "--temperature", "--top-k", "--top-p", "--seed",
        "--no-cache", "--dtype", "--timing", "--chat", "--system", "--chat-template"}
    assert all(a.help and len(a.help) > 15 for a in flags)
    with pytest.raises(SystemExit) as e:
        main(["generate", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert all(a.option_strings[0] in text for a in flags)


@pytest.mark.parametrize("argv, message", [
    (["--max-new-tokens", "0"], "--max-new-tokens: must be >= 1, got 0"),
    (["--max-new-tokens", "abc"], "--max-new-tokens: expected an integer, got 'abc'"),
    (["--temperature", "-1"], "--temperature: must be finite and >= 0, got -1"),
    (["--temperature", "nan"], "--temperature: must be finite"),
    (["--top-k", "-2"], "--top-k: must be >= 0, got -2"),
    (["--top-p", "0"], r"--top-p: must be finite and in \(0, 1\], got 0"),
    (["--top-p", "1.5"], r"--top-p: .*got 1.5"),
    (["--dtype", "int8"], "--dtype: invalid choice: 'int8'"),
])
def test_bad_flag_values_one_line(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(tmp_path), "--prompt", "x", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(message, err), err


def test_bad_model_paths_one_line(tmp_path, capsys):
    cfg = kvjax.ModelConfig.preset("gpt2-tiny")
    params = random_params(cfg)
    kvjax.save_hf(cfg, params, tmp_path / "no_tok")
    kvjax.save_hf(cfg, params, tmp_path / "gpt2", tokenizer=kvjax.ByteTokenizer())
    (tmp_path / "empty").mkdir()
    cases = [(tmp_path / "missing", "no such file or folder, and not a model name"),
             (tmp_path / "empty", "no config.json"),
             (tmp_path / "no_tok", "no tokenizer in"),
             (tmp_path / "no_tok" / "config.json", "is a file")]
    for path, message in cases:
        rc, out, err = _run(capsys, "--model", path, "--prompt", "x")
        assert rc == 2 and out == ""
        assert len(err.strip().splitlines()) == 1 and message in err, err
        assert str(path) in err
    # GPT-2's learned position table (256) bounds prompt + new tokens.
    rc, _, err = _run(capsys, "--model", tmp_path / "gpt2", "--prompt", "x" * 250,
                      "--max-new-tokens", 10)
    assert rc == 2 and "max_position=256" in err and "= 261 positions" in err  # BOS + 250 + 10


def test_command_line_process_has_no_traceback(tmp_path):
    """The real entry point in a fresh process: one line on stderr, exit code 2."""
    code = "import sys; from kvjax.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run([sys.executable, "-c", code, "generate", "--model", str(tmp_path / "nope"),
                           "--prompt", "hi"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"kvjax generate: error: --model {tmp_path / 'nope'}: no such file or folder, and not a "
        f"model name ({', '.join(kvjax.models.model_names())}; see kvjax models)"]


def test_a_bundled_model_name_resolves_to_its_folder():
    from kvjax.bundled import load_bundled
    from kvjax.generate_cli import resolve_model

    cfg, params, tok = resolve_model("text", "float32")
    ref_cfg, _, ref_tok = load_bundled("text")
    assert cfg == ref_cfg and tok.encode("abc") == ref_tok.encode("abc")


def test_chat_template_file_for_a_model_without_one(tmp_path, capsys, monkeypatch):
    """A GGUF model with no tokenizer.chat_template: --chat says to pass --chat-template; the
    file's template renders the prompt (the report's prompt tokens are its ids); a bad file is
    one line naming file, line and problem, before the model loads."""
    from test_gguf import _write_gguf

    from kvjax import generate_cli
    from kvjax.tokenizer import use_chat_template

    model = _write_gguf(tmp_path / "tiny.gguf")
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
                        "{% if add_generation_prompt %}<assistant>{% endif %}")
    rc, _, err = _run(capsys, "--model", model, "--prompt", "hi", "--chat")
    assert rc == 2 and "no chat template" in err and "--chat-template FILE" in err
    rc, _, err = _run(capsys, "--model", model, "--prompt", "hi", "--chat-template", template,
                      "--max-new-tokens", 2, "--timing", "first")
    _, _, tok = kvjax.load_model(str(model))
    ids = use_chat_template(tok, template.read_text()).apply_chat_template([{"role": "user", "content": "hi"}])
    assert rc == 0 and _report(err)["prompt tokens"] == str(len(ids)) and len(ids) > len(tok.encode("hi"))
    monkeypatch.setattr(generate_cli, "resolve_model", lambda *a: pytest.fail("the model was loaded"))
    bad = tmp_path / "bad.jinja"
    bad.write_text("hello\n{% for m in messages %}\n{{ m.content }\n")
    for path, message in ((bad, rf"--chat-template {bad}, line 3: unexpected '}}'"),
                          (tmp_path / "none.jinja", "no such file")):
        rc, _, err = _run(capsys, "--model", model, "--prompt", "hi", "--chat-template", path)
        assert rc == 2 and re.search(message, err) and len(err.strip().splitlines()) == 1, err
