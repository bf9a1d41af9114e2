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
