"""PyTorch-eager re-statement of the authors' adversarial ADMM training loop, for the benchmark.

Written here from the paper's description (docs/method.md) of Ye et al.'s loop, not copied: the
same topologies as `admm_jax.models` (LeNet_adv(w), VGG-16-BN, CIFAR ResNet-18), an eager
PGD loop that calls `torch.autograd.grad` once per step, then cross-entropy on the
adversarial batch plus the ADMM penalty rho/2 sum ||W - Z + U||^2, backward, and SGD with
momentum. NCHW layout, as PyTorch users write it. Only benchmarks/bench.py and its tests
import this module (it needs torch: `pip install admm_jax[bench]`).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F


class LeNetAdv(nn.Module):
  """conv5x5(2w) - ReLU - pool - conv5x5(4w) - ReLU - pool - fc(64w) - ReLU - fc, as LeNet."""

  def __init__(self, width: int = 1, in_channels: int = 1, num_classes: int = 10):
    super().__init__()
    w = width
    self.conv1 = nn.Conv2d(in_channels, 2 * w, 5, padding=2)
    self.conv2 = nn.Conv2d(2 * w, 4 * w, 5, padding=2)
    self.fc1 = nn.Linear(7 * 7 * 4 * w, 64 * w)
    self.fc2 = nn.Linear(64 * w, num_classes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = F.max_pool2d(F.relu(self.conv1(x)), 2)
    x = F.max_pool2d(F.relu(self.conv2(x)), 2)
    x = F.relu(self.fc1(x.flatten(1)))
    return self.fc2(x)


_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M")


class VGG16(nn.Module):
  """VGG-16 with BatchNorm, channels scaled by w/16, one linear classifier (as models.VGG16)."""

  def __init__(self, width: int = 16, in_channels: int = 3, num_classes: int = 10):
    super().__init__()
    layers: list[nn.Module] = []
    c_in = in_channels
    for c in _VGG16_CFG:
      if c == "M":
        layers.append(nn.MaxPool2d(2))
        continue
      c_out = max(1, c * width // 16)
      layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                 nn.ReLU(inplace=True)]
      c_in = c_out
    self.features = nn.Sequential(*layers)
    self.fc = nn.Linear(c_in, num_classes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.fc(self.features(x).flatten(1))


class BasicBlock(nn.Module):
  """conv3x3 - BN - ReLU - conv3x3 - BN (+ conv1x1 - BN shortcut when the shape changes)."""

  def __init__(self, c_in: int, c_out: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(c_out)
    self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(c_out)
    self.shortcut = nn.Sequential()
    if stride != 1 or c_in != c_out:
      self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                    nn.BatchNorm2d(c_out))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return F.relu(y + self.shortcut(x))


class ResNet18(nn.Module):
  """CIFAR ResNet-18 with 4w, 8w, 16w, 32w channels (as models.ResNet18)."""

  def __init__(self, width: int = 16, in_channels: int = 3, num_classes: int = 10):
    super().__init__()
    self.conv1 = nn.Conv2d(in_channels, 4 * width, 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(4 * width)
    blocks, c_in = [], 4 * width
    for channels, stride in ((4, 1), (8, 2), (16, 2), (32, 2)):
      for b in range(2):
        blocks.append(BasicBlock(c_in, channels * width, stride if b == 0 else 1))
        c_in = channels * width
    self.layers = nn.Sequential(*blocks)
    self.fc = nn.Linear(c_in, num_classes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = F.relu(self.bn1(self.conv1(x)))
    x = self.layers(x)
    return self.fc(x.mean(dim=(2, 3)))


def build_model(name: str, width: int, in_channels: int) -> nn.Module:
  """The PyTorch twin of `admm_jax.models.get_model(name, width)`."""
  cls = {"lenet": LeNetAdv, "vgg16": VGG16, "resnet18": ResNet18}[name]
  return cls(width=width, in_channels=in_channels)


def autocast(device: torch.device | str, dtype: torch.dtype | None) -> Any:
  """torch's mixed precision for a compute dtype (None or float32: a no-op context)."""
  if dtype is None or dtype == torch.float32:
    return contextlib.nullcontext()
  return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def pgd_attack(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
               y: torch.Tensor, *, eps: float, step_size: float, steps: int,
               compute_dtype: torch.dtype | None = None) -> torch.Tensor:
  """The authors' eager PGD: random start, `steps` x (autograd.grad, signed step, clip).

  `compute_dtype` bfloat16 runs the model under autocast; the iterate stays float32.
  """
  x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0.0, 1.0)
  for _ in range(steps):
    x_adv.requires_grad_()
    with torch.enable_grad(), autocast(x.device, compute_dtype):
      loss = F.cross_entropy(model(x_adv).float(), y, reduction="sum")
    grad = torch.autograd.grad(loss, [x_adv])[0]
    x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
    x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)
  return x_adv.detach()


