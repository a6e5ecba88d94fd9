"""The MerMED-FM (MaSSL + modality gating) train step written in PyTorch, for speed comparison (issue 7).

Written here from the published recipe (arXiv 2507.00185; DINO/iBOT-lineage code), the same model
and objective as mermed_jax's step:
  * ViT (timm/DINO numerics): 16x16 conv patch embedding, CLS token, learned position embedding
    resized for 96 px crops by DINO's interpolate_pos_encoding (bicubic, scale_factor (n+0.1)/14),
    pre-norm blocks with LayerNorm eps 1e-6, fused qkv with bias, exact GELU, stochastic depth
    rising linearly to 0.1 (student), final LayerNorm, CLS output.
  * head: Linear(D, 2048)-BN-GELU-Linear(2048, 2048)-BN-GELU-Linear(2048, 256), L2-normalised; BN in
    training mode over all crops of the batch at once (12 B rows student, 2 B teacher). Run in fp32
    (as ours: the head casts to float32), outside autocast.
  * memory: FIFO queue of K = 131,072 teacher embeddings with modality ids; each step a random
    partition into blocks of 16,384 columns; gated block cross-entropy between
    softmax(teacher . keys / 0.07) and log_softmax(student . keys / 0.1) over (student crop i,
    teacher crop j != i) pairs, other-modality keys masked once the queue is full (it is, here);
    enqueue of the teacher's second-global-crop embeddings after the step.
  * optimiser: AdamW (0.9, 0.999, eps 1e-8) with layer decay 0.8 (stem 0.8^14 ... head 1.0), no
    weight decay on biases, norms, pos embedding and CLS token, per-tensor gradient clipping at 1.0
    (DINO's clip_gradients), then EMA of the teacher (torch._foreach ops).
  * input: uint8 NHWC crops normalised on the fly with per-modality mean/std (as ours).

Modes, timed at the same batch and thread count in one process:
  bf16       torch.autocast('cpu', bfloat16) around the backbones (best on this CPU: oneDNN bf16)
  bf16-compile   the same with torch.compile on the backbones (reported as failed if it fails)
  fp32       eager fp32, for reference
and the bf16/fp32 matmul peaks of this torch build. With --jax-python, the JAX step
(bench/train_step.py) runs in a subprocess right after, at the same config, and the ratios are printed.

Setup (torch lives in its own venv; keep it out of requirements.txt):
  python3 -m venv .venv-torch && .venv-torch/bin/pip install torch==2.13.0 numpy
Usage:
  .venv-torch/bin/python bench/torch_reference.py --variant S/16 --batch 8 --steps 3 \
      --jax-python .venv/bin/python --jax-precisions float32,mixed,bfloat16 --json /tmp/torch_s16.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

VARIANTS = {"Ti": (192, 12, 3, 768), "S": (384, 12, 6, 1536), "B": (768, 12, 12, 3072), "L": (1024, 24, 16, 4096)}
NUM_MODALITIES = 7


# ----------------------------------------------------------------------------------------------- model
class DropPath(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Block(nn.Module):
    def __init__(self, dim, heads, mlp_dim, drop_path):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, dim)
        self.drop_path = DropPath(drop_path)

    def attn(self, x):
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, n, d))

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.fc2(F.gelu(self.fc1(self.norm2(x)))))


class ViT(nn.Module):
    def __init__(self, variant="B/16", img_size=224, drop_path_rate=0.1):
        super().__init__()
        name, patch = variant.split("/")
        dim, depth, heads, mlp_dim = VARIANTS[name]
        self.patch = int(patch)
        self.depth = depth
        self.patch_embed = nn.Conv2d(3, dim, self.patch, self.patch)
        side = img_size // self.patch
        self.side = side
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 1e-6)
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + side * side, dim) * 0.02)
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_dim, r) for r in rates])
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def interpolate_pos_encoding(self, h, w):
        """DINO's: bicubic with scale_factor (n + 0.1) / side."""
        gh, gw = h // self.patch, w // self.patch
        if (gh, gw) == (self.side, self.side):
            return self.pos_embed
        grid = self.pos_embed[:, 1:].reshape(1, self.side, self.side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((gh + 0.1) / self.side, (gw + 0.1) / self.side), mode="bicubic")
        grid = grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)
        return torch.cat([self.pos_embed[:, :1], grid], dim=1)

    def forward(self, x):  # x: [N, 3, H, W]
        h, w = x.shape[-2:]
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.interpolate_pos_encoding(h, w)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 0]


