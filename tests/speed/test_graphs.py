"""GraphedCall's wiring, with a recorder that stands in for CUDA graphs on the CPU: it keeps the
recorded call and replays it into the static outputs, as a graph replays its kernels into its
static buffers. One graph per signature, recorded at the second call; inputs copied into the
static buffers; outputs handed out as copies; calls with gradients and unrecordable calls run
plainly."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

from fastvader.lora import add_lora
from fastvader.speed.graphs import GraphedCall, adapter_state


class ReplayRecorder:
    def __init__(self, fail: bool = False):
        self.recorded, self.fail = 0, fail

    def record(self, run):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.recorded += 1
        outputs = run()

        def replay():
            for static, fresh in zip(outputs, run()):
                static.copy_(fresh)
        return outputs, replay


class Counting(nn.Module):
    """Returns (x * w, x + shift); counts its runs."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(2.0))
        self.runs = 0

    def forward(self, x, shift=0.0):
        self.runs += 1
        return x * self.w, x + shift


def test_records_once_per_signature_and_replays_with_fresh_inputs():
    model, recorder = Counting(), ReplayRecorder()
    call = GraphedCall(model, recorder=recorder)
    call.activate()
    with torch.no_grad():
        first = call(torch.ones(3))  # plain: the call torch.compile compiles in
        assert recorder.recorded == 0 and model.runs == 1
        second = call(torch.full((3,), 2.0))
        assert recorder.recorded == 1 and call.replays == 1
        x = torch.arange(3.0)
        third = call(x)
        model.w.data.fill_(5.0)  # an optimizer step writes in place: the replay reads it
        fourth = call(x)
        call(torch.ones(4))  # a new shape: plain first, recorded on its second call
        call(torch.ones(4))
        call(torch.ones(3), shift=1.0)  # another value: another signature
    assert recorder.recorded == 2 and len(call.graphs) == 2 and len(call.seen) == 3
    torch.testing.assert_close(first[0], torch.full((3,), 2.0))
    torch.testing.assert_close(second[0], torch.full((3,), 4.0))
    torch.testing.assert_close(third, (2 * x, x))
    torch.testing.assert_close(fourth, (5 * x, x))
    # what a caller holds is a copy: later replays do not change it
    assert third[0].data_ptr() != fourth[0].data_ptr()
    torch.testing.assert_close(third[0], 2 * x)
    assert "2 graph(s) recorded" in call.describe()


def test_plain_until_active_with_gradients_and_after_a_failed_recording():
    model = Counting()
    call = GraphedCall(model, recorder=ReplayRecorder(fail=True))
    with torch.no_grad():
        call(torch.ones(2)), call(torch.ones(2))
    assert call.graphs == {} and call.error is None  # not active yet
    call.activate()
    out = call(torch.ones(2))  # gradients on: never graphed
    assert out[0].requires_grad and call.error is None
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = [call(torch.ones(2))[0] for _ in range(4)]
    assert len(caught) == 1 and "could not record the call (RuntimeError: operation not permitted" in str(caught[0].message)
    assert call.error is not None and all(torch.equal(r, torch.full((2,), 2.0)) for r in results)
    call.release()
    assert not call.active and call.graphs == {}


def test_adapter_switches_are_part_of_the_signature():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4)).requires_grad_(False)
    add_lora(model, 2, 2.0, 0.0, ["0"], init_weights=False)
    key = adapter_state(model)
    before = key()
    model[0]._disable_adapters = True  # what the safeguards' regulariser and peft's enable_adapters set
    assert key() != before
    model[0]._disable_adapters = False
    assert key() == before
    assert adapter_state(nn.Linear(2, 2))() == ()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (the GPU suite runs this)")
def test_cuda_graphs_replay_a_module_on_the_gpu():
    model = nn.Sequential(nn.Linear(16, 16), nn.GELU()).cuda()
    call = GraphedCall(model)
    call.activate()
    with torch.no_grad():
        outs = [call(torch.full((2, 16), float(i), device="cuda")) for i in range(4)]
        want = [model(torch.full((2, 16), float(i), device="cuda")) for i in range(4)]
    assert len(call.graphs) == 1 and call.replays == 3
    for got, ref in zip(outs, want):
        torch.testing.assert_close(got, ref)
