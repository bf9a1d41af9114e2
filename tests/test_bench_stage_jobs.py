"""bench/stage_jobs.py: one command trains every stage with its own overrides."""

import argparse

import pytest
from conftest import load_module


def bench():
    return load_module("bench/stage_jobs.py", "bench_stage_jobs")


def test_per_config_overrides_reach_only_their_job_and_its_benchmark():
    b = bench()
    configs = ["small-64", "small-64-128"]
    sets = [
        "data.shards=s3://bucket/shards",  # a ':' in a value is no config prefix
        "small-64-128:train.batch_size=64",
        "small-64-128:train.grad_accum=2",
        "small-64:train.warmup_steps=200",
    ]
    assert b.sets_for("small-64", sets, configs) == ["data.shards=s3://bucket/shards", "train.warmup_steps=200"]
    assert b.sets_for("small-64-128", sets, configs) == [
        "data.shards=s3://bucket/shards",
        "train.batch_size=64",
        "train.grad_accum=2",
    ]
    args = argparse.Namespace(batch=128, set=sets, configs=",".join(configs))
    assert b.batch_for("small-64", args) == 128
    assert b.batch_for("small-64-128", args) == 64
    with pytest.raises(SystemExit, match="'small-64-12' is not one of --configs"):
        b.sets_for("small-64", ["small-64-12:train.batch_size=64"], configs)


def test_the_benchmark_runs_the_step_settings_of_its_job():
    b = bench()
    configs = ["small-64", "small-64-128"]
    sets = [
        "deepspeed.compile=true",
        "small-64-128:deepspeed.channels_last_weights=true",
        "small-64:deepspeed.compile=false",  # the later override wins
    ]
    args = argparse.Namespace(batch=128, set=sets, configs=",".join(configs))
    assert b.bench_flags_for("small-64", args) == []
    assert b.bench_flags_for("small-64-128", args) == ["--compile", "--channels_last_weights"]


def test_labels_run_one_config_twice_with_their_own_overrides_and_scores_are_read():
    b = bench()
    assert b.entries("v=small-64,eps=small-64,small-64-128") == [
        ("v", "small-64"),
        ("eps", "small-64"),
        ("small-64-128", "small-64-128"),
    ]
    args = argparse.Namespace(batch=128, set=["eps:model.diffusion.loss_target=eps"], configs="v=small-64,eps=small-64")
    assert b.sets_for("v", args.set, b.names_of(args)) == []
    assert b.sets_for("eps", args.set, b.names_of(args)) == ["model.diffusion.loss_target=eps"]
    with pytest.raises(SystemExit, match="'small-64' is not one of"):  # labelled entries answer to their label
        b.sets_for("v", ["small-64:train.lr=1e-3"], b.names_of(args))
    with pytest.raises(SystemExit, match="names repeat"):
        b.entries("small-64,small-64")
    m = b.FID_LINE.search("   64px  FID 202.31  KID 0.0909 ± 0.0000")
    assert m and m.groups() == ("64", "202.31", "0.0909")
