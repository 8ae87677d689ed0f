"""How much of a task a frozen encoder already holds: a linear probe on its sentence embeddings.

Each model embeds every sentence of the task's train and dev sets (mean over the tokens of the
last hidden state, L2-normalised); a logistic regression is fit on the train features and scored
on dev with the task's metric (tinybert_fast.data.compute_metrics).  Features: u for one
sentence, [u, v, |u - v|, u * v] for a pair.  The encoder never trains, so the probe separates what
an init (the general-distilled student, a random student, the pretrained teacher) brings to task
distillation from what the task steps add.

With --teacher, each model folder that holds a projection (distill's projection.pt: a student
after general distillation or task step 1) is also scored on how well it fits the teacher on the
dev sentences, which general distillation never saw (benchmarks.glue_corpus leaves dev out): per
mapped hidden state (TinyBERT's uniform mapping, state 0 = embeddings), the per-element MSE of the
projected student states against the teacher's and R^2 = 1 - SSE / SST (SST: the teacher states'
squared deviations from their per-dimension mean over the tokens), over every token.

    python -m benchmarks.init_probe --task mrpc --data-dir ../shared/data/glue/MRPC \\
        --model teacher=../models/all-mpnet-base-v2 --model general=RUNS/general/run/model \\
        --model random=random:RUNS/general/run/model --teacher ../models/all-mpnet-base-v2 \\
        --out probe.json

A model is NAME=FOLDER (its weights) or NAME=random:FOLDER (that config with random weights,
seeded).  Every model uses its folder's tokenizer.  Regularisation C in {0.1, 1, 10}: each C's
dev score is reported, and the best is labelled as chosen on dev (an optimistic figure).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch

from tinybert_fast import data, glue, train

from .mpnet_study_summary import majority_score

C_VALUES = (0.1, 1.0, 10.0)


def load_encoder(spec: str, seed: int) -> tuple[torch.nn.Module, object]:
    """(encoder in eval mode, tokenizer) of FOLDER or random:FOLDER."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    random_init = spec.startswith("random:")
    folder = spec[len("random:"):] if random_init else spec
    if not os.path.isdir(folder):
        raise SystemExit(f"--model: {folder} is not a model folder")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if random_init:
        torch.manual_seed(seed)
        model = AutoModel.from_config(AutoConfig.from_pretrained(folder))
    else:
        model = AutoModel.from_pretrained(folder)
    return model.eval(), tokenizer


