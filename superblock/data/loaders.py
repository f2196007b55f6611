"""Samplers and loaders: train order a pure function of (seed, epoch), augmentation of a sample a pure function
of (seed, epoch, index), exact evaluation shards, worker caps, and mid-epoch resume (skip_batches)."""

from __future__ import annotations

import contextlib
import itertools
import os
import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from superblock.data.bundle import DataBundle
from superblock.data.synthetic import SyntheticShapes
from superblock.seeding import seed_everything, stable_seed


class EpochShuffleSampler(Sampler[int]):
    """Shuffled indices whose order is a pure function of ``(seed, epoch)``.

    The training loop calls ``set_epoch`` before each epoch (as with DistributedSampler), and can resume
    mid-epoch by skipping the first batches: the order does not depend on how many epochs ran before in
    this process or on any global RNG state.
    """

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(stable_seed("sampler", self.seed, self.epoch))
        return iter(torch.randperm(self.size, generator=g).tolist())

    def __len__(self) -> int:
        return self.size


@contextlib.contextmanager
def _seeded_rngs(seed: int) -> Iterator[None]:
    """Seed Python's, NumPy's and torch's global RNGs (what transforms draw from), restoring them afterwards:
    with 0 workers the samples are loaded in the training process, whose own RNG streams must not move."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        seed_everything(seed)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


class SeededSamples(Dataset):
    """A training split whose random augmentation of a sample is a pure function of ``(seed, epoch, index)``.

    Keys are ``(epoch, index)`` pairs from :class:`EpochTagged`. A worker's RNG is seeded once per process, so
    per-epoch reseeding never reaches persistent workers, and which worker loads which batch changes after a
    mid-epoch resume; seeding per sample makes both irrelevant (exact resume with any number of workers), and
    ranks, which load different indices, draw different augmentations. Plain integer keys load without seeding.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]):
        if isinstance(key, tuple):
            epoch, index = key
            with _seeded_rngs(stable_seed("sample", self.seed, epoch, index)):
                return self.dataset[index]
        return self.dataset[key]


class EpochTagged(Sampler[tuple[int, int]]):
    """Yields ``(epoch, index)`` from a sampler with ``set_epoch`` (its epoch read when iteration starts)."""

    def __init__(self, base: EpochShuffleSampler | DistributedSampler) -> None:
        self.base = base

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.base.epoch
        return ((epoch, i) for i in self.base)

    def __len__(self) -> int:
        return len(self.base)


