"""The checks a CPU cannot make, in one short run on a lent GPU (CI never has one).

* ``env``: the device, torch and CUDA versions.
* ``jvp_attention``: forward-mode AD through the DiT's attention on CUDA. In float64, the
  objectives' JVP (``objectives.base.jvp``) of a small DiT against a central finite difference,
  its two backends (dual tensors, ``torch.func.jvp``) against each other, the gradient through
  the tangent included, and CUDA against CPU for the same weights and inputs; in float32, the fused SDPA kernel
  (flash / memory-efficient) against the math path that the JVP uses; and whether a tangent
  through SDPA outside ``jvp_context`` raises on CUDA (why the context exists).
* ``dit_b2``: DiT-B/2 on ImageNet-256 latents (4 x 32 x 32, 1000 classes), one training step
  (AdamW) per objective: Flow Matching (TF32, and bf16 autocast), MeanFlow (JVP on the
  ``r != t`` rows, and on all rows), TVM; images / s, peak memory, the MeanFlow / Flow Matching
  step ratio.
* ``unet1d``: the paper-size 1-D UNets (UNet1D-M = Diffusion Policy low-dim, UNet1D-L = DP image
  width) on a 16 x 7 action chunk: training step at batch 256 (FM, MeanFlow, DDPM) and the
  per-chunk latency at batch 1 (MeanFlow 1 NFE, DDIM-10, DDPM-100).
* ``resnet18_policy``: the Lift image policy as Diffusion Policy builds it (two 84 x 84 cameras
  cropped to 76, ResNet-18 + GroupNorm + spatial softmax per camera, proprioception, 2 obs steps,
  UNet1D-L): training step at batch 64 and per-chunk latency at batch 1.
* ``drift_kernel``: the drift field's torch kernel on CUDA against the numba kernel (float64
  on the same data), and its time at policy and image batch sizes.
* ``trainer_cuda``: ``jumpflow-train experiment=toy2d trainer.device=cuda`` end to end (train,
  checkpoint, evaluate) in a child process.

    python -m bench.gpu_checks [--only dit_b2,unet1d] [--dit-batch 64] [--out DIR]
    python -m bench.gpu_checks --device cpu     # a dry run at batch 4 (bench/results/gpu_checks_dryrun.json)

Run it where ``jumpflow`` is installed (``jumpflow.configs`` exists only in an installed copy);
on a lent machine with no registry, put an installed copy and hydra / omegaconf / antlr4 on
``PYTHONPATH`` and start it from outside the tree.

Writes ``bench/results/gpu_checks.json`` after every check (a run cut short keeps what it
measured) and prints the table. Exits at once, with a one-line error, where no CUDA device is.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from torch import nn

from bench.backbones import representative_draw
from bench.common import RESULTS, write_results
from jumpflow.backbones import build_backbone
from jumpflow.generator import ClassEmbedding, Generator
from jumpflow.objectives import DDPM, FlowMatching, MeanFlow, TerminalVelocityMatching
from jumpflow.objectives.base import JVP_BACKENDS, autocast_through_jvps, jvp, jvp_backend

DEV = torch.device("cuda")
DIT_BATCH = 256        # the paper's global batch on one GPU: MeanFlow's whole-batch JVP and TVM run out of memory (64: per GPU of 4)
SMALL = False          # --device cpu: a dry run at small batches, to find a script's bugs before a lease


def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def cuda_seconds(fn, warmup: int = 3, iters: int = 10) -> float:
    """Mean seconds per call of ``fn`` on the GPU, by CUDA events over ``iters`` calls (wall
    clock on the CPU of a ``--device cpu`` dry run)."""
    if SMALL:
        warmup, iters = 1, 1
    if DEV.type != "cuda":
        for _ in range(warmup):
            fn()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) / iters
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters / 1e3


def wall_ms(fn, warmup: int = 5, calls: int = 50) -> tuple[float, float]:
    """p50 / p95 milliseconds per call, synchronised (a closed-loop controller waits for it)."""
    out = []
    if SMALL:
        warmup, calls = 1, 2
    for i in range(warmup + calls):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        if i >= warmup:
            out.append((time.perf_counter() - t0) * 1e3)
    out.sort()
    return out[len(out) // 2], out[min(len(out) - 1, int(0.95 * len(out)))]


def empty_cache():
    if DEV.type == "cuda":
        torch.cuda.empty_cache()


def draw_seed(gen: Generator, batch: dict) -> int:
    """The seed a timed step replays: for MeanFlow one whose draw has the paper's share of
    ``r != t`` rows (``bench.backbones.representative_draw``: its cost depends on that share),
    else 0."""
    if not isinstance(gen.objective, MeanFlow):
        return 0
    return representative_draw(gen, batch["x"], batch["cond"])[0]


def train_step(gen: Generator, batch: dict, bf16: bool = False, seed: int = 0, jvp_bf16: bool = False):
    opt = torch.optim.AdamW(gen.parameters(), lr=1e-4, betas=(0.9, 0.95))

    def step():
        opt.zero_grad(set_to_none=True)
        torch.manual_seed(seed)          # one draw replayed (for MeanFlow, one with the paper's JVP share)
        with torch.autocast(DEV.type, dtype=torch.bfloat16, enabled=bf16), autocast_through_jvps(jvp_bf16):
            loss = gen.compute_loss(batch).loss.mean()
        loss.backward()
        opt.step()
    return step


def check_env() -> list[dict]:
    if DEV.type != "cuda":
        return [{"check": "env", "device": "cpu (dry run)", "torch": torch.__version__}]
    p = torch.cuda.get_device_properties(0)
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         check=False, capture_output=True, text=True).stdout.strip()
    return [{"check": "env", "device": p.name, "sms": p.multi_processor_count,
             "memory_gib": round(p.total_memory / 2**30, 1), "torch": torch.__version__,
             "cuda": torch.version.cuda, "nvidia_smi": smi}]


def small_dit(dtype) -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    net = build_backbone("DiT-S/2", (4, 16, 16), 64, hidden_size=128, depth=2, num_heads=4).to(dtype)
    # adaLN-Zero starts as the zero map, whose JVP is trivially zero: perturb every weight
    with torch.no_grad():
        for prm in net.parameters():
            prm.add_(0.05 * torch.randn_like(prm))
    g = torch.Generator().manual_seed(1)
    args = (torch.randn(3, 4, 16, 16, generator=g, dtype=dtype), torch.rand(3, generator=g, dtype=dtype),
            0.3 * torch.rand(3, generator=g, dtype=dtype), torch.randn(3, 64, generator=g, dtype=dtype))
    return net, args


def check_jvp_attention() -> list[dict]:
    rows = []
    net, (x, t, h, c) = small_dit(torch.float64)
    tx, tt = torch.randn_like(x), torch.ones_like(t)      # MeanFlow's tangent (v, 1, 0)
    results = {}
    for device in ("cpu", DEV.type):
        n = net.to(device)
        xs, ts, hs, cs, txs, tts = (a.to(device) for a in (x, t, h, c, tx, tt))

        def f(x_, t_, n=n, hs=hs, cs=cs):
            return n(x_, t_, hs, cs)
        by_backend = {}
        for backend in JVP_BACKENDS:        # the objectives' JVP: dual tensors (default) and torch.func.jvp
            with jvp_backend(backend):
                u, du = jvp(f, (xs, ts), (txs, tts))
            # TVM differentiates through the tangent: its gradient must agree between the backends
            grads = torch.autograd.grad(du.pow(2).sum(), [p for p in n.parameters() if p.requires_grad],
                                        allow_unused=True)
            by_backend[backend] = (u.detach(), du.detach(), [gr for gr in grads if gr is not None])
        u, du, _ = by_backend["forward_ad"]
        eps = 1e-6
        with torch.no_grad():
            fd = (f(xs + eps * txs, ts + eps * tts) - f(xs - eps * txs, ts - eps * tts)) / (2 * eps)
        results[device] = (u.cpu(), du.cpu())
        rows.append({"check": "jvp_attention", "case": f"float64 jvp vs central difference ({device})",
                     "rel_err": float((du - fd).norm().detach() / fd.norm()), "tangent_norm": float(du.norm().detach())})
        (ua, dua, ga), (ub, dub, gb) = by_backend["forward_ad"], by_backend["functorch"]
        rows.append({"check": "jvp_attention", "case": f"float64 forward_ad vs functorch ({device})",
                     "max_abs_diff_u": float((ua - ub).abs().max()), "max_abs_diff_du": float((dua - dub).abs().max()),
                     "max_abs_diff_grad_through_tangent": max(float((a - b).abs().max()) for a, b in zip(ga, gb)),
                     "grads": len(ga)})
    rows.append({"check": "jvp_attention", "case": "float64 CUDA vs CPU (u, du/dt)",
                 "max_abs_diff_u": float((results[DEV.type][0] - results["cpu"][0]).abs().max()),
                 "max_abs_diff_du": float((results[DEV.type][1] - results["cpu"][1]).abs().max())})
    # fused kernels (bf16 flash / fp32 efficient) against the math path the JVP runs on
    net32, (x, t, h, c) = small_dit(torch.float32)
    net32 = net32.to(DEV)
    x, t, h, c = (a.to(DEV) for a in (x, t, h, c))
    with torch.no_grad():
        net32.set_attention("math")
        ref = net32(x, t, h, c)
        net32.set_attention("fused")
        fused = net32(x, t, h, c)
        with torch.autocast(DEV.type, dtype=torch.bfloat16):
            fused_bf16 = net32(x, t, h, c).float()
    net32.set_attention("auto")
    rows.append({"check": "jvp_attention", "case": "fp32 fused SDPA vs math path",
                 "rel_err": float((fused - ref).norm() / ref.norm())})
    rows.append({"check": "jvp_attention", "case": "bf16 autocast fused vs fp32 math",
                 "rel_err": float((fused_bf16 - ref).norm() / ref.norm())})
    # a tangent through SDPA's fused kernels outside jvp_context
    q = torch.randn(2, 4, 64, 32, device=DEV, dtype=torch.bfloat16)
    try:
        torch.func.jvp(lambda a: torch.nn.functional.scaled_dot_product_attention(a, a, a), (q,), (q,))
        outcome = "ran (no error)"
    except Exception as e:  # noqa: BLE001 - the outcome is the finding
        outcome = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    rows.append({"check": "jvp_attention", "case": "bf16 SDPA jvp outside jvp_context", "outcome": outcome})
    return rows


def check_dit_b2(batch: int | None = None) -> list[dict]:
    batch = batch or DIT_BATCH
    batch = 4 if SMALL else batch
    torch.manual_seed(0)
    shape = (4, 32, 32)
    encoder = ClassEmbedding(1000, 768)
    backbone = build_backbone("DiT-B/2", shape, 768)
    params = sum(p.numel() for p in backbone.parameters())
    x = torch.randn(batch, *shape, device=DEV)
    labels = torch.randint(0, 1000, (batch,), device=DEV)
    rows, base = [], None
    # precision: "fp32", "bf16" (autocast, JVPs in fp32: what the step does without the trainer's
    # jvp_bf16) or "bf16_jvp" (autocast through the JVPs too: trainer.jvp_bf16=true)
    cases = [("flow_matching", FlowMatching, {}, "fp32"), ("flow_matching", FlowMatching, {}, "bf16"),
             ("meanflow", MeanFlow, {}, "fp32"), ("meanflow", MeanFlow, {"jvp_rows": "all"}, "fp32"),
             ("meanflow", MeanFlow, {}, "bf16"), ("meanflow", MeanFlow, {}, "bf16_jvp"),
             ("tvm", TerminalVelocityMatching, {}, "fp32"), ("tvm", TerminalVelocityMatching, {}, "bf16_jvp")]
    for label, cls, kw, precision in cases:
        bf16 = precision != "fp32"
        gen = Generator(backbone, cls(**kw), encoder, shape=shape).to(DEV)
        if DEV.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            data = {"x": x, "cond": labels}
            sec = cuda_seconds(train_step(gen, data, bf16=bf16, seed=draw_seed(gen, data),
                                          jvp_bf16=precision == "bf16_jvp"), warmup=3, iters=10)
            row = {"check": "dit_b2", "objective": label, "options": ",".join(f"{k}={v}" for k, v in kw.items()) or "-",
                   "precision": {"fp32": "fp32 (TF32 off)", "bf16_jvp": "bf16 autocast through the JVP"}.get(
                       precision, "bf16 autocast (JVP fp32)" if label != "flow_matching" else "bf16 autocast"),
                   "batch": batch, "params_m": round(params / 1e6, 1), "sec_per_step": sec,
                   "img_per_s": batch / sec,
                   "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if DEV.type == "cuda" else None}
        except Exception as e:  # noqa: BLE001 - an objective that fails here is the finding
            row = {"check": "dit_b2", "objective": label, "error": f"{type(e).__name__}: {str(e)[:200]}"}
        if label == "flow_matching" and precision == "fp32":
            base = row.get("sec_per_step")
        if base and "sec_per_step" in row and label != "flow_matching":
            row["vs_flow_matching_fp32"] = row["sec_per_step"] / base
        rows.append(row)
        del gen
        empty_cache()
    return rows


def chunk_generators(name: str, shape, cond_dim: int, encoder: nn.Module | None = None):
    torch.manual_seed(0)
    backbone = build_backbone(name, shape, cond_dim)
    params = sum(p.numel() for p in backbone.parameters())
    objectives = {"flow_matching": FlowMatching(), "meanflow": MeanFlow(), "meanflow_jvp_all": MeanFlow(jvp_rows="all"),
                  "ddpm": DDPM(num_train_steps=100)}
    return params, {k: Generator(backbone, o, encoder or nn.Identity(), shape=shape).to(DEV)
                    for k, o in objectives.items()}


def policy_rows(check: str, name: str, gens: dict, params: int, batch: dict, one: object,
                extra: dict) -> list[dict]:
    rows = []
    fm_sec = None
    for label, gen in gens.items():
        gen.train()
        sec = cuda_seconds(train_step(gen, batch, seed=draw_seed(gen, batch)), warmup=3, iters=10)
        fm_sec = sec if label == "flow_matching" else fm_sec
        rows.append({"check": check, "backbone": name, "case": "train_step", "objective": label,
                     "batch": len(batch["x"]), "params_m": round(params / 1e6, 1), "sec_per_step": sec,
                     "vs_flow_matching": sec / fm_sec, **extra})
    for label, steps, sampler in (("meanflow", 1, None), ("flow_matching", 1, None), ("ddpm", 10, "ddim"),
                                  ("ddpm", 100, "ddpm")):
        gen = gens[label].eval()
        with torch.inference_mode():
            p50, p95 = wall_ms(lambda gen=gen, s=steps, sm=sampler: gen.generate(one, steps=s, sampler=sm))
        rows.append({"check": check, "backbone": name, "case": "latency_batch1", "objective": label,
                     "nfe": steps, "sampler": sampler or "-", "ms_p50": p50, "ms_p95": p95, **extra})
    return rows


def check_unet1d(batch: int = 256) -> list[dict]:
    batch = 4 if SMALL else batch
    rows = []
    shape, cond_dim = (16, 7), 46
    for name in ("UNet1D-M", "UNet1D-L"):
        params, gens = chunk_generators(name, shape, cond_dim)
        data = {"x": torch.randn(batch, *shape, device=DEV), "cond": torch.randn(batch, cond_dim, device=DEV)}
        rows += policy_rows("unet1d", name, gens, params, data, torch.randn(1, cond_dim, device=DEV), {})
        del gens
        empty_cache()
    return rows


def check_resnet18_policy(batch: int = 64) -> list[dict]:
    batch = 4 if SMALL else batch
    from jumpflow.policy.encoders import ObsEncoder

    obs_shapes = {"agentview_image": (3, 84, 84), "robot0_eye_in_hand_image": (3, 84, 84),
                  "robot0_eef_pos": (3,), "robot0_eef_quat": (4,), "robot0_gripper_qpos": (2,)}
    torch.manual_seed(0)
    encoder = ObsEncoder(obs_shapes, n_obs_steps=2, image_trunk="resnet18", crop_size=76)
    enc_params = sum(p.numel() for p in encoder.parameters())

    def obs(b):
        return {k: (torch.rand(b, 2, *s, device=DEV) if len(s) == 3 else torch.randn(b, 2, *s, device=DEV))
                for k, s in obs_shapes.items()}
    params, gens = chunk_generators("UNet1D-L", (16, 7), encoder.out_dim, encoder)
    data = {"x": torch.randn(batch, 16, 7, device=DEV), "cond": obs(batch)}
    return policy_rows("resnet18_policy", "ResNet-18 x2 + UNet1D-L", gens, params + enc_params, data, obs(1),
                       {"encoder_params_m": round(enc_params / 1e6, 1)})


def check_drift_kernel() -> list[dict]:
    from jumpflow.drift import drift_field

    rows = []
    g = torch.Generator().manual_seed(0)
    for groups, gsize, pos, d in ((256, 16, 16, 112), (64, 64, 64, 512), (8, 128, 128, 4096)):
        gen = torch.randn(groups, gsize, d, generator=g, dtype=torch.float64)
        p = torch.randn(groups, pos, d, generator=g, dtype=torch.float64)
        ref = drift_field(gen, p, impl="numba")
        out = drift_field(gen.to(DEV), p.to(DEV), impl="torch").cpu()
        gen32, p32 = gen.float().to(DEV), p.float().to(DEV)
        sec = cuda_seconds(lambda gen32=gen32, p32=p32: drift_field(gen32, p32, impl="torch"), warmup=2, iters=10)
        drift_field(gen.float(), p.float(), impl="numba")         # compiles the float32 kernel
        t0 = time.perf_counter()
        drift_field(gen.float(), p.float(), impl="numba")
        numba_sec = time.perf_counter() - t0
        rows.append({"check": "drift_kernel", "groups": groups, "gen": gsize, "pos": pos, "d": d,
                     "max_abs_diff_float64": float((out - ref).abs().max()), "cuda_fp32_ms": sec * 1e3,
                     "numba_cpu_fp32_ms": numba_sec * 1e3})
    return rows


def check_trainer_cuda() -> list[dict]:
    run = Path(tempfile.mkdtemp(prefix="jf_gpu_trainer_"))
    cmd = [sys.executable, "-m", "jumpflow.cli.train", "experiment=toy2d", "objective=meanflow",
           *(f"trainer.{k}={20 if SMALL else 400}" for k in ("max_steps", "eval_every", "ckpt_every")),
           f"trainer.device={DEV.type}",
           "logger=none", f"run_dir={run}/run", f"hydra.run.dir={run}/run"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=240)
    wall = time.perf_counter() - t0
    ckpts = sorted((run / "run" / "checkpoints").glob("ckpt_*.safetensors")) if (run / "run").exists() else []
    row = {"check": "trainer_cuda", "command": " ".join(cmd[2:]), "returncode": proc.returncode,
           "wall_s": wall, "checkpoints": len(ckpts), "tail": (proc.stdout + proc.stderr)[-600:]}
    shutil.rmtree(run, ignore_errors=True)
    return [row]


CHECKS = {"env": check_env, "jvp_attention": check_jvp_attention, "dit_b2": check_dit_b2,
          "unet1d": check_unet1d, "resnet18_policy": check_resnet18_policy, "drift_kernel": check_drift_kernel,
          "trainer_cuda": check_trainer_cuda}


def main(argv=None) -> None:
    global DEV, SMALL, DIT_BATCH
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(CHECKS), help="comma-separated checks, in order")
    ap.add_argument("--out", default=None, help="also copy the result file into this folder")
    ap.add_argument("--dit-batch", type=int, default=DIT_BATCH, help="DiT-B/2 batch on the one GPU")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                    help="cpu: a dry run at small batches, written to gpu_checks_dryrun.json")
    args = ap.parse_args(argv)
    DEV, SMALL, DIT_BATCH = torch.device(args.device), args.device == "cpu", args.dit_batch
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - set(CHECKS))
    if unknown:
        raise SystemExit(f"--only: unknown checks {unknown}; known: {sorted(CHECKS)}")
    if args.out and not Path(args.out).is_dir():
        raise SystemExit(f"--out: {args.out} is not a folder")
    if DEV.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench.gpu_checks needs a CUDA device; none is visible")
    torch.backends.cuda.matmul.allow_tf32 = False
    rows = []
    path = RESULTS / ("gpu_checks_dryrun.json" if SMALL else "gpu_checks.json")
    for name in names:
        t0 = time.perf_counter()
        try:
            new = CHECKS[name]()
        except Exception as e:  # noqa: BLE001 - one failed check must not lose the others
            new = [{"check": name, "error": f"{type(e).__name__}: {e}"[:400],
                    "trace": traceback.format_exc()[-800:]}]
        for r in new:
            r["check_seconds"] = round(time.perf_counter() - t0, 1)
        rows += new
        print(f"[{name}] {time.perf_counter() - t0:.1f} s", flush=True)
        write_results(path.stem, {"only": names}, rows, path)
        if args.out:
            shutil.copy(path, Path(args.out) / path.name)


if __name__ == "__main__":
    main()
