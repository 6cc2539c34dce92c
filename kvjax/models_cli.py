"""`kvjax models`: every model name `kvjax.load_model` resolves, with its shape.

    kvjax models [--json]

Lists the bundled models (trained by kvjax, shipped inside the package) and the packaged
ones (GGUF files inside pip packages, kvjax.models.PACKAGED): layers, d_model, heads / kv
heads, vocabulary, context, parameter count, the file format (GGUF file type, or the
safetensors dtype) and whether it is installed (the pip command when it is not).

Metadata only, no tensor data: a GGUF file's header (`kvjax.gguf.load_gguf_config`), a
folder's config.json and its safetensors headers (8 bytes + JSON). The shape goes through the
same `kvjax.hf.config_from_hf` that loading uses.
"""
from __future__ import annotations

import argparse
import json
import math
import struct
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "models", help="list the model names kvjax can load, with their shapes",
        description="List the bundled and packaged model names that --model (kvjax generate, "
                    "kvjax serve), kvjax.load_model and experiment configs accept, with their "
                    "shapes, read from metadata only (no weights are loaded). A .gguf path or a "
                    "Hugging Face folder works too but is not listed.")
    p.add_argument("--json", action="store_true",
                   help="print one JSON list (one object per model) instead of a table")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    rows = model_rows()
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(table(rows))
    return 0


# ---------------------------------------------------------------- rows
def model_rows() -> list[dict]:
    """One dict per bundled or packaged model: name, source, installed, install (the pip
    command, or None), about, path, and the shape fields of `shape_of` (or `error`)."""
    from .models import PACKAGED, ModelNotInstalled, model_names, packaged_path

    rows = []
    for name, status in model_names().items():
        source = "bundled" if status == "bundled" else "packaged"
        pkg = PACKAGED.get(name)
        row = {"name": name, "source": source, "installed": True, "install": None,
               "about": pkg.about if pkg else _bundled_about(name), "path": None}
        try:
            path = packaged_path(name) if pkg else _bundled_path(name)
        except ModelNotInstalled:
            rows.append({**row, "installed": False, "install": pkg.install})
            continue
        except (OSError, ValueError) as e:   # a broken package or assembly: say so, list the rest
            rows.append({**row, "error": f"{type(e).__name__}: {e}"})
            continue
        row["path"] = str(path)
        try:
            row.update(shape_of(path))
        except (OSError, ValueError, KeyError, struct.error) as e:  # CheckpointError is a ValueError
            row["error"] = f"{type(e).__name__}: {e}"
        rows.append(row)
    return rows


def _bundled_path(name: str) -> Path:
    from .bundled import bundled_path

    return bundled_path(name)


def _bundled_about(name: str) -> str:
    from .bundled import bundled_info

    task = bundled_info(name)["train_config"].get("task")
    return f"trained by kvjax train (task {task}), byte-level tokenizer" if task else "bundled with kvjax"


def shape_of(path) -> dict:
    """The shape fields of a .gguf file or a Hugging Face folder, from metadata only:
    family, layers, d_model, heads, kv_heads, head_dim, vocab, context, params, format,
    size_bytes."""
    from .hf import config_from_hf

    path = Path(path)
    if path.is_file():
        from .gguf import load_gguf_config

        _, hf, g = load_gguf_config(path)
        params, fmt = gguf_param_count(g), f"GGUF {gguf_file_type(g)}"
        size = path.stat().st_size
    else:
        hf = json.loads((path / "config.json").read_text())
        params, dtypes, size = safetensors_summary(path)
        fmt = f"safetensors {'/'.join(sorted(dtypes)) or '?'}"
    cfg, family = config_from_hf(hf, "float32", source=str(path))
    return {"family": family, "layers": cfg.num_layers, "d_model": cfg.d_model,
            "heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
            "vocab": cfg.vocab_size, "context": cfg.max_position, "params": params,
            "format": fmt, "size_bytes": size}


def safetensors_summary(folder: Path) -> tuple[int, set, int]:
    """(parameter count, dtypes, bytes) of a folder's *.safetensors, from their JSON headers."""
    count, dtypes, size = 0, set(), 0
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(n))
        for key, t in header.items():
            if key != "__metadata__":
                count += math.prod(t["shape"])
                dtypes.add(t["dtype"].lower().replace("bf16", "bfloat16").replace("f32", "float32")
                           .replace("f16", "float16"))
        size += f.stat().st_size
    return count, dtypes, size


# ---------------------------------------------------------------- GGUF metadata
def gguf_param_count(g) -> int:
    """Parameters of a GGUFFile: the element count of its tensors (ggml-order shapes)."""
    return sum(math.prod(t.shape) for t in g.tensors.values())


def gguf_file_type(g) -> str:
    """general.file_type by name (Q4_1, Q4_K_M, ...), else the tensor types the file uses."""
    import gguf

    ft = g.get("general.file_type", None)
    try:
        return gguf.LlamaFileType(int(ft)).name.removeprefix("MOSTLY_")
    except (TypeError, ValueError):
        return "/".join(sorted({t.tensor_type.name for t in g.tensors.values()}))


# ---------------------------------------------------------------- the table
COLUMNS = (("name", "name"), ("source", "source"), ("family", "family"), ("layers", "layers"),
           ("d_model", "d_model"), ("heads", "heads/kv"), ("vocab", "vocab"), ("context", "context"),
           ("params", "params"), ("format", "format"))


def table(rows: list[dict]) -> str:
    """The rows as an aligned text table; a model that is not installed shows its pip command."""
    cells = [[title for _, title in COLUMNS]]
    notes = []
    for r in rows:
        if not r["installed"]:
            cells.append([r["name"], r["source"], "not installed"] + [""] * (len(COLUMNS) - 3))
            notes.append(f"{r['name']}: not installed; install it with: {r['install']}")
            continue
        if "error" in r:
            cells.append([r["name"], r["source"], "unreadable"] + [""] * (len(COLUMNS) - 3))
            notes.append(f"{r['name']}: {r['error']}")
            continue
        cells.append([_cell(key, r) for key, _ in COLUMNS])
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines + notes)


def _cell(key: str, r: dict) -> str:
    if key == "heads":
        return f"{r['heads']}/{r['kv_heads']}"
    if key == "params":
        n = r["params"]
        return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.0f}K"
    return str(r[key])
