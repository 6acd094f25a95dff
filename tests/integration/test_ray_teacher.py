"""The Ray teacher stage on a local 2-CPU Ray: transport, streaming, backpressure, spilling,
actor failure, caching, and fast failures for bad addresses and impossible resource requests."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import time
from contextlib import contextmanager

import pytest
import torch

pytest.importorskip("ray")

import ray  # noqa: E402

from ia2dist.config import ExtractConfig, ModelConfig  # noqa: E402
from ia2dist.errors import IA2Error  # noqa: E402
from ia2dist.backends.ray import cluster  # noqa: E402
from ia2dist.backends.ray.packing import pack_records, unpack_records  # noqa: E402
from ia2dist.backends.ray.messages import TeacherStageOptions  # noqa: E402
from ia2dist.backends.ray.teacher_stage import TeacherStage  # noqa: E402
from ia2dist.backends.ray.transport import fetch_records  # noqa: E402
from ia2dist.model.load import load_model, load_tokenizer  # noqa: E402
from ia2dist.teacher.store import TeacherStore, extraction_settings, shard_dir  # noqa: E402
from ia2dist.records import TeacherRecord  # noqa: E402
from ia2dist.teacher.extract import extract  # noqa: E402
from tests.helpers import free_port  # noqa: E402
from tests.unit.test_packing import _assert_same  # noqa: E402

pytestmark = pytest.mark.ray

OBJECT_STORE_BYTES = 80 * 1024 * 1024
TINY = ModelConfig(name_or_path="tiny:llama", device="cpu")
T = 6
EXTRACT = ExtractConfig(batch_size=4, act_dtype="float32", topk=3)
WORDS = "alpha beta gamma delta the movie was great a dull and boring plot".split()


def _prompts(n: int, offset: int = 0) -> tuple[list[str], list[str]]:
    """Prompts of varied lengths (so batches pad) and their uids."""
    prompts = [f"Text:{' '.join(WORDS[(i + offset) % 7:(i + offset) % 7 + 1 + i % 5])}\nLabel:"
               for i in range(n)]
    return prompts, [f"ex{offset + i}" for i in range(n)]


@contextmanager
def _options(stage: TeacherStage, **changes):
    saved = {k: getattr(stage.options, k) for k in changes}
    for k, v in changes.items():
        setattr(stage.options, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(stage.options, k, v)


# --------------------------------------------------------------------------------------------------
# Addresses (fail fast, whatever the state of this process)
# --------------------------------------------------------------------------------------------------

def test_unreachable_address_fails_fast(monkeypatch):
    port = free_port()
    started = time.time()
    with pytest.raises(IA2Error, match=f"127.0.0.1:{port}.*ray start --head"):
        cluster.connect(f"127.0.0.1:{port}", timeout_s=5)
    # an address nothing answers at (or something that is not a Ray head): Ray alone would retry
    # for minutes
    with pytest.raises(IA2Error, match="198.51.100.7:6379"):
        cluster.connect("198.51.100.7:6379", timeout_s=3)
    with socket.socket() as listener:  # accepts connections, never speaks gRPC
        listener.bind(("", 0))  # all interfaces: Ray maps 127.0.0.1 to the node address
        listener.listen()
        silent = f"127.0.0.1:{listener.getsockname()[1]}"
        with pytest.raises(IA2Error, match=f"{silent}.*(no answer|not a Ray head)"):
            cluster.connect(silent, timeout_s=3)
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    with pytest.raises(IA2Error, match=f"'auto'.*:{port}"):
        cluster.connect("auto", timeout_s=5)
    with pytest.raises(IA2Error, match="host:port"):
        cluster.connect("not-an-address", timeout_s=1)
    assert time.time() - started < 30
    assert not ray.is_initialized()


# --------------------------------------------------------------------------------------------------
# On a local cluster
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_ctx():
    temp_dir = f"/tmp/ray_t{os.getpid()}"
    ctx = cluster.connect(None, num_cpus=2, object_store_bytes=OBJECT_STORE_BYTES,
                          temp_dir=temp_dir)
    yield ctx
    ctx.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def teacher():
    tokenizer = load_tokenizer(TINY)
    return load_model(TINY, device="cpu"), tokenizer


@pytest.fixture(scope="module")
def stage(ray_ctx):
    """Two tiny-llama replicas of half a CPU each (the other CPU stays free for other stages)."""
    options = TeacherStageOptions(num_actors=2, cpus_per_actor=0.5, shard_size=2,
                                  max_restarts=2)
    with TeacherStage(TINY, EXTRACT, max_new_tokens=T, options=options) as st:
        yield st


def _reference(teacher, prompts, uids, **kw) -> list[TeacherRecord]:
    model, tokenizer = teacher
    kwargs = dict(max_new_tokens=T, batch_size=EXTRACT.batch_size, act_dtype=torch.float32,
                  topk=EXTRACT.topk)
    kwargs.update(kw)
    return extract(model, tokenizer, prompts, uids, **kwargs)


def test_connect_local_context(ray_ctx):
    assert ray_ctx.owns_cluster and ray_ctx.resources()["CPU"] == 2
    assert ray_ctx.resources()["object_store_memory"] == OBJECT_STORE_BYTES
    with pytest.raises(IA2Error, match="already initialised"):
        cluster.connect(None)


def test_object_store_transport_is_zero_copy(ray_ctx):
    records = [TeacherRecord(uid="a", response_ids=torch.tensor([4, 2]),
                             acts_LTD=torch.randn(2, 2, 16).bfloat16())]
    packed = ray.get(ray.put(pack_records(records)))
    assert not packed.acts_LKD.flags.writeable  # a view of the shared-memory object
    (got,) = unpack_records(packed)
    assert got.acts_LTD.dtype == torch.bfloat16 and torch.equal(got.acts_LTD, records[0].acts_LTD)


def _reference_by_shard(teacher, prompts, uids, shard_size) -> list[TeacherRecord]:
    """One-process extraction of each shard's prompts (the same batches the actors run)."""
    return [rec for i in range(0, len(prompts), shard_size)
            for rec in _reference(teacher, prompts[i:i + shard_size], uids[i:i + shard_size])]


