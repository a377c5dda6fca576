"""A training loader whose data order is a function of (seed, iteration), so ``--resume`` continues
with exactly the images, flips and sizes an uninterrupted run would have seen.

Detectron2's ``build_detection_train_loader`` draws its order from an infinite shuffled stream
and its augmentations from the data workers' global RNGs; after a restart both begin again
from the start, so a resumed run sees other batches than an uninterrupted one.
:func:`build_detr_train_loader` takes the same arguments and instead

* numbers the samples of the (infinite) stream ``k = 0, 1, 2, ...``; iteration ``t`` is made of
  the ``total_batch_size`` samples ``k = t * total_batch_size + j``, worker ``r`` of ``R`` taking
  ``j`` in ``[r * B, (r + 1) * B)`` (``B = total_batch_size / R``);
* sample ``k`` is image ``perm_e[k mod N]`` of epoch ``e = k // N``, ``perm_e`` a permutation
  drawn from ``(seed, e)`` (the identity with ``shuffle=False``);
* the mapper (augmentations) of that sample runs with numpy's, Python's and torch's global RNGs
  seeded from ``(seed, e, index)`` (and restored afterwards), so the augmentation of a sample does
  not depend on which data worker maps it, nor on what was mapped before.

The sampler (:class:`ResumableTrainingSampler`) can start at any iteration
(:meth:`~ResumableTrainingSampler.set_start_iter`) and is checkpointed (its seed), which
``d2detr.engine.do_train`` uses on ``--resume``. Not supported: aspect-ratio grouping (its
batches depend on the order of what came before; DETR does not group either).
"""
import logging
import random
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.utils.data as torchdata
from torch import Tensor
from detectron2.data.build import trivial_batch_collator
from detectron2.data.common import DatasetFromList
from detectron2.utils import comm

__all__ = [
    "ResumableTrainingSampler",
    "SeededMapDataset",
    "build_detr_train_loader",
    "resumable_sampler",
    "sample_seed",
]

logger = logging.getLogger(__name__)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of dataset item ``index`` in ``epoch`` of a run seeded ``seed``."""
    return int(np.random.SeedSequence([int(seed), int(epoch), int(index)]).generate_state(1)[0])


def _epoch_permutation(seed: int, epoch: int, size: int, shuffle: bool) -> Tensor:
    if not shuffle:
        return torch.arange(size)
    g = torch.Generator()
    g.manual_seed(int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1)[0]))
    return torch.randperm(size, generator=g)


class ResumableTrainingSampler(torchdata.Sampler):
    """Batch sampler of one worker: yields, for every iteration from ``start_iter`` on, the list of
    ``(dataset index, augmentation seed)`` of this worker's share of the batch (see the module
    docstring for the order).

    Args:
        size: number of items in the dataset.
        total_batch_size: images per iteration over all workers (divisible by the world size).
        shuffle: a new permutation every epoch; False: dataset order.
        seed: base seed shared by all workers; None: a random one shared by all workers
            (``comm.shared_random_seed()``; checkpointed, so a resumed run keeps it).
        start_iter: first iteration to yield.
    """

    def __init__(self, size: int, total_batch_size: int, *, shuffle: bool = True,
                 seed: Optional[int] = None, start_iter: int = 0):
        if size <= 0:
            raise ValueError(f"ResumableTrainingSampler needs a non-empty dataset, got size={size}")
        world, rank = comm.get_world_size(), comm.get_rank()
        if total_batch_size <= 0 or total_batch_size % world != 0:
            raise ValueError(
                f"total_batch_size ({total_batch_size}) must be a positive multiple of the number of workers ({world})"
            )
        self.size = int(size)
        self.total_batch_size = int(total_batch_size)
        self.batch_size = self.total_batch_size // world
        self.rank = rank
        self.shuffle = bool(shuffle)
        self.seed = int(comm.shared_random_seed() if seed is None else seed)
        self.start_iter = int(start_iter)

    def set_start_iter(self, start_iter: int) -> None:
        """The iteration the next ``iter(sampler)`` begins with."""
        self.start_iter = int(start_iter)

    def item(self, k: int) -> Tuple[int, int]:
        """``(dataset index, augmentation seed)`` of sample ``k`` of the stream."""
        epoch, pos = divmod(int(k), self.size)
        if getattr(self, "_perm_epoch", None) != epoch:
            self._perm = _epoch_permutation(self.seed, epoch, self.size, self.shuffle)
            self._perm_epoch = epoch
        index = int(self._perm[pos])
        return index, sample_seed(self.seed, epoch, index)

    def batch(self, iteration: int) -> List[Tuple[int, int]]:
        """This worker's part of iteration ``iteration``."""
        first = iteration * self.total_batch_size + self.rank * self.batch_size
        return [self.item(first + j) for j in range(self.batch_size)]

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        it = self.start_iter
        while True:
            yield self.batch(it)
            it += 1

    def state_dict(self) -> dict:
        return {"seed": self.seed, "size": self.size, "total_batch_size": self.total_batch_size,
                "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        """Takes the checkpointed seed; warns when the dataset or batch size changed (the order
        then differs from the interrupted run's anyway)."""
        changed = {k: (state[k], getattr(self, k)) for k in ("size", "total_batch_size", "shuffle")
                   if k in state and state[k] != getattr(self, k)}
        if changed:
            logger.warning("The train loader changed since the checkpoint (%s): the data order after resuming "
                           "differs from the interrupted run's.",
                           ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()))
        self.seed = int(state["seed"])
        self._perm_epoch = None


class _SeededRNG:
    """Seeds numpy's, Python's and torch's (CPU) global RNGs, restoring them on exit."""

    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self):
        self.saved = (np.random.get_state(), random.getstate(), torch.random.get_rng_state())
        np.random.seed(self.seed)
        random.seed(self.seed)
        torch.random.manual_seed(self.seed)

    def __exit__(self, *exc):
        np_state, py_state, torch_state = self.saved
        np.random.set_state(np_state)
        random.setstate(py_state)
        torch.random.set_rng_state(torch_state)
        return False


