"""Paired, alternating timings: a function against its peer, measured in the same run."""

import argparse
import statistics
import time

import torch


def timed(fn, device: torch.device) -> float:
    """Seconds one call of `fn` takes (synchronising the GPU around it)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def paired_ratio(fn, peer, device: torch.device, repeats: int) -> tuple[float, float, float]:
    """Median seconds of `fn` and `peer`, and the median of per-pair ratios; the order alternates each pair."""
    fn(), peer()  # warm-up
    times, peer_times, ratios = [], [], []
    for i in range(repeats):
        first, second = (fn, peer) if i % 2 == 0 else (peer, fn)
        t_first, t_second = timed(first, device), timed(second, device)
        t_fn, t_peer = (t_first, t_second) if i % 2 == 0 else (t_second, t_first)
        times.append(t_fn), peer_times.append(t_peer), ratios.append(t_fn / t_peer)
    return statistics.median(times), statistics.median(peer_times), statistics.median(ratios)


def benchmark_parser(doc: str, presets, repeats: int) -> argparse.ArgumentParser:
    """The flags every model benchmark takes: --preset, --batch_size, --repeats, --dtype, --device."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=presets, default="demo")
    parser.add_argument("--batch_size", type=int)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def device_and_dtype(args) -> tuple[torch.device, torch.dtype]:
    """Seed torch and return the parsed device and dtype."""
    torch.manual_seed(0)
    return torch.device(args.device), getattr(torch, args.dtype)