@torch.no_grad()
def embed(model, tokenizer, texts: list[str], max_length: int, batch: int = 64) -> np.ndarray:
    """[N, d] float32: mean of the last hidden state over each text's tokens, L2-normalised."""
    order = np.argsort([len(t) for t in texts])  # similar lengths per batch: less padding
    out = np.zeros((len(texts), model.config.hidden_size), np.float32)
    for i in range(0, len(texts), batch):
        idx = order[i:i + batch]
        enc = tokenizer([texts[j] for j in idx], padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt")
        hidden = model(**{k: enc[k] for k in train.model_inputs(model, enc)}).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        out[idx] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
    return out


def features(model, tokenizer, examples: list[data.Example], max_length: int) -> np.ndarray:
    """u for single sentences, [u, v, |u - v|, u * v] for pairs."""
    columns = [embed(model, tokenizer, [e.texts[k] for e in examples], max_length)
               for k in range(len(examples[0].texts))]
    if len(columns) == 1:
        return columns[0]
    u, v = columns
    return np.concatenate([u, v, np.abs(u - v), u * v], axis=1)


@torch.no_grad()
def hidden_fit(student, projection: torch.nn.Linear, teacher, tokenizer, texts: list[str],
               max_length: int, batch: int = 32) -> dict:
    """How well the projected student states fit the teacher's mapped states on `texts`:
    {"teacher_states": [...], "mse": [...], "teacher_variance": [...], "r2": [...]}, one entry per
    student state j (0 = embeddings) and its teacher state (mapping.layer_map "uniform").  mse and
    teacher_variance are per element (SSE and SST over tokens x d_teacher); r2 = 1 - SSE / SST."""
    from tinybert_fast import mapping
    hidden = mapping.layer_map("uniform", student.config.num_hidden_layers,
                               teacher.config.num_hidden_layers).hidden
    pairs = [(j, group[0]) for j, group in enumerate(hidden)]
    d = teacher.config.hidden_size
    sse = torch.zeros(len(pairs), dtype=torch.float64)
    t_sum = torch.zeros(len(pairs), d, dtype=torch.float64)
    t_sq = torch.zeros(len(pairs), d, dtype=torch.float64)
    tokens = 0
    for i in range(0, len(texts), batch):
        enc = tokenizer(texts[i:i + batch], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        mask = enc["attention_mask"].bool()
        s_states = student(**{k: enc[k] for k in train.model_inputs(student, enc)},
                           output_hidden_states=True).hidden_states
        t_states = teacher(**{k: enc[k] for k in train.model_inputs(teacher, enc)},
                           output_hidden_states=True).hidden_states
        for k, (j, t) in enumerate(pairs):
            want = t_states[t][mask].double()
            got = projection(s_states[j][mask]).double()
            sse[k] += ((got - want) ** 2).sum()
            t_sum[k] += want.sum(0)
            t_sq[k] += (want ** 2).sum(0)
        tokens += int(mask.sum())
    sst = (t_sq - t_sum ** 2 / tokens).sum(1)
    return {"teacher_states": [t for _, t in pairs], "tokens": tokens,
            "mse": (sse / (tokens * d)).tolist(), "teacher_variance": (sst / (tokens * d)).tolist(),
            "r2": (1 - sse / sst).tolist()}


def load_projection(folder: str) -> torch.nn.Linear | None:
    """The projection distill saved beside a student (PROJECTION_FILE), or None."""
    from tinybert_fast.distill.config import PROJECTION_FILE
    path = os.path.join(folder, PROJECTION_FILE)
    if not os.path.isfile(path):
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    out_dim, in_dim = state["weight"].shape
    projection = torch.nn.Linear(in_dim, out_dim)
    projection.load_state_dict(state)
    return projection.eval()


def probe(task: glue.Task, train_x, train_y, dev_x, dev_y) -> dict:
    """Dev metrics of a logistic regression per C, and the best C's (chosen on dev)."""
    from sklearn.linear_model import LogisticRegression
    per_c = {}
    for c in C_VALUES:
        clf = LogisticRegression(C=c, max_iter=5000).fit(train_x, train_y)
        per_c[str(c)] = {"train": data.compute_metrics(task, clf.predict(train_x).tolist(),
                                                       train_y)["score"],
                         "dev": data.compute_metrics(task, clf.predict(dev_x).tolist(), dev_y)}
    best = max(per_c, key=lambda c: per_c[c]["dev"]["score"])
    return {"per_c": per_c, "best_c_on_dev": float(best),
            "best_dev_score": per_c[best]["dev"]["score"]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", required=True, choices=sorted(glue.TASKS))
    parser.add_argument("--data-dir", required=True, help="the task's GLUE TSV folder")
    parser.add_argument("--model", action="append", required=True, metavar="NAME=FOLDER",
                        help="NAME=FOLDER or NAME=random:FOLDER; repeat for each model")
    parser.add_argument("--teacher", help="a teacher folder: also fit each model that has a "
                        "projection against it (hidden_fit)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0, help="for random:FOLDER")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="write the results here (JSON)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    task = glue.get_task(args.task)
    if task.is_regression:
        raise SystemExit(f"--task: {args.task} is a regression task; the probe classifies")
    models = {}
    for item in args.model:
        name, sep, spec = item.partition("=")
        if not sep or not name or not spec:
            raise SystemExit(f"--model: expected NAME=FOLDER or NAME=random:FOLDER; got {item!r}")
        if name in models:
            raise SystemExit(f"--model: the name {name!r} is given twice")
        models[name] = spec
    train_set = data.load_examples(task, "train", args.data_dir)
    dev = data.load_examples(task, "dev", args.data_dir)
    train_y = [e.label for e in train_set]
    dev_y = [e.label for e in dev]
    result = {"task": args.task, "train_examples": len(train_set), "dev_examples": len(dev),
              "majority_dev_score": majority_score(task, args.data_dir)[0],
              "features": "mean-pooled last hidden state, L2-normalised; pairs: [u, v, |u-v|, u*v]",
              "max_length": args.max_length, "threads": args.threads, "teacher": args.teacher,
              "versions": {"torch": torch.__version__, "python": platform.python_version()},
              "models": {}}
    teacher = load_encoder(args.teacher, args.seed)[0] if args.teacher else None
    dev_texts = [text for e in dev for text in e.texts]
    for name, spec in models.items():
        start = time.perf_counter()
        model, tokenizer = load_encoder(spec, args.seed)
        train_x = features(model, tokenizer, train_set, args.max_length)
        dev_x = features(model, tokenizer, dev, args.max_length)
        entry = {"model": spec, "parameters": sum(p.numel() for p in model.parameters()),
                 **probe(task, train_x, train_y, dev_x, dev_y)}
        projection = None if spec.startswith("random:") else load_projection(spec)
        if teacher is not None and projection is not None:
            entry["hidden_fit"] = hidden_fit(model, projection, teacher, tokenizer, dev_texts,
                                             args.max_length)
            r2 = [round(r, 3) for r in entry["hidden_fit"]["r2"]]
            print(f"{name}: R^2 per mapped state {r2}", flush=True)
        entry["seconds"] = time.perf_counter() - start
        result["models"][name] = entry
        print(f"{name}: dev {entry['best_dev_score']:.4f} (C={entry['best_c_on_dev']}, chosen "
              f"on dev) in {entry['seconds']:.0f} s", flush=True)
    if args.out:
        train.write_json_atomic(args.out, result)
    return result


if __name__ == "__main__":
    main()