class TorchADMMTrainer:
  """One adversarial ADMM training step, as the authors' loop does it (eager PyTorch).

  ADMM variables Z (projection of the weights at init) and U (zeros) for every conv/linear
  weight; the step adds rho/2 ||W - Z + U||^2 to the loss. Z/U updates happen once per ADMM
  epoch in the authors' code, outside the step, and are not timed here.

  `compile_backend` (e.g. "inductor", torch.compile's default) runs every forward pass through
  `torch.compile(model)`, what a GPU user would write today; `compute_dtype` bfloat16 runs
  them under autocast (weights, optimizer state, Z/U and the PGD iterate stay float32).
  """

  def __init__(self, model: nn.Module, *, eps: float, step_size: float, steps: int,
               lr: float = 0.01, momentum: float = 0.9, rho: float = 1e-3,
               prune_ratio: float = 0.8, compile_backend: str | None = None,
               compute_dtype: torch.dtype | None = None):
    self.model = model
    self.forward = model if compile_backend is None else torch.compile(model,
                                                                         backend=compile_backend)
    self.compute_dtype = compute_dtype
    self.eps, self.step_size, self.steps, self.rho = eps, step_size, steps, rho
    self.optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    self.pruned = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    self.z, self.u = [], []
    with torch.no_grad():
      for w in self.pruned:
        flat = w.detach().abs().flatten()
        k = int(round(prune_ratio * flat.numel()))
        thresh = flat.kthvalue(max(k, 1)).values
        self.z.append(torch.where(w.abs() > thresh, w, torch.zeros_like(w)))
        self.u.append(torch.zeros_like(w))

  def admm_loss(self) -> torch.Tensor:
    """rho/2 sum_i ||W_i - Z_i + U_i||^2."""
    return 0.5 * self.rho * sum(torch.sum((w - z + u) ** 2)
                                for w, z, u in zip(self.pruned, self.z, self.u))

  def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PGD on (x, y) in train mode, then one SGD step on CE(adv) + ADMM penalty; returns loss."""
    self.model.train()
    x_adv = pgd_attack(self.forward, x, y, eps=self.eps, step_size=self.step_size,
                       steps=self.steps, compute_dtype=self.compute_dtype)
    with autocast(x.device, self.compute_dtype):
      logits = self.forward(x_adv).float()
    loss = F.cross_entropy(logits, y) + self.admm_loss()
    self.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    self.optimizer.step()
    return loss.detach()


def load_flax_params(model: nn.Module, params: dict[str, Any], name: str) -> None:
  """Copies flax LeNet params into the PyTorch twin (conv HWIO -> OIHW, flatten HWC -> CHW).

  Only LeNet is supported: the benchmark's forward-equality test uses it to check that both
  sides compute the same network.
  """
  if name != "lenet":
    raise ValueError(f"weight porting is implemented for lenet only, got {name!r}.")
  t = lambda a: torch.from_numpy(np.array(a, np.float32))  # a writable copy
  with torch.no_grad():
    for conv in ("conv1", "conv2"):
      getattr(model, conv).weight.copy_(t(np.transpose(params[conv]["kernel"], (3, 2, 0, 1))))
      getattr(model, conv).bias.copy_(t(params[conv]["bias"]))
    k1 = np.asarray(params["fc1"]["kernel"])          # rows in (H, W, C) order
    c = model.conv2.out_channels
    k1 = k1.reshape(7, 7, c, -1).transpose(2, 0, 1, 3).reshape(7 * 7 * c, -1)  # (C, H, W)
    model.fc1.weight.copy_(t(k1.T))
    model.fc1.bias.copy_(t(params["fc1"]["bias"]))
    model.fc2.weight.copy_(t(np.asarray(params["fc2"]["kernel"]).T))
    model.fc2.bias.copy_(t(params["fc2"]["bias"]))


def flax_params_from_torch(state_dict: dict[str, Any], width: int) -> dict[str, Any]:
  """The inverse of `load_flax_params` for LeNet: a PyTorch LeNet_adv(width) state_dict (the
  authors' or this module's; keys conv1.weight ... fc2.bias, an AttackPGD 'basic_model.' or
  DataParallel 'module.' prefix stripped) -> flax params of models.LeNet(width).
  """
  sd = {}
  for k, v in state_dict.items():
    for prefix in ("module.", "basic_model."):
      k = k[len(prefix):] if k.startswith(prefix) else k
    sd[k] = np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v, np.float32)
  c = 4 * width
  k1 = sd["fc1.weight"].T.reshape(c, 7, 7, -1).transpose(1, 2, 0, 3).reshape(7 * 7 * c, -1)
  return {"conv1": {"kernel": sd["conv1.weight"].transpose(2, 3, 1, 0), "bias": sd["conv1.bias"]},
          "conv2": {"kernel": sd["conv2.weight"].transpose(2, 3, 1, 0), "bias": sd["conv2.bias"]},
          "fc1": {"kernel": k1, "bias": sd["fc1.bias"]},
          "fc2": {"kernel": sd["fc2.weight"].T, "bias": sd["fc2.bias"]}}
