"""
Device and precision: which device, which dtype (measured on CPUs), autocast, torch.compile, DDP's process setup,
and the peak FLOP/s that MFU divides by.
"""
import contextlib
import os
import time

import torch
import torch.distributed as dist

from common import UserError


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name="auto"):
    """'auto' -> cuda > mps > cpu; any other name (cpu, cuda, cuda:N, mps) is checked to exist here."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    present = {"cpu": True, "mps": torch.backends.mps.is_available(),
               "cuda": torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()}
    if not present.get(device.type, False):
        raise UserError(f"device {name!r} is not available on this machine: use auto or cpu")
    return name


def amp_dtype(device_type, dtype="auto"):
    """The autocast dtype, or None for plain fp32. 'auto': bf16 on GPUs that have it, else fp16 (train
    with a GradScaler); on a CPU bf16 where its matmuls measure faster than fp32's (cpu_auto_dtype), else
    fp32. Never fp16 on a CPU: it is emulated there, orders of magnitude slower than fp32. MPS stays fp32
    unless asked."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise UserError(f"dtype must be auto, float32, bfloat16 or float16, not {dtype!r}")
        if dtype == "float16" and device_type == "cpu":
            raise UserError("float16 is emulated on CPUs (far slower than fp32): use bfloat16 or float32")
        if dtype == "bfloat16" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UserError("this GPU has no bfloat16: use float16 (or auto)")
        return None if dtype == "float32" else DTYPES[dtype]
    if device_type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device_type == "cpu":
        return cpu_auto_dtype()[0]
    return None


def matmul_flops(device, dtype, n, reps):
    """FLOP/s of an n x n matmul in dtype on device: the best of reps products, after one untimed product (it
    pays for allocation, packing and kernel selection). The random numbers come from a generator of its own, so
    measuring never shifts a seeded run."""
    a = torch.randn(n, n, device=device, generator=torch.Generator(device).manual_seed(0)).to(dtype)
    sync = getattr(torch, torch.device(device).type).synchronize  # a no-op on a CPU
    seconds = []
    for _ in range(reps + 1):
        sync()
        t0 = time.perf_counter()
        a @ a
        sync()
        seconds.append(time.perf_counter() - t0)
    return 2 * n ** 3 / min(seconds[1:])


_MATMUL_GFLOPS = {}  # thread count -> measured speeds: measured once per process


def cpu_matmul_gflops(n=1024, reps=3):
    """This CPU's matmul speed with the current thread count, {"float32": GFLOP/s, "bfloat16": GFLOP/s}
    (matmul_flops: well under a second where bf16 is native)."""
    threads = torch.get_num_threads()
    if threads not in _MATMUL_GFLOPS:
        _MATMUL_GFLOPS[threads] = {name: matmul_flops("cpu", DTYPES[name], n, reps) / 1e9
                                   for name in ("float32", "bfloat16")}
    return _MATMUL_GFLOPS[threads]


def cpu_auto_dtype():
    """dtype=auto on a CPU -> (bf16, or None for fp32; why, in words): bf16 autocast where this CPU multiplies
    bf16 matrices faster than fp32 ones. Measured rather than read from CPU flags: some CPUs that report
    AVX512-BF16 run bf16 matmuls slower than fp32 (docs/training.md, Speed on a 2-core CPU)."""
    speed = cpu_matmul_gflops()
    bf16, fp32 = speed["bfloat16"], speed["float32"]
    choice = torch.bfloat16 if bf16 > fp32 else None
    return choice, (f"{'bfloat16' if choice else 'float32'} (bf16 matmul {bf16:.0f} GFLOP/s vs fp32 {fp32:.0f} "
                    f"on this CPU, {torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''})")


def autocast(device_type, dtype):
    """Mixed-precision context for amp_dtype's choice (a no-op for fp32)."""
    return torch.autocast(device_type, dtype=dtype) if dtype else contextlib.nullcontext()


