"""What a GPU would launch per step: capsnet on the emulated device, PyTorch by its profiler.

At small batches a GPU step is bound by kernel launches (5 to 20 us each in CuPy), not by
flops, so the number of launches per step is a cost of its own. Both counts here are of
the same network and step as ``scripts/bench.py`` times (the paper's CapsNet, or the
MultiMNIST network: forward with the margin and reconstruction loss, backward, the Adam
step, zeroing the gradients; and an inference forward to the capsule lengths):

- **capsnet** runs the step on the emulated CuPy (``capsnet.testing``), which counts every
  call that would write device memory: element-wise, reduction, matrix product, copy, fill
  and fused kernels. Views (reshape, transpose, slicing) count nothing.
- **PyTorch** runs the same step eagerly on the CPU under ``torch.profiler``; each aten
  operator that does work of its own counts once: views and metadata operators
  (``VIEWS``) count nothing, and operators that only dispatch to others (``COMPOSITE``:
  ``linear`` to ``addmm``, ``conv2d`` to the convolution, ``softmax`` to ``_softmax`` ...)
  count their children instead. Adam runs with ``foreach=True``, what PyTorch picks for
  CUDA tensors, and each ``_foreach_*`` operator counts once, as one multi-tensor kernel
  on a GPU. ``zero_grad`` sets the gradients to None (PyTorch's default): nothing to launch.

Neither count is a GPU measurement: they count dispatches, the thing launches follow.

    python scripts/launch_counts.py --batch 100       # both, printed
    python scripts/bench.py --launches                # batches 1, 32, 100, with the JSON
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Any

SCRIPTS = Path(__file__).resolve().parent
NETWORKS = {"mnist": {}, "multimnist": {"input_shape": (1, 36, 36), "digits": 2}}

VIEWS = {f"aten::{name}" for name in (
    "view _unsafe_view view_as reshape _reshape_alias as_strided expand expand_as transpose t permute "
    "unsqueeze squeeze unsqueeze_ squeeze_ t_ slice select narrow split split_with_sizes unsafe_split chunk "
    "unbind unflatten flatten detach detach_ alias lift_fresh empty empty_like empty_strided new_empty_strided "
    "resize_ set_ result_type to contiguous numpy_T item _local_scalar_dense is_nonzero size stride dim "
    "resolve_conj resolve_neg _conj conj _has_compatible_shallow_copy_type").split()}
COMPOSITE = {f"aten::{name}" for name in (
    "linear matmul conv2d convolution _convolution softmax clone zeros zeros_like ones ones_like full full_like "
    "_to_copy relu relu_ one_hot einsum type_as new_zeros new_ones new_full masked_fill repeat stack square "
    "norm linalg_vector_norm mean log_softmax cross_entropy_loss nll_loss mse_loss max_pool2d dropout "
    "feature_dropout").split()}


def _phases(step: dict[str, Any]) -> dict[str, Any]:
    train = sum(step[k] for k in ("forward_and_loss", "backward", "optimizer_step", "zero_grad"))
    return {**step, "train_step": train}


def count_ours(batch: int, network: str = "mnist") -> dict[str, Any]:
    """Launches of capsnet's training and inference steps on the emulated device."""
    import numpy as np

    from capsnet import backend
    from capsnet.models.capsnet import CapsNet, CapsNetLoss
    from capsnet.optim import Adam
    from capsnet.testing import device_counts

    if not backend.is_emulated():
        raise RuntimeError("capsnet's launches are counted on the emulated device: run with CAPSNET_EMULATE_CUPY=1")
    cfg = NETWORKS[network]
    rng = np.random.default_rng(0)
    with backend.use("cupy") as cp:
        side = cfg.get("input_shape", (1, 28, 28))
        digits = cfg.get("digits", 1)
        x = cp.asarray(rng.random((batch, *side), dtype=np.float32))
        labels = np.stack([rng.permutation(10)[:digits] for _ in range(batch)]).astype(np.int64)
        y = cp.asarray(labels[:, 0] if digits == 1 else labels)
        target = x if digits == 1 else cp.asarray(rng.random((batch, digits, *side), dtype=np.float32))
        model = CapsNet(dtype="float32", seed=0, **cfg)
        loss, opt = CapsNetLoss(), Adam(model.parameters(), lr=1e-3)
        model.train()
        counted: dict[str, Any] = {}
        for _ in range(2):  # the second step is the steady state: the optimizer's state exists
            with device_counts() as forward:
                lengths, recon = model(x, y)
                loss(lengths, recon, y, target)
            with device_counts() as backward:
                model.backward(*loss.backward())
            with device_counts() as step:
                opt.step()
            with device_counts() as zero:
                opt.zero_grad()
            counted = {"forward_and_loss": forward, "backward": backward, "optimizer_step": step, "zero_grad": zero}
        model.eval()
        with device_counts() as infer:
            model.predict(x)
    result = _phases({name: c.launches for name, c in counted.items()})
    result["inference"] = infer.launches
    result["by_kind"] = dict(sum((c.by_kind for c in counted.values()), Counter()))
    result["host_transfers_in_step"] = sum(len(c.d2h) for c in counted.values())
    return result


