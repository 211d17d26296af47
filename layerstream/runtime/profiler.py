"""Per-unit time waiting for I/O, copying and computing, and bytes read: `--profile` and `last_stats`."""

from __future__ import annotations

from collections import defaultdict

from ..utils import fmt_bytes


class Profiler:
    """Per-unit time waiting for I/O, copying to the device and computing; bytes read."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.wait = defaultdict(float)
        self.copy = defaultdict(float)
        self.dequant = defaultdict(float)
        self.compute = defaultdict(float)
        self.calls = defaultdict(int)
        self.bytes_read = 0
        self.read_seconds = 0.0
        self.sweeps = 0
        self.sweep_tokens: list[int] = []   # new tokens per row in each sweep (a verification: 1 + drafted)
        self.allocations = 0
        # mixture of experts: one entry per experts call, (layer unit, experts routed, of which read from disk)
        self.experts: list[tuple[str, tuple[int, ...], int]] = []

    def reset(self):
        self.__init__(self.enabled)

    def report(self) -> str:
        names = list(self.calls)
        sweeps = max(self.sweeps, 1)
        lines = [f"{'unit':>10s} {'calls':>6s} {'wait ms':>9s} {'copy ms':>9s} {'compute ms':>11s}   (per call)"]
        for n in names:
            c = max(self.calls[n], 1)
            lines.append(f"{n:>10s} {self.calls[n]:6d} {1e3 * self.wait[n] / c:9.2f} {1e3 * self.copy[n] / c:9.2f} "
                         f"{1e3 * self.compute[n] / c:11.2f}")
        tw, tc, tk = sum(self.wait.values()), sum(self.copy.values()), sum(self.compute.values())
        td = sum(self.dequant.values())
        if self.experts:
            routed = sum(len(e[1]) for e in self.experts)
            lines.append(f"experts: {len(self.experts)} calls, {routed / len(self.experts):.2f} routed per call, "
                         f"{sum(e[2] for e in self.experts) / len(self.experts):.2f} of them read from disk")
        lines.append(f"total: wait {tw:.2f} s, copy {tc:.2f} s, compute {tk:.2f} s over {self.sweeps} sweeps; "
                     + (f"dequantize/convert {td:.2f} s on the loader; " if td else "") +
                     f"read {fmt_bytes(self.bytes_read)} ({fmt_bytes(self.bytes_read / sweeps)} per sweep"
                     + (f", {fmt_bytes(self.bytes_read / self.read_seconds)}/s on the loader"
                        if self.read_seconds else "")
                     + f"); buffer allocations {self.allocations}")
        return "\n".join(lines)
