"""train: `kvjax.train.train` driven from a config, its log streamed into the results.

The `train:` section maps field by field onto `kvjax.train.TrainConfig` (the schema
reads that dataclass's own fields and types; its own checks name field, value and
limit). The top-level `seed` is used when the section sets none. Training computes in
float32 (the saved weights' dtype is `train.save_dtype`), so the top-level `dtype`
must stay float32. Checkpoints go to `<results>/checkpoints/`; each logged step
(step, loss, lr, grad_norm, tokens/s, eval metrics when computed) becomes a metrics row.

`train.init_from` starts from a model's weights instead of random ones. A model that
kvjax.load_model resolves (a bundled or packaged name, a .gguf file, a checkpoint folder
with config.json) also gives the model shape (SHAPE_KEYS): a shape key the section sets to
another value than the model's is a ConfigError naming it; a model kvjax train's llama
cannot express (another family, norm, rope scaling, ...) is one too. Packaged and .gguf
models are converted once to a checkpoint folder, `<results>/init_from/`. A run folder (or
a folder of runs) keeps TrainConfig's own meaning: its newest checkpoint, shape from the
section; such a path may not exist at validation time when an earlier experiment writes it.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from kvjax.train import TrainConfig, train

from .. import plots
from ..models import check_model, load_named
from ..schema import ConfigError

Config = TrainConfig
SHAPE_KEYS = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
              "mlp_dim", "rope_theta", "tie_embeddings")
_IGNORED = ("name", "dtype", "max_position")    # ModelConfig fields training sets itself


def section_defaults(top) -> dict:
    """Values the section inherits from the top level unless it sets them."""
    return {"seed": top.seed}


def validate(run_cfg) -> None:
    if run_cfg.dtype != "float32":
        raise ConfigError(f"dtype: {run_cfg.dtype!r} is not allowed for kind 'train'; allowed: "
                          f"'float32' (training keeps float32 weights; set train.save_dtype for "
                          f"the exported weights)")
    init_shape(run_cfg.settings)


def _is_model(source: str) -> bool:
    """Whether init_from names a model; else a run folder or a folder of runs (TrainConfig's own
    meaning), which may not exist yet when an earlier experiment writes it (a path with a '/')."""
    path = Path(source).expanduser()
    if path.is_dir():
        return (path / "config.json").is_file()
    return path.exists() or source.endswith(".gguf") or "/" not in source.replace("\\", "/")


def init_shape(c: TrainConfig) -> dict:
    """The shape fields init_from's model sets ({} without a model); ConfigError naming the key
    that conflicts, or init_from when the model is not one kvjax train can continue."""
    if not c.init_from or not _is_model(c.init_from):
        return {}
    from kvjax.models import read_config

    check_model("train.init_from", c.init_from)
    try:
        cfg, family = read_config(c.init_from)
    except (ValueError, FileNotFoundError, ImportError) as e:
        raise ConfigError(f"train.init_from: {e}") from None
    shape = {"vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "num_layers": cfg.num_layers,
             "num_heads": cfg.num_heads, "num_kv_heads": cfg.num_kv_heads,
             "head_dim": None if cfg.head_dim * cfg.num_heads == cfg.d_model else cfg.head_dim,
             "mlp_dim": cfg.mlp_dim, "rope_theta": float(cfg.rope_theta), "tie_embeddings": cfg.tie_embeddings}
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for key in SHAPE_KEYS:
        mine = getattr(c, key)
        if mine != defaults[key] and mine != shape[key] and not (key == "head_dim" and mine == cfg.head_dim):
            raise ConfigError(f"train.{key}: {mine!r} conflicts with init_from {c.init_from!r}, whose "
                              f"{key} is {shape[key]!r}; leave {key} out (the shape comes from the model)")
    try:
        ours = dataclasses.replace(c, **shape).model_config("float32")
    except ValueError as e:
        raise ConfigError(f"train.init_from: {c.init_from!r} cannot be trained here: {e}") from None
    differ = [f.name for f in dataclasses.fields(cfg) if f.name not in _IGNORED
              and not _same(getattr(cfg, f.name), getattr(ours, f.name))]
    if differ:
        raise ConfigError(f"train.init_from: {c.init_from!r} is a {family} model that kvjax train's "
                          f"llama (RMSNorm, rotary, SwiGLU) cannot express: it differs in "
                          f"{', '.join(f'{k}={getattr(cfg, k)!r}' for k in differ)}")
    return shape


def _same(a, b) -> bool:
    """Equal, floats up to float32 rounding (a GGUF file stores norm_eps as float32)."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-6)
    return a == b


def prepare(ctx, cfg: TrainConfig) -> TrainConfig:
    """cfg with init_from's shape; a packaged or .gguf init_from converted to a checkpoint folder
    (<results>/init_from/) that kvjax.train reads."""
    shape = init_shape(cfg)
    if not shape:
        return cfg
    cfg = dataclasses.replace(cfg, **shape)
    path = Path(cfg.init_from).expanduser()
    if path.is_file() or not path.exists():      # a .gguf file or a packaged name
        import kvjax

        folder = Path(ctx.path) / "init_from"
        mcfg, params, _ = load_named("train.init_from", cfg.init_from, "float32")
        kvjax.save_hf(mcfg, params, folder)
        ctx.note(f"init_from {cfg.init_from}: converted to {folder} for training")
        cfg = dataclasses.replace(cfg, init_from=str(folder))
    ctx.note("Model shape from init_from: " + ", ".join(f"{k}={v}" for k, v in shape.items()))
    return cfg


def run(ctx, cfg: TrainConfig) -> dict:
    cfg = prepare(ctx, cfg)
    log = []
    with ctx.progress(cfg.num_steps, "training") as advance:
        done = [0]

        def on_step(record: dict):
            ctx.log(record)
            log.append(record)
            step = int(record["step"])
            note = f"loss {record['loss']:.3f}"
            if "eval_loss" in record:
                note += f" eval {record['eval_loss']:.3f}"
            advance(step - done[0], note=note)
            done[0] = step

        summary = train(cfg, ctx.path, progress=on_step)

    evals = [r for r in log if "eval_loss" in r]
    extra = [k for k in ("eval_bits_per_byte", "eval_accuracy") if any(k in r for r in evals)]
    if evals:
        ctx.table("Evaluations", ["step", "train loss", "eval loss", *extra, "tokens/s"],
                  [[r["step"], r["loss"], r["eval_loss"], *(r.get(k) for k in extra), r["tokens_per_s"]]
                   for r in evals])
    scalars = {k: v for k, v in summary.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    ctx.table("Training summary", ["key", "value"], [[k, v] for k, v in scalars.items()])

    if log:
        fig, axes = plots.figure()
        steps = [r["step"] for r in log]
        plots.lines(axes[0], steps, {"train loss": [r["loss"] for r in log],
                                     "eval loss": [r.get("eval_loss") for r in log]},
                    xlabel="step", ylabel="loss (nats/token)", title=f"Training: task {cfg.task}")
        ctx.save_figure(fig, "train_loss.png")
    return summary
