"""Paired, alternating timings: a function against its peer, measured in the same run."""

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