class Head(nn.Module):
    def __init__(self, dim, hidden=2048, bottleneck=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden, momentum=0.1, eps=1e-5), nn.GELU(),
                                 nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden, momentum=0.1, eps=1e-5), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))

    def forward(self, x):
        return F.normalize(self.mlp(x.float()), dim=-1, eps=1e-6)  # the official head (mermed_jax.models.head.NORMALIZE_EPS)


class MultiCrop(nn.Module):
    """Backbone once per resolution, head once on all crops; out [n_crops, B, d]."""

    def __init__(self, variant, drop_path_rate):
        super().__init__()
        self.backbone = ViT(variant, drop_path_rate=drop_path_rate)
        self.head = Head(self.backbone.norm.normalized_shape[0])
        self.backbone_fn = self.backbone  # replaced by a compiled module under --compile
        self.autocast = None

    def forward(self, crops):  # list of [n, B, 3, H, W]
        feats = []
        for group in crops:
            n, b = group.shape[:2]
            rows = group.transpose(0, 1).reshape((b * n,) + group.shape[2:])
            if self.autocast is not None:
                with torch.autocast("cpu", dtype=self.autocast):
                    out = self.backbone_fn(rows)
            else:
                out = self.backbone_fn(rows)
            feats.append(out.float().reshape(b, n, -1))
        x = torch.cat(feats, dim=1)
        b, n, d = x.shape
        return self.head(x.reshape(b * n, d)).reshape(b, n, -1).transpose(0, 1)


# ------------------------------------------------------------------------------------------- objective
def memory_loss(student, teacher, queue, ids, modality, partition, student_temp, teacher_temp, gating):
    """Gated block cross-entropy (see mermed_jax/ssl/memory_loss.py for the definition)."""
    n_s, n_t, b = student.shape[0], teacher.shape[0], student.shape[1]
    pair = (torch.arange(n_s)[:, None] != torch.arange(n_t)[None, :]).float()
    total = student.new_zeros(())
    for cols in partition:
        keys, key_ids = queue[cols], ids[cols]
        mask = (key_ids[None, :] == modality[:, None]) | (not gating)
        valid = mask.any(-1)
        s_logp = torch.log_softmax(torch.where(mask, student @ keys.T / student_temp, -1e9), -1)
        t_logp = torch.log_softmax(torch.where(mask, teacher @ keys.T / teacher_temp, -1e9), -1)
        t_prob = t_logp.exp()
        s_logp = torch.where(mask, s_logp, 0.0)
        cross = -torch.einsum("jbp,ibp->ijb", t_prob, s_logp)
        total = total + (torch.where(valid, cross, 0.0) * pair[:, :, None]).sum()
    n_pairs = n_s * n_t - min(n_s, n_t)
    return total / (partition.shape[0] * b * n_pairs)


def param_groups(model: MultiCrop, lr: float, wd: float, layer_decay: float = 0.8):
    depth = model.backbone.depth
    groups = {}
    for name, p in model.named_parameters():
        if name.startswith("head."):
            lid = depth + 2
        elif name.startswith("backbone.blocks."):
            lid = int(name.split(".")[2]) + 1
        elif name.startswith("backbone.norm."):
            lid = depth + 1
        else:
            lid = 0
        no_wd = p.ndim == 1 or name.endswith(("pos_embed", "cls_token"))
        key = (lid, no_wd)
        if key not in groups:
            scale = layer_decay ** (depth + 2 - lid)
            # p -= lr * scale * (adam + wd * p), as ours (optim.py): torch's AdamW decays by the
            # group's lr times weight_decay, so weight_decay is wd itself.
            groups[key] = {"params": [], "lr": lr * scale, "weight_decay": 0.0 if no_wd else wd}
        groups[key]["params"].append(p)
    return list(groups.values())


