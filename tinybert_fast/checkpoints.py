"""Model folders checked before use: what `from_pretrained` would stumble on, named.

A run names its models by argument (--teacher, --student, --model, --tokenizer, --mlm); each is a
hub id ("bert-base-uncased", "org/name"), a preset, or a local folder.  A local folder is checked
here before transformers reads it (tinybert_fast.distill.models.pretrained calls
check_model_argument), and every problem is an InputError naming the argument and the file:

    a path that does not exist (and cannot be a hub id: absolute, "./x", "a/b/c");
    a folder without config.json, or a config.json that is not JSON (file:line:column);
    no weight file (model.safetensors, pytorch_model.bin, or their sharded index), a shard an
    index lists that is missing;
    a truncated model.safetensors: its header is shorter than its 8-byte length says, or a
    tensor's data ends past the end of the file (safetensors reports these as "incomplete
    metadata" without the file's name);
    a config.json that does not match the weights: the word embeddings' [vocab_size, hidden_size]
    (embedding_size where the config has one: ALBERT, ELECTRA) and the number of encoder
    layers (BERT-style names `...embeddings.word_embeddings.weight`, `...encoder.layer.<i>....`;
    other layouts are not compared);
    a tokenizer with token ids at or past the config's vocab_size (vocab.txt lines, or the
    largest id of tokenizer.json's vocabulary and added tokens).

Only headers and small JSON files are read (never the tensors), so the checks cost milliseconds.
"""

from __future__ import annotations

import json
import os
import re
import struct

from .errors import InputError

__all__ = ["check_model_argument", "check_model_folder", "looks_local", "WEIGHT_FILES"]

# weight files in the order transformers prefers them
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "vocab.json",
                   "spiece.model", "sentencepiece.bpe.model")
# a hub id: "name" or "org/name", of letters, digits, '-', '_', '.'
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_LAYER = re.compile(r"(?:^|\.)encoder\.layers?\.(\d+)\.")


def looks_local(spec: str) -> bool:
    """True when `spec` can only be a local path (it exists, or is not a hub id's shape: absolute,
    starting with '.' or '~', more than one '/', a backslash)."""
    return os.path.exists(spec) or not _HUB_ID.match(spec)


def check_model_argument(spec: str, argument: str, what: str = "model") -> None:
    """Check a model argument before anything loads it: a local folder with check_model_folder,
    a local path that does not exist refused; a hub id is left to transformers.

    what: "model" (config and weights), "config" (config.json; the weights too when the folder
    holds some, else they are required) or "tokenizer" (tokenizer files)."""
    if os.path.isdir(spec):
        check_model_folder(spec, argument, what)
    elif os.path.exists(spec):
        if what != "config" or not spec.endswith(".json"):
            raise InputError("not a folder", argument=argument, path=spec,
                             expected="a model folder (config.json, weights, tokenizer)")
    elif looks_local(spec):
        raise InputError("no such file or folder", argument=argument, path=spec,
                         expected="a model folder or a hub model id")


