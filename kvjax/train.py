"""Next-token training of small Llama-style models with optax (the bundled demo models).

Axis letters: B batch, T sequence, V vocab.

`TrainConfig` is a frozen dataclass of plain typed fields (the `train:` section of a
`kind: train` experiment YAML); `train(config, out_dir, progress)` runs AdamW with a
linear-warmup + cosine schedule and global-norm clipping, one jitted step that donates
the training state, periodic held-out evaluation, and atomic checkpoints.

Checkpoints: `out_dir/checkpoints/step_NNNNNNNN/` is a Hugging Face folder (`save_hf`,
weights in `save_dtype`) plus the tokenizer, `train_config.json`, and
`train_state.msgpack` (float32 params, optimizer state and step, via
flax.serialization). A checkpoint is written under a temporary name and renamed into
place, so an interrupted save never leaves a folder that looks complete. `train` resumes
from the newest checkpoint in `out_dir` (or from `resume_from`); the batch of step s is
a function of (seed, s) only, so a resumed run follows the uninterrupted one exactly.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import string
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import data
from .atomic import atomic_write_bytes
from .config import ModelConfig
from .hf import save_hf
from .model import Transformer, init_params, param_count
from .tokenizer import ByteTokenizer

TASKS = ("text", "recall")
SAVE_DTYPES = ("bfloat16", "float32")

# Fields that do not change the training trajectory: a resumed run may change them.
_RESUME_FREE = frozenset({"log_every", "eval_every", "eval_windows", "checkpoint_every",
                          "keep_checkpoints", "resume_from", "recall_eval_per_distance"})


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; defaults train the bundled text model."""

    task: str = "text"                 # "text" (pydoc bytes) | "recall" (key-value recall)
    seed: int = 0
    # Model: Llama family (RMSNorm, rotary positions, SwiGLU, grouped-query attention).
    vocab_size: int = 259              # ByteTokenizer: 256 bytes + <pad> <bos> <eos>
    d_model: int = 256
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 2
    head_dim: Optional[int] = None     # None: d_model // num_heads
    mlp_dim: int = 704
    seq_len: int = 256                 # training context; also the model's max_position
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    init_std: float = 0.02
    # Optimisation: AdamW, linear warmup then cosine decay to end_lr_ratio * learning_rate.
    num_steps: int = 1000
    batch_size: int = 16
    learning_rate: float = 2e-3
    end_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1          # on matrices (ndim >= 2) only, not norm scales
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0             # global-norm clipping
    # Evaluation, logging, checkpoints.
    log_every: int = 10
    eval_every: int = 100
    eval_windows: int = 64             # held-out sequences per evaluation (text: 0 = all windows)
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    save_dtype: str = "bfloat16"       # dtype of the Hugging Face weights in each checkpoint
    resume_from: Optional[str] = None  # a checkpoint folder or run folder to continue from
    init_from: Optional[str] = None    # start from these weights (checkpoint folder, run folder or
                                       # bundled model name) with a fresh optimizer at step 0
    # Text task.
    heldout_every: int = 10            # about 1 in heldout_every pydoc topics is held out
    # Recall task (see kvjax.data.RecallTask).
    recall_pairs: int = 32
    recall_key_len: int = 2
    recall_value_len: int = 2
    recall_min_pairs: int = 1          # training sequences have U[min, max] pairs, where max grows
    recall_ramp_start: int = 8         # ... linearly from recall_ramp_start to recall_pairs
    recall_ramp_steps: int = 0         # ... over the first recall_ramp_steps steps (0: no ramp)
    recall_queries: int = 0            # queries per training sequence (pairs drawn with replacement);
                                       # 0: as many as fit in seq_len. Evaluation: one per sequence.
    recall_echo_key: bool = False      # pairs `keyvaluekey;` (see kvjax.data.RecallTask.echo_key)
    recall_loss: str = "answers"       # train on "answers" (query values) or "all" tokens
    recall_key_chars: str = string.ascii_letters
    recall_value_chars: str = string.digits
    recall_eval_per_distance: int = 32  # final accuracy: sequences per pair-to-query distance

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field, its value and the allowed range."""
        def bad(field, allowed):
            raise ValueError(f"TrainConfig.{field}={getattr(self, field)!r}: must be {allowed}")

        if self.task not in TASKS:
            bad("task", f"one of {list(TASKS)}")
        if self.recall_loss not in ("answers", "all"):
            bad("recall_loss", "one of ['answers', 'all']")
        if self.save_dtype not in SAVE_DTYPES:
            bad("save_dtype", f"one of {list(SAVE_DTYPES)}")
        positive = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "mlp_dim",
                    "seq_len", "num_steps", "batch_size", "log_every", "eval_every",
                    "checkpoint_every", "keep_checkpoints", "recall_pairs", "recall_key_len",
                    "recall_value_len", "recall_min_pairs", "recall_eval_per_distance")
        for f in positive:
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(f, "an int >= 1")
        for f in ("seed", "warmup_steps", "eval_windows", "recall_queries", "recall_ramp_steps",
                  "recall_ramp_start"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                bad(f, "an int >= 0")
        if self.head_dim is not None and (not isinstance(self.head_dim, int) or self.head_dim < 2
                                          or self.head_dim % 2):
            bad("head_dim", "None or an even int >= 2 (rotary positions)")
        if self.head_dim is None and self.d_model % self.num_heads:
            bad("d_model", f"a multiple of num_heads={self.num_heads} when head_dim is None")
        if self.num_heads % self.num_kv_heads:
            bad("num_kv_heads", f"a divisor of num_heads={self.num_heads}")
        if self.vocab_size < 259:
            bad("vocab_size", ">= 259 (the byte tokenizer's vocabulary)")
        if self.warmup_steps >= self.num_steps:
            bad("warmup_steps", f"< num_steps={self.num_steps}")
        if self.heldout_every < 2:
            bad("heldout_every", "an int >= 2")
        for f, lo, hi in (("learning_rate", 0.0, 1.0), ("end_lr_ratio", 0.0, 1.0),
                          ("weight_decay", 0.0, 10.0), ("beta1", 0.0, 1.0), ("beta2", 0.0, 1.0),
                          ("init_std", 0.0, 10.0)):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or not lo <= v <= hi or (f in ("learning_rate", "init_std")
                                                                          and v == 0):
                bad(f, f"a number in {'(' if f in ('learning_rate', 'init_std') else '['}{lo}, {hi}]")
        if not isinstance(self.grad_clip, (int, float)) or self.grad_clip <= 0:
            bad("grad_clip", "a number > 0")
        if not isinstance(self.rope_theta, (int, float)) or self.rope_theta <= 1:
            bad("rope_theta", "a number > 1")
        if self.task == "recall":
            task = self.recall_task()  # validates the recall fields together
            if self.recall_min_pairs > self.recall_pairs:
                bad("recall_min_pairs", f"<= recall_pairs={self.recall_pairs}")
            need = task.seq_len(max(self.recall_queries, 1))
            if need > self.seq_len:
                bad("seq_len", f">= {need}, the length of a recall sequence with "
                               f"{self.recall_pairs} pairs and {max(self.recall_queries, 1)} queries")

    def model_config(self, dtype: str = "float32") -> ModelConfig:
        return ModelConfig(
            vocab_size=self.vocab_size, d_model=self.d_model, num_layers=self.num_layers,
            num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim or self.d_model // self.num_heads, mlp_dim=self.mlp_dim,
            max_position=self.seq_len, rope_theta=float(self.rope_theta),
            tie_embeddings=self.tie_embeddings, dtype=dtype, name=f"kvjax-{self.task}")

    def recall_task(self) -> data.RecallTask:
        return data.RecallTask(num_pairs=self.recall_pairs, key_len=self.recall_key_len,
                               value_len=self.recall_value_len, key_chars=self.recall_key_chars,
                               value_chars=self.recall_value_chars, echo_key=self.recall_echo_key)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {sorted(unknown)}; fields are {sorted(names)}")
        return cls(**d)


# ----------------------------------------------------------------------------- optimisation

def make_optimizer(config: TrainConfig) -> tuple[optax.GradientTransformation, Callable]:
    """(clip -> AdamW with decay on matrices only, the learning-rate schedule)."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate, warmup_steps=config.warmup_steps,
        decay_steps=config.num_steps, end_value=config.learning_rate * config.end_lr_ratio)
    decay_mask = lambda params: jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)  # noqa: E731
    opt = optax.chain(
        optax.clip_by_global_norm(config.grad_clip),
        optax.adamw(schedule, b1=config.beta1, b2=config.beta2, weight_decay=config.weight_decay,
                    mask=decay_mask))
    return opt, schedule


