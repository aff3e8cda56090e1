"""Peak memory and time of one distillation loss forward + backward at Qwen's vocabulary (151,936).

What is measured: one loss step starting from the final hidden states of the completion positions
(all batch × seq positions here): student hidden [B, T, 896] (requires grad) with its lm_head
weight [V, 896] (requires grad), teacher hidden [B, T, 1536] with its weight [V, 1536] (no grad),
all float32 on the CPU. The step is: compute the loss (in a function, as a trainer's compute_loss
does, so its locals are freed on return), then `loss.backward()`. Variants, in this order:

* naive — logits = h @ W.T for both models, log_softmax, forward KL = Σ_v p_T (log p_T − log p_S)
  per token, mean over tokens (the baseline every ratio is taken against);
* TRL — the same projections, then `GKDTrainer.generalized_jsd_loss` (trl.experimental.gkd) at
  β = 0 (forward KL) and β = 0.5, with labels and `num_items_in_batch` as `GKDTrainer.compute_loss`
  passes them (the second baseline: rows of the same β are compared with it);
* reasondistill — `make_objective("forward_kl")` and `make_objective("jsd", {"beta": 0.5})` on
  `ObjectiveInputs` with student `Head(hidden rows, weight)` and teacher `Head(hidden rows,
  weight)`: logits are projected `--chunk-size` positions at a time, and each chunk's gradients
  with respect to the hidden states and the head are computed as it is projected (`sum_token_chunks`);
* reasondistill, checkpointed chunks — the previous code (before 2026-12-07): the same chunks under
  activation checkpointing (`map_token_chunks`), each chunk's logits projected again in the backward
  pass;
* Liger-Kernel — `LigerFusedLinearJSD` at β = 0.5 where it runs. Its kernels are Triton kernels for
  CUDA/ROCm/XPU devices: on a machine without one the row says why it did not run.

How: every variant runs in a fresh subprocess (`--child`), which builds its inputs (no temporaries),
runs the same code once at a tiny size to import and warm everything up, then reads its resident
set size (RSS, /proc/self/status) just before the step. Peak = `ru_maxrss` (resource.getrusage)
after the step; "step MiB" is peak − RSS before, the memory the loss itself needs; absolute numbers
are printed too. Seconds are wall-clock for forward + backward. A variant's address space is capped
(RLIMIT_AS) at `--memory-limit-gb` above what it has mapped before the step, and at most the memory
the machine has available minus 2 GiB, so a variant that does not fit fails with "out of memory"
instead of taking the machine down; a variant killed by a signal is reported as such.

    .venv/bin/python benchmarks/kd_loss_memory.py [--vocab 151936] [--seq 1024] [--batch 4]
        [--chunk-size 512] [--threads N] [--memory-limit-gb 20] [--variants naive,trl-fkl,...]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time

# key -> (label, kind, options); rows print in this order
VARIANTS = {
    "naive": ("naive forward KL", "naive", {}),
    "trl-fkl": ("TRL generalized_jsd β=0", "trl", {"beta": 0.0}),
    "trl-jsd": ("TRL generalized_jsd β=0.5", "trl", {"beta": 0.5}),
    "rd-fkl": ("reasondistill forward_kl", "reasondistill", {"objective": "forward_kl", "options": {}}),
    "rd-jsd": ("reasondistill jsd β=0.5", "reasondistill", {"objective": "jsd", "options": {"beta": 0.5}}),
    "rd-fkl-ckpt": ("rd forward_kl, checkpointed", "checkpointed", {}),
    "liger-jsd": ("Liger fused-linear JSD β=0.5", "liger", {"beta": 0.5}),
}
# the TRL row each row is also compared with (same divergence)
SAME_DIVERGENCE = {
    "trl-fkl": "trl-fkl", "rd-fkl": "trl-fkl", "rd-fkl-ckpt": "trl-fkl",
    "trl-jsd": "trl-jsd", "rd-jsd": "trl-jsd", "liger-jsd": "trl-jsd",
}  # fmt: skip
MIB = 2**20


def proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def mem_available_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable not in /proc/meminfo")


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def loss_function(kind: str, options: dict, chunk_size: int):
    """The variant's compute_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels)."""
    import torch

    if kind == "naive":

        def naive(student_hidden, student_weight, teacher_hidden, teacher_weight, labels):
            student_logits = student_hidden @ student_weight.T
            with torch.no_grad():
                teacher_logits = teacher_hidden @ teacher_weight.T
            student_logprobs = torch.log_softmax(student_logits, -1)
            teacher_logprobs = torch.log_softmax(teacher_logits, -1)
            per_token = (teacher_logprobs.exp() * (teacher_logprobs - student_logprobs)).sum(-1)
            return per_token.mean()

        return naive

    if kind == "trl":
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from trl.experimental.gkd import GKDTrainer

        def trl(student_hidden, student_weight, teacher_hidden, teacher_weight, labels):
            student_logits = student_hidden @ student_weight.T
            with torch.no_grad():
                teacher_logits = teacher_hidden @ teacher_weight.T
            return GKDTrainer.generalized_jsd_loss(
                student_logits,
                teacher_logits,
                labels=labels,
                beta=options["beta"],
                num_items_in_batch=labels.numel(),
            )

        return trl

    if kind == "liger":
        from liger_kernel.transformers import LigerFusedLinearJSD  # Triton kernels: a GPU only

        fused = LigerFusedLinearJSD(jsd_beta=options["beta"])

        def liger(student_hidden, student_weight, teacher_hidden, teacher_weight, labels):
            return fused(
                student_hidden.reshape(-1, student_hidden.shape[-1]), student_weight,
                teacher_hidden.reshape(-1, teacher_hidden.shape[-1]), teacher_weight, labels.reshape(-1),
            )  # fmt: skip

        return liger

    from reasondistill.objectives import make_objective
    from reasondistill.objectives.base import ObjectiveInputs
    from reasondistill.objectives.heads import Head, map_token_chunks

    if kind == "checkpointed":
        from reasondistill.objectives.divergences import kl_teacher_student, shared_support

        def checkpointed(student_hidden, student_weight, teacher_hidden, teacher_weight, labels):
            positions = student_hidden.shape[0] * student_hidden.shape[1]
            per_token = map_token_chunks(
                lambda logits, teacher: kl_teacher_student(*shared_support(logits, teacher, 1.0)),
                Head(student_hidden.reshape(positions, -1), student_weight),
                {"teacher": Head(teacher_hidden.reshape(positions, -1), teacher_weight)},
                chunk_size,
            )
            return per_token.sum() / positions

        return checkpointed

    objective = make_objective(options["objective"], options["options"])

    def reasondistill(student_hidden, student_weight, teacher_hidden, teacher_weight, labels):
        batch, seq, _ = student_hidden.shape
        inputs = ObjectiveInputs(
            student=Head(student_hidden.reshape(batch * seq, -1), student_weight),
            labels=labels.reshape(-1),
            normaliser=batch * seq,
            sequence=torch.arange(batch).repeat_interleave(seq),
            num_sequences=batch,
            teacher=Head(teacher_hidden.reshape(batch * seq, -1), teacher_weight),
            chunk_size=chunk_size,
        )
        return objective(inputs)

    return reasondistill


