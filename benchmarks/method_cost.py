# SPDX-License-Identifier: Apache-2.0
"""Cost of one training epoch of every method, as a ratio to a clean (ERM) epoch on the same model.

The methods are timed side by side, interleaved round by round, so that machine noise hits them
alike; the ratio of medians is what to read, not the seconds. Beside each ratio stands the
theoretical number of forward+backward passes per step (``Method.passes()``), when the
method declares it.

    python benchmarks/method_cost.py                 # digits, small_cnn, 5 rounds
    python benchmarks/method_cost.py --quick         # CI smoke test: one short round
    python benchmarks/method_cost.py --arch preact_resnet18 --shape cifar --device cuda
    # configs/mnist.yaml's training: PGD-40 on C&W's CNN over 1,000 MNIST images, one torch thread
    OMP_NUM_THREADS=1 python benchmarks/method_cost.py --shape mnist --arch cw_mnist --methods pgd_at \
        --attack-steps 40 --batch-size 100 --batches 10 --rounds 3 --out benchmarks/results/method_cost-mnist.json

Each row also gives ``epoch_seconds``: its median seconds per step times the steps of one epoch over
the whole training split (digits, MNIST), an extrapolation from the steps timed, not a measured epoch.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks._report import save  # noqa: E402

from otarena import methods  # noqa: E402
from otarena.methods.common.data import INFO, TensorData, batches  # noqa: E402


def synthetic(shape: str, n: int) -> TensorData:
    """Random CIFAR-shaped data: throughput does not depend on the pixel values."""
    info = INFO["cifar10"]
    generator = torch.Generator().manual_seed(0)
    return TensorData("cifar-shaped", "train", torch.rand(n, 3, 32, 32, generator=generator),
                      torch.randint(0, 10, (n,), generator=generator), info)


def machine(device: torch.device) -> dict:
    return {"cpu_count": os.cpu_count(), "torch": torch.__version__, "platform": platform.platform(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch_threads": torch.get_num_threads()}


def time_epoch(run, n_batches: int, device: torch.device) -> float:
    """Seconds for ``n_batches`` training steps (no validation)."""
    generator = torch.Generator().manual_seed(0)
    stream = batches(run.train, run.cfg.batch_size, shuffle=True, generator=generator, drop_last=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for i, (x, y, idx) in enumerate(stream):
        if i == n_batches:
            break
        run.method.step(x, y, idx)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


TOLERANCE = 0.15


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(methods.REGISTRY), help="comma-separated registry names")
    parser.add_argument("--arch", default="small_cnn")
    parser.add_argument("--shape", default="digits", choices=["digits", "mnist", "cifar"],
                        help="digits or MNIST (the first batches of their training split), or random CIFAR-shaped data")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=20, help="steps timed per method per round")
    parser.add_argument("--batch-size", type=int, default=128, help="CIFAR's usual batch; small batches add per-call overhead")
    parser.add_argument("--attack-steps", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="one round of 2 steps (a smoke test)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "method_cost.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.batches = 1, 2
    names = [m for m in args.methods.split(",") if m and m != "erm"]
    device = methods.common.train.pick_device(args.device)
    full_train = None   # the training split an epoch runs over, when the data are real
    if args.shape in ("digits", "mnist"):
        full_train = methods.data.load(args.shape, "train")
        # The steps timed only: MNIST's 55,000 images would cost seconds to copy around for nothing.
        train = full_train.subset(args.batch_size * args.batches) if args.shape == "mnist" else full_train
        threat = methods.ThreatModel("Linf", 0.2 if args.shape == "digits" else 0.3)
    else:
        train = synthetic("cifar", args.batch_size * args.batches)
        threat = methods.ThreatModel("Linf", 8 / 255)
    hparams = {"batch_size": args.batch_size, "attack_steps": args.attack_steps, "optimizer": "sgd", "lr": 0.01}
    dataset = {"cifar": "cifar10"}.get(args.shape, args.shape)
    steps_per_epoch = len(full_train) // args.batch_size if full_train is not None else None

    def arch_of(name):
        # Methods tied to an architecture (HKR's Lipschitz nets) are compared with ERM on that arch.
        archs = methods.get(name).archs
        return args.arch if not archs or args.arch in archs else archs[0 if args.shape == "digits" else -1]

    def build(name, arch):
        norm = methods.get(name).norm or threat.norm
        return methods.build_run(name, hparams, dataset=dataset, arch=arch, device=device, train=train, val=train,
                                 threat=methods.ThreatModel(norm, threat.eps if norm == threat.norm else 0.5))

    keys = [("erm", arch) for arch in dict.fromkeys(arch_of(n) for n in ["erm", *names])] + \
        [(name, arch_of(name)) for name in names]
    runs = {key: build(*key) for key in keys}
    for run in runs.values():          # warm-up: allocator, cuDNN autotuning, lazy state
        time_epoch(run, 1, device)
    seconds: dict[tuple, list[float]] = {key: [] for key in keys}
    for _ in range(args.rounds):
        for key, run in runs.items():
            seconds[key].append(time_epoch(run, args.batches, device))
    rows = []
    print(f"{'method':<16} {'arch':<16} {'x ERM':>7} {'theory':>7} {'vs theory':>10} {'s/step':>9}")
    for name, arch in keys:
        median = statistics.median(seconds[(name, arch)])
        ratio = median / statistics.median(seconds[("erm", arch)])
        passes = runs[(name, arch)].method.passes()
        # The target: within 15% of the theoretical pass count, i.e. no hidden overhead.
        deviation = ratio / passes - 1 if passes else None
        rows.append({"method": name, "arch": arch, "ratio_to_erm": ratio, "theoretical_passes": passes,
                     "deviation_from_theory": deviation,
                     "within_15pct": None if deviation is None else abs(deviation) <= TOLERANCE,
                     "seconds_per_step": median / args.batches,
                     "epoch_seconds": None if steps_per_epoch is None else median / args.batches * steps_per_epoch})
        theory = f"{passes:7.1f}" if passes else "    n/a"
        shown = f"{deviation:+9.0%}{' ' if abs(deviation) <= TOLERANCE else '!'}" if deviation is not None else " " * 10
        print(f"{name:<16} {arch:<16} {ratio:7.2f} {theory} {shown} {rows[-1]['seconds_per_step']:9.4f}")
    if steps_per_epoch is not None:
        print(f"one epoch over the {len(full_train)} training images ({steps_per_epoch} steps), extrapolated: "
              + ", ".join(f"{r['method']} {r['epoch_seconds'] / 3600:.2f} h" for r in rows))
    checked = [r for r in rows if r["within_15pct"] is not None and r["method"] != "erm"]
    print(f"{sum(r['within_15pct'] for r in checked)}/{len(checked)} methods within {TOLERANCE:.0%} of their "
          f"theoretical pass count ('!' marks the others)")
    report = {"benchmark": "method_cost", "arch": args.arch, "shape": args.shape, "batch_size": args.batch_size,
              "attack_steps": args.attack_steps, "rounds": args.rounds, "batches": args.batches,
              "train_images": None if full_train is None else len(full_train), "steps_per_epoch": steps_per_epoch,
              "machine": machine(device), "rows": rows}
    for row in rows:
        assert row["ratio_to_erm"] > 0 and row["seconds_per_step"] > 0
    if not args.quick:
        save(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
