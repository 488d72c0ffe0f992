"""SAELens's own trainer on a saepipe synthetic store's rows, for the SAELens rows of bench/RESULTS.md's
"Recovery vs budget" section (issue 12). Two steps, since SAELens lives in its own virtualenv:

    python -m bench.saelens_synth dump --store STORE --tokens 2097152 --out rows.npy           # saepipe python
    $SAELENS_PYTHON bench/saelens_synth.py train --rows rows.npy --arch topk --lr 3e-3 --out W_dec.npy
    python -m bench.saelens_synth score --truth SYNTH_DIR W_dec.npy                              # saepipe python

`train` runs SAELens's SAETrainer (constant lr, Adam 0.9/0.999, batch 256, width 2048, k 11 by default) over
the rows once, in a seeded shuffled order; `score` prints recovery (|cos| >= 0.9) and MCC of the decoder.
"""

from __future__ import annotations

import argparse

import numpy as np


def dump(store: str, tokens: int, out: str) -> None:
    from saepipe.harvest import open_store

    s = open_store(store)
    hook = s.settings["hooks"][0]
    n = -(-tokens // s.context_size)
    np.save(out, s.activations(hook, 0, n).reshape(-1, s.d_model)[:tokens].astype(np.float32))


def train(rows: str, arch: str, lr: float, width: int, k: int, batch: int, out: str) -> None:
    import torch
    from sae_lens import BatchTopKTrainingSAEConfig, LoggingConfig, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE
    from sae_lens.saes.topk_sae import TopKTrainingSAE
    from sae_lens.training.sae_trainer import SAETrainer

    torch.set_num_threads(1)
    x = torch.from_numpy(np.load(rows))
    x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))]
    torch.manual_seed(0)
    if arch == "batchtopk":
        sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=x.shape[1], d_sae=width, k=k))
    else:
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=x.shape[1], d_sae=width, k=k))
    batches = (x[i : i + batch] for i in range(0, len(x) - batch + 1, batch))
    cfg = SAETrainerConfig(
        n_checkpoints=0, checkpoint_path=None, save_final_checkpoint=False, total_training_samples=len(x),
        device="cpu", autocast=False, lr=lr, lr_end=lr, lr_scheduler_name="constant", lr_warm_up_steps=0,
        adam_beta1=0.9, adam_beta2=0.999, lr_decay_steps=0, n_restart_cycles=1, train_batch_size_samples=batch,
        dead_feature_window=1000, feature_sampling_window=2000,
        logger=LoggingConfig(log_to_wandb=False, eval_every_n_wandb_logs=2**31 - 1),
        n_batches_for_norm_estimate=1000,
    )  # fmt: skip
    SAETrainer(cfg=cfg, sae=sae, data_provider=batches, save_checkpoint_fn=lambda p: None).fit()
    np.save(out, sae.W_dec.detach().numpy())


def score(truth: str, decoders: list[str]) -> None:
    from scipy.optimize import linear_sum_assignment

    from saepipe.harvest.synthetic import open_truth

    directions = open_truth(truth).directions.astype(np.float64)
    for path in decoders:
        w = np.load(path).astype(np.float64)
        w /= np.linalg.norm(w, axis=1, keepdims=True)
        cos = directions @ w.T
        rows, cols = linear_sum_assignment(-np.abs(cos))
        print(f"{path}: recovered {(cos.max(1) >= 0.9).mean():.3f}, MCC {np.abs(cos[rows, cols]).mean():.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump")
    d.add_argument("--store", required=True)
    d.add_argument("--tokens", type=int, default=2_097_152)
    d.add_argument("--out", required=True)
    t = sub.add_parser("train")
    t.add_argument("--rows", required=True)
    t.add_argument("--arch", choices=["topk", "batchtopk"], default="topk")
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--width", type=int, default=2048)
    t.add_argument("--k", type=int, default=11)
    t.add_argument("--batch-size", type=int, default=256)
    t.add_argument("--out", required=True)
    s = sub.add_parser("score")
    s.add_argument("--truth", required=True)
    s.add_argument("decoders", nargs="+")
    a = p.parse_args()
    if a.cmd == "dump":
        dump(a.store, a.tokens, a.out)
    elif a.cmd == "train":
        train(a.rows, a.arch, a.lr, a.width, a.k, a.batch_size, a.out)
    else:
        score(a.truth, a.decoders)


if __name__ == "__main__":
    main()
