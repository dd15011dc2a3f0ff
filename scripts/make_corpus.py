"""Sample a model's statistics corpus and write it as a packaged token-id file.

The default statistics corpus of rome_lens is text sampled from the model itself (see
:mod:`rome_lens.statistics.corpus`). Sampling 16k tokens costs minutes on a CPU, and more tokens
cost proportionally more, so for the embedded model the corpus is shipped with the package as
token ids in ``rome_lens/statistics/corpora/<sha256[:16]>.npz``, keyed by the sha256 of the
model file it was sampled from. This script regenerates such a file for any model
``rome_lens.load_model`` can load.

Every batch of ``--batch`` sequences is sampled with its own seed (``seed * 1_000_003 +
batch index``), so batches are independent: they run in ``--workers`` processes of one torch
thread each (robust when other processes take a core), are kept in ``--work`` as they finish
(an interrupted run resumes), and any prefix of the result is itself a valid, smaller corpus.

Usage:
    python scripts/make_corpus.py --sequences 2048 [--model PATH] [--workers 2]
        [--out rome_lens/statistics/corpora/]
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import time
from pathlib import Path

import numpy as np
import torch

SEQ_LEN = 128
TOP_K = 40


def batch_seed(seed: int, index: int) -> int:
    return seed * 1_000_003 + index


def worker(model_name: str | None, indices: list[int], args: argparse.Namespace) -> None:
    torch.set_num_threads(1)  # one thread per process: no OpenMP barrier stalls under contention
    import rome_lens
    from rome_lens.sampling import sample_tokens

    model = rome_lens.load_model(model_name)
    bos = int(model.tokenizer.bos_token_id or 0)
    for index in indices:
        path = args.work / f"batch-{index:05d}.npy"
        if path.exists():
            continue
        t0 = time.perf_counter()
        tokens = sample_tokens(model, args.batch, SEQ_LEN - 1, top_k=TOP_K,
                               seed=batch_seed(args.seed, index), batch_size=args.batch)
        rows = torch.cat([torch.full((args.batch, 1), bos), tokens], dim=1)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, rows.numpy().astype(np.uint32))
        tmp.rename(path)
        logging.info("batch %d: %.1f tok/s", index, rows.numel() / (time.perf_counter() - t0))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model name or path (default: embedded)")
    parser.add_argument("--sequences", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/rome_lens_corpus"))
    parser.add_argument("--out", type=Path, default=Path("rome_lens/statistics/corpora"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.sequences % args.batch:
        parser.error("--sequences must be a multiple of --batch")
    args.work.mkdir(parents=True, exist_ok=True)
    n_batches = args.sequences // args.batch
    jobs = [list(range(w, n_batches, args.workers)) for w in range(args.workers)]
    procs = [mp.get_context("spawn").Process(target=worker, args=(args.model, job, args))
             for job in jobs]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    if any(proc.exitcode for proc in procs):
        raise SystemExit("a worker failed; rerun to resume")
    write(args, n_batches)
    return 0


def write(args: argparse.Namespace, n_batches: int) -> None:
    import rome_lens
    from rome_lens.models import source_sha256
    from rome_lens.statistics.corpus import write_packaged_corpus

    model = rome_lens.load_model(args.model)
    tokens = np.concatenate([np.load(args.work / f"batch-{i:05d}.npy") for i in range(n_batches)])
    path = write_packaged_corpus(
        args.out, source_sha256(model) or "", torch.from_numpy(tokens.astype(np.int64)),
        seed=args.seed, top_k=TOP_K, batch=args.batch,
    )
    logging.info("wrote %s (%d x %d tokens, %.0f KB)", path, *tokens.shape,
                 path.stat().st_size / 1024)


if __name__ == "__main__":
    raise SystemExit(main())
