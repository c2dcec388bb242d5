"""The micro-batch graph's bookkeeping on CPU, with a stand-in for torch's CUDA graph.

A real capture records the step's kernels without running them, and a replay runs them again
on whatever the captured input tensors then hold, writing the captured output tensors. The
stand-in does the same in Python: capture runs the step once to get output tensors and then
undoes its gradient accumulation (a capture runs nothing); replay runs the step on the
captured inputs and copies the results into those outputs. What is checked is the part that
is not torch's: inputs copied in before each replay, the captured micro-batch computed once,
other shapes run eagerly, gradients accumulated exactly as an eager run does. The GPU itself
is checked by benchmarks/bench_trainer_graphs.py.
"""

import pytest
import torch

from posttrain.model.moe import RoutingSegments
from posttrain.train.cuda_graph import MicroBatchGraph, batch_signature


class StandInGraph:
    def __init__(self):
        self.fn = self.outputs = None
        self.replays = 0

    def replay(self):
        loss, metrics = self.fn()
        self.outputs[0].copy_(loss)
        for k, v in metrics.items():
            self.outputs[1][k].copy_(v)
        self.replays += 1


def stand_in_capture(params):
    def capture(graph, fn):
        before = [p.grad.clone() for p in params]
        loss, metrics = fn()
        for p, g in zip(params, before):  # a capture runs nothing
            p.grad.copy_(g)
        graph.fn = fn
        graph.outputs = (loss.clone(), {k: v.clone() for k, v in metrics.items()})
        return graph.outputs
    return capture


def make_step(model):
    def step(batch):
        pred = model(batch["x"])
        # the routing segments take part, as the trainer's batches carry them
        w = (batch["seg"].seq_N >= 0).float()[:, None]
        loss = ((pred - batch["y"]) ** 2 * w).mean()
        (loss / 2).backward()
        return loss.detach(), {"tokens": w.sum()}
    return step


def batches(n, rows=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        r = rows if i != n - 2 else rows + 2  # one micro-batch of another shape
        seq = torch.randint(-1, 3, (r,), generator=g)
        out.append({"x": torch.randn(r, 5, generator=g), "y": torch.randn(r, 3, generator=g),
                    "seg": RoutingSegments(seq, 4)})
    return out


def test_replays_accumulate_like_eager():
    torch.manual_seed(0)
    eager_model = torch.nn.Linear(5, 3)
    graph_model = torch.nn.Linear(5, 3)
    graph_model.load_state_dict(eager_model.state_dict())
    data = batches(9)

    eager_losses = [make_step(eager_model)(b)[0].item() for b in data]
    params = list(graph_model.parameters())
    runner = MicroBatchGraph(make_step(graph_model), params, warmup=2, graph_factory=StandInGraph,
                             capture=stand_in_capture(params))
    with pytest.warns(UserWarning, match="shapes differ"):
        got = [runner(b)[0].item() for b in data]

    assert runner.graph is not None and runner.failed is None
    # micro-batches 3.. replay (the capture's own one included), except the one of another shape
    assert runner.replays == runner.graph.replays == len(data) - 2 - 1
    assert got == pytest.approx(eager_losses, rel=1e-6)
    for p, q in zip(eager_model.parameters(), graph_model.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-6, atol=1e-7)


def test_a_capture_that_fails_goes_on_eagerly():
    model = torch.nn.Linear(5, 3)
    params = list(model.parameters())

    def failing_capture(graph, fn):
        raise RuntimeError("operation not permitted when stream is capturing")

    runner = MicroBatchGraph(make_step(model), params, warmup=1, graph_factory=StandInGraph, capture=failing_capture)
    data = batches(4)
    with pytest.warns(UserWarning, match="capturing the micro-batch failed"):
        losses = [runner(b)[0] for b in data]
    assert runner.graph is None and "not permitted" in runner.failed
    assert all(torch.isfinite(l) for l in losses)


def test_signature_sees_shapes_dtypes_and_the_sequence_bound():
    b = batches(1)[0]
    assert batch_signature(b) == batch_signature({k: v for k, v in b.items()})
    assert batch_signature(b) != batch_signature({**b, "x": b["x"].double()})
    assert batch_signature(b) != batch_signature({**b, "seg": RoutingSegments(b["seg"].seq_N, 8)})


def test_trainer_refuses_cuda_graphs_without_a_gpu(tmp_path):
    from posttrain.train.config import TrainConfig
    from posttrain.train.loop import Trainer, lm_loss

    cfg = TrainConfig(out_dir=str(tmp_path), cuda_graphs=True, report_to=[], progress=False)
    with pytest.raises(ValueError, match="cuda_graphs: it needs a CUDA device"):
        Trainer(torch.nn.Linear(2, 2), cfg, lm_loss(0.3), lambda rows: rows)
