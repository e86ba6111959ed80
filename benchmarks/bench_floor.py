"""The float32 floor: how fast an eval stage of resnet18 and multitask can be on this CPU, one thread.

The suite's targets ask the compiled eval stage for <= 0.6x the hand-written eager module on resnet18 and
multitask.  This script measures whether float32 arithmetic on this machine allows it:

1. The machine: float32 peak (the fastest rate any kernel here reached: ``torch.mm`` on square matrices
   of 512-2048, the 1024-square product as a oneDNN 1x1 convolution, or one of the layers below) and
   streaming read bandwidth (``sum`` of a 64 MB tensor).
2. Every convolution and linear layer of one inference call of the hand-written module (forward hooks):
   its multiply-adds, weight bytes, and time run alone through oneDNN on a random input of its shape.
3. A roofline floor: each layer takes at least max(2 * multiply-adds / peak, weight bytes / bandwidth).
   The floor ignores activations and every other op, so no float32 implementation on this core can beat
   it (unless it keeps weights in cache between calls, which matters for resnet18's last layers only).
   Set beside hand-written eager (best of interleaved rounds) and the compiled stage
   (``compile_stage(..., compile=True)``), with the share of the compiled stage's time spent inside oneDNN
   and MKL kernels (``torch.profiler``).
4. The slowest layer bound by weight bytes, run through every float32 kernel torch offers for it, with its
   weights cold (cycling through copies that overflow the last-level cache, as they are in a call of the
   whole model when its weights exceed that cache): how fast any of them reads the weights.

    python benchmarks/bench_floor.py --markdown benchmarks/results/floor.md
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.benchmark import Timer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.workloads import Workload, build_workloads
from torchbricks_fx import Stage, compile_stage

COMMAND = "python benchmarks/bench_floor.py --markdown benchmarks/results/floor.md"
TARGET = 0.6


@dataclass(frozen=True)
class Machine:
    mm_gflops: float  # matrix products: torch.mm at three sizes and a 1x1 convolution, the best
    bandwidth_gbs: float
    layer_gflops: float = 0.0  # the fastest layer measured alone

    @property
    def peak_gflops(self) -> float:
        return max(self.mm_gflops, self.layer_gflops)


@dataclass(frozen=True)
class Layer:
    description: str  # kind, channels, kernel, stride and input size: identical layers group together
    macs: int
    weight_bytes: int
    alone_seconds: float

    @property
    def gflops(self) -> float:
        return 2 * self.macs / self.alone_seconds / 1e9

    def floor_seconds(self, machine: Machine) -> float:
        return max(2 * self.macs / (machine.peak_gflops * 1e9), self.weight_bytes / (machine.bandwidth_gbs * 1e9))

    def bound_by_weights(self, machine: Machine) -> bool:
        return self.weight_bytes / (machine.bandwidth_gbs * 1e9) > 2 * self.macs / (machine.peak_gflops * 1e9)


@dataclass(frozen=True)
class WeightBoundLayer:
    description: str
    weight_bytes: int
    seconds: dict[str, float]  # kernel -> seconds per call, weights cold
    streaming_seconds: float  # reading the same bytes with sum


@dataclass(frozen=True)
class WorkloadFloor:
    name: str
    layers: tuple[Layer, ...]
    eager_seconds: float
    compiled_seconds: float
    compiled_choice: str
    kernel_share: float  # of a compiled call's time, inside oneDNN and MKL kernels (profiled)
    weight_bound: WeightBoundLayer | None

    def floor_seconds(self, machine: Machine) -> float:
        return sum(layer.floor_seconds(machine) for layer in self.layers)

    @property
    def gflop(self) -> float:
        return 2 * sum(layer.macs for layer in self.layers) / 1e9

    @property
    def alone_seconds(self) -> float:
        return sum(layer.alone_seconds for layer in self.layers)

    @property
    def largest(self) -> Layer:
        return max(self.layers, key=lambda layer: layer.alone_seconds)


def median_seconds(fn: Callable[[], object], min_run_time: float) -> float:
    return Timer(stmt="fn()", globals={"fn": fn}, num_threads=1).blocked_autorange(min_run_time=min_run_time).median


def measure_machine(min_run_time: float) -> Machine:
    gflops = []
    for n in (512, 1024, 2048):
        a, b = torch.randn(n, n), torch.randn(n, n)
        gflops.append(2 * n**3 / median_seconds(functools.partial(torch.mm, a, b), min_run_time) / 1e9)
    # The same product as a 1x1 convolution goes through oneDNN, not BLAS (faster on some CPUs).
    image, weight = torch.randn(1, 1024, 32, 32), torch.randn(1024, 1024, 1, 1)
    seconds = median_seconds(lambda: torch.nn.functional.conv2d(image, weight), min_run_time)
    gflops.append(2 * 1024**3 / seconds / 1e9)
    stream = torch.randn(16 * 1024 * 1024)  # 64 MB: larger than the last-level cache a core can use
    bandwidth = stream.numel() * 4 / median_seconds(stream.sum, min_run_time) / 1e9
    return Machine(max(gflops), bandwidth)


def _describe(module: nn.Module, shape: torch.Size) -> str:
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return (f"conv {module.in_channels}->{module.out_channels} {kh}x{kw}/{module.stride[0]} "
                f"on {shape[-2]}x{shape[-1]}")
    return f"linear {module.in_features}->{module.out_features}"


def _macs(module: nn.Module, output: torch.Tensor) -> int:
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return output.numel() * module.in_channels // module.groups * kh * kw
    assert isinstance(module, nn.Linear)  # measure_layers hooks nothing else
    return output.numel() * module.in_features


def layer_calls(hand_written: nn.Module, args: list[torch.Tensor]) -> list[tuple[nn.Module, torch.Size, torch.Tensor]]:
    """Every convolution and linear layer one call of ``hand_written`` runs: (layer, input shape, output)."""
    calls: list[tuple[nn.Module, torch.Size, torch.Tensor]] = []
    hooks = [module.register_forward_hook(lambda m, inputs, output: calls.append((m, inputs[0].shape, output)))
             for module in hand_written.modules() if isinstance(module, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            hand_written(*args)
    finally:
        for hook in hooks:
            hook.remove()
    return calls


def measure_layers(calls: list[tuple[nn.Module, torch.Size, torch.Tensor]], min_run_time: float) -> tuple[Layer, ...]:
    layers = []
    for module, shape, output in calls:
        sample = torch.randn(shape)
        with torch.no_grad():
            alone = median_seconds(functools.partial(module, sample), min_run_time)
        layers.append(Layer(_describe(module, shape), _macs(module, output), _weight_bytes(module), alone))
    return tuple(layers)


def _weight_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def last_level_cache_bytes() -> int:
    """The largest CPU cache (Linux sysfs; 32 MB where it cannot be read)."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = entry.read_text().strip()
        if text[:-1].isdigit() and text[-1] in "KM":
            sizes.append(int(text[:-1]) * (1024 if text[-1] == "K" else 1024**2))
    return max(sizes, default=32 * 1024**2)


