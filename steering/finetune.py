"""LoRA fine-tuning of the base model, with preventative steering and the finetuning shift.

Training uses PEFT (a LoRA adapter on every linear projection) and transformers' ``Trainer``
on chat-format JSONL (OpenAI's fine-tuning format, one ``{"messages": [...]}`` per line), with
the loss on assistant tokens only. It runs on a float32 copy of the base model of its own,
normally in a child process (``python -m steering.finetune SPEC.json``) with its own thread
budget, so the serving engine keeps going; the child reports events as JSON lines on stdout.

Preventative steering (Persona Vectors): while training, forward hooks add
``coefficient * v[layer]`` (the raw vector) to every token's residual at the chosen layers, or
with ``layers="all"`` the layer-incremental vectors ``v[l] - v[l-1]`` at every layer. The hooks
are removed when training ends (whatever way it ends), so the adapter is served without them.

Finetuning shift (Persona Vectors): the mean last-prompt-token state over fixed evaluation
prompts, fine-tuned minus base, projected on the unit persona vector at its layer.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from steering.atomic import fsync_dir
from steering.vector import PersonaVector

# The learning rate that learning_rate_multiplier scales (OpenAI's hyperparameter is a multiplier).
BASE_LEARNING_RATE = 1e-4
ROLES = ("system", "user", "assistant")
IGNORE = -100
Emit = Callable[[dict], None]


class TrainingFileError(ValueError):
    """A training or validation line that cannot be used; ``line`` is its 1-based number."""

    def __init__(self, line: int, message: str):
        super().__init__(f"line {line}: {message}")
        self.line, self.reason = line, message


class TrainingCancelled(Exception):
    """Training stopped because it was asked to."""


class TrainingDeadlineError(Exception):
    """Training ran past its deadline and stopped."""


@dataclass
class Hyperparameters:
    """OpenAI's fine-tuning hyperparameters, resolved (no ``"auto"`` left)."""

    n_epochs: int = 1
    batch_size: int = 4
    learning_rate_multiplier: float = 1.0
    seed: int = 0


@dataclass
class LoraSettings:
    """The paper's LoRA: rank 32, alpha 64, rsLoRA, every linear projection of the blocks."""

    r: int = 32
    alpha: int = 64
    rslora: bool = True
    dropout: float = 0.0


@dataclass
class PreventiveEntry:
    """One preventative-steering entry: ``layers=None`` is the vector's recommended layer,
    ``"all"`` the layer-incremental vectors at every layer."""

    vector: str
    coefficient: float
    layers: list[int] | str | None = None


@dataclass
class Example:
    line: int
    input_ids: list[int]
    labels: list[int]

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE)


