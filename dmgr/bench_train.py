"""What training costs: the loader's tiles/s and, per architecture and data set, steps/s, images/s, the share
of time waiting on data, FLOPs per step against the device's measured matmul rate, and peak memory.

    python -m dmgr.bench_train [--archs demo_global,demo_local_mask] [--steps 8] [--device cpu|cuda]
                               [--frames 24] [--precision bf16] [--json FILE]
    make bench-train ARGS="..."          (also: python -m dmgr.bench --train ...)

The loader is timed on `--frames` grey 2448x2048 PNG frames (rendered once into outputs/bench-frames/):
256 px tiles through `TileDataset` from its frame cache (cold: the first use decodes the frames; warm), in
one process and through a DataLoader with the training command's automatic workers, against decoding each
tile's frame (the loader before the frame cache). Each architecture trains `--steps` timed steps (after one
untimed) at its batch size, in a process of its own (peak memory: the process's peak RSS above its start on a
CPU, torch's peak allocation on CUDA): a global architecture on tiles of the frames (and on the demo's 64 px
boards at 64 px), a local one on the demo's defect patches resized to its side. FLOPs per step are counted
by torch.utils.flop_counter (forward and backward of one batch); `matmul` is a timed square matmul in the
step's precision, so `FLOP share` = FLOPs per step x steps/s / that rate. On CUDA the steps run with
bf16 autocast (--precision), channels_last and the sdpa attention kernel.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import platform
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from dmgr import CONF_DIR, DEMO_DATA
from dmgr.cli import program
from dmgr.data.dataset import PatchDataset, TileDataset, TileSampler, to_model_range
from dmgr.diffusion import make_diffusion
from dmgr.diffusion.training import diffusion_loss
from dmgr.models import build_unet
from dmgr.models.precision import autocast
from dmgr.models.unet import set_attention_kernel
from dmgr.sampler.settings import has_mask_channel
from dmgr.train import workers_for

FRAMES = Path("outputs/bench-frames")
FRAME_SIZE = (2448, 2048)
BATCH = {"demo_global": 16, "global_128": 16, "global_256": 8}  # local architectures: 32
CPU_ARCHS = "demo_global,demo_local_mask"
GPU_ARCHS = "demo_global,demo_local_mask,global_128,global_256,local_mask_32,local_mask_64"


def grey_frames(folder: Path, count: int, size: tuple[int, int] = FRAME_SIZE) -> Path:
    """`count` grey PNG frames of `size` (smooth texture plus noise: PNG-compressed like camera frames)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        path = folder / f"frame-{i:03d}.png"
        if path.is_file():
            continue
        base = Image.fromarray(rng.integers(0, 256, (size[1] // 8, size[0] // 8), dtype=np.uint8))
        texture = np.asarray(base.resize(size, Image.BICUBIC)).astype(np.int16)
        noisy = texture + rng.integers(-8, 9, texture.shape)
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path)
    return folder


def tiles_per_second(dataset: TileDataset, batch: int, steps: int, workers: int) -> float:
    """Tiles/s of whole batches through a DataLoader (workers 0: in this process)."""
    loader = DataLoader(dataset, batch_sampler=TileSampler(len(dataset), batch, 0, 0, 0, steps), num_workers=workers)
    start, count = time.perf_counter(), 0
    for tiles in loader:
        count += tiles.shape[0]
    return count / (time.perf_counter() - start)


def loader_bench(folder: Path, size: int = 256, batch: int = 32, steps: int = 60) -> dict:
    """The loader's tiles/s: decoding each tile's frame, the frame cache cold and warm, with workers."""
    cache = folder / ".frames"
    for old in cache.glob("*.npy"):
        old.unlink()
    start = time.perf_counter()
    cached = TileDataset(folder, size, raw=True)  # as training reads them: uint8, made float on the device
    result = {"frames": len(cached), "tile": size, "cache_build_s": time.perf_counter() - start}
    result["decode_each_tile"] = tiles_per_second(TileDataset(folder, size, cache=False), 4, 4, 0)
    result["cache_cold"] = tiles_per_second(cached, batch, steps, 0)
    result["cache_warm"] = tiles_per_second(cached, batch, steps, 0)
    workers = workers_for("auto", cached, 1)
    result["auto_workers"] = workers
    result["cache_workers"] = tiles_per_second(cached, batch, steps, workers) if workers else result["cache_warm"]
    return result


def matmul_rate(device: str, precision: str, n: int = 2048) -> float:
    """FLOP/s of an n x n matmul in the step's dtype on the device."""
    dtype = torch.bfloat16 if precision == "bf16" and device.startswith("cuda") else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    repeats = 50 if device.startswith("cuda") else 2
    best = float("inf")
    for _ in range(3):  # the best of three rounds: a shared machine's other work slows some
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 * repeats / best


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def arch_config(name: str) -> dict:
    return yaml.safe_load((Path(CONF_DIR) / "arch" / f"{name}.yaml").read_text())


def dataset_for(arch: dict, data: str, frames: Path):
    size = int(arch["config"]["image_size"])
    if arch["role"] == "global":
        return TileDataset(frames if data == "frames" else Path(DEMO_DATA) / "global", size, raw=True)
    return PatchDataset(Path(DEMO_DATA) / "local", list(arch["classes"]), size=size, flip=True,
                        with_masks=has_mask_channel(int(arch["config"].get("in_channels", 3))))


def train_case(name: str, data: str, frames: str, steps: int, device: str, precision: str, threads: int | None) -> dict:
    """One architecture on one data set, in its own process: the timed steps and their cost."""
    if threads:
        torch.set_num_threads(threads)
    arch = arch_config(name)
    cuda = device.startswith("cuda")
    batch = BATCH.get(name, 32)
    dataset = dataset_for(arch, data, Path(frames))
    workers = workers_for("auto", dataset, 1)
    if isinstance(dataset, TileDataset):
        loader = DataLoader(dataset, batch_sampler=TileSampler(len(dataset), batch, 0, 0, 0, steps + 1),
                            num_workers=workers, pin_memory=cuda, prefetch_factor=4 if workers else None)
    else:
        loader = DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers)
    start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = build_unet(arch["config"]).to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
        set_attention_kernel(model, "sdpa")
        torch.cuda.reset_peak_memory_stats(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    diffusion = make_diffusion(1000, "linear")
    g = torch.Generator().manual_seed(0)
    flops, waited, timed = 0.0, 0.0, 0.0
    batches = iter(loader)
    for step in range(steps + 1):  # step 0: untimed, its FLOPs counted
        started = time.perf_counter()
        batch_data = next(batches)
        wait = time.perf_counter() - started
        x0, y = (batch_data[0], batch_data[1].long()) if isinstance(batch_data, list) else (batch_data, None)
        x0 = to_model_range(x0.to(device, non_blocking=True))
        x0 = x0.contiguous(memory_format=torch.channels_last) if cuda else x0
        y = y.to(device) if y is not None else None
        t = torch.randint(0, 1000, (x0.shape[0],), generator=g).to(device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        counter = FlopCounterMode(display=False) if step == 0 else None
        with counter or contextlib.nullcontext():
            with autocast(torch.device(device).type, precision):
                loss = diffusion_loss(model, diffusion, x0, t, noise, y)["loss"].mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        synchronize(device)
        if counter is not None:
            flops = counter.get_total_flops()
        else:
            waited += wait
            timed += time.perf_counter() - started
    peak = (torch.cuda.max_memory_allocated(device) if cuda else
            (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start_rss) * 1024)
    return {"arch": name, "data": data, "batch": batch, "workers": workers, "steps": steps,
            "parameters": sum(p.numel() for p in model.parameters()), "flops_per_step": flops,
            "steps_per_s": steps / timed, "images_per_s": steps * batch / timed,
            "data_wait": waited / timed, "peak_memory_bytes": peak}


def cases(archs: list[str]) -> list[tuple[str, str]]:
    """(architecture, data set): global ones on the frames, and on the demo boards where they are 64 px."""
    out = []
    for name in archs:
        arch = arch_config(name)
        if arch["role"] == "local":
            out.append((name, "demo patches"))
        else:
            if int(arch["config"]["image_size"]) == 64:
                out.append((name, "demo boards"))
            out.append((name, "frames"))
    return out


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    fmt = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *map(fmt, rows)])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=program("dmgr.bench_train"), description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", default=None, help=f"conf/arch names (default: {CPU_ARCHS} on cpu; on cuda "
                                                 f"{GPU_ARCHS})")
    p.add_argument("--steps", type=int, default=8, help="timed training steps per case (after one untimed)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--precision", default=None, help="autocast: fp32, bf16, fp16 (default: bf16 on cuda, fp32)")
    p.add_argument("--frames", type=int, default=24, help="grey 2448x2048 frames of the loader benchmark")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per case (default: torch's)")
    p.add_argument("--no-loader", action="store_true", help="skip the loader's tiles/s")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        parser().error(f"--device {args.device}: no CUDA device is visible here")
    precision = args.precision or ("bf16" if cuda else "fp32")
    archs = [a.strip() for a in (args.archs or (GPU_ARCHS if cuda else CPU_ARCHS)).split(",") if a.strip()]
    where = torch.cuda.get_device_name(args.device) if cuda else (
        f"{platform.processor() or platform.machine()}, {args.threads or torch.get_num_threads()} threads")
    print(f"training benchmark: torch {torch.__version__}, {where}, precision {precision}", flush=True)
    frames = grey_frames(FRAMES, args.frames)
    results: dict = {"device": where, "precision": precision}
    if not args.no_loader:
        r = results["loader"] = loader_bench(frames)
        print(f"loader: {r['frames']} grey 2448x2048 PNG frames, {r['tile']} px tiles: decoding each tile's frame "
              f"{r['decode_each_tile']:.0f} tiles/s; frame cache built in {r['cache_build_s']:.1f} s, then "
              f"{r['cache_cold']:.0f} tiles/s cold, {r['cache_warm']:.0f} warm, {r['cache_workers']:.0f} with "
              f"{r['auto_workers']} workers (auto)", flush=True)
    rate = matmul_rate(args.device, precision)
    results["matmul_flops_per_s"] = rate
    print(f"matmul rate: {rate / 1e12:.3f} TFLOP/s ({precision})", flush=True)
    rows, results["cases"] = [], []
    context = multiprocessing.get_context("spawn")
    todo = cases(archs)
    if any(data.startswith("demo") for _, data in todo) and not Path(DEMO_DATA).is_dir():
        print(f"no demo data at {DEMO_DATA}: the demo boards and patches are left out (`make data` writes them)")
        todo = [(name, data) for name, data in todo if not data.startswith("demo")]
    for name, data in todo:
        with ProcessPoolExecutor(1, mp_context=context) as pool:  # a process each: its own peak memory
            r = pool.submit(train_case, name, data, str(frames), args.steps, args.device, precision,
                            args.threads).result()
        results["cases"].append(r)
        share = r["flops_per_step"] * r["steps_per_s"] / rate
        rows.append([name, data, r["batch"], f"{r['parameters'] / 1e6:.1f} M", f"{r['flops_per_step'] / 1e9:.0f}",
                     f"{r['steps_per_s']:.3g}", f"{r['images_per_s']:.3g}", f"{r['data_wait']:.1%}",
                     f"{share:.0%}", f"{r['peak_memory_bytes'] / 2**20:.0f} MiB"])
        print(f"{name} on {data}: {r['steps_per_s']:.3g} steps/s", flush=True)
    print()
    print(table(rows, ["arch", "data", "batch", "params", "GFLOP/step", "steps/s", "images/s", "data wait",
                       "FLOP share", "peak memory"]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