class SeededMapDataset(torchdata.Dataset):
    """``dataset[index]`` mapped by ``mapper`` under RNGs seeded with the item's seed:
    ``ds[(index, seed)]``. A mapper returning None (Detectron2's "skip this one") is an error,
    since replacing the item would break the order."""

    def __init__(self, dataset: Sequence, mapper: Callable):
        self.dataset = dataset
        self.mapper = mapper

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: Tuple[int, int]):
        index, seed = item
        record = self.dataset[index]
        with _SeededRNG(seed):
            out = self.mapper(record)
        if out is None:
            name = record.get("file_name", index) if isinstance(record, dict) else index
            raise ValueError(f"the mapper returned None for {name}: build_detr_train_loader cannot skip items")
        return out


def build_detr_train_loader(
    dataset,
    *,
    mapper: Callable,
    total_batch_size: int,
    num_workers: int = 0,
    shuffle: bool = True,
    seed: Optional[int] = None,
    aspect_ratio_grouping: bool = False,
    collate_fn: Optional[Callable] = None,
) -> torchdata.DataLoader:
    """A drop-in for ``detectron2.data.build_detection_train_loader`` (same ``dataset``,
    ``mapper``, ``total_batch_size``, ``num_workers``) whose data order and augmentations are
    functions of ``(seed, iteration)`` (see the module docstring), so a resumed run continues
    exactly. Each worker gets lists of ``total_batch_size / world_size`` mapped dicts."""
    if aspect_ratio_grouping:
        raise ValueError("build_detr_train_loader does not group by aspect ratio (the batches would "
                         "depend on the order of earlier ones); use aspect_ratio_grouping=False")
    if isinstance(dataset, list):
        dataset = DatasetFromList(dataset, copy=False)
    sampler = ResumableTrainingSampler(len(dataset), total_batch_size, shuffle=shuffle, seed=seed)
    return torchdata.DataLoader(
        SeededMapDataset(dataset, mapper),
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=trivial_batch_collator if collate_fn is None else collate_fn,
    )


def resumable_sampler(loader) -> Optional[ResumableTrainingSampler]:
    """The :class:`ResumableTrainingSampler` of a loader from :func:`build_detr_train_loader`,
    else None."""
    sampler = getattr(loader, "batch_sampler", None)
    return sampler if isinstance(sampler, ResumableTrainingSampler) else None