def _torch_launches(event: Any) -> list[str]:
    if event.name.startswith("aten::_foreach_"):
        return [event.name]
    own = [] if event.name in VIEWS or event.name in COMPOSITE else [event.name]
    return own + [k for child in event.cpu_children if child.name.startswith("aten::") for k in _torch_launches(child)]


def _profiled(fn: Any) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    roots = [e for e in events if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    return [k for e in roots for k in _torch_launches(e)]


def count_torch(batch: int, network: str = "mnist") -> dict[str, Any]:
    """Kernel calls of the PyTorch reference's eager step (see the module's docstring)."""
    import torch

    sys.path.insert(0, str(SCRIPTS))
    from torch_capsnet import TorchCapsNet, total_loss

    cfg = NETWORKS[network]
    torch.manual_seed(0)
    side = cfg.get("input_shape", (1, 28, 28))
    digits = cfg.get("digits", 1)
    x = torch.rand(batch, *side)
    y = torch.stack([torch.randperm(10)[:digits] for _ in range(batch)])
    y = y[:, 0] if digits == 1 else y
    target = x if digits == 1 else torch.rand(batch, digits, *side)
    model = TorchCapsNet(dtype=torch.float32, **cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True)
    held: dict[str, Any] = {}

    def forward() -> None:
        lengths, recon = model(x, y)
        held["loss"] = total_loss(lengths, recon, y, target)

    model.train()
    for _ in range(2):
        forward()
        held["loss"].backward()
        opt.step()
        opt.zero_grad()
    counted = {"forward_and_loss": _profiled(forward), "backward": _profiled(lambda: held["loss"].backward()),
               "optimizer_step": _profiled(opt.step), "zero_grad": _profiled(opt.zero_grad)}
    model.eval()
    with torch.inference_mode():
        infer = _profiled(lambda: model.predict(x))
    result = _phases({name: len(k) for name, k in counted.items()})
    result["inference"] = len(infer)
    result["by_operator"] = dict(Counter(k for ks in counted.values() for k in ks).most_common())
    result["torch"] = torch.__version__
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--network", choices=tuple(NETWORKS), default="mnist")
    p.add_argument("--which", choices=("ours", "torch", "both"), default="both")
    args = p.parse_args(argv)
    if args.which in ("ours", "both"):
        print("capsnet (emulated device):", {k: v for k, v in count_ours(args.batch, args.network).items()})
    if args.which in ("torch", "both"):
        print("PyTorch (profiler):", {k: v for k, v in count_torch(args.batch, args.network).items()
                                      if k != "by_operator"})


if __name__ == "__main__":
    main()
