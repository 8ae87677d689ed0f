"""MiniLM-L3 student for the MRPC study: embeddings and layers from teacher layers 2, 4, 6
(1-based), classifier freshly initialised; one init shared by every cell."""
import sys, torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertForSequenceClassification
teacher_dir, config_json, out = sys.argv[1:4]
t = AutoModelForSequenceClassification.from_pretrained(teacher_dir)
torch.manual_seed(0)
cfg = BertConfig.from_json_file(config_json); cfg.num_labels = 2
s = BertForSequenceClassification(cfg)
s.bert.embeddings.load_state_dict(t.bert.embeddings.state_dict())
for i, j in enumerate((1, 3, 5)):
    s.bert.encoder.layer[i].load_state_dict(t.bert.encoder.layer[j].state_dict())
s.save_pretrained(out); AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(out)
print("wrote", out)