def make_inputs(batch: int, seq: int, vocab: int, student_hidden: int, teacher_hidden: int, seed: int = 0):
    """Hidden states and head weights, built in place (no temporaries that would raise ru_maxrss)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, seq, student_hidden, generator=generator).requires_grad_()
    student_weight = torch.randn(vocab, student_hidden, generator=generator)
    student_weight.mul_(student_hidden**-0.5).requires_grad_()
    teacher = torch.randn(batch, seq, teacher_hidden, generator=generator)
    teacher_weight = torch.randn(vocab, teacher_hidden, generator=generator).mul_(teacher_hidden**-0.5)
    labels = torch.randint(0, vocab, (batch, seq), generator=generator)
    return student, student_weight, teacher, teacher_weight, labels


def is_out_of_memory(error: BaseException) -> bool:
    return (
        isinstance(error, MemoryError) or "not enough memory" in str(error) or "can't allocate" in str(error)
    )


def measure(key: str, args: argparse.Namespace, limit_bytes: int | None) -> dict:
    """Run one variant's loss forward + backward in this process and measure it."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    _, kind, options = VARIANTS[key]
    compute_loss = loss_function(kind, options, args.chunk_size)
    # warm-up at a tiny size: imports, thread pool, lazily loaded autograd / checkpoint machinery
    tiny = make_inputs(2, 3, 50, 4, 6)
    compute_loss(*tiny).backward()
    del tiny
    inputs = make_inputs(args.batch, args.seq, args.vocab, args.student_hidden, args.teacher_hidden)
    gc.collect()
    before = proc_status_kib("VmRSS") * 1024
    max_before = max_rss_bytes()
    original_limit = resource.getrlimit(resource.RLIMIT_AS)
    if limit_bytes is not None:
        mapped = proc_status_kib("VmSize") * 1024
        resource.setrlimit(resource.RLIMIT_AS, (mapped + limit_bytes, original_limit[1]))
    result = {"key": key, "rss_before": before, "max_rss_before": max_before, "loss": None}
    started = time.perf_counter()
    try:
        loss = compute_loss(*inputs)
        loss.backward()
        result["loss"] = loss.item()
        result["status"] = "ok"
    except (MemoryError, RuntimeError) as error:
        if not is_out_of_memory(error):
            raise
        result["status"] = "out of memory"
    result["seconds"] = time.perf_counter() - started
    resource.setrlimit(resource.RLIMIT_AS, original_limit)
    result["max_rss"] = max_rss_bytes()
    result["step_peak"] = max(0, result["max_rss"] - before)
    return result