class Step:
    def __init__(self, args, dtype, compile_backbone):
        torch.manual_seed(0)
        self.args = args
        self.student = MultiCrop(args.variant, 0.1)
        self.teacher = MultiCrop(args.variant, 0.0)
        self.teacher.load_state_dict(self.student.state_dict())
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        for net in (self.student, self.teacher):
            net.autocast = dtype
            net.train()
            if compile_backbone:
                net.backbone_fn = torch.compile(net.backbone)
        lr = 5e-5 * args.batch / 256
        try:
            self.opt = torch.optim.AdamW(param_groups(self.student, lr, 0.04), betas=(0.9, 0.999), eps=1e-8,
                                         fused=True)
        except (RuntimeError, TypeError):
            self.opt = torch.optim.AdamW(param_groups(self.student, lr, 0.04), betas=(0.9, 0.999), eps=1e-8,
                                         foreach=True)
        self.s_params = [p for p in self.student.parameters()]
        self.t_params = [p for p in self.teacher.parameters()]
        g = torch.Generator().manual_seed(0)
        k = args.memory
        self.queue = F.normalize(torch.randn(k, 256, generator=g), dim=-1)
        self.ids = torch.arange(k) % NUM_MODALITIES  # full: gating on
        self.ptr = 0
        self.mean = torch.full((NUM_MODALITIES, 3), 0.45)
        self.std = torch.full((NUM_MODALITIES, 3), 0.25)
        self.momentum = 0.9995

    def normalize(self, crops, modality):  # uint8 [B, n, H, W, 3] -> [n, B, 3, H, W]
        x = crops.float() / 255.0
        x = (x - self.mean[modality][:, None, None, None]) / self.std[modality][:, None, None, None]
        return x.permute(1, 0, 4, 2, 3).contiguous()

    def __call__(self, batch):
        modality = batch["modality"]
        g = self.normalize(batch["global"], modality)
        crops = [g, self.normalize(batch["local"], modality)] if batch["local"].shape[1] else [g]
        with torch.no_grad():
            t_emb = self.teacher([g])
        s_emb = self.student(crops)
        k, p = self.queue.shape[0], min(16384, self.queue.shape[0])
        partition = torch.randperm(k).reshape(k // p, p)
        loss = memory_loss(s_emb, t_emb, self.queue, self.ids, modality, partition, 0.1, 0.07, gating=True)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grads = [q.grad for q in self.s_params if q.grad is not None]
        norms = torch._foreach_norm(grads)
        torch._foreach_mul_(grads, [torch.clamp(1.0 / (n + 1e-6), max=1.0) for n in norms])
        self.opt.step()
        with torch.no_grad():
            torch._foreach_mul_(self.t_params, self.momentum)
            torch._foreach_add_(self.t_params, self.s_params, alpha=1 - self.momentum)
            rows = t_emb[1]
            self.queue[self.ptr:self.ptr + rows.shape[0]] = rows
            self.ids[self.ptr:self.ptr + rows.shape[0]] = modality
            self.ptr = (self.ptr + rows.shape[0]) % k
        return loss.detach()


def matmul_peak(dtype, n=2048, reps=5, chain=4):
    a = torch.randn(n, n).to(dtype)
    b = (torch.randn(n, n) / math.sqrt(n)).to(dtype)
    best = float("inf")
    for _ in range(reps + 2):
        t = time.perf_counter()
        x = a
        for _ in range(chain):
            x = x @ b
        best = min(best, time.perf_counter() - t)
    return chain * 2 * n**3 / best


def time_mode(args, batch, dtype, compile_backbone):
    step = Step(args, dtype, compile_backbone)
    t0 = time.perf_counter()
    loss = float(step(batch))  # warm-up (and compile)
    first = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        loss = float(step(batch))
        times.append(time.perf_counter() - t)
    sec = float(np.median(times))
    return {"step_s_median": sec, "step_s_all": times, "first_step_s": first, "images_per_s": args.batch / sec,
            "loss": loss}


def write_loss_check(path, n_s=12, n_t=2, b=14, d=256, k=4096, block=1024, seed=0):
    """Random unit embeddings, a half-full-modality queue and a partition; the loss with and without gating."""
    g = torch.Generator().manual_seed(seed)
    unit = lambda x: F.normalize(x, dim=-1)  # noqa: E731
    student, teacher = unit(torch.randn(n_s, b, d, generator=g)), unit(torch.randn(n_t, b, d, generator=g))
    queue = unit(torch.randn(k, d, generator=g))
    ids = torch.randint(0, NUM_MODALITIES, (k,), generator=g)
    modality = torch.arange(b) % NUM_MODALITIES
    partition = torch.randperm(k, generator=g).reshape(k // block, block)
    out = {name: t.numpy() for name, t in dict(student=student, teacher=teacher, queue=queue, ids=ids,
                                               modality=modality, partition=partition).items()}
    for gating in (True, False):
        out[f"loss_gating_{gating}"] = np.float64(memory_loss(student.double(), teacher.double(), queue.double(), ids,
                                                              modality, partition, 0.1, 0.07, gating))
    np.savez(path, **out)
    print({k: float(v) for k, v in out.items() if k.startswith("loss")})


def run_jax(args, precision: str, torch_bf16_peak_tflops: float) -> dict:
    """bench/train_step.py at this benchmark's config in one policy, in a fresh interpreter."""
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "jax.json"
        cmd = [args.jax_python, str(pathlib.Path(__file__).with_name("train_step.py")), "--variant", args.variant,
               "--batch", str(args.batch), "--precision", precision, "--num-local", str(args.num_local),
               "--memory", str(args.memory), "--steps", str(args.steps), "--json", str(out),
               "--best-peak-gflops", str(torch_bf16_peak_tflops * 1e3)]
        if args.jax_parts:
            cmd.append("--parts")
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


def print_table(result: dict) -> None:
    """The side-by-side rows: images/s, s/step, and each JAX policy's ratio to every torch mode."""
    rows = [(f"torch {mode}", r.get("images_per_s"), r.get("step_s_median")) for mode, r in result["modes"].items()]
    rows += [(f"jax {p}", r["images_per_s"], r["step_s_median"]) for p, r in result.get("jax", {}).items()]
    print(f"\n{result['config']['variant']} batch {result['config']['batch']}:")
    for name, ips, sec in rows:
        print(f"  {name:22s} " + (f"{ips:6.3f} img/s {sec:7.2f} s/step" if ips else "failed"))
    for p, ratios in result.get("ratios_jax_over_torch", {}).items():
        print(f"  jax {p} / " + ", ".join(f"torch {m} {v:.2f}x" for m, v in ratios.items()))


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--variant", default="S/16")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--num-local", type=int, default=10)
    p.add_argument("--memory", type=int, default=131072)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--modes", default="bf16,bf16-compile,fp32")
    p.add_argument("--jax-python", default=None, help="also run bench/train_step.py with this interpreter")
    p.add_argument("--jax-precisions", default="float32,mixed,bfloat16",
                   help="the JAX step's precision policies to time, one subprocess each")
    p.add_argument("--jax-parts", action="store_true", help="pass --parts to the JAX run (its per-part breakdown)")
    p.add_argument("--json", default=None)
    p.add_argument("--check-loss", default=None, metavar="NPZ",
                   help="only write random loss inputs and this loss to NPZ (bench/train_step.py --check-loss-npz compares)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.check_loss:
        return write_loss_check(args.check_loss)

    rng = np.random.default_rng(0)
    b = args.batch
    batch = {
        "global": torch.from_numpy(rng.integers(0, 256, (b, 2, 224, 224, 3), dtype=np.uint8)),
        "local": torch.from_numpy(rng.integers(0, 256, (b, args.num_local, 96, 96, 3), dtype=np.uint8)),
        "modality": torch.from_numpy((np.arange(b) % NUM_MODALITIES).astype(np.int64)),
    }
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([pathlib.Path(sys.executable).name, *sys.argv]),
        "machine": {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__, "load_avg": os.getloadavg()},
        "config": {"variant": args.variant, "batch": b, "crops": f"2x224+{args.num_local}x96", "memory": args.memory},
        "matmul_peak_tflops": {"bfloat16": matmul_peak(torch.bfloat16) / 1e12,
                               "float32": matmul_peak(torch.float32) / 1e12},
        "modes": {},
    }
    for mode in args.modes.split(","):
        dtype = torch.bfloat16 if mode.startswith("bf16") else None
        try:
            result["modes"][mode] = time_mode(args, batch, dtype, mode.endswith("compile"))
        except Exception as e:  # noqa: BLE001 - torch.compile may fail on this machine; say so
            result["modes"][mode] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
        print(mode, json.dumps(result["modes"][mode]), flush=True)

    if args.jax_python:
        result["jax_full"], result["jax"], result["ratios_jax_over_torch"] = {}, {}, {}
        for precision in args.jax_precisions.split(","):
            jax_res = run_jax(args, precision, result["matmul_peak_tflops"]["bfloat16"])
            result["jax_full"][precision] = jax_res
            result["jax"][precision] = {k: jax_res[k] for k in (
                "images_per_s", "step_s_median", "mfu", "mfu_vs_fp32_peak", "mfu_vs_given_peak", "matmul_peak_tflops",
                "flops_analytic", "flops_xla_cost_analysis", "command")}
            result["ratios_jax_over_torch"][precision] = {
                mode: jax_res["images_per_s"] / r["images_per_s"] for mode, r in result["modes"].items()
                if "images_per_s" in r}
            print("jax", precision, json.dumps(result["jax"][precision]), flush=True)
        flops = next(iter(result["jax_full"].values()))["flops_analytic"]
        best_peak = max(result["matmul_peak_tflops"]["bfloat16"],
                        *(r["matmul_peak_tflops"]["bfloat16"] for r in result["jax_full"].values())) * 1e12
        for r in result["modes"].values():
            if "images_per_s" in r:
                r["mfu_vs_torch_bf16_peak"] = flops / r["step_s_median"] / (result["matmul_peak_tflops"]["bfloat16"] * 1e12)
                r["mfu_vs_best_peak"] = flops / r["step_s_median"] / best_peak
    print(json.dumps(result, indent=1))
    print_table(result)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