def inference_dtype(device_type, dtype, n_params):
    """The dtype the weights are cast to for generation: cast once rather than autocast every op, since
    half-precision weights halve the bytes read per token. auto: the training autocast dtype, except on a
    CPU for models under 50M parameters, whose decoding is bound by per-op overhead, higher in bf16
    (docs/serving.md, sample.py)."""
    if dtype == "auto" and device_type == "cpu" and n_params < 50e6:
        return torch.float32
    return amp_dtype(device_type, dtype) or torch.float32


def setup_process(device="auto"):
    """(device, rank, local_rank, world_size) of a training process: resolve_device's, or under torchrun (its
    variables mean DDP) this rank's GPU, with the process group started. TF32 matmuls on CUDA."""
    name = resolve_device(device)
    if name.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls outside autocast on tensor cores
        torch.backends.cudnn.allow_tf32 = True
    if "RANK" not in os.environ:
        return name, 0, 0, 1
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if name == "cuda":
        name = f"cuda:{local_rank}"
        torch.cuda.set_device(name)
    dist.init_process_group(backend="nccl" if name.startswith("cuda") else "gloo")
    return name, rank, local_rank, world


def choose_compile(setting, device_type, ptdtype):
    """compile=auto: on where it pays. CUDA: always. CPU: with bf16 autocast only (set, or measured faster by
    dtype=auto), where compiled steps are faster than eager by enough to repay the compile time (cold start
    and the evaluation graph); in fp32 the gain is too small. MPS: off (Inductor's Metal backend is experimental)."""
    if setting == "auto":
        return device_type == "cuda" or (device_type == "cpu" and ptdtype == torch.bfloat16)
    return setting


def compile_model(raw_model, batch, ctx):
    """torch.compile, tried on one forward and backward pass: where it cannot work here (no C++ compiler,
    no Triton, an unsupported platform) warn and train eagerly instead."""
    if raw_model.device.type == "cpu":
        # Inductor's CPU kernel for the embedding's backward adds token rows with atomic adds from all threads, in
        # whatever order they land: two identical runs (or a resumed one) end with different weights. Deterministic
        # mode lowers it to ATen's ordered index_put instead: bit-identical runs (docs/training.md has the cost).
        torch.use_deterministic_algorithms(True)
    compiled = torch.compile(raw_model, dynamic=False)  # static shapes: recompiles once per curriculum stage
    try:
        with ctx:
            loss = compiled(*batch)[1]
        loss.backward()
        return compiled
    except Exception as e:  # the toolchain's errors are many and long; eager mode has none of them
        print(f"warning: torch.compile failed here ({type(e).__name__}: {str(e).strip().splitlines()[0][:200]}); "
              "training without it (pass --compile=False to skip the attempt)")
        return raw_model
    finally:
        raw_model.zero_grad(set_to_none=True)


_PEAKS = {}  # (device, dtype) -> FLOP/s: measured once per process


def peak_flops(device, dtype=None):
    """This device's matmul rate in FLOP/s at dtype (None: fp32), measured once per process (a CPU: its dtype=auto
    measurement): the denominator of MFU (train.py and bench.py). Measured rather than read from a datasheet
    table: matching GPU names by substring mistakes one card for another ("L40" for "L4"), and CPUs and unlisted
    GPUs have no entry."""
    name = str(dtype or torch.float32).removeprefix("torch.")
    if device == "cpu":
        return cpu_matmul_gflops()[name] * 1e9
    if (device, name) not in _PEAKS:
        _PEAKS[device, name] = matmul_flops(device, DTYPES[name], 4096, 5)
    return _PEAKS[device, name]


def print_memory_estimate(mem, batch_size, block_size, ptdtype, mc, device):
    gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
    total = sum(mem.values())
    parts = " + ".join(f"{k} {gib(v)}" for k, v in mem.items() if v)
    print(f"memory estimate per device: {parts} = {gib(total)} GiB "
          f"(micro-batch {batch_size} x {block_size} tokens, {str(ptdtype or torch.float32).removeprefix('torch.')}, "
          f"grad_checkpoint={mc.grad_checkpoint})")
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(device)
        if total > free:
            print(f"warning: the estimate exceeds this GPU's free memory ({gib(free)} GiB): lower batch_size "
                  "(raise grad_accum to keep tokens per step), block_size, or set grad_checkpoint=True")
