"""bench/serve.py's direct arm is the replica's own sampler call, run in-process."""

import torch
from conftest import load_module


def load_bench():
    return load_module("bench/serve.py", "bench_serve")


def test_direct_arm_is_the_replicas_sampler_call(pipe64):
    # The direct arm must give what a request gets (same seeds, steps, sampler and guidance),
    # with the images already on the host: that copy is what waits for a GPU to finish.
    kw = dict(steps=3, sampler="ddim", guidance_scale=2.0)
    got = load_bench().direct_call(pipe64, ["red apple", "rocket"], [3, 8], **kw)
    want = pipe64.generate(["red apple", "rocket"], num_samples=2, seeds=[3, 8], **kw)
    assert [tuple(x.shape) for x in got] == [tuple(x.shape) for x in want]
    for g, w in zip(got, want):
        assert g.device.type == "cpu"
        torch.testing.assert_close(g, w.cpu(), rtol=0, atol=1e-5)
    # guidance reaches the call: another scale gives other images
    other = load_bench().direct_call(
        pipe64, ["red apple", "rocket"], [3, 8], steps=3, sampler="ddim", guidance_scale=1.0
    )
    assert not torch.allclose(other[-1], got[-1], atol=1e-3)
