"""Timers for the benchmarks: CUDA events on a GPU (no host sync inside the timed work), wall clock on CPU."""

from __future__ import annotations

import statistics
import time

import torch


class Clock:
    """Marks points in a step; CUDA events on a GPU (no host sync inside the step: the host may run ahead of the
    device, and the waits still count), wall clock on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []
        self.done: list[float] = []  # seconds of the intervals read so far

    def mark(self) -> None:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self, wait: bool = False) -> list[float]:
        """Seconds between consecutive marks whose end the device has reached, without waiting (``wait``: all of
        them, one sync)."""
        if wait and self.cuda:
            torch.cuda.synchronize()
        while len(self.done) + 1 < len(self.marks):
            a, b = self.marks[len(self.done)], self.marks[len(self.done) + 1]
            if not self.cuda:
                self.done.append(b - a)
            elif b.query():
                self.done.append(a.elapsed_time(b) / 1e3)
            else:
                break
        return self.done

    def intervals_ms(self) -> list[float]:
        """Milliseconds between consecutive marks (synchronizes the device once)."""
        return [1e3 * t for t in self.seconds(wait=True)]

    def reset(self) -> None:
        self.marks, self.done = [], []


def cuda_ms(fn) -> float:
    """Milliseconds of one call of ``fn`` on the GPU, between two CUDA events (waits for the second)."""
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b)


def median(xs):
    """The median of the values that are not None; None when there are none."""
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None
