"""One site's local training and evaluation; knows nothing of federations.

:class:`SiteWork` implements :class:`fedfew_med.algorithms.LocalWork` for one site
and one round. Determinism without global state: the data order of every
training call is drawn from a ``torch.Generator`` seeded from (run seed, round,
site, slot), so a resumed run replays exactly what an uninterrupted one does.
Site-local buffers (norm statistics) are kept per slot in :class:`SiteState`.

Compute runs on ``[training].device`` at ``[training].precision``
(:mod:`fedfew_med.devices`): the scratch network and each batch move there, and what a call
returns (parameters, buffers, probabilities) comes back as CPU float32 tensors, so a site's
state, its replies and every checkpoint are device-free.
"""

from __future__ import annotations

import copy
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from monai.losses import DiceCELoss
from torch import nn
from torch.func import functional_call, vmap

from fedfew_med.algorithms.base import Params, Prox, TrainResult
from fedfew_med.config import TrainingConfig
from fedfew_med.data.base import SiteData, Split
from fedfew_med.devices import (
    autocast,
    backward_step,
    grad_scaler,
    memory_format,
    resolve_device,
    to_cpu,
    to_device,
)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def task_loss(task: str) -> LossFn:
    """The training loss of a task: cross-entropy (classification) or Dice + CE (segmentation)."""
    if task in ("classification", "tabular"):
        return nn.CrossEntropyLoss()
    if task == "segmentation":
        return DiceCELoss(to_onehot_y=True, softmax=True)
    raise ValueError(f"task must be 'classification', 'segmentation' or 'tabular', got {task!r}")


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from integers and strings (strings hashed with CRC32, stable across runs)."""
    ints = [p if isinstance(p, int) else zlib.crc32(p.encode()) for p in parts]
    return int(np.random.SeedSequence(ints).generate_state(2, dtype=np.uint32).astype(np.uint64) @ np.array([1 << 31, 1], dtype=np.uint64))


@dataclass
class SiteState:
    """Everything a site keeps between rounds.

    Attributes
    ----------
    models
        Personal / local models by slot (Ditto's ``personal``, Local's ``local``).
    buffers
        Norm-layer buffers by slot; a slot seen for the first time starts from the
        network's initial buffers.
    """

    models: dict[str, Params] = field(default_factory=dict)
    buffers: dict[str, Params] = field(default_factory=dict)

    def copy(self) -> SiteState:
        """Deep copy (evaluation and failed rounds must leave the real state untouched)."""
        return SiteState(models=copy.deepcopy(self.models), buffers=copy.deepcopy(self.buffers))


class SiteWork:
    """A site's compute for one round (implements ``LocalWork``).

    Parameters
    ----------
    data
        The site's data.
    network
        A network instance used as scratch space (its weights are overwritten on every call).
    initial_buffers
        Buffers of the freshly initialised network.
    state
        The site's persistent state; updated in place.
    training
        Local training hyper-parameters.
    seed, round_idx
        Run seed and round, for the per-slot data-order generators.
    """

    def __init__(
        self,
        *,
        data: SiteData,
        network: nn.Module,
        initial_buffers: Params,
        state: SiteState,
        training: TrainingConfig,
        seed: int,
        round_idx: int,
    ) -> None:
        self.data = data
        self.network = network
        self.initial_buffers = initial_buffers
        self.site_state = state
        self.training = training
        self.seed = seed
        self.round_idx = round_idx
        self.loss_fn = task_loss(data.task)
        self.device = resolve_device(training.device)
        self.precision = training.precision
        self.network.to(self.device)  # in place; a no-op when it is there already (the CPU, always, by default)
        self.memory_format = memory_format(self.network, training.channels_last)
        if self.memory_format is not None:  # in place too: load_state_dict copies into these strides
            self.network.to(memory_format=self.memory_format)  # type: ignore[call-overload]  # torch stubs omit the keyword
        self.samples_seen = 0
        self.steps_taken = 0

    # -------------------------------------------------------------- LocalWork
    @property
    def num_samples(self) -> int:
        return self.data.size("train")

    @property
    def state(self) -> dict[str, Params]:
        return self.site_state.models

    def _load(self, params: Params, slot: str) -> None:
        buffers = self.site_state.buffers.get(slot, self.initial_buffers)
        self.network.load_state_dict({**params, **buffers}, strict=True)

    def deployed_network(self, params: Params, *, slot: str) -> nn.Module:
        """The site's network holding ``params`` (and ``slot``'s norm buffers) in eval mode, for new images.

        It is the work's shared network: the next call that loads other parameters changes it.
        """
        self._load(params, slot)
        return self.network.eval()

    def _batch(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch's images (in the training memory format) and labels, on the device."""
        return to_device(batch["image"], self.device, self.memory_format), batch["label"].to(self.device)

    def generator(self, slot: str) -> torch.Generator:
        """The data-order generator of ``slot`` in this round."""
        return torch.Generator().manual_seed(derive_seed(self.seed, self.round_idx, self.data.name, slot))

    def train(
        self,
        params: Params,
        *,
        slot: str,
        epochs: int | None = None,
        prox: Prox | None = None,
        from_slot: str | None = None,
    ) -> TrainResult:
        """Plain SGD on a copy of ``params`` for ``epochs`` epochs; see ``LocalWork.train``."""
        t = self.training
        epochs = t.local_epochs if epochs is None else epochs
        if self.num_samples == 0:
            raise ValueError(f"site {self.data.name!r} has no training records")
        self._load(params, from_slot or slot)
        net = self.network
        net.train()
        opt = torch.optim.SGD(net.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
        scaler = grad_scaler(self.device, self.precision)
        loader = self.data.loader("train", batch_size=t.batch_size, generator=self.generator(slot))
        centre = {n: v.detach().to(self.device) for n, v in prox.center.items()} if prox is not None else None
        named = dict(net.named_parameters())
        steps = samples = 0
        epoch_loss = 0.0
        for _ in range(epochs):
            total, count = 0.0, 0
            for batch in loader:
                x, y = self._batch(batch)
                opt.zero_grad(set_to_none=True)
                with autocast(self.device, self.precision):
                    loss = self.loss_fn(net(x), y)
                objective = loss
                if centre is not None and prox is not None:
                    # FedProx/Ditto proximal term strength/2 · ||θ − centre||² (float32, outside autocast)
                    sq = sum(((named[n] - c) ** 2).sum() for n, c in centre.items())
                    objective = loss + 0.5 * prox.strength * sq
                backward_step(objective, opt, scaler)
                total += float(loss.detach()) * len(x)
                count += len(x)
                steps += 1
            samples += count
            epoch_loss = total / max(count, 1)
        self.site_state.buffers[slot] = to_cpu(dict(net.named_buffers()))
        self.samples_seen += samples
        self.steps_taken += steps
        new_params = to_cpu(dict(net.named_parameters()))
        return TrainResult(params=new_params, loss=epoch_loss, steps=steps, samples=samples)

    # -------------------------------------------------------------- K copies at once
    def train_many(self, params: Sequence[Params], *, slots: Sequence[str]) -> list[TrainResult]:
        """Train each of ``params`` in its slot: one after another, or with ``[training].one_pass`` in one
        vectorised pass over the data order of ``slots[0]`` (see :meth:`_train_one_pass`)."""
        if not self.training.one_pass or len(params) < 2:
            return [self.train(p, slot=s) for p, s in zip(params, slots, strict=True)]
        return self._train_one_pass(params, slots)

    def losses(self, params: Sequence[Params], *, slots: Sequence[str], split: str = "train") -> list[float]:
        """:meth:`loss` of each of ``params``; with ``one_pass``, all of them in one vectorised pass."""
        if not self.training.one_pass or len(params) < 2:
            return [self.loss(p, slot=s, split=split) for p, s in zip(params, slots, strict=True)]
        self._require_no_buffers()
        stacked = self._stack(params, grad=False)
        batched = vmap(self._loss_of, in_dims=(0, None, None))  # (K,) mean loss of each copy on one batch
        self.network.eval()
        total, count = torch.zeros(len(params), dtype=torch.float64), 0
        with torch.no_grad():
            for batch in self.data.loader(self._split(split), batch_size=max(self.training.batch_size, 64)):
                x, y = self._batch(batch)
                with autocast(self.device, self.precision):
                    per_copy = batched(stacked, x, y)
                total += per_copy.detach().to("cpu", torch.float64) * len(x)
                count += len(x)
        return [float(v) for v in total / max(count, 1)]

    def _loss_of(self, params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The task loss of the network with ``params`` on one batch (vmapped over copies)."""
        return self.loss_fn(functional_call(self.network, params, (x,)).float(), y)

    def _require_no_buffers(self) -> None:
        names = [n for n, _ in self.network.named_buffers()]
        if names:
            raise ValueError(f"site {self.data.name!r}: [training].one_pass needs a network without buffers, but it has "
                             f"{len(names)} ({names[0]}...): running statistics cannot be shared by copies in one pass")

    def _stack(self, params: Sequence[Params], *, grad: bool) -> dict[str, torch.Tensor]:
        """Parameters of the copies stacked on a new first axis: name -> (K, *shape), on the device."""
        return {n: torch.stack([p[n] for p in params]).to(self.device).requires_grad_(grad) for n in params[0]}

    def _train_one_pass(self, params: Sequence[Params], slots: Sequence[str]) -> list[TrainResult]:
        """SGD on all copies at once: ``vmap`` of the network over stacked parameters, one batch for all.

        The loss summed over copies has, for each copy, that copy's own gradient (the copies share
        no parameter), and SGD (momentum, weight decay) acts elementwise, so each copy follows the
        update it would follow alone on this data order.
        """
        self._require_no_buffers()
        if self.num_samples == 0:
            raise ValueError(f"site {self.data.name!r} has no training records")
        t = self.training
        stacked = self._stack(params, grad=True)
        opt = torch.optim.SGD(list(stacked.values()), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
        scaler = grad_scaler(self.device, self.precision)
        batched = vmap(self._loss_of, in_dims=(0, None, None))
        loader = self.data.loader("train", batch_size=t.batch_size, generator=self.generator(slots[0]))
        self.network.train()
        steps = samples = 0
        epoch_loss = torch.zeros(len(params), dtype=torch.float64)
        for _ in range(t.local_epochs):
            total, count = torch.zeros(len(params), dtype=torch.float64), 0
            for batch in loader:
                x, y = self._batch(batch)
                opt.zero_grad(set_to_none=True)
                with autocast(self.device, self.precision):
                    per_copy = batched(stacked, x, y)  # (K,)
                backward_step(per_copy.sum(), opt, scaler)
                total += per_copy.detach().to("cpu", torch.float64) * len(x)
                count += len(x)
                steps += 1
            samples += count
            epoch_loss = total / max(count, 1)
        for slot in slots:
            self.site_state.buffers[slot] = {}
        self.samples_seen += samples * len(params)
        self.steps_taken += steps * len(params)
        return [
            TrainResult(params=to_cpu({n: v[k] for n, v in stacked.items()}), loss=float(epoch_loss[k]), steps=steps, samples=samples)
            for k in range(len(params))
        ]

    @torch.no_grad()
    def loss(self, params: Params, *, slot: str, split: str = "train") -> float:
        """Mean loss of ``params`` on ``split`` in eval mode (an empty split falls back to train)."""
        split_ = self._split(split)
        self._load(params, slot)
        self.network.eval()
        total, count = 0.0, 0
        for batch in self.data.loader(split_, batch_size=max(self.training.batch_size, 64)):
            x, y = self._batch(batch)
            with autocast(self.device, self.precision):
                out = self.network(x)
            total += float(self.loss_fn(out.float(), y)) * len(x)
            count += len(x)
        return total / max(count, 1)

    # -------------------------------------------------------------- evaluation
    def _split(self, split: str) -> Split:
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be train, val or test, got {split!r}")
        if split == "val" and self.data.size("val") == 0:
            return "train"
        return split  # type: ignore[return-value]

    @torch.no_grad()
    def predict(self, params: Params, *, slot: str, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
        """Class probabilities and targets on ``split``.

        Returns
        -------
        probs, targets
            Classification: (N, C) and (N,). Segmentation: (N, C, *spatial) and (N, 1, *spatial).
        """
        self._load(params, slot)
        self.network.eval()
        probs, targets = [], []
        for batch in self.data.loader(self._split(split), batch_size=max(self.training.batch_size, 64)):
            with autocast(self.device, self.precision):
                out = self.network(to_device(batch["image"], self.device, self.memory_format))
            probs.append(torch.softmax(out.float(), dim=1).cpu())
            targets.append(batch["label"])
        if not probs:
            raise ValueError(f"site {self.data.name!r} has no {split} records")
        return torch.cat(probs), torch.cat(targets)