def token_losses(cfg: ModelConfig, params, tokens):
    """Per-token next-token loss: tokens int32 [B, T + 1] -> nats float32 [B, T] and logits [B, T, V]."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    B, T = inputs.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None, :], (B, T))
    lengths = jnp.full((B,), T, jnp.int32)
    logits, _ = Transformer(cfg).apply({"params": params}, inputs, positions, lengths)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets), logits


def _weighted_mean(losses, weights):
    return (losses * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def make_train_step(cfg: ModelConfig, opt: optax.GradientTransformation):
    """A jitted step (state, tokens [B, T + 1], weights [B, T]) -> (state, metrics); state is donated."""
    def loss_fn(params, tokens, weights):
        losses, _ = token_losses(cfg, params, tokens)
        return _weighted_mean(losses, weights)

    def step(state, tokens, weights):
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], tokens, weights)
        updates, opt_state = opt.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1}
        return new_state, {"loss": loss, "grad_norm": _global_norm(grads)}

    return jax.jit(step, donate_argnums=0)


def _global_norm(tree):
    return jnp.sqrt(sum(jnp.vdot(x, x) for x in jax.tree_util.tree_leaves(tree)))


def make_eval_step(cfg: ModelConfig):
    """Jitted (params, tokens, weights) -> (summed nats, weight, argmax predictions [B, T])."""
    def step(params, tokens, weights):
        losses, logits = token_losses(cfg, params, tokens)
        return (losses * weights).sum(), weights.sum(), logits.argmax(-1).astype(jnp.int32)

    return jax.jit(step)


# ----------------------------------------------------------------------------- data per task

def _step_rng(seed: int, step: int, stream: int = 0) -> np.random.Generator:
    """The generator for one step's batch: a function of (seed, step) only, so resuming is exact."""
    return np.random.default_rng(np.random.SeedSequence([seed, stream, step]))