def run_child(key: str, args: argparse.Namespace, limit_bytes: int) -> dict:
    """`measure` in a fresh interpreter, so ru_maxrss is this variant's alone."""
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        key,
        "--limit-bytes",
        str(limit_bytes),
        *("--vocab", str(args.vocab), "--seq", str(args.seq), "--batch", str(args.batch)),
        *("--student-hidden", str(args.student_hidden), "--teacher-hidden", str(args.teacher_hidden)),
        *("--chunk-size", str(args.chunk_size), "--threads", str(args.threads or 0)),
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    if done.returncode < 0:
        status = f"killed (signal {-done.returncode})"
    elif "MemoryError" in done.stderr or "not enough memory" in done.stderr:
        status = "out of memory"
    else:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        status = f"failed (exit {done.returncode}: {last[:80]})"
    return {"key": key, "status": status}


def not_run(key: str) -> dict | None:
    """The result of a variant that cannot run on this machine (Liger-Kernel without a GPU), or None."""
    reason = liger_unavailable() if VARIANTS[key][1] == "liger" else None
    return {"key": key, "status": "not run", "reason": reason} if reason else None


def liger_unavailable() -> str | None:
    """Why Liger-Kernel's fused JSD cannot run here, or None."""
    import importlib.util

    import torch

    if not (torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())):
        return "Liger-Kernel's kernels are Triton kernels for CUDA/ROCm/XPU devices; this machine has none"
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install liger-kernel)"
    return None


def ratio(row: dict, baseline: dict | None, field: str) -> str:
    if baseline is None or row.get("status") != "ok" or baseline.get("status") != "ok" or not baseline[field]:
        return "-"
    return f"{row[field] / baseline[field]:.2f}x"


def mib(value: int | None) -> str:
    return "-" if value is None else f"{value / MIB:,.0f}"


