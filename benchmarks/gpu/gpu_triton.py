"""The dry run's Triton phase: the cuda backend's kernels in the interpreter, then compiled for sm_90.

The Triton interpreter (TRITON_INTERPRET=1) runs kernels on CPU tensors but never compiles them, so a
kernel that is right in the interpreter can still fail to compile on the GPU (types of loop-carried
values, ``tl.dot`` shape rules, constexpr misuse). This closes that gap without a GPU:

1. ``phase_triton`` runs the code the ``cuda`` backend runs -- its runner's kernel-swapped bf16 U-Net (NCHW
   and channels-last), its
   sampler steps (DDIM, DDPM with noise, DPM-Solver++ with the previous x0), its decode with the Triton
   nearest-code lookup, the Triton Philox noise and MAGE-Net's channel attention as the enhancement runner
   calls it -- on CPU tensors in the interpreter and checks each against its reference (bf16 within twice
   plain PyTorch bf16's error), while ``recording()`` notes each launch's kernel, argument types and
   constexpr values;
2. ``python benchmarks/gpu/gpu_triton.py LAUNCHES.json`` -- a fresh process, because the interpreter
   patches ``triton.language`` for the rest of its process -- compiles every distinct launch with
   ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` down to a cubin (Triton ships
   its own ptxas) and prints one JSON line per kernel with its shared memory, warps and compile time.

What it cannot show: run-time errors, speed, or differences between the Triton here and the GPU
machine's (3.6 there); integer arguments are compiled unspecialised (no divisibility hints).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gpu_common import HERE, ROOT, Plan, tail

_PTR = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "int64": "i64", "int32": "i32",
        "uint32": "u32", "uint8": "u8", "bool": "i1"}


def _arg_type(name: str, value) -> str:
    import torch

    if isinstance(value, torch.Tensor):
        return "*" + _PTR[str(value.dtype).replace("torch.", "")]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"argument {name}: cannot type {type(value).__name__} for an ahead-of-time compile")


@contextlib.contextmanager
def recording():
    """Yields a dict that fills with {key: launch} for every interpreted kernel launch in the block; a
    launch is {"module", "name", "signature", "constexprs"} (JSON-ready, input of this script)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    launches: dict[str, dict] = {}
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        params = JITFunction(self.fn).params
        bound = dict(zip(self.arg_names, args), **kwargs)
        signature, constexprs = {}, {}
        for p in params:
            value = bound[p.name] if p.name in bound else p.default
            if p.is_constexpr:
                signature[p.name], constexprs[p.name] = "constexpr", value
            else:
                signature[p.name] = _arg_type(p.name, value)
        launch = {"module": self.fn.__module__, "name": self.fn.__qualname__, "signature": signature,
                  "constexprs": constexprs}
        launches.setdefault(json.dumps(launch, sort_keys=True), launch)
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
    try:
        yield launches
    finally:
        InterpretedFunction.run = original


def compile_launch(launch: dict, arch: int = 90) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(launch["module"]), launch["name"])
    t0 = time.perf_counter()
    kernel = triton.compile(ASTSource(fn=fn, signature=launch["signature"], constexprs=launch["constexprs"]),
                            target=GPUTarget("cuda", arch, 32))
    return {"kernel": launch["name"], "constexprs": launch["constexprs"], "arch": f"sm_{arch}",
            "seconds": round(time.perf_counter() - t0, 2), "shared_bytes": kernel.metadata.shared,
            "num_warps": kernel.metadata.num_warps, "cubin_bytes": len(kernel.asm["cubin"])}


