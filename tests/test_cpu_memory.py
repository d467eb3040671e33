"""Reused pages for large CPU outputs (mixrecipe.cpu_memory): a buffer is handed out again only when nothing
references it, and the ops' results are the same with and without the reuse."""

import threading

import pytest
import torch

from mixrecipe import cpu_memory, ops
from mixrecipe import reference as R


@pytest.fixture
def pool(monkeypatch):
    """A fresh, empty pool that takes every output (the threshold is 16 MB in use)."""
    monkeypatch.setattr(cpu_memory, "_BUFFERS", [])
    monkeypatch.setattr(cpu_memory, "POOL_MIN_BYTES", 1)
    monkeypatch.setattr(cpu_memory, "POOL_MAX_BUFFERS", 3)
    return cpu_memory


def test_a_buffer_is_reused_only_when_nothing_references_it(pool):
    x = torch.zeros(4, 3, 8, 8)
    a = pool.empty_like(x, torch.bfloat16)
    first = a.data_ptr()
    assert pool.empty_like(x, torch.bfloat16).data_ptr() != first  # a is alive
    # A view, a storage and a NumPy array each keep the buffer from being handed out again.
    for keep in (lambda t: t[1:], lambda t: t.untyped_storage(), lambda t: t.view(torch.int16).numpy()):
        held = keep(a)
        del a
        b = pool.empty_like(x, torch.bfloat16)
        assert b.data_ptr() != first
        del held
        a = pool.empty_like(x, torch.bfloat16)  # nothing over it any more: handed out again
        assert a.data_ptr() == first
        del b
    assert a.shape == x.shape and a.dtype == torch.bfloat16 and a.is_contiguous()


def test_layout_follows_x_and_small_or_odd_tensors_use_torch(pool, monkeypatch):
    x = torch.zeros(2, 3, 5, 7).contiguous(memory_format=torch.channels_last)
    out = pool.empty_like(x, torch.float16)
    assert out.stride() == x.stride() and out.is_contiguous(memory_format=torch.channels_last)
    assert pool.pooled_bytes() == x.numel() * 2
    strided = torch.zeros(2, 3, 5, 14)[..., ::2]  # not dense: torch's allocator, torch's layout
    assert pool.empty_like(strided, torch.float32).stride() == torch.empty_like(strided).stride()
    assert pool.pooled_bytes() == x.numel() * 2
    monkeypatch.setattr(cpu_memory, "POOL_MIN_BYTES", 10**9)
    pool.empty_like(x, torch.float32)
    assert pool.pooled_bytes() == x.numel() * 2


def test_a_full_pool_falls_back_and_release_unmaps_free_buffers(pool):
    x = torch.zeros(3, 100)
    held = [pool.empty_like(x, torch.float32) for _ in range(3)]
    extra = pool.empty_like(x, torch.float32)  # all three in use: torch's allocator
    assert pool.pooled_bytes() == 3 * 1200
    assert extra.data_ptr() not in {t.data_ptr() for t in held}
    other = pool.empty_like(torch.zeros(7), torch.float32)  # another size, pool full: torch's allocator
    assert pool.pooled_bytes() == 3 * 1200
    del held[0], other
    pool.empty_like(torch.zeros(7), torch.float32)  # a free one of another size makes room
    assert pool.pooled_bytes() == 2 * 1200 + 28
    assert pool.release() == 28  # the 7-float one is free again; the two held ones stay
    assert pool.pooled_bytes() == 2 * 1200


def test_threads_never_share_a_buffer(pool, monkeypatch):
    monkeypatch.setattr(cpu_memory, "POOL_MAX_BUFFERS", 64)
    x = torch.zeros(64, 64)
    taken, lock, all_done = [], threading.Lock(), threading.Barrier(4)

    def work(k):
        mine = []
        for _ in range(50):
            t = pool.empty_like(x, torch.float32)
            t.fill_(k)
            mine.append(t)
            if len(mine) > 2:
                assert (mine[0] == k).all()  # nobody else wrote into a buffer this thread holds
                mine.pop(0)
        with lock:
            taken.extend(t.data_ptr() for t in mine)
        all_done.wait()  # every thread still holds its last two while the others record theirs

    workers = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(set(taken)) == len(taken)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_the_op_with_reused_outputs_keeps_earlier_results_intact(pool, layout):
    """uint8 -> normalized bf16 with a new output each call: an output still held keeps its values while
    later calls reuse the buffers let go."""
    g = torch.Generator().manual_seed(3)
    norm = dict(mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    kept = []
    for call in range(6):
        x = torch.randint(0, 256, (4, 3, 9, 10), generator=g, dtype=torch.uint8)
        x = x.contiguous(memory_format=layout)
        target = torch.randint(0, 5, (4,), generator=g)
        out, soft = ops.mixup(x, target, 0.3, num_classes=5, out_dtype=torch.bfloat16, **norm)
        ref, _ = R.mix_reference(x, target, 0.3, num_classes=5, out_dtype=torch.float64, **norm)
        torch.testing.assert_close(out.double(), ref, rtol=1e-2, atol=2e-2)
        assert out.is_contiguous(memory_format=layout)
        if call % 2 == 0:
            kept.append((out, out.clone()))  # held: its buffer must not be handed out again
    assert all(torch.equal(held, copy) for held, copy in kept)
    assert cpu_memory.pooled_bytes() <= 3 * 4 * 3 * 9 * 10 * 2


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork for DataLoader workers")
def test_outputs_made_in_loader_workers_reach_the_main_process(pool):
    """A DataLoader worker that mixes in its collate hands pooled outputs to the main process (moved into
    shared memory on the way), values intact."""

    def collate(indices):
        x = torch.full((4, 3, 8, 8), indices[0], dtype=torch.uint8)
        return ops.mixup(x, torch.arange(4), 0.3, num_classes=4, out_dtype=torch.float32)[0]

    loader = torch.utils.data.DataLoader(list(range(16)), batch_size=4, num_workers=2, collate_fn=collate,
                                         multiprocessing_context="fork")
    got = list(loader)
    assert [float(t.mean()) * 255 for t in got] == pytest.approx([0, 4, 8, 12], abs=1e-4)