class _Task:
    """Training batches and held-out evaluation for one task."""

    def __init__(self, config: TrainConfig):
        self.config = config
        c = config
        if c.task == "text":
            self.train_stream = data.text_stream("train", c.heldout_every)
            held = data.text_stream("heldout", c.heldout_every)
            windows = data.text_eval_windows(held, c.seq_len, c.eval_windows or None)
            # Byte targets only: nats/byte excludes the <bos>/<eos> document markers.
            self.eval_tokens, self.eval_weights = windows, (windows[:, 1:] < 256).astype(np.float32)
            self.eval_batch = None
        else:
            self.recall = c.recall_task()
            width = c.seq_len + 1
            batch = data.recall_batch(self.recall, _step_rng(c.seed, 0, stream=1),
                                      c.eval_windows or c.batch_size, num_queries=1)
            self.eval_batch = batch
            self.eval_tokens, self.eval_weights = self._pad(batch, width)

    def _pad(self, batch: data.RecallBatch, width: int, all_tokens: bool = False):
        """Right-pad recall sequences to [B, width]; weights [B, width - 1] on the answer
        targets (or, with all_tokens, on every real target, answers included)."""
        B, T = batch.tokens.shape
        tokens = np.full((B, width), data.PAD_ID, np.int32)
        tokens[:, :T] = batch.tokens
        weights = np.zeros((B, width - 1), np.float32)
        weights[:, :T - 1] = 1.0 if all_tokens else batch.answer_mask[:, 1:]
        return tokens, weights

    def train_batch(self, step: int):
        c = self.config
        rng = _step_rng(c.seed, step)
        if c.task == "text":
            tokens = data.text_batch(self.train_stream, rng, c.batch_size, c.seq_len)
            return tokens, np.ones((c.batch_size, c.seq_len), np.float32)
        n = int(rng.integers(c.recall_min_pairs, recall_max_pairs(c, step) + 1))
        m = c.recall_queries or self.recall.max_queries(c.seq_len, num_pairs=n)
        batch = data.recall_batch(self.recall, rng, c.batch_size, num_pairs=n, num_queries=m,
                                  repeat_queries=True)
        return self._pad(batch, c.seq_len + 1, all_tokens=c.recall_loss == "all")

    def evaluate(self, eval_step, params) -> dict:
        """Held-out loss (text: nats and bits per byte; recall: nats per answer token, accuracy)."""
        bs = self.config.batch_size
        total, count, preds = 0.0, 0.0, []
        for i in range(0, len(self.eval_tokens), bs):
            t, w = self.eval_tokens[i:i + bs], self.eval_weights[i:i + bs]
            s, n, p = eval_step(params, jnp.asarray(t), jnp.asarray(w))
            total, count = total + float(s), count + float(n)
            preds.append(np.asarray(p))
        loss = total / max(count, 1.0)
        out = {"eval_loss": loss}
        if self.config.task == "text":
            out["eval_bits_per_byte"] = loss / math.log(2)
        else:
            pred = np.concatenate(preds)
            out["eval_accuracy"] = _recall_accuracy_from_argmax(pred, self.eval_batch)
        return out

    def accuracy_by_distance(self, eval_step, params) -> dict[int, float]:
        """Exact-match recall for every pair-to-query distance, single-query sequences."""
        c, task = self.config, self.recall
        n = c.recall_eval_per_distance
        result = {}
        for d in task.distances():
            batch = data.recall_batch(task, _step_rng(c.seed, d, stream=2), n, num_queries=1, distance=d)
            tokens, weights = self._pad(batch, c.seq_len + 1)
            preds = [np.asarray(eval_step(params, jnp.asarray(tokens[i:i + c.batch_size]),
                                          jnp.asarray(weights[i:i + c.batch_size]))[2])
                     for i in range(0, n, c.batch_size)]
            result[d] = _recall_accuracy_from_argmax(np.concatenate(preds), batch)
        return result