def phase_triton(plan: Plan) -> dict:
    """The cuda backend's Triton kernels in the interpreter against their references, every launch then
    compiled for sm_90 in a fresh process (``main`` below)."""
    import copy

    import torch

    from retina_fast import _env, bench, engine, noise, samplers
    from retina_fast.backends.runners import CUDARunner, Runner, cuda_table
    from retina_fast.enhance import CUDARunner as EnhanceCUDARunner
    from retina_fast.enhance import cuda_enhance_table, load_enhancer
    from retina_fast.ops.table import use_table
    from retina_fast.models.magenet import ChannelAttention, channel_attention_ref
    from retina_fast.ops import sampler_step_ref

    if not _env.triton_interpret():
        return {"status": "failed", "reason": "TRITON_INTERPRET=1 was not set before Triton was imported"}
    checks = []

    def check(what: str, err: float, bound: float) -> None:
        checks.append({"check": what, "error": err, "bound": bound, "passed": bool(err <= bound)})

    gen = torch.Generator().manual_seed(0)
    pipe = engine.load("default")
    cfg, bf16, cpu = pipe.config, torch.bfloat16, torch.device("cpu")
    with recording() as launches, torch.no_grad():
        runner, ref = CUDARunner(pipe.loaded, cpu, bf16), Runner(pipe.loaded, cpu, torch.float32)
        x = torch.randn(1, *cfg.latent_shape, generator=gen)
        t = torch.full((1,), 600)
        exact = pipe.loaded.unet(x, t)
        plain = copy.deepcopy(pipe.loaded.unet).to(bf16)(x.to(bf16), t).float()
        with use_table(cuda_table()):                       # what CUDARunner.denoise captures in its graph
            eps = runner.fast_unet(x.to(bf16), t).float()
        yard = bench.relative_l2(plain, exact)
        check("U-Net bf16 (GroupNorm+SiLU, linear and softmax attention) vs fp32", bench.relative_l2(eps, exact),
              2 * yard + 1e-3)
        nhwc = CUDARunner(pipe.loaded, cpu, bf16, layout="nhwc")  # the channels-last contender (cuda@nhwc)
        with use_table(cuda_table()):
            eps_cl = nhwc.fast_unet(x.to(bf16).contiguous(memory_format=torch.channels_last), t).float()
        check("U-Net bf16 channels-last (NHWC GroupNorm+SiLU) vs fp32", bench.relative_l2(eps_cl, exact),
              2 * yard + 1e-3)
        keys = noise.derive_keys(0, range(1), 3, noise.STREAM_STEP)
        for sampler in ("ddim", "ddpm", "dpmpp_2m"):
            c = samplers.plan(sampler, pipe.loaded.schedule, 10)[3]
            prev = torch.rand_like(x) * 2 - 1 if c.cp else None
            out, _ = runner.step(x, exact, c, prev, keys if c.std else None, True)
            want, _ = sampler_step_ref(x, exact, c, x0_prev=prev, keys=keys if c.std else None)
            check(f"sampler step {sampler}", float((out - want).abs().max()), 1e-5)
        x0 = torch.rand(1, *cfg.latent_shape, generator=gen) * 2 - 1
        check("decode (Triton nearest code)", float((runner.decode(x0) - ref.decode(x0)).abs().max()), 1e-5)
        rows = noise.randn_rows(keys, 1001, impl="triton")
        check("noise rows (Triton Philox)", float((rows - noise.randn_rows(keys, 1001, impl="torch")).abs().max()),
              2e-6)
        # MAGE-Net's cuda runner: each distinct channel attention of its bf16 channels-last copy, called as the
        # runner calls it (the whole restore in the interpreter costs ~10x more and adds no other kernel)
        mage = EnhanceCUDARunner(load_enhancer("default").model, cpu, bf16)
        seen = {}
        for m in mage.fast.modules():
            if isinstance(m, ChannelAttention):
                seen.setdefault(m.up.weight.shape[0], m)
        for c, m in sorted(seen.items()):
            xa = (torch.randn(1, c, 9, 7, generator=gen) + 0.5).to(bf16).contiguous(memory_format=torch.channels_last)
            w1, w2 = m.down.weight.float(), m.up.weight.float()
            want = channel_attention_ref(xa.float(), w1, w2)
            plain_err = float((channel_attention_ref(xa, m.down.weight, m.up.weight).float() - want).abs().max())
            with use_table(cuda_enhance_table()):            # the table the runner captures its graph with
                got = m(xa).float()
            check(f"MAGE-Net channel attention C={c} bf16 channels-last", float((got - want).abs().max()),
                  2 * plain_err + 1e-2)
    rec = {"checks": checks, "launches": len(launches)}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "launches.json"
        path.write_text(json.dumps(list(launches.values())))
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        out = subprocess.run([sys.executable, str(HERE / "gpu_triton.py"), str(path)], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=300)
    rec["sm90"] = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    bad = [c["check"] for c in checks if not c["passed"]]
    if out.returncode or len(rec["sm90"]) != len(launches):
        bad.append(f"sm_90 compile: exit {out.returncode} {tail(out.stderr, 1500)}")
    return {**rec, "status": "failed" if bad else "ok", "reason": "; ".join(bad)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("launches", help="JSON list of launches written from recording()")
    p.add_argument("--arch", type=int, default=90)
    a = p.parse_args(argv)
    from retina_fast import _env

    if _env.triton_interpret():
        print("gpu_triton.py: unset TRITON_INTERPRET; the interpreter does not compile", file=sys.stderr)
        return 2
    with open(a.launches, encoding="utf-8") as fh:
        launches = json.load(fh)
    failed = 0
    for launch in launches:
        try:
            print(json.dumps(compile_launch(launch, a.arch)), flush=True)
        except Exception as exc:  # report every kernel, then fail
            failed += 1
            print(json.dumps({"kernel": launch["name"], "constexprs": launch["constexprs"],
                              "error": f"{type(exc).__name__}: {exc}"}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
