"""DDP communication hooks: QSGD and natural compression.

Both follow torch's per-tensor quantisation hook: every rank compresses its gradient
bucket, the compressed payloads (uint8) are all-gathered, and every rank decodes all of
them and averages — so the average is the same on every rank and only compressed bytes
cross the wire. Register with ``ddp_model.register_comm_hook(state, hook)``.

Stochastic rounding draws from a generator per state, seeded ``seed + rank`` so ranks draw
independent noise (the compressors' variance then averages down over ranks).

Error feedback (optional, ``error_feedback=True``): the part of the gradient a rank's
compressor dropped, e = v − C(v), is added to that rank's next gradient of the same bucket
before compressing (Seide et al. 2014 / Karimireddy et al. 2019), so no gradient signal is
lost over steps; the compressors here are unbiased, so it is not needed for convergence.
"""

# No ``from __future__ import annotations``: DDP checks the hook's annotations as objects
# (bucket: dist.GradBucket, return: Future[Tensor]).
import torch
import torch.distributed as dist
from torch import Tensor

from .natural import natural_encode, natural_payload_decode
from .qsgd import BUCKET_SIZE, LEVELS, check_qsgd_args, elias_gamma_bits, qsgd_decode, qsgd_encode, \
    qsgd_payload_decode


class _CompressionState:
    """What both hooks keep: process group, generator, error-feedback residuals and the byte
    counters (``bytes_sent``: compressed payload bytes this rank sent; ``bytes_dense``: what
    the same gradients take in fp32)."""

    def __init__(self, process_group: dist.ProcessGroup | None, error_feedback: bool, seed: int) -> None:
        if not isinstance(error_feedback, bool):
            raise TypeError(f"error_feedback must be a bool, got {type(error_feedback).__name__}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(f"process_group must be a torch.distributed ProcessGroup or None, got "
                            f"{type(process_group).__name__}")
        self.process_group = process_group
        self.error_feedback = error_feedback
        self.seed = seed
        self.generator: torch.Generator | None = None
        self.residuals: dict[tuple[int, int], Tensor] = {}
        self.bytes_sent = 0
        self.bytes_dense = 0

    def group(self):
        return self.process_group if self.process_group is not None else dist.group.WORLD

    def _generator(self, device: torch.device) -> torch.Generator:
        if self.generator is None or self.generator.device != device:
            rank = dist.get_rank(self.group())
            self.generator = torch.Generator(device=device).manual_seed(self.seed + rank)
        return self.generator

    def _with_residual(self, index: int, v: Tensor) -> Tensor:
        if not self.error_feedback:
            return v
        r = self.residuals.get((index, v.numel()))
        return v if r is None else v + r

    def _keep_residual(self, index: int, v: Tensor, sent: Tensor) -> None:
        if self.error_feedback:
            self.residuals[(index, v.numel())] = v - sent

    @property
    def compression_ratio(self) -> float:
        """fp32 bytes / compressed bytes over all buckets sent so far."""
        return self.bytes_dense / self.bytes_sent if self.bytes_sent else float("nan")


class QSGDState(_CompressionState):
    """State of :func:`qsgd_hook`.

    Args:
        levels: s >= 1 quantisation levels (default 16).
        bucket_size: entries per quantisation bucket (default 512), each with its fp32 norm.
        process_group: the group to communicate in (default: the default group).
        error_feedback: add each rank's previous quantisation error before quantising.
        elias: also count the Elias-gamma coded size of the levels (``coded_bits``), the
            size an entropy coder would send (the payload itself is fixed-width packed).
        seed: stochastic rounding seed (rank r uses seed + r).
    """

    def __init__(self, levels: int = LEVELS, bucket_size: int = BUCKET_SIZE, *,
                 process_group: dist.ProcessGroup | None = None, error_feedback: bool = False, elias: bool = False,
                 seed: int = 0) -> None:
        check_qsgd_args(levels, bucket_size)
        if not isinstance(elias, bool):
            raise TypeError(f"elias must be a bool, got {type(elias).__name__}")
        super().__init__(process_group, error_feedback, seed)
        self.levels, self.bucket_size, self.elias = levels, bucket_size, elias
        self.coded_bits = 0


class NaturalCompressionState(_CompressionState):
    """State of :func:`natural_compression_hook` (9 bits per entry on the wire).

    Args: ``process_group``, ``error_feedback``, ``seed`` as :class:`QSGDState`.
    """

    def __init__(self, *, process_group: dist.ProcessGroup | None = None, error_feedback: bool = False,
                 seed: int = 0) -> None:
        super().__init__(process_group, error_feedback, seed)


def _all_gather_mean(state: _CompressionState, payload: Tensor, decode, bucket_buffer: Tensor):
    group = state.group()
    world = dist.get_world_size(group)
    out = [torch.empty_like(payload) for _ in range(world)]
    fut = dist.all_gather(out, payload, group=group, async_op=True).get_future()

    def average(f) -> Tensor:
        f.wait()  # propagates a communication error; the payloads are in ``out``
        total = torch.zeros(bucket_buffer.numel(), dtype=torch.float32, device=bucket_buffer.device)
        for p in out:
            total += decode(p)
        return (total / world).to(bucket_buffer.dtype).view(bucket_buffer.shape)

    return fut.then(average)


def qsgd_hook(state: QSGDState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """DDP communication hook: QSGD-quantise the bucket, all-gather, decode, average."""
    if not isinstance(state, QSGDState):
        raise TypeError(f"qsgd_hook: state must be a QSGDState, got {type(state).__name__}")
    buf = bucket.buffer()
    v = state._with_residual(bucket.index(), buf.detach().reshape(-1).float())
    payload, norms, q = qsgd_encode(v, state.levels, state.bucket_size, generator=state._generator(v.device))
    state._keep_residual(bucket.index(), v, qsgd_decode(norms, q, state.levels, state.bucket_size))
    state.bytes_sent += payload.numel()
    state.bytes_dense += 4 * v.numel()
    if state.elias:
        state.coded_bits += 32 * norms.numel() + elias_gamma_bits(q)
    n, levels, bs = v.numel(), state.levels, state.bucket_size
    return _all_gather_mean(state, payload, lambda p: qsgd_payload_decode(p, n, levels, bs), buf)


def natural_compression_hook(state: NaturalCompressionState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """DDP communication hook: natural compression (9 bits per entry), all-gather, average."""
    if not isinstance(state, NaturalCompressionState):
        raise TypeError(f"natural_compression_hook: state must be a NaturalCompressionState, got "
                        f"{type(state).__name__}")
    buf = bucket.buffer()
    v = state._with_residual(bucket.index(), buf.detach().reshape(-1).float())
    payload, sent = natural_encode(v, generator=state._generator(v.device))
    state._keep_residual(bucket.index(), v, sent)
    state.bytes_sent += payload.numel()
    state.bytes_dense += 4 * v.numel()
    n = v.numel()
    return _all_gather_mean(state, payload, lambda p: natural_payload_decode(p, n), buf)
