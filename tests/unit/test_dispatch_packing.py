"""Row packing used by the one-call dispatch all-to-all is exact for any dtype mix, and the
counters add up rows and bytes per peer."""

import torch

from megatron_coe.model.dispatch import A2ACounters, pack_rows, unpack_rows


def test_pack_unpack_is_bit_exact():
    n = 7
    tensors = [torch.randn(n, 5).to(torch.bfloat16), torch.rand(n), torch.randn(n, 2, 3).double(),
               torch.randint(-5, 5, (n,), dtype=torch.int64)]
    packed = pack_rows(tensors)
    assert packed.dtype == torch.uint8
    assert packed.shape == (n, 5 * 2 + 4 + 6 * 8 + 8)
    out = unpack_rows(packed, [(t.dtype, t.shape[1:]) for t in tensors])
    for a, b in zip(tensors, out):
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8) if a.dtype == torch.bfloat16
                                                  else a, b.view(torch.uint8)
                                                  if b.dtype == torch.bfloat16 else b)


def test_pack_handles_zero_rows():
    out = unpack_rows(pack_rows([torch.empty(0, 4), torch.empty(0)]),
                      [(torch.float32, torch.Size([4])), (torch.float32, torch.Size([]))])
    assert out[0].shape == (0, 4) and out[1].shape == (0,)


def test_counters_per_peer_totals():
    c = A2ACounters(ep_rank=1)
    c.record(0, "dispatch", "forward", [3, 2], [4, 1], 10)
    c.record(1, "dispatch", "forward", [1, 0], [0, 5], 10)
    c.record(0, "combine", "backward", [4, 1], [3, 2], 8)
    assert c.entries[(0, "dispatch", "forward")].sent_bytes == [30, 20]
    fwd = c.total("forward")
    assert fwd == {"calls": 2, "sent_bytes": 60, "recv_bytes": 100, "self_bytes": 20}
    assert c.total()["calls"] == 3
