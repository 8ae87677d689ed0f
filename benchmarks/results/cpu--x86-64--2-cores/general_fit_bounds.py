"""What a 4 x 312 student could fit of the MPNet teacher's mapped states, against what the
general-distilled one does (general_init_mpnet.json, "bounds"; issue #24's diagnosis).

1. Subspace bounds, on 500 general-corpus sentences (every 150th line): the share of each mapped
   teacher state's variance (states 0, 3, 6, 9, 12) inside one rank-312 subspace with one offset
   (pooled PCA: the most a shared 312 -> 768 projection can reach) and inside the state's own 312
   principal components.
2. Overfitting 32 corpus sentences: a fresh TinyBERT4 (MPNet family, dropout 0) and projection
   trained on the embedding + hidden MSE of those 32 alone (AdamW, lr 1e-3, full batch, 400
   steps): R^2 per state in-sample, every 100 steps.  It shows the shape and the optimiser can fit.

    python benchmarks/results/cpu--x86-64--2-cores/general_fit_bounds.py RUNS TEACHER
"""
import json
import sys

import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer

runs, teacher_dir = sys.argv[1], sys.argv[2]
STATES = (0, 3, 6, 9, 12)
torch.set_num_threads(1)
torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained(teacher_dir)
teacher = AutoModel.from_pretrained(teacher_dir).eval()
corpus = [line.strip() for line in open(f"{runs}/general/corpus.txt", encoding="utf-8")
          if line.strip()]


def encode(texts):
    batch = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    batch.pop("token_type_ids", None)
    return batch


result = {}
states = [[] for _ in STATES]
lines = corpus[::150][:500]
with torch.no_grad():
    for i in range(0, len(lines), 32):
        batch = encode(lines[i:i + 32])
        mask = batch["attention_mask"].bool()
        hidden = teacher(**batch, output_hidden_states=True).hidden_states
        for k, s in enumerate(STATES):
            states[k].append(hidden[s][mask])
states = [torch.cat(h).double() for h in states]
sst = [((h - h.mean(0)) ** 2).sum() for h in states]


def r2_in(basis, offset, k):
    centred = states[k] - offset
    return float(1 - ((centred - centred @ basis @ basis.T) ** 2).sum() / sst[k])


pooled = torch.cat(states)
mean = pooled.mean(0)
_, _, v = torch.linalg.svd(pooled - mean, full_matrices=False)
own = []
for k, h in enumerate(states):
    _, _, vk = torch.linalg.svd(h - h.mean(0), full_matrices=False)
    own.append(r2_in(vk[:312].T, h.mean(0), k))
result["subspace_bounds"] = {
    "sentences": len(lines), "tokens": len(states[0]), "teacher_states": list(STATES),
    "shared_rank312_r2": [r2_in(v[:312].T, mean, k) for k in range(len(STATES))],
    "own_rank312_r2": own}

config = AutoConfig.from_pretrained(f"{runs}/genab/tinybert4_mpnet_nodropout.json")
student = AutoModel.from_config(config).train()
projection = torch.nn.Linear(config.hidden_size, teacher.config.hidden_size)
batch = encode(corpus[:32])
mask = batch["attention_mask"].bool()
with torch.no_grad():
    target = teacher(**batch, output_hidden_states=True).hidden_states
wanted = [target[s][mask].double() for s in STATES]
total = [((t - t.mean(0)) ** 2).sum() for t in wanted]
opt = torch.optim.AdamW([*student.parameters(), *projection.parameters()], lr=1e-3)
curve = []
for step in range(401):
    hidden = student(**batch, output_hidden_states=True).hidden_states
    loss = sum(((projection(hidden[j])[mask] - target[s][mask]) ** 2).mean()
               for j, s in enumerate(STATES))
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 100 == 0:
        with torch.no_grad():
            curve.append({"step": step, "loss": float(loss), "r2": [
                float(1 - ((projection(hidden[j])[mask].double() - wanted[j]) ** 2).sum()
                      / total[j]) for j in range(len(STATES))]})
result["overfit_32_sentences"] = {"lr": 1e-3, "steps": 400, "curve": curve}
print(json.dumps(result, indent=1))