def test_records_equal_single_process_extract(stage, teacher):
    prompts, uids = _prompts(11)
    with _options(stage, shard_size=4):
        got = stage.run_records(prompts, uids)
    assert stage.stats.num_shards == 3 and stage.stats.attempts == [1] * 3
    _assert_same(got, _reference_by_shard(teacher, prompts, uids, 4))  # bit-exact
    assert sum(stage.stats.act_bytes) == sum(r.nbytes() for r in got)
    # each replica that extracted reports the decode settings it proved (the KV-cached path)
    proofs = [p for per_actor in ray.get([a.decoding.remote() for a in stage.actors])
              for p in per_actor]
    assert proofs and all(p["kv_cache"] and p["model"] == "LlamaForCausalLM" for p in proofs)
    # against one extract over all prompts, batches pad differently: same tokens, fp32 rounding
    whole = _reference(teacher, prompts, uids)
    for g, w in zip(got, whole):
        assert torch.equal(g.response_ids, w.response_ids)
        torch.testing.assert_close(g.acts_LTD, w.acts_LTD, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(g.topk_logprobs_Tk, w.topk_logprobs_Tk, rtol=1e-4, atol=1e-5)


def test_consumer_starts_before_extraction_ends_and_budget_holds(stage):
    prompts, uids = _prompts(12, offset=3)
    budget = 2 * stage.shard_bound(2)
    order = []
    with _options(stage, byte_budget=budget):
        for shard, ref in stage.run(prompts, uids):
            records = fetch_records(ref)
            assert [r.uid for r in records] == uids[2 * shard:2 * shard + 2]
            order.append(shard)
            time.sleep(0.05)  # a consumer slower than nothing
            stage.release(shard)
    stats = stage.stats
    assert sorted(order) == list(range(6))
    # the first shard was consumed (released) before the last one was produced
    assert stats.released_at[order[0]] < max(stats.finished_at)
    assert 0 < stats.peak_inflight_bytes <= budget
    assert stats.peak_held_bytes <= budget


def test_consumer_that_never_releases_gets_an_error_not_a_hang(stage):
    prompts, uids = _prompts(8)
    with _options(stage, byte_budget=2 * stage.shard_bound(2)):
        with pytest.raises(IA2Error, match="release"):
            for _shard, _ref in stage.run(prompts, uids):
                pass
    with _options(stage, byte_budget=stage.shard_bound(2) - 1):
        with pytest.raises(IA2Error, match="smaller than one shard"):
            stage.run(prompts, uids)
    # a consumer that stops early leaves the pool usable
    for _shard, _ref in stage.run(prompts, uids):
        break
    assert [r.uid for r in stage.run_records(prompts, uids)] == uids


def _store(path, meta: dict, uids, shard_size: int = 2) -> TeacherStore:
    return TeacherStore(path, meta, extraction_settings(T, (), EXTRACT.act_dtype, EXTRACT.topk),
                        uids, shard_size)


def test_shards_persist_and_are_reused(stage, teacher, tmp_path):
    prompts, uids = _prompts(5, offset=1)
    first = stage.run_records(prompts, uids, store=_store(tmp_path, {"run": 1}, uids))
    assert (shard_dir(tmp_path, 2) / "manifest.json").is_file()
    second = stage.run_records(prompts, uids, store=_store(tmp_path, {"run": 1}, uids))
    assert stage.stats.from_cache == [True] * 3 and stage.stats.attempts == [0] * 3
    _assert_same(second, first)
    _assert_same(first, _reference_by_shard(teacher, prompts, uids, 2))
    # the one-process backend reads the same store
    _assert_same(_store(tmp_path, {"run": 1}, uids).read_all(), first)
    with pytest.raises(IA2Error, match="different settings"):
        stage.run_records(prompts, uids, store=_store(tmp_path, {"run": 2}, uids))


def test_shards_travel_in_parts_each_reader_pulls_its_own(stage, teacher):
    """With parts (one per rank of a group), each shard comes back as one object per part holding
    exactly the examples of that part, in order; together they are the shard."""
    prompts, uids = _prompts(7, offset=4)
    part_of = [0, 1, 1, 0, 1, 0, 0]
    with _options(stage, shard_size=3):
        for shard, refs in stage.run(prompts, uids, parts=part_of, num_parts=2, tag="t"):
            assert len(refs) == 2
            lo = 3 * shard
            for part, ref in enumerate(refs):
                got = fetch_records(ref)
                assert [r.uid for r in got] == [u for k, u in enumerate(uids[lo:lo + 3])
                                               if part_of[lo + k] == part]
            want = _reference(teacher, prompts[lo:lo + 3], uids[lo:lo + 3])
            _assert_same(sorted(fetch_records(refs), key=lambda r: uids.index(r.uid)), want)
        assert stage.held_bytes() > 0
        assert stage.release_tag("t") > 0 and stage.held_bytes() == 0


def test_killed_actor_restarts_and_only_unfinished_shards_rerun(stage, teacher):
    prompts, uids = _prompts(16, offset=2)
    victim_pid = stage.actor_pids()[0]
    seen, before_kill, payload_meta = [], set(), {}
    with _options(stage, shard_size=1):
        for shard, ref in stage.run(prompts, uids):
            if not seen:
                os.kill(victim_pid, signal.SIGKILL)
                before_kill.add(shard)
            seen.append(shard)
            packed = ray.get(ref[0])
            payload_meta[shard] = dict(packed.meta)
            (record,) = unpack_records(packed)
            _assert_same([record], _reference(teacher, [prompts[shard]], [uids[shard]]))
            stage.release(shard)
    stats = stage.stats
    assert sorted(seen) == list(range(16))  # every shard exactly once
    assert stats.completions == [1] * 16
    assert stats.actor_failures == 1 and stats.reruns >= 1
    assert sum(stats.attempts) == 16 + stats.reruns
    assert all(stats.attempts[s] == 1 for s in before_kill)  # finished shards never recomputed
    rerun = [s for s in range(16) if stats.attempts[s] > 1]
    assert rerun and all(payload_meta[s]["pid"] != victim_pid for s in rerun)
    assert all(payload_meta[s]["attempt"] == stats.attempts[s] for s in range(16))
    new_pids = stage.wait_for_actors(timeout_s=120)
    assert new_pids[0] != victim_pid and new_pids[0] is not None
    # the restarted replica works
    got = stage.run_records(*_prompts(4))
    _assert_same(got, _reference_by_shard(teacher, *_prompts(4), 2))


def test_impossible_resource_requests_fail_fast(ray_ctx):
    started = time.time()
    with pytest.raises(IA2Error, match="need 3 CPU"):
        cluster.check_resources(num_actors=3, cpus_per_actor=1)
    with pytest.raises(IA2Error, match="GPU"):
        cluster.check_resources(num_actors=1, cpus_per_actor=0.5, gpus_per_actor=0.5)
    with pytest.raises(IA2Error, match="worker"):
        cluster.check_resources(num_actors=1, cpus_per_actor=1, num_workers=4, cpus_per_worker=1)
    with pytest.raises(IA2Error, match="STRICT_SPREAD"):
        cluster.check_resources(num_actors=2, cpus_per_actor=0.5, strategy="STRICT_SPREAD")
    cluster.check_resources(num_actors=2, cpus_per_actor=1)  # fits
    options = TeacherStageOptions(num_actors=1, cpus_per_actor=1, gpus_per_actor=1)
    with pytest.raises(IA2Error, match="GPU"):
        TeacherStage(TINY, EXTRACT, max_new_tokens=T, options=options).start()
    assert time.time() - started < 10


@pytest.fixture(scope="module")
def deep_model_dir(tmp_path_factory):
    """A narrow 64-layer llama: 88 KiB of fp32 activations per response position, so a few
    thousand positions outgrow the 80 MiB object store while staying cheap to compute."""
    from ia2dist.model.tiny import build_tiny_model

    path = tmp_path_factory.mktemp("deep")
    tokenizer = load_tokenizer(TINY)
    model = build_tiny_model("llama", tokenizer, seed=0, hidden=64, layers=64, heads=4, ffn=64)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_output_larger_than_object_store_spills_and_reads_back(ray_ctx, deep_model_dir):
    cfg = ModelConfig(name_or_path=str(deep_model_dir), device="cpu", dtype="float32")
    extract_cfg = ExtractConfig(batch_size=32, act_dtype="float32")
    prompts, uids = _prompts(128, offset=5)
    options = TeacherStageOptions(num_actors=1, cpus_per_actor=1, shard_size=32,
                                  byte_budget=4 * OBJECT_STORE_BYTES)
    refs = {}
    with TeacherStage(cfg, extract_cfg, max_new_tokens=44, options=options) as deep:
        for shard, ref in deep.run(prompts, uids):
            refs[shard] = ref  # hold everything: the store must spill
        total = sum(deep.stats.act_bytes)
        assert total > OBJECT_STORE_BYTES
        assert any(files for _, _, files in os.walk(ray_ctx.spill_dir))
        model, tokenizer = load_model(cfg), load_tokenizer(cfg)
        for shard in sorted(refs):
            if shard in (min(refs), max(refs)):  # the first put (spilled first) and the last
                lo, hi = 32 * shard, 32 * shard + 32
                want = extract(model, tokenizer, prompts[lo:hi], uids[lo:hi], max_new_tokens=44,
                               batch_size=32, act_dtype=torch.float32)
                _assert_same(fetch_records(refs[shard]), want)
            else:
                assert len(fetch_records(refs[shard])) == 32  # read back from the spill too
            deep.release(shard)
        assert deep.stats.peak_held_bytes >= total


def test_teacher_load_error_reaches_the_driver_as_one_line(ray_ctx):
    missing = ModelConfig(name_or_path="/nonexistent/teacher_dir", device="cpu")
    options = TeacherStageOptions(num_actors=1, cpus_per_actor=1, ready_timeout_s=120)
    with pytest.raises(IA2Error, match="/nonexistent/teacher_dir does not exist") as info:
        TeacherStage(missing, EXTRACT, max_new_tokens=T, options=options).start()
    assert "\n" not in str(info.value)
