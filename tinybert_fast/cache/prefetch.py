"""Prefetch: a background thread that stages batch i+1 while the caller trains on batch i.

The CUDA path gathers the records into a pinned host buffer (Staging), copies it to the device on
a side stream and unpacks it there; the consumer's stream waits on the event recorded after the
last kernel, so a yielded batch is ready to use on the current stream.  Errors (a corrupt record,
an unknown id) reach the consumer at the batch they concern.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterable, Iterator

import torch

from .extension import has_cuda_kernels


class Staging:
    """A pinned host buffer that grows as needed, and the event of the last copy out of it."""

    def __init__(self):
        self.buffer: torch.Tensor | None = None
        self.event = None

    def get(self, nbytes: int, pin: bool) -> torch.Tensor:
        if self.event is not None:
            self.event.synchronize()  # the previous copy out of this buffer must be done
            self.event = None
        if self.buffer is None or self.buffer.numel() < nbytes:
            size = max(nbytes, 1 << 20)
            size = 1 << (size - 1).bit_length()
            self.buffer = torch.empty(size, dtype=torch.uint8, pin_memory=pin)
        return self.buffer


def record_stream(tensors, stream) -> None:
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_cuda:
            t.record_stream(stream)


def batched(items: Iterable, n: int) -> Iterator[list]:
    batch = []
    for x in items:
        batch.append(int(x))
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


class Prefetcher:
    """Iterator over TeacherBatch with a background producer thread (see TeacherCache.prefetch)."""

    _DONE = object()

    def __init__(self, cache, batches, device, depth, pad_to, out_dtype, verify,
                 num_threads, attention):
        self.cache, self.device = cache, device
        self.cuda = device.type == "cuda" and has_cuda_kernels()
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        # depth batches queued + one being built + one in use by the caller
        self.slots = [Staging() for _ in range(depth + 2)]
        self.args = (pad_to, out_dtype, verify, num_threads, attention)
        self.thread = threading.Thread(target=self._produce, args=(iter(batches),), daemon=True,
                                       name="tinybert_fast-cache-prefetch")
        self.thread.start()

    def _produce(self, batches) -> None:
        pad_to, out_dtype, verify, num_threads, attention = self.args
        try:
            for k, ids in enumerate(batches):
                if self.stop.is_set():
                    return
                if self.cuda:
                    plan = self.cache._plan(ids, pad_to, out_dtype, attention)
                    item = self.cache._stage_cuda(plan, self.device,
                                                  self.slots[k % len(self.slots)], verify,
                                                  num_threads)
                else:
                    item = (self.cache.fetch(ids, self.device, pad_to, out_dtype=out_dtype,
                                             verify=verify, num_threads=num_threads,
                                             attention_form=attention), None)
                self._put(item)
        except BaseException as exc:  # delivered to the consumer at the batch it concerns
            self._put(exc)
            return
        self._put(self._DONE)

    def _put(self, item) -> None:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self):
        return self

    def __next__(self):
        if self.stop.is_set():
            raise StopIteration
        item = self.queue.get()
        if item is self._DONE:
            self.close()
            raise StopIteration
        if isinstance(item, BaseException):
            self.close()
            raise item
        batch, event = item
        if event is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(event)
            record_stream(batch, stream)
        return batch

    def close(self) -> None:
        self.stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self.queue.get_nowait()

    def __del__(self):
        self.stop.set()
