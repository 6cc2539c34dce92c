"""train: `kvjax.train.train` driven from a config, its log streamed into the results.

The `train:` section maps field by field onto `kvjax.train.TrainConfig` (the schema
reads that dataclass's own fields and types; its own checks name field, value and
limit). The top-level `seed` is used when the section sets none. Training computes in
float32 (the saved weights' dtype is `train.save_dtype`), so the top-level `dtype`
must stay float32. Checkpoints go to `<results>/checkpoints/`; each logged step
(step, loss, lr, grad_norm, tokens/s, eval metrics when computed) becomes a metrics row.
"""
from __future__ import annotations

from kvjax.train import TrainConfig, train

from .. import plots
from ..schema import ConfigError

Config = TrainConfig


def section_defaults(top) -> dict:
    """Values the section inherits from the top level unless it sets them."""
    return {"seed": top.seed}


def validate(run_cfg) -> None:
    if run_cfg.dtype != "float32":
        raise ConfigError(f"dtype: {run_cfg.dtype!r} is not allowed for kind 'train'; allowed: "
                          f"'float32' (training keeps float32 weights; set train.save_dtype for "
                          f"the exported weights)")


def run(ctx, cfg: TrainConfig) -> dict:
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
