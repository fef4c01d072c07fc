"""`make gpu-check`: the paper-scale figures on one GPU, within about 8 minutes on an H100.

- TopK and RA-SAE training steps alone at the paper's size, replayed from CUDA graphs against
  launched from Python: steps/s, and how far the two models are apart after the same steps;
- the loader alone as a GPU fit reads it (each shuffle window copied whole, batches gathered,
  decoded and standardised on the GPU): tokens/s over an epoch of the train split, and the
  largest difference from the host's standardised batches;
- TopK and RA-SAE training steps/s at the paper's size (d 768, 3,840 concepts, top-k 384,
  32,000 centroids, batch 4,096), through `archsae fit`'s own path (TokenStore -> Trainer,
  checkpoints and logs included) from a float16 store written on local disk, and the projected
  time of one epoch over the paper's 334M tokens (DINOv2 over ImageNet-1k);
- K-means seconds per iteration at 32,000 centroids (`archsae centroids`; faiss on the GPU when
  its build has GPU support, and it says which), with the time projected to 8.2M tokens;
- `archsae evaluate`'s pass at 32,000 random concepts on the GPU (three token kinds in one pass)
  over half the store, its peak GPU memory and its time projected to the paper's held-out split;
- extraction images/s of a DINOv2-shaped ViT-B/14 (random weights: speed and error only) in
  bf16 and fp16 autocast against float32 (`archsae extract --precision`), and the error of the
  16-bit tokens against the float32 ones (1 - R^2).
On a machine without CUDA it refuses in one line (exit 2).

    python -m benchmarks.gpu_check [--images 4096] [--niter 5] [--extract-images 2048]
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import PAPER_CONCEPTS, PAPER_D, PAPER_TOKENS, PAPER_TOKENS_PER_IMAGE, paper_store, result
from benchmarks.evaluate_scale import HELDOUT_TOKENS, SIZES, TARGET_GB, TARGET_MINUTES, measure
from archsae.fit.settings import PAPER_CENTROIDS

PAPER_BATCH = 4096
PAPER_KMEANS_TOKENS = 256 * PAPER_CENTROIDS  # faiss's cap per centroid, our default sample
GRAPH_STEPS = 300  # steps compared, then timed, with and without CUDA graphs
SILENT = 64  # codes that never fire in that comparison: AuxK's graphs are in it


def parse_args():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=4096,
                    help="images x 261 tokens in the store (4096: one epoch is 235 steps)")
    ap.add_argument("--niter", type=int, default=5, help="K-means iterations timed")
    ap.add_argument("--extract-images", type=int, default=2048)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--work", help="folder for the store (default: a temporary folder on local disk)")
    return ap.parse_args()


def kmeans(store_path: Path, niter: int) -> dict:
    """Seconds per iteration of `archsae centroids` at 32,000 centroids; with a faiss without GPU
    support, one iteration on 262,144 tokens (more would not fit the check's minutes)."""
    import faiss

    from archsae.cache import open_store
    from archsae.fit import CentroidSettings, centroid_set

    settings = (CentroidSettings(n_centroids=PAPER_CENTROIDS, niter=niter) if faiss.get_num_gpus() > 0
                else CentroidSettings(n_centroids=PAPER_CENTROIDS, niter=1, sample=1 << 18))
    name = centroid_set(store_path, settings, progress=True)
    meta = open_store(store_path).load_centroids(name)[1]
    per_iter = meta["seconds"] / meta["niter"]
    return {"name": name, "gpu": meta["gpu"], "tokens": meta["n_tokens_sampled"], "s_per_iter": per_iter,
            "s_per_iter_paper": per_iter * PAPER_KMEANS_TOKENS / meta["n_tokens_sampled"]}


def loader_on_device(store_path: Path, device: str, compared: int = 64) -> dict:
    """Tokens/s of one epoch of the train split's batches as a GPU fit reads them (windows
    copied whole, batches gathered there), and the largest difference of the first `compared`
    batches, decoded and standardised there, from the host's standardised ones."""
    from archsae.cache import TokenStore

    loader, dev = TokenStore(store_path, part="train"), torch.device(device)
    mean, std = loader.mean.to(dev), loader.std.to(dev)
    difference = 0.0
    pairs = zip(loader.batches(PAPER_BATCH, seed=0), loader.batches(PAPER_BATCH, seed=0, device=dev))
    for _, (x, y) in zip(range(compared), pairs):
        difference = max(difference, float(((loader.decode(y) - mean) / std - x.to(dev)).abs().max()))
    finish = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    finish()
    t, n = time.perf_counter(), 0
    for y in loader.batches(PAPER_BATCH, seed=1, device=dev):
        n += len(y)
    finish()
    return {"tokens_per_s": n / (time.perf_counter() - t), "difference": difference}


def steps_per_s(store_path: Path, work: Path, sae: str, centroids: str, args, cuda_graphs: bool = True) -> float:
    """Steps/s of a fit as users run it, from its own metrics.jsonl, leaving out the steps
    before the second logged row (start-up: allocations, kernel choice, first batches, and the
    CUDA graphs' warm-up and capture: a logged step's graph is captured at the second)."""
    from archsae.fit import FitSettings, fit, sae_settings

    settings = sae_settings(sae, PAPER_D, PAPER_CONCEPTS, centroids=centroids if sae == "ra" else None)
    cfg = FitSettings(epochs=1, batch_size=PAPER_BATCH, log_every=10, checkpoint_every=10**9,
                      device=args.device, cuda_graphs=cuda_graphs)
    out = work / f"fit-{sae}"
    fit(store_path, out, settings, cfg, progress=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[min(1, len(rows) - 2)], rows[-1]  # a short fit (the test's): from the first
    t = [r["step"] * PAPER_BATCH / r["tokens_per_s"] for r in (first, last)]
    return (last["step"] - first["step"]) / (t[1] - t[0])


def graphs_against_python(device: str, steps: int = GRAPH_STEPS) -> dict:
    """For TopK and RA-SAE at the paper's size, the step alone (batches already on the GPU,
    metrics every 20 steps as a fit logs them, AuxK's dead-code reads from step 50 on, with
    `SILENT` codes held silent by their bias so that AuxK runs, W's candidate centroids chosen
    anew every 50 updates) with and without CUDA graphs: the steps/s
    of each over `steps` steps after as many, and how far apart the models are after the first
    `steps` steps from the same start on the same batches (the largest difference of their
    atoms or encoder rows, relative to the largest entry), against two runs without graphs."""
    from archsae.fit import FitSettings, sae_settings
    from archsae.fit.step import TrainingStep

    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(0)
    xs = [torch.randn(PAPER_BATCH, PAPER_D, device=dev, generator=g) for _ in range(8)]
    points = torch.randn(PAPER_CENTROIDS, PAPER_D, device=dev, generator=g).cpu()

    def learned(step) -> list[torch.Tensor]:
        step.model.eval()  # the atoms computed afresh, not the training step's hull
        with torch.no_grad():
            out = [step.model.dictionary.weight().float().clone(), step.model.enc.weight.float().clone()]
        step.model.train()
        return out

    def apart(a, b) -> float:
        return max(float((x - y).abs().max() / x.abs().max()) for x, y in zip(a, b))

    out = {}
    for sae in ("topk", "ra"):
        settings = sae_settings(sae, PAPER_D, PAPER_CONCEPTS)
        models, rates = [], []
        for graphs in (False, False, True):
            cfg = FitSettings(batch_size=PAPER_BATCH, device=device, cuda_graphs=graphs,
                              dead_tokens=50 * PAPER_BATCH)
            step = TrainingStep(settings, cfg, points if sae == "ra" else None, 10 ** 6, dev)
            with torch.no_grad():
                step.model.enc.bias[:SILENT] = -1e3
            for i in range(steps):
                step(xs[i % len(xs)], metrics=i % 20 == 19)
            models.append(learned(step))
            torch.cuda.synchronize()
            t = time.perf_counter()
            for i in range(steps):
                step(xs[i % len(xs)], metrics=i % 20 == 19)
            torch.cuda.synchronize()
            rates.append(steps / (time.perf_counter() - t))
            del step
        out[sae] = {"python": rates[0], "graphs": rates[2], "difference": apart(models[0], models[2]),
                    "python_difference": apart(models[0], models[1])}
    return out


def evaluation(store_path: Path, device: str) -> dict:
    """The largest of `benchmarks.evaluate_scale`'s sizes, measured on the GPU at evaluate's
    default batch (4,096), projected to the paper's held-out split."""
    concepts = max(SIZES)
    m = measure(concepts, str(store_path), device=device, batch_size=4096)
    return {**m, "concepts": concepts,
            "minutes_paper": (m["per_token"] * HELDOUT_TOKENS + m["per_dictionary"]) / 60}


def extraction(args, work: Path) -> dict:
    """Images/s of the backbone's forward alone and of `archsae extract` (decoding included) at
    each precision, and the error of each precision's stored tokens against float32's."""
    from archsae.extract.demo_data import write_demo_shards
    from archsae.extract.presets import build_backbone
    from archsae.extract.run import PRECISIONS, extract

    device = torch.device(args.device)
    backbone = build_backbone("dinov2", "random", device=device)
    images = torch.randn(256, *backbone.data_config["input_size"], device=device)
    data = write_demo_shards(args.extract_images, out=work / "shards")
    out = {}
    for precision, dtype in PRECISIONS.items():
        with torch.inference_mode(), torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            backbone.features(images)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(5):
                backbone.features(images)
            torch.cuda.synchronize()
        forward = 5 * len(images) / (time.perf_counter() - t)
        t = time.perf_counter()
        store = extract("dinov2", data, work / f"extract-{precision}", weights="random", batch_size=256,
                        device=args.device, precision=precision, progress=False)
        out[precision] = {"forward": forward, "extract": args.extract_images / (time.perf_counter() - t),
                          "tokens": np.asarray(store.tokens[:]).astype(np.float32)}
    ref = out["float32"]["tokens"]
    centred = np.square(ref - ref.mean((0, 1))).sum()
    for o in out.values():
        o["error"] = float(np.square(o.pop("tokens") - ref).sum() / centred)
    return out


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        print("gpu-check needs a CUDA GPU and this machine has none: run `make gpu-check` on a GPU "
              "host (the CPU figures are in `make bench`)", file=sys.stderr)
        sys.exit(2)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory(prefix="archsae-gpu-", dir=args.work) as work:
        work = Path(work)
        t = time.perf_counter()
        paper_store(work / "store", args.images)
        print(f"store: {args.images} images x {PAPER_TOKENS_PER_IMAGE} tokens x {PAPER_D} float16 written in "
              f"{time.perf_counter() - t:.0f} s")
        km = kmeans(work / "store", args.niter)
        print(f"k-means K={PAPER_CENTROIDS} on {km['tokens']} tokens, faiss on "
              f"{'the GPU' if km['gpu'] else 'the CPU (no GPU build of faiss here)'}: "
              f"{km['s_per_iter']:.2f} s per iteration, {km['s_per_iter_paper']:.1f} s at 8.2M tokens")
        feed = loader_on_device(work / "store", args.device)
        print(f"loader on the device: {feed['tokens_per_s']:,.0f} tokens/s of float16 batches at "
              f"{PAPER_BATCH}; largest difference from the host's standardised batches "
              f"{feed['difference']:.1e}", flush=True)
        try:
            graphs = graphs_against_python(args.device)
        except Exception as exc:  # the other figures are still worth the GPU's minutes
            print(f"CUDA graphs of the step failed ({type(exc).__name__}: {exc}); the fits below run "
                  "without them", flush=True)
            graphs = {}
        for sae, o in graphs.items():
            print(f"{sae} step alone: {o['python']:.1f} steps/s launched from Python, {o['graphs']:.1f} "
                  f"replayed from CUDA graphs; after {GRAPH_STEPS} steps the models are {o['difference']:.1e} "
                  f"apart (two runs without graphs: {o['python_difference']:.1e})", flush=True)
        rates = {sae: steps_per_s(work / "store", work, sae, km["name"], args, cuda_graphs=bool(graphs))
                 for sae in ("topk", "ra")}
        ev = evaluation(work / "store", args.device)
        print(f"evaluate {ev['concepts']} concepts: {ev['tokens']} tokens in {ev['seconds']:.1f} s "
              f"({ev['per_token'] * 1e6:.1f} us per token, {ev['per_dictionary']:.1f} s per dictionary), "
              f"peak GPU memory {ev['peak_gb']:.1f} GB; {HELDOUT_TOKENS / 1e6:.1f}M tokens in "
              f"{ev['minutes_paper']:.1f} min")
        ext = extraction(args, work)
    epoch_min = {sae: PAPER_TOKENS / PAPER_BATCH / r / 60 for sae, r in rates.items()}
    for sae, r in rates.items():
        print(f"{sae}: {r:.1f} steps/s at batch {PAPER_BATCH} ({r * PAPER_BATCH / 1e6:.2f}M tokens/s), "
              f"one 334M-token epoch in {epoch_min[sae]:.1f} min")
    for precision, o in ext.items():
        print(f"extract {precision}: backbone {o['forward']:.0f} images/s, `archsae extract` (decoding "
              f"included) {o['extract']:.0f} images/s, 1 - R^2 against float32 {o['error']:.2e}")
    result("gpu_loader_tokens_per_s", feed["tokens_per_s"], ">=", 1100000)
    result("gpu_loader_device_vs_host_difference", feed["difference"], "<=", 1e-4, digits=6)
    result("gpu_topk_steps_per_s", rates["topk"], ">=", 272)
    result("gpu_ra_steps_per_s", rates["ra"], ">=", 272)
    result("gpu_ra_epoch_minutes", epoch_min["ra"], "<=", 5)
    result("gpu_ra_over_topk_step", rates["topk"] / rates["ra"], "<=", 1.5)
    for sae in ("topk", "ra"):  # nan: the graphs failed (said above)
        o = graphs.get(sae, {"graphs": float("nan"), "python": 1.0, "difference": float("nan")})
        result(f"gpu_{sae}_step_graphs_over_python", o["graphs"] / o["python"], ">=", 1.0)
        result(f"gpu_{sae}_graphs_vs_python_difference", o["difference"], "<=", 1e-3, digits=6)
    result(f"gpu_evaluate_minutes_{ev['concepts']}", ev["minutes_paper"], "<=", TARGET_MINUTES)
    result(f"gpu_evaluate_peak_gb_{ev['concepts']}", ev["peak_gb"], "<=", TARGET_GB)
    result("gpu_kmeans_s_per_iter_32k_8m_tokens", km["s_per_iter_paper"], "<=", 9)
    result("gpu_extract_forward_bf16_over_fp32", ext["bfloat16"]["forward"] / ext["float32"]["forward"], ">=", 1.5)
    result("gpu_extract_bf16_over_fp32", ext["bfloat16"]["extract"] / ext["float32"]["extract"], ">=", 1.0)
    result("gpu_extract_bf16_error", ext["bfloat16"]["error"], "<=", 1e-2)

if __name__ == "__main__":
    main()