def parse_chat_line(line_no: int, raw: str) -> list[dict] | None:
    """One JSONL line of OpenAI's chat fine-tuning format to its messages; ``None`` for a blank
    line; :class:`TrainingFileError` naming the line when it is malformed.

    Example::

        parse_chat_line(3, '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}')
    """
    if not raw.strip():
        return None
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise TrainingFileError(line_no, f"not JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list):
        raise TrainingFileError(line_no, "each line must be an object with a 'messages' list")
    messages = obj["messages"]
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise TrainingFileError(line_no, f"messages[{i}] needs a role (system, user or assistant) and string content")
        if m.get("weight", 1) not in (0, 1):
            raise TrainingFileError(line_no, f"messages[{i}].weight must be 0 or 1")
    if not messages or messages[0]["role"] == "assistant":
        raise TrainingFileError(line_no, "the messages must start with a system or user message")
    if not any(m["role"] == "assistant" and m.get("weight", 1) == 1 and m["content"].strip() for m in messages):
        raise TrainingFileError(line_no, "no assistant message to train on (non-empty, weight 1)")
    return messages


def encode_chat(tokenizer, messages: list[dict], line: int, *, max_tokens: int) -> Example:
    """Token ids of a chat in the model's template, labels only on trained assistant turns.

    Each assistant turn's span is what the template adds after the prompt that precedes it
    (with the generation prompt): its content and end-of-turn tokens, as the model writes them
    when served. Pieces are tokenized apart at those boundaries, as serving tokenizes a prompt
    apart from its answer.
    """
    def render(msgs: list[dict], generation: bool) -> str:
        plain = [{"role": m["role"], "content": m["content"]} for m in msgs]
        return tokenizer.apply_chat_template(plain, add_generation_prompt=generation, tokenize=False)

    ids: list[int] = []
    labels: list[int] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt, full = render(messages[:i], True), render(messages[: i + 1], False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise TrainingFileError(line, "the model's chat template does not extend one turn into the next")
        context = tokenizer(prompt[len(done):], add_special_tokens=False).input_ids
        answer = tokenizer(full[len(prompt):], add_special_tokens=False).input_ids
        ids += context + answer
        labels += [IGNORE] * len(context) + (answer if message.get("weight", 1) == 1 else [IGNORE] * len(answer))
        done = full
    if len(ids) > max_tokens:
        raise TrainingFileError(line, f"the chat is {len(ids)} tokens, more than the {max_tokens} a row may have")
    return Example(line, ids, labels)


def iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    with open(path, encoding="utf-8") as fh:
        for number, raw in enumerate(fh, start=1):
            yield number, raw


def check_chat_file(path: Path, *, max_rows: int) -> int:
    """Validate a chat JSONL file's shape (no tokenizer needed); returns its number of rows.
    Raises :class:`TrainingFileError` naming the first bad line, or the row limit."""
    rows = 0
    try:
        for number, raw in iter_lines(path):
            if parse_chat_line(number, raw) is not None:
                rows += 1
                if rows > max_rows:
                    raise TrainingFileError(number, f"the file has more than {max_rows} rows, the most allowed")
    except UnicodeDecodeError as exc:
        raise TrainingFileError(0, f"the file is not UTF-8 text ({exc.reason})") from None
    if rows == 0:
        raise TrainingFileError(1, "the file has no rows")
    return rows


def read_chat_file(path: Path, tokenizer, *, max_tokens: int) -> list[Example]:
    """Every row of a chat JSONL file, encoded; :class:`TrainingFileError` at the first bad line."""
    examples = []
    for number, raw in iter_lines(path):
        messages = parse_chat_line(number, raw)
        if messages is not None:
            examples.append(encode_chat(tokenizer, messages, number, max_tokens=max_tokens))
    if not examples:
        raise TrainingFileError(1, "the file has no rows")
    return examples


def prompts_of(path: Path) -> set[str]:
    """Every user message of a chat file (evaluation prompts must not be among them)."""
    seen = set()
    for number, raw in iter_lines(path):
        for m in parse_chat_line(number, raw) or []:
            if m["role"] == "user":
                seen.add(m["content"].strip())
    return seen


def preventative_deltas(entries: list[PreventiveEntry], vectors: dict[str, PersonaVector],
                        num_layers: int) -> dict[int, torch.Tensor]:
    """The residual additions of preventative steering, ``layer -> delta [hidden]``, summed
    over entries: ``coefficient * v[layer]`` at the entry's layers, or with ``layers="all"``
    ``coefficient * (v[l] - v[l-1])`` at every layer 1..L (their sum up to layer l is
    ``v[l] - v[0]``, so each block adds only what its own layer changes).

    Example::

        preventative_deltas([PreventiveEntry("evil", 5.0, [20])], {"evil": v}, 30)  # {20: 5 * v[20]}
    """
    deltas: dict[int, torch.Tensor] = {}
    for i, entry in enumerate(entries):
        v = vectors[entry.vector].directions
        if entry.layers == "all":
            parts = {layer: v[layer] - v[layer - 1] for layer in range(1, num_layers + 1)}
        else:
            layers = entry.layers or [vectors[entry.vector].recommended_layer]
            if any(layer is None or not 1 <= layer <= num_layers for layer in layers):
                raise ValueError(f"preventative_steering[{i}].layers: layers are 1..{num_layers}")
            parts = {layer: v[layer] for layer in layers}
        for layer, direction in parts.items():
            delta = entry.coefficient * direction.to(torch.float32)
            deltas[layer] = deltas[layer] + delta if layer in deltas else delta
    return deltas


@contextmanager
def preventative_steering(blocks: list[nn.Module], deltas: dict[int, torch.Tensor]):
    """Add ``deltas[layer]`` to every token of block ``layer``'s output (1-based) inside the
    block; the hooks are removed on the way out, however the block is left.

    Example::

        with preventative_steering(decoder_blocks(model), {20: 5.0 * v[20]}):
            trainer.train()
    """
    def make(delta: torch.Tensor):
        def hook(_module, _args, output):
            if isinstance(output, tuple):
                return (output[0] + delta.to(output[0].dtype),) + output[1:]
            return output + delta.to(output.dtype)
        return hook

    handles = []
    try:
        for layer, delta in sorted(deltas.items()):
            block = blocks[layer - 1]
            handles.append(block.register_forward_hook(make(delta.to(next(block.parameters()).device))))
        yield
    finally:
        for handle in handles:
            handle.remove()


def finetuning_shift(base: torch.Tensor, tuned: torch.Tensor, direction: torch.Tensor) -> float:
    """The finetuning shift: mean of ``tuned`` minus mean of ``base`` (states ``[prompts, hidden]``
    at the last prompt token), projected on the unit ``direction``.

    Example::

        finetuning_shift(torch.zeros(2, 2), torch.tensor([[1., 1.], [3., 1.]]), torch.tensor([2., 0.]))  # 2.0
    """
    unit = direction.to(torch.float32) / direction.norm()
    return float((tuned.float().mean(0) - base.float().mean(0)) @ unit)


@torch.no_grad()
def last_prompt_states(model: nn.Module, tokenizer, prompts: list[str], layers: list[int]) -> dict[int, torch.Tensor]:
    """Each prompt's hidden state at its last token (chat template with generation prompt), per
    layer of ``hidden_states`` numbering: ``layer -> [prompts, hidden]``, float32."""
    from steering.chat import chat_prompt_ids

    rows: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    device = model.get_input_embeddings().weight.device
    for prompt in prompts:
        ids = torch.tensor([chat_prompt_ids(tokenizer, [{"role": "user", "content": prompt}])], device=device)
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
        for layer in layers:
            rows[layer].append(hidden[layer][0, -1].float().cpu())
    return {layer: torch.stack(states) for layer, states in rows.items()}


@dataclass
class MonitorSpec:
    vector: str
    layer: int


@dataclass
class TrainingJob:
    """Everything a training run needs; also the JSON the child process reads."""

    model: str
    training_file: str
    output_dir: str
    cache_dir: str | None = None
    validation_file: str | None = None
    hyperparameters: Hyperparameters = field(default_factory=Hyperparameters)
    lora: LoraSettings = field(default_factory=LoraSettings)
    preventative: list[PreventiveEntry] = field(default_factory=list)
    monitor: list[MonitorSpec] = field(default_factory=list)
    vector_files: dict[str, str] = field(default_factory=dict)  # vector name -> .safetensors
    eval_prompts: dict[str, list[str]] = field(default_factory=dict)  # vector name -> prompts
    max_tokens: int = 2048
    threads: int = 2
    deadline: float | None = None  # time.time() past which training stops
    max_steps: int | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "TrainingJob":
        data = json.loads(text)
        data["hyperparameters"] = Hyperparameters(**data["hyperparameters"])
        data["lora"] = LoraSettings(**data["lora"])
        data["preventative"] = [PreventiveEntry(**e) for e in data["preventative"]]
        data["monitor"] = [MonitorSpec(**m) for m in data["monitor"]]
        return cls(**data)


def _collate(pad_id: int):
    def collate(batch: list[dict]) -> dict:
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n] = torch.tensor(b["input_ids"])
            labels[i, :n] = torch.tensor(b["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
    return collate


def train(job: TrainingJob, *, emit: Emit = lambda event: None, should_stop: Callable[[], bool] = lambda: False,
          lm=None) -> dict:
    """Train a LoRA adapter as ``job`` says and write it to ``job.output_dir`` (PEFT's format:
    ``adapter_config.json`` + ``adapter_model.safetensors``, the directory appearing whole).

    Loads its own float32 copy of the base model unless ``lm`` (a float32
    :class:`~steering.model.LoadedModel` this call may modify: it gets the adapter) is given.
    ``emit`` receives events (``{"type": "metrics", "step", "total_steps", "train_loss", ...}``);
    ``should_stop`` is polled every step: :class:`TrainingCancelled` when it says so,
    :class:`TrainingDeadlineError` past ``job.deadline``. Returns the result: trained tokens,
    losses, and per monitored vector the base and fine-tuned readings and the shift.

    Example::

        result = train(TrainingJob(model="default", training_file="train.jsonl", output_dir="out/adapter"))
    """
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from steering.model import load_model

    torch.set_num_threads(max(1, job.threads))
    torch.manual_seed(job.hyperparameters.seed)
    if lm is None:
        lm = load_model(job.model, dtype="float32", device="cpu", cache_dir=Path(job.cache_dir) if job.cache_dir else None,
                        prepack=False, cpu_kernels=False)
    tokenizer = lm.tokenizer
    examples = read_chat_file(Path(job.training_file), tokenizer, max_tokens=job.max_tokens)
    valid = read_chat_file(Path(job.validation_file), tokenizer, max_tokens=job.max_tokens) if job.validation_file else None
    vectors = {name: PersonaVector.load(Path(path)) for name, path in job.vector_files.items()}
    deltas = preventative_deltas(job.preventative, vectors, lm.num_layers)

    base_states = {m.vector: last_prompt_states(lm.model, tokenizer, job.eval_prompts[m.vector], [m.layer])[m.layer]
                   for m in job.monitor}
    emit({"type": "message", "message": f"training on {len(examples)} rows"
          + (f" with preventative steering at {len(deltas)} layer(s)" if deltas else "")})

    hp = job.hyperparameters
    model = get_peft_model(lm.model, LoraConfig(
        r=job.lora.r, lora_alpha=job.lora.alpha, use_rslora=job.lora.rslora, lora_dropout=job.lora.dropout,
        target_modules="all-linear", task_type="CAUSAL_LM"))
    steps_per_epoch = math.ceil(len(examples) / hp.batch_size)
    total = job.max_steps or steps_per_epoch * hp.n_epochs
    losses: list[float] = []
    stop_reason: list[str] = []

    class Progress(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if should_stop():
                stop_reason.append("cancelled")
            elif job.deadline is not None and time.time() > job.deadline:
                stop_reason.append("deadline")
            if stop_reason:
                control.should_training_stop = True
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "loss" in logs:
                losses.append(float(logs["loss"]))
                emit({"type": "metrics", "step": state.global_step, "total_steps": total,
                      "train_loss": round(float(logs["loss"]), 6), "learning_rate": logs.get("learning_rate")})
            if "eval_loss" in logs:
                emit({"type": "metrics", "step": state.global_step, "total_steps": total,
                      "valid_loss": round(float(logs["eval_loss"]), 6)})

    Path(job.output_dir).parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".trainer-", dir=Path(job.output_dir).parent))
    try:
        args = TrainingArguments(
            output_dir=str(scratch), per_device_train_batch_size=hp.batch_size, per_device_eval_batch_size=hp.batch_size,
            num_train_epochs=hp.n_epochs, max_steps=job.max_steps or -1,
            learning_rate=BASE_LEARNING_RATE * hp.learning_rate_multiplier, seed=hp.seed, data_seed=hp.seed,
            lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, logging_steps=1, save_strategy="no",
            eval_strategy="epoch" if valid else "no", report_to=[], use_cpu=True, dataloader_num_workers=0,
            remove_unused_columns=False, disable_tqdm=True,
        )
        as_rows = lambda rows: [{"input_ids": e.input_ids, "labels": e.labels} for e in rows]  # noqa: E731
        trainer = Trainer(model=model, args=args, train_dataset=as_rows(examples),
                          eval_dataset=as_rows(valid) if valid else None,
                          data_collator=_collate(tokenizer.pad_token_id), callbacks=[Progress()])
        with preventative_steering(lm.blocks, deltas):
            trainer.train()
        if stop_reason == ["cancelled"]:
            raise TrainingCancelled("training was cancelled")
        if stop_reason:
            raise TrainingDeadlineError("training ran past its deadline and stopped")
        model.eval()
        shifts = {}
        for m in job.monitor:
            tuned = last_prompt_states(model, tokenizer, job.eval_prompts[m.vector], [m.layer])[m.layer]
            unit = vectors[m.vector].direction(m.layer) / vectors[m.vector].direction(m.layer).norm()
            shifts[m.vector] = {
                "layer": m.layer, "eval_prompts": len(job.eval_prompts[m.vector]),
                "base_projection": round(float((base_states[m.vector] @ unit).mean()), 4),
                "fine_tuned_projection": round(float((tuned @ unit).mean()), 4),
                "measured_shift": round(finetuning_shift(base_states[m.vector], tuned, vectors[m.vector].direction(m.layer)), 4),
            }
        save_adapter(model, Path(job.output_dir))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    trained = sum(e.trained_tokens for e in examples) * hp.n_epochs
    return {"trained_tokens": trained, "steps": len(losses), "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None, "shifts": shifts}


def save_adapter(model, target: Path) -> None:
    """Write the adapter (safetensors only) into a temp directory beside ``target``, then rename
    it into place, so a reader never sees half an adapter."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        # PEFT adds a model-card template that says nothing about this adapter.
        (tmp / "README.md").unlink(missing_ok=True)
        for name in os.listdir(tmp):
            with open(tmp / name, "rb") as fh:
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(target.parent)


def main(argv: list[str] | None = None) -> int:
    """Child-process entry: ``python -m steering.finetune SPEC.json``. Events go to stdout as JSON
    lines, the last one ``{"type": "result"}`` or ``{"type": "error"}``; SIGTERM cancels."""
    argv = sys.argv[1:] if argv is None else argv
    job = TrainingJob.from_json(Path(argv[0]).read_text())
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    out = sys.stdout

    def emit(event: dict) -> None:
        out.write(json.dumps({"created_at": int(time.time()), **event}) + "\n")
        out.flush()

    # Library chatter goes to stderr; stdout carries only events.
    sys.stdout = sys.stderr
    try:
        result = train(job, emit=emit, should_stop=lambda: bool(stop))
    except TrainingCancelled as exc:
        emit({"type": "error", "code": "cancelled", "message": str(exc)})
        return 3
    except TrainingDeadlineError as exc:
        emit({"type": "error", "code": "deadline", "message": str(exc)})
        return 4
    except TrainingFileError as exc:
        emit({"type": "error", "code": "invalid_training_file", "message": str(exc)})
        return 2
    except Exception as exc:  # reported to the job, which fails saying why
        emit({"type": "error", "code": "training_failed", "message": f"{type(exc).__name__}: {exc}"})
        return 1
    emit({"type": "result", "result": result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