def print_table(results: dict[str, dict], per_variant: bool) -> None:
    naive = results.get("naive")
    header = (
        f"{'variant':<28} {'status':<14} {'loss':>9} {'RSS before':>11} {'peak RSS':>9} {'step MiB':>9}"
        f" {'seconds':>8} {'peak/naive':>11} {'time/naive':>11} {'peak/TRL':>9} {'time/TRL':>9}"
    )
    print(header)
    for key, row in results.items():
        ok = row.get("status") == "ok"
        same = results.get(SAME_DIVERGENCE.get(key, ""))
        loss = f"{row['loss']:.5f}" if ok else "-"
        seconds = f"{row['seconds']:.2f}" if ok else "-"
        step = mib(row.get("step_peak")) if per_variant else "n/a"
        if not ok and "step_peak" in row:
            step = ">" + step  # how far it got before the allocation that failed
        print(
            f"{VARIANTS[key][0]:<28} {row['status']:<14} {loss:>9} {mib(row.get('rss_before')):>11}"
            f" {mib(row.get('max_rss')):>9} {step:>9} {seconds:>8}"
            f" {ratio(row, naive, 'step_peak') if per_variant else 'n/a':>11} {ratio(row, naive, 'seconds'):>11}"
            f" {ratio(row, same, 'step_peak') if per_variant else 'n/a':>9} {ratio(row, same, 'seconds'):>9}"
        )


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--student-hidden", type=int, default=896)
    parser.add_argument("--teacher-hidden", type=int, default=1536)
    parser.add_argument("--chunk-size", type=int, default=512, help="reasondistill: positions per chunk")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument(
        "--memory-limit-gb", type=float, default=20.0, help="cap on the memory one variant's step may map"
    )
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}"
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="no subprocesses, no memory cap (smoke tests): times only, peaks are not per variant",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--limit-bytes", type=int, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(measure(args.child, args, args.limit_bytes)), flush=True)
        return
    keys = [key.strip() for key in args.variants.split(",") if key.strip()]
    unknown = [key for key in keys if key not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    positions = args.batch * args.seq
    print(
        f"one KD loss forward+backward, float32 CPU: vocab {args.vocab:,}, batch {args.batch} x seq {args.seq}"
        f" = {positions:,} positions, student hidden {args.student_hidden}, teacher hidden {args.teacher_hidden},"
        f" reasondistill chunk {args.chunk_size}, threads {args.threads or 'default'}"
    )
    print(
        f"one [positions, vocab] float32 tensor = {positions * args.vocab * 4 / MIB:,.0f} MiB;"
        f" student weight grad = {args.vocab * args.student_hidden * 4 / MIB:,.0f} MiB"
    )
    results = {}
    if args.in_process:
        print("in-process run: peak RSS is the process's, not per variant; no memory cap")
        for key in keys:
            results[key] = not_run(key) or measure(key, args, None)
    else:
        limit = int(min(args.memory_limit_gb * 2**30, mem_available_bytes() - 2 * 2**30))
        print(
            f"each variant in a fresh subprocess; its step may map at most {limit / 2**30:.1f} GiB"
            f" (--memory-limit-gb {args.memory_limit_gb:g}, capped at MemAvailable - 2 GiB)"
        )
        for key in keys:
            results[key] = not_run(key) or run_child(key, args, limit)
            reason = f" ({results[key]['reason']})" if "reason" in results[key] else ""
            print(f"  {VARIANTS[key][0]}: {results[key]['status']}{reason}", flush=True)
    print()
    print_table(results, per_variant=not args.in_process)
    for key, row in results.items():
        if "reason" in row:
            print(f"{VARIANTS[key][0]}: not run: {row['reason']}")
    print(
        "\nstep MiB = ru_maxrss after the step - RSS before it (inputs built); ratios divide step MiB and"
        " seconds; peak/TRL and time/TRL compare with the TRL row of the same divergence."
    )


if __name__ == "__main__":
    main()