class ShardSampler(Sampler[int]):
    """In-order indices ``rank, rank + world, ...``: every sample evaluated exactly once across ranks.

    DistributedSampler pads the last shard with repeated samples, which biases accuracy slightly; the
    evaluation loop sums counts over ranks, so uneven shards are exact.
    """

    def __init__(self, size: int, rank: int, world_size: int) -> None:
        self.indices = range(rank, size, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def build_val_loader(bundle: DataBundle, batch_size: int, num_workers: int = 0) -> DataLoader:
    """The in-order validation loader of a bundle (one process; an evaluation-only bundle is enough)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    workers = usable_workers(num_workers)
    return DataLoader(
        bundle.val, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=torch.cuda.is_available()
    )


def usable_workers(requested: int) -> int:
    """`requested` loader workers, capped at this process's share of the CPUs it may run on.

    Recipes ask for 8-12 workers per GPU; on a 2-core machine that only oversubscribes the cores (and torch warns
    every epoch). Under torchrun the share is the CPUs divided by the processes on this node."""
    if requested <= 0:
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = max(1, cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    return min(requested, per_process)


def build_loaders(
    bundle: DataBundle,
    batch_size: int,
    num_workers: int = 0,
    seed: int = 0,
    distributed: bool = False,
    drop_last: bool = True,
    pin_memory: bool | None = None,
    eval_batch_size: int | None = None,
) -> tuple[DataLoader, DataLoader, EpochShuffleSampler | DistributedSampler]:
    """Train and val loaders, plus the train sampler (call ``sampler.set_epoch(epoch)`` every epoch).

    ``batch_size`` is per process. Under ``distributed=True`` the train split is sharded with
    DistributedSampler(shuffle=True, seed=seed) and the val split with :class:`ShardSampler`
    (torch.distributed must be initialised). Train order is a pure function of (seed, epoch) either way, and the
    random augmentation of each sample a pure function of (seed, epoch, index) (:class:`SeededSamples`; not for
    a dataset whose ``random_augmentation`` is False, such as text windows).
    ``num_workers`` is capped at this process's share of the CPUs (:func:`usable_workers`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    n_train, n_val = len(bundle.train), len(bundle.val)  # type: ignore[arg-type]
    if distributed:
        import torch.distributed as dist

        rank, world = dist.get_rank(), dist.get_world_size()
        train_sampler: EpochShuffleSampler | DistributedSampler = DistributedSampler(
            bundle.train, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=drop_last
        )
        val_sampler: Sampler[int] = ShardSampler(n_val, rank, world)
    else:
        train_sampler = EpochShuffleSampler(n_train, seed)
        val_sampler = range(n_val)  # type: ignore[assignment]
    if drop_last and len(train_sampler) < batch_size:
        raise ValueError(
            f"the training split has {len(train_sampler)} samples per process, fewer than one batch of "
            f"{batch_size}: lower data.batch_size or use more data"
        )
    num_workers = usable_workers(num_workers)
    if num_workers > 0:
        # Render procedural data once here, so worker processes share it instead of each rendering a copy.
        for ds in (bundle.train, bundle.val):
            if isinstance(ds, SyntheticShapes):
                _ = ds.images
    common = {"num_workers": num_workers, "pin_memory": pin_memory, "persistent_workers": num_workers > 0}
    # Augmentations are seeded per sample (SeededSamples); the generator only fixes the workers' base seeds.
    # Datasets that draw no random numbers (text: random_augmentation = False) skip the per-sample RNG reseeding.
    augmented = getattr(bundle.train, "random_augmentation", True)
    train = DataLoader(
        SeededSamples(bundle.train, seed) if augmented else bundle.train,
        batch_size=batch_size,
        sampler=EpochTagged(train_sampler) if augmented else train_sampler,
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed),
        **common,
    )
    val = DataLoader(bundle.val, batch_size=eval_batch_size or batch_size, sampler=val_sampler, **common)
    return train, val, train_sampler


class _SkipSampler(Sampler[int]):
    """The indices of `base` after the first `skip`: the rest of an epoch, same order, nothing loaded to get there."""

    def __init__(self, base: Sampler[int], skip: int) -> None:
        self.base, self.skip = base, skip

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.base), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.base) - self.skip)  # type: ignore[arg-type]


def skip_batches(loader: DataLoader, batches: int) -> DataLoader:
    """A loader over the same epoch as `loader` that starts after `batches` batches (exact mid-epoch resume).

    The sampler must already be set to the epoch (`set_epoch`); the skipped samples are never read from disk.
    """
    if batches <= 0:
        return loader
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=_SkipSampler(loader.sampler, batches * loader.batch_size),
        drop_last=loader.drop_last,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
        collate_fn=loader.collate_fn,
        generator=loader.generator,
    )


def calibration_loader(train: DataLoader, batches: int, seed: int, rank: int = 0, world_size: int = 1) -> DataLoader:
    """`batches` batches of the training samples for measuring activations (`sparsity.score_init=activation`), the
    same whenever they are asked for: a fixed draw from `seed` (each rank its own share), loaded in this process.

    It leaves the training run as it was: the epoch's iterator (persistent workers are reset by a second `iter()`
    of the training loader), the sampler and every RNG stream (augmented samples are seeded per sample, keyed apart
    from the epochs'). So the scores can be measured at any step, e.g. again after a permutation mid-run."""
    dataset, size = train.dataset, train.batch_size or 1
    total = len(dataset)  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(stable_seed("calibration", seed))  # a loader without one draws from torch's
    keys: list = torch.randperm(total, generator=g)[: min(total, batches * size * world_size)].tolist()
    keys = keys[rank::world_size]
    if isinstance(dataset, SeededSamples):
        keys = [("calibration", i) for i in keys]
    return DataLoader(dataset, batch_size=size, sampler=keys, collate_fn=train.collate_fn, num_workers=0, generator=g)