def measure_weight_bound(conv: nn.Conv2d, shape: torch.Size, min_run_time: float) -> WeightBoundLayer:
    """``conv`` through each float32 kernel torch has for it, on copies of its weights that overflow the
    last-level cache three times, so that every call reads its weights from memory."""
    weight_bytes = _weight_bytes(conv)
    copies = max(2, -(-3 * last_level_cache_bytes() // weight_bytes))
    weights = [torch.randn_like(conv.weight) for _ in range(copies)]
    bias = torch.zeros(conv.out_channels)
    image = torch.randn(shape)
    padding = tuple(conv.padding) if isinstance(conv.padding, tuple) else conv.padding  # 'same' / 'valid'
    if isinstance(padding, str):
        raise ValueError(f"padding={padding!r}: give {conv} its padding in pixels")
    geometry = (list(padding), list(conv.stride), list(conv.dilation), conv.groups)
    # As a frozen Inductor graph runs it: weights reordered once for oneDNN, activations channels-last.
    packed = [torch.ops.mkldnn._reorder_convolution_weight(w, *geometry, list(shape)) for w in weights]
    channels_last = image.contiguous(memory_format=torch.channels_last)
    # The same product as a matrix product over the unfolded input: rows = batch x output pixels.
    columns = F.unfold(image, conv.kernel_size, conv.dilation, padding, conv.stride)
    rows = columns.transpose(1, 2).reshape(-1, columns.shape[1]).contiguous()
    matrices = [w.reshape(conv.out_channels, -1) for w in weights]
    kernels: dict[str, Callable[[], object]] = {
        "oneDNN, weights prepacked (the frozen stage's kernel)": lambda: [
            torch.ops.mkldnn._convolution_pointwise(channels_last, w, bias, *geometry, "none", [], "")
            for w in packed],
        "oneDNN as eager runs it (weights reordered per call)": lambda: [
            F.conv2d(image, w, bias, conv.stride, conv.padding, conv.dilation, conv.groups) for w in weights],
        "BLAS matrix product on the unfolded input": lambda: [F.linear(rows, m, bias) for m in matrices],
    }
    if torch.backends.mkl.is_available():
        count = rows.shape[0]
        mkl_packed = [(torch.ops.mkl._mkl_reorder_linear_weight(m, count), m) for m in matrices]
        kernels["MKL, weights prepacked, on the unfolded input"] = lambda: [
            torch.ops.mkl._mkl_linear(rows, p, m, bias, count) for p, m in mkl_packed]
    with torch.no_grad():
        seconds = {name: median_seconds(kernel, min_run_time) / copies for name, kernel in kernels.items()}
    streaming = median_seconds(lambda: [w.sum() for w in weights], min_run_time) / copies
    return WeightBoundLayer(_describe(conv, shape), weight_bytes, seconds, streaming)


def measure_kernel_share(call: Callable[[], object], calls: int = 20) -> float:
    """The share of ``call``'s time spent inside oneDNN and MKL kernels (their self time under the
    profiler, over the profiled calls' wall time)."""
    call()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        start = time.perf_counter()
        for _ in range(calls):
            call()
        wall = time.perf_counter() - start
    inside = sum(event.self_cpu_time_total for event in profile.key_averages()
                 if event.key.startswith(("mkldnn::", "mkl::")))
    return inside / 1e6 / wall


def measure_workload(workload: Workload, machine: Machine, rounds: int, min_run_time: float) -> WorkloadFloor:
    args = [workload.named_inputs[name] for name in workload.input_names]
    hand_written, named_inputs = workload.hand_written, workload.named_inputs
    workload.collection.eval()
    stage = compile_stage(workload.collection, Stage.INFERENCE, outputs=list(workload.outputs), compile=True)
    stage(named_inputs)  # compiles and chooses

    def eager() -> object:
        with torch.no_grad():
            return hand_written(*args)

    # Interleaved rounds, best median of each: drift on a shared machine hits both alike.
    eager_times, compiled_times = [], []
    for _ in range(rounds):
        eager_times.append(median_seconds(eager, min_run_time))
        compiled_times.append(median_seconds(lambda: stage(named_inputs), min_run_time))
    calls = layer_calls(hand_written, args)
    layers = measure_layers(calls, min_run_time / 3)
    choice = stage.compiled.choice if stage.compiled is not None else None
    kernel_share = measure_kernel_share(lambda: stage(named_inputs))
    return WorkloadFloor(workload.name, layers, min(eager_times), min(compiled_times), str(choice), kernel_share,
                         _weight_bound(calls, layers, machine, min_run_time))


def _weight_bound(calls: list[tuple[nn.Module, torch.Size, torch.Tensor]], layers: tuple[Layer, ...],
                  machine: Machine, min_run_time: float) -> WeightBoundLayer | None:
    """The slowest convolution that reads more weight bytes than its arithmetic needs time for, when the
    model's weights overflow the last-level cache (else they stay in cache between calls)."""
    if sum(layer.weight_bytes for layer in layers) <= last_level_cache_bytes():
        return None
    bound = [(layer.alone_seconds, module, shape) for (module, shape, _), layer in zip(calls, layers, strict=True)
             if isinstance(module, nn.Conv2d) and layer.bound_by_weights(machine)]
    if not bound:
        return None
    _, conv, shape = max(bound, key=lambda item: item[0])
    return measure_weight_bound(conv, shape, min_run_time)


def _grouped(layers: tuple[Layer, ...]) -> list[tuple[Layer, int]]:
    groups: dict[str, list[Layer]] = {}
    for layer in layers:
        groups.setdefault(layer.description, []).append(layer)
    return [(same[0], len(same)) for same in groups.values()]


def render(machine: Machine, results: list[WorkloadFloor]) -> str:
    lines = ["## The float32 floor", "", f"Command: `{COMMAND}`  ",
             f"torch {torch.__version__}, 1 thread, inference stage, batch 2, float32. This core: "
             f"**{machine.peak_gflops:.0f} GFLOP/s** peak, the fastest rate measured (matrix products: `torch.mm` "
             f"at 512/1024/2048 square and 1024x1024 as a 1x1 convolution, best {machine.mm_gflops:.0f}; the "
             f"fastest layer alone: {machine.layer_gflops:.0f}), "
             f"and **{machine.bandwidth_gbs:.1f} GB/s** streaming read (sum of 64 MB). Floor = sum over the "
             "convolution and linear layers of max(FLOPs / peak, weight bytes / bandwidth); it leaves out "
             "activations and every other op. Times are the best of interleaved rounds; layers alone run "
             "through oneDNN as eager runs them (weights reordered on each call).", "",
             "| workload | conv + linear GFLOP | hand-written eager (ms) | compiled stage (ms) | of its time, in "
             "oneDNN and MKL kernels (profiled) | largest layer alone (ms) | floor (ms) | 0.6x needs | 0.6x within "
             "the floor? |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for result in results:
        eager, floor, largest = result.eager_seconds, result.floor_seconds(machine), result.largest
        needs = result.gflop / (TARGET * eager)
        verdict = "yes" if floor <= TARGET * eager else "**no**: even the floor is slower"
        lines.append(
            f"| {result.name} | {result.gflop:.3f} | {eager * 1e3:.2f} (1.00x) | {result.compiled_seconds * 1e3:.2f} "
            f"({result.compiled_seconds / eager:.2f}x, {result.compiled_choice}) | "
            f"{result.kernel_share:.0%} | "
            f"{largest.alone_seconds * 1e3:.2f} ({largest.alone_seconds / eager:.2f}x: {largest.description}) | "
            f"{floor * 1e3:.2f} ({floor / eager:.2f}x) | {needs:.0f} GFLOP/s sustained | {verdict} |")
    for result in results:
        lines += ["", f"{result.name}, layer by layer (identical layers grouped; alone = the layer's own oneDNN "
                      "call, GFLOP/s = what it reached):", "",
                  "| layer | count | MFLOP each | weights (MB) | alone (us) | GFLOP/s | floor (us) | bound by |",
                  "|---|---:|---:|---:|---:|---:|---:|---|"]
        for layer, count in _grouped(result.layers):
            bound = "weight bytes" if layer.bound_by_weights(machine) else "arithmetic"
            lines.append(f"| {layer.description} | {count} | {2 * layer.macs / 1e6:.1f} | "
                         f"{layer.weight_bytes / 1e6:.2f} | {layer.alone_seconds * 1e6:.0f} | "
                         f"{layer.gflops:.0f} | "
                         f"{layer.floor_seconds(machine) * 1e6:.0f} | {bound} |")
    for result in results:
        if result.weight_bound is not None:
            lines += ["", *_render_weight_bound(result.name, result.weight_bound)]
    return "\n".join(lines) + "\n"


def _render_weight_bound(name: str, layer: WeightBoundLayer) -> list[str]:
    lines = [f"{name}'s slowest weight-bound layer, {layer.description} ({layer.weight_bytes / 1e6:.2f} MB of "
             f"weights), through each float32 kernel torch has for it, weights cold (read from memory on every "
             f"call, as in a call of the whole model, whose weights overflow the last-level cache); reading the "
             f"same bytes with `sum` takes {layer.streaming_seconds * 1e6:.0f} us "
             f"({layer.weight_bytes / layer.streaming_seconds / 1e9:.1f} GB/s):", "",
             "| kernel | us per call | weights read at (GB/s) | vs reading them with `sum` |", "|---|---:|---:|---:|"]
    for kernel, seconds in sorted(layer.seconds.items(), key=lambda item: item[1]):
        lines.append(f"| {kernel} | {seconds * 1e6:.0f} | {layer.weight_bytes / seconds / 1e9:.1f} | "
                     f"{seconds / layer.streaming_seconds:.1f}x |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--markdown", type=Path, help="write the report section here")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of eager and compiled")
    parser.add_argument("--min-run-time", type=float, default=0.3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print("measuring the machine ...", file=sys.stderr, flush=True)
    machine = measure_machine(args.min_run_time)
    results = []
    for workload in build_workloads(["resnet18", "multitask"]):
        print(f"measuring {workload.name} ...", file=sys.stderr, flush=True)
        results.append(measure_workload(workload, machine, args.rounds, args.min_run_time))
    fastest_layer = max(layer.gflops for result in results for layer in result.layers)
    machine = dataclasses.replace(machine, layer_gflops=fastest_layer)
    report = render(machine, results)
    print(report)
    if args.markdown:
        from torchbricks_fx.files import write_text

        write_text(args.markdown, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