def recall_max_pairs(c: TrainConfig, step: int) -> int:
    """The most pairs a training sequence has at `step` (the curriculum ramp)."""
    if c.recall_ramp_steps == 0 or step >= c.recall_ramp_steps:
        return c.recall_pairs
    lo = max(min(c.recall_ramp_start, c.recall_pairs), c.recall_min_pairs)
    return lo + (c.recall_pairs - lo) * step // c.recall_ramp_steps


def _recall_accuracy_from_argmax(pred: np.ndarray, batch: data.RecallBatch) -> float:
    """pred [B, T] holds argmax token ids; pred[:, t] predicts token t + 1."""
    V = batch.answers.shape[2]
    pos = batch.answer_starts[:, :, None] - 1 + np.arange(V)[None, None, :]
    got = np.take_along_axis(pred, pos.reshape(len(pred), -1), axis=1).reshape(pos.shape)
    return float(data.exact_match(got, batch.answers).mean())


# ----------------------------------------------------------------------------- checkpoints

def _checkpoint_dirs(out_dir: Path) -> list[Path]:
    root = out_dir / "checkpoints"
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")
            and p.name[5:].isdigit() and (p / "train_state.msgpack").is_file()]
    return sorted(dirs, key=lambda p: int(p.name[5:]))


def latest_checkpoint(path: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in a run folder, or the folder itself if it is one."""
    path = Path(path)
    if (path / "train_state.msgpack").is_file():
        return path
    dirs = _checkpoint_dirs(path)
    return dirs[-1] if dirs else None


def export_model(config: TrainConfig, params, path: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write the model as a Hugging Face folder (save_dtype weights), tokenizer and train config."""
    path = Path(path)
    dtype = jnp.dtype(config.save_dtype)
    cfg = config.model_config(config.save_dtype)
    save_hf(cfg, jax.tree_util.tree_map(lambda p: jnp.asarray(p, dtype), params), path,
            tokenizer=ByteTokenizer())
    (path / "train_config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    if extra is not None:
        (path / "train_summary.json").write_text(json.dumps(extra, indent=2) + "\n")
    return path


def save_checkpoint(config: TrainConfig, state, out_dir: Path, extra: dict | None = None) -> Path:
    """Write `checkpoints/step_N` atomically (temp folder, then rename) and prune old ones."""
    step = int(state["step"])
    root = out_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    host_state = jax.device_get(state)
    export_model(config, host_state["params"], tmp, extra)
    atomic_write_bytes(tmp / "train_state.msgpack", flax.serialization.to_bytes(host_state))
    if final.exists():  # a re-save of the same step (e.g. after a resume at a checkpoint step)
        shutil.rmtree(final)
    os.rename(tmp, final)
    for old in _checkpoint_dirs(out_dir)[:-config.keep_checkpoints]:
        shutil.rmtree(old)
    return final


def _restore(config: TrainConfig, template, ckpt: Path):
    saved = json.loads((ckpt / "train_config.json").read_text())
    ours = config.to_dict()
    differ = sorted(k for k in set(saved) | set(ours)
                    if k not in _RESUME_FREE and saved.get(k) != _jsonable(ours.get(k)))
    if differ:
        raise ValueError(f"cannot resume from {ckpt}: TrainConfig differs in {differ} "
                         f"(saved {[saved.get(k) for k in differ]}, now {[ours.get(k) for k in differ]})")
    return flax.serialization.from_bytes(template, (ckpt / "train_state.msgpack").read_bytes())


def _initial_weights(source: str, template):
    """Weights for `init_from`: float32 params shaped like `template`, or a ValueError."""
    from .bundled import bundled_names, model_folder
    from .hf import load_hf

    path = model_folder(source)
    if not path.is_dir():
        raise ValueError(f"TrainConfig.init_from={source!r}: not a folder nor a bundled model "
                         f"(bundled: {bundled_names()})")
    # A checkpoint, a run folder, a folder of runs (`runs/<name>`: the newest one), or an
    # exported model folder (a bundled model).
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        runs = sorted(p for p in path.iterdir() if p.is_dir() and latest_checkpoint(p))
        ckpt = latest_checkpoint(runs[-1]) if runs else path
    _, params = load_hf(ckpt, dtype="float32")
    want = jax.tree_util.tree_map(lambda x: x.shape, template)
    got = jax.tree_util.tree_map(lambda x: x.shape, params)
    if want != got:
        raise ValueError(f"TrainConfig.init_from={source!r}: the weights in {ckpt} do not fit this "
                         f"model shape (d_model, layers, heads, mlp_dim, vocab_size must match)")
    return jax.tree_util.tree_map(jnp.asarray, params)


def _jsonable(v):
    return json.loads(json.dumps(v))


# ----------------------------------------------------------------------------- the loop

def train(config: TrainConfig, out_dir: str | os.PathLike,
          progress: Callable[[dict], None] | None = None) -> dict:
    """Train (or resume) a model; returns a summary dict (also saved with the final checkpoint).

    progress: called with a dict per logged step: step, loss, lr, grad_norm, tokens_per_s,
    elapsed_s, plus eval_loss (and eval_bits_per_byte or eval_accuracy) at evaluation steps.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = progress or (lambda _: None)
    cfg = config.model_config("float32")  # master weights and compute in float32
    opt, schedule = make_optimizer(config)
    task = _Task(config)
    state = _initial_state(config, cfg, opt, out_dir)
    start = int(state["step"])

    train_step, eval_step = make_train_step(cfg, opt), make_eval_step(cfg)
    t0 = time.perf_counter()
    state, history, last_eval = _train_loop(config, state, task, (train_step, eval_step), schedule,
                                            out_dir, report, t0)
    if start >= config.num_steps or not last_eval:
        last_eval = task.evaluate(eval_step, state["params"])
    summary = {
        "task": config.task, "steps": config.num_steps, "resumed_from_step": start,
        "params": param_count(state["params"]),
        "tokens_seen": config.num_steps * config.batch_size * config.seq_len,
        "wall_s_this_run": time.perf_counter() - t0,
        "final_train_loss": history[-1]["loss"] if history else None,
        **last_eval,
        "python": sys.version.split()[0], "jax": jax.__version__,
        "backend": jax.default_backend(),
    }
    if config.task == "recall":
        summary["accuracy_by_distance"] = {str(d): a for d, a in
                                           task.accuracy_by_distance(eval_step, state["params"]).items()}
    summary["checkpoint"] = str(save_checkpoint(config, state, out_dir, extra=summary))
    return summary


def _initial_state(config: TrainConfig, cfg, opt, out_dir: Path) -> dict:
    """{"params", "opt_state", "step"}: fresh (or from `init_from`), or restored from the latest
    checkpoint in out_dir (else in `resume_from`)."""
    ckpt = latest_checkpoint(out_dir)
    if ckpt is None and config.resume_from:
        ckpt = latest_checkpoint(config.resume_from)
        if ckpt is None:
            raise ValueError(f"TrainConfig.resume_from={config.resume_from!r}: no checkpoint found there")
    params = init_params(cfg, jax.random.key(config.seed), std=config.init_std)
    if config.init_from and ckpt is None:  # a resumed run restores its own weights instead
        params = _initial_weights(config.init_from, params)
    state = {"params": params, "opt_state": opt.init(params), "step": jnp.zeros((), jnp.int32)}
    if ckpt is not None:
        state = jax.device_put(_restore(config, jax.device_get(state), ckpt))
    return state


def _train_loop(config: TrainConfig, state: dict, task, steps, schedule, out_dir: Path, report,
                t0: float) -> tuple[dict, list, dict]:
    """The steps from state["step"] to num_steps, logging, evaluating and checkpointing on their
    schedules. steps: (train_step, eval_step). Returns (state, logged records, last evaluation)."""
    train_step, eval_step = steps
    tokens_per_step = config.batch_size * config.seq_len
    history, last_eval = [], {}
    t_log = t0
    steps_since_log = 0
    for step in range(int(state["step"]), config.num_steps):
        tokens, weights = task.train_batch(step)
        state, metrics = train_step(state, jnp.asarray(tokens), jnp.asarray(weights))
        steps_since_log += 1
        done = step + 1
        if done % config.log_every == 0 or done == config.num_steps or done % config.eval_every == 0:
            loss = float(metrics["loss"])  # waits for the step: timing below is honest
            now = time.perf_counter()
            record = {"step": done, "loss": loss, "lr": float(schedule(step)),
                      "grad_norm": float(metrics["grad_norm"]),
                      "tokens_per_s": steps_since_log * tokens_per_step / max(now - t_log, 1e-9),
                      "elapsed_s": now - t0}
            if not math.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss} at step {done}; "
                                         f"lower TrainConfig.learning_rate={config.learning_rate}")
            if done % config.eval_every == 0 or done == config.num_steps:
                last_eval = task.evaluate(eval_step, state["params"])
                record.update(last_eval)
            history.append(record)
            report(record)
            steps_since_log, t_log = 0, time.perf_counter()
        if done % config.checkpoint_every == 0 and done < config.num_steps:
            save_checkpoint(config, state, out_dir)
    return state, history, last_eval