def _read_json(path: str, argument: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise InputError(f"not valid JSON ({exc.msg})", argument=argument, path=path,
                         line=exc.lineno, column=exc.colno) from None
    except UnicodeDecodeError as exc:
        raise InputError("not UTF-8 text", argument=argument, path=path,
                         found=f"byte 0x{exc.object[exc.start]:02x} at offset {exc.start}",
                         expected="a UTF-8 JSON file") from None


def safetensors_header(path: str, argument: str) -> dict:
    """The header of a .safetensors file ({tensor name: {"dtype", "shape", "data_offsets"}}),
    checked: InputError for a file shorter than its header says, a header that is not JSON, or
    a tensor whose data ends past the end of the file (a truncated download or copy).

    Layout: 8 bytes little-endian u64 N, N bytes of JSON, then the data; offsets are relative to
    the end of the header."""
    size = os.path.getsize(path)
    at = dict(argument=argument, path=path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InputError("truncated safetensors file", **at, found=f"{size} bytes",
                             expected="at least the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise InputError("truncated safetensors file: the header is shorter than it says",
                             **at, found=f"{size} bytes",
                             expected=f"at least {8 + n} (a header of {n} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError("damaged safetensors file: its header is not JSON", **at) from None
    if not isinstance(header, dict):
        raise InputError("damaged safetensors file: its header is not a table", **at)
    data = size - 8 - n
    for name, entry in header.items():
        if name == "__metadata__" or not isinstance(entry, dict):
            continue
        end = entry.get("data_offsets", [0, 0])[1]
        if end > data:
            raise InputError(f"truncated safetensors file: tensor {name!r} ends past the end",
                             **at, found=f"{size} bytes", expected=f"at least {8 + n + end}")
    return header


def _weight_shapes(folder: str, argument: str) -> dict[str, list[int]] | None:
    """{tensor name: shape} from the folder's safetensors headers (None for .bin weights, whose
    shapes cannot be read without unpickling them); InputError when no weight file is there."""
    present = [name for name in WEIGHT_FILES if os.path.isfile(os.path.join(folder, name))]
    if not present:
        raise InputError("no weight file", argument=argument, path=folder,
                         expected=f"one of {', '.join(WEIGHT_FILES)}")
    first = os.path.join(folder, present[0])
    if present[0].endswith(".index.json"):
        index = _read_json(first, argument)
        shards = sorted(set((index.get("weight_map") or {}).values())) \
            if isinstance(index, dict) else []
        missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
        if not shards or missing:
            raise InputError("the weight index lists shard files that are not there",
                             argument=argument, path=first, found=f"missing {missing[:3]}"
                             if missing else "no weight_map", expected="every shard it lists")
        files = [os.path.join(folder, s) for s in shards]
    else:
        files = [first]
    shapes: dict[str, list[int]] = {}
    for path in files:
        if os.path.getsize(path) == 0:
            raise InputError("empty weight file", argument=argument, path=path)
        if not path.endswith(".safetensors"):
            return None
        for name, entry in safetensors_header(path, argument).items():
            if isinstance(entry, dict) and "shape" in entry:
                shapes[name] = entry["shape"]
    return shapes


def _check_config_against_weights(config: dict, shapes: dict[str, list[int]], config_path: str,
                                  argument: str) -> None:
    embedding = next((s for k, s in shapes.items()
                      if k.endswith("embeddings.word_embeddings.weight")), None)
    at = dict(argument=argument, path=config_path)
    if embedding is not None and len(embedding) == 2:
        # ALBERT and ELECTRA factor the embeddings: their width is embedding_size
        width = "embedding_size" if "embedding_size" in config else "hidden_size"
        want = [config.get("vocab_size"), config.get(width)]
        if None not in want and list(embedding) != want:
            raise InputError("config.json does not match the weights", **at,
                             found=f"vocab_size, {width} = {want[0]}, {want[1]}",
                             expected=f"the word embeddings' shape {list(embedding)}")
    layers = {int(m.group(1)) for k in shapes for m in [_LAYER.search(k)] if m}
    n = config.get("num_hidden_layers")
    if layers and isinstance(n, int) and n != len(layers):
        raise InputError("config.json does not match the weights", **at,
                         found=f"num_hidden_layers = {n}",
                         expected=f"the {len(layers)} encoder layers the weights hold")


def _tokenizer_size(folder: str, argument: str) -> tuple[int, str] | None:
    """(the largest token id + 1, the file it comes from) of the folder's tokenizer, or None when
    it has no file this reads (tokenizer.json, vocab.txt)."""
    path = os.path.join(folder, "tokenizer.json")
    if os.path.isfile(path):
        tok = _read_json(path, argument)
        vocab = (tok.get("model") or {}).get("vocab") if isinstance(tok, dict) else None
        ids = []
        if isinstance(vocab, dict):
            ids += [i for i in vocab.values() if isinstance(i, int)]
        elif isinstance(vocab, list):  # Unigram: [[piece, score], ...]
            ids.append(len(vocab) - 1)
        ids += [t.get("id") for t in tok.get("added_tokens") or []
                if isinstance(t, dict) and isinstance(t.get("id"), int)]
        return (max(ids) + 1, path) if ids else None
    path = os.path.join(folder, "vocab.txt")
    if os.path.isfile(path):
        with open(path, "rb") as f:
            return sum(1 for _ in f), path
    return None


def check_model_folder(path: str, argument: str, what: str = "model") -> None:
    """Check a local model folder (module docstring).  what: "model" (config.json and weights
    needed), "config" (config.json needed; weights checked where present) or "tokenizer"
    (tokenizer files needed; config.json checked where present).  InputError naming the
    argument and the file otherwise."""
    if what not in ("model", "config", "tokenizer"):
        raise ValueError(f"what must be 'model', 'config' or 'tokenizer'; got {what!r}")
    if not os.path.isdir(path):
        raise InputError("no such folder" if not os.path.exists(path) else "not a folder",
                         argument=argument, path=path, expected="a model folder")
    config_path = os.path.join(path, "config.json")
    config = None
    if os.path.isfile(config_path):
        config = _read_json(config_path, argument)
        if not isinstance(config, dict):
            raise InputError("config.json is not a JSON object", argument=argument,
                             path=config_path)
    elif what != "tokenizer":
        raise InputError("no config.json", argument=argument, path=path,
                         expected="a model folder (config.json, weights, tokenizer)")
    if what == "tokenizer" and not any(os.path.isfile(os.path.join(path, f))
                                       for f in TOKENIZER_FILES):
        raise InputError("no tokenizer files", argument=argument, path=path,
                         expected=f"one of {', '.join(TOKENIZER_FILES)}")
    has_weights = any(os.path.isfile(os.path.join(path, f)) for f in WEIGHT_FILES)
    if config is not None and (what == "model" or has_weights):
        shapes = _weight_shapes(path, argument)
        if shapes:
            _check_config_against_weights(config, shapes, config_path, argument)
    vocab_size = config.get("vocab_size") if config is not None else None
    tokenizer = _tokenizer_size(path, argument)
    if isinstance(vocab_size, int) and tokenizer is not None and tokenizer[0] > vocab_size:
        raise InputError("the tokenizer does not fit the model's vocabulary", argument=argument,
                         path=tokenizer[1], found=f"token ids up to {tokenizer[0] - 1}",
                         expected=f"ids below config.json's vocab_size {vocab_size}")
