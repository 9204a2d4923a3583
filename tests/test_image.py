"""The compiled BPF program kept on disk (ImageCache) and loaded without
BCC's compiler (BpfObject).

- The cache itself, without root: keys, ownership, pruning.
- With real BPF: a generated program compiled once, then loaded from its
  image into fresh maps, must count exactly what the same program counts
  when BCC compiled it; every function of s3slower's own program (each
  option set's text) must load from a fresh image.
- End to end: a tracer started cold (a text never compiled) and again warm
  reports the same generated requests exactly; the warm start names the
  image it loaded.

S3SLOWER_IMAGE_SEED=N reruns with the same generated values.
"""

import ctypes
import json
import os
import random
import threading

import pytest

from conftest import Tracer, require_bpf, run_client

import s3slower

SEED = int(os.environ.get("S3SLOWER_IMAGE_SEED") or random.randrange(1 << 30))


def setup_module():
    print("image seed: %d (rerun: S3SLOWER_IMAGE_SEED=%d)" % (SEED, SEED))


class FakeBcc:
    __version__ = "test"


def test_cache_round_trip_and_keys(tmp_path):
    cache = s3slower.ImageCache(str(tmp_path))
    image = dict(version=s3slower.IMAGE_VERSION, functions={"f": {}},
                 maps=[], license="GPL", kern_version=0)
    assert cache.get(FakeBcc, "text a") is None
    cache.put(FakeBcc, "text a", image)
    got = cache.get(FakeBcc, "text a")
    assert got == image
    assert cache.get(FakeBcc, "text b") is None
    other = type("OtherBcc", (), {"__version__": "other"})
    assert cache.get(other, "text a") is None
    assert cache.path(FakeBcc, "text a") != cache.path(other, "text a")


def test_cache_refuses_what_others_could_write(tmp_path):
    cache = s3slower.ImageCache(str(tmp_path))
    cache.put(FakeBcc, "t", dict(version=s3slower.IMAGE_VERSION))
    path = cache.path(FakeBcc, "t")
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o644)
    os.chmod(path, 0o666)
    assert cache.get(FakeBcc, "t") is None
    os.chmod(path, 0o644)
    assert cache.get(FakeBcc, "t") is not None
    with open(path, "w") as f:
        f.write("{not json")
    assert cache.get(FakeBcc, "t") is None
    with open(path, "w") as f:
        json.dump({"version": s3slower.IMAGE_VERSION + 1}, f)
    assert cache.get(FakeBcc, "t") is None


def test_cache_keeps_the_most_recent(tmp_path):
    cache = s3slower.ImageCache(str(tmp_path))
    rng = random.Random(SEED)
    count = cache.KEEP + rng.randrange(1, 6)
    for i in range(count):
        cache.put(FakeBcc, "text %d" % i, {"version": s3slower.IMAGE_VERSION})
        os.utime(cache.path(FakeBcc, "text %d" % i), (i, i))
    cache.put(FakeBcc, "last", {"version": s3slower.IMAGE_VERSION})
    kept = sorted(os.listdir(str(tmp_path)))
    assert len(kept) == cache.KEEP
    assert cache.get(FakeBcc, "last") is not None
    assert cache.get(FakeBcc, "text 0") is None


# A program with every kind of map s3slower uses, a tail call and a
# tracepoint: what it counts must not depend on how it was loaded.
PROGRAM = r"""
#include <uapi/linux/ptrace.h>
#undef TRACEPOINT_PROBE
#define TRACEPOINT_PROBE(category, event) \
int tp__##category##__##event(struct tracepoint__##category##__##event *args)
struct big { u64 calls; u64 sum; char pad[%(pad)d]; };
BPF_HASH(by_tid, u32, struct big, 64);
BPF_TABLE("lru_hash", u32, u64, lru, 16);
BPF_ARRAY(totals, u64, 4);
BPF_PERCPU_ARRAY(scratch, struct big, 1);
BPF_RINGBUF_OUTPUT(events, 4);
BPF_PROG_ARRAY(next_step, 1);

int second_step(struct pt_regs *ctx)
{
    int k = 1;
    u64 *v = totals.lookup(&k);
    if (v)
        __sync_fetch_and_add(v, 1);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_getppid)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (tgid != %(pid)d)
        return 0;
    u32 tid = (u32)bpf_get_current_pid_tgid();
    int zero = 0;
    struct big *s = scratch.lookup(&zero);
    if (!s)
        return 0;
    struct big *b = by_tid.lookup_or_try_init(&tid, s);
    if (b) {
        b->calls++;
        b->sum += %(step)d;
    }
    u64 one = 1, *l = lru.lookup(&tid);
    if (l)
        (*l)++;
    else
        lru.update(&tid, &one);
    u64 *t = totals.lookup(&zero);
    if (t)
        __sync_fetch_and_add(t, 1);
    u64 mark = 0x5333534c4f574552ULL;
    events.ringbuf_output(&mark, sizeof(mark), 0);
    next_step.call(args, 0);
    return 0;
}
"""


def run_counts(bpf, calls):
    """Attach, make calls getppid() calls, read what the program counted."""
    seen = []

    def on_event(ctx, data, size):
        seen.append(ctypes.string_at(data, size))
        return 0
    tail = bpf.load("second_step", s3slower.BPF_PROG_TYPE_TRACEPOINT)
    bpf["next_step"][ctypes.c_int(0)] = ctypes.c_int(tail)
    bpf.open_ring_buffer("events", on_event)
    bpf.attach_tracepoints()
    for _ in range(calls):
        os.getppid()
    bpf.ring_buffer_consume()
    mine = bpf["by_tid"][bpf["by_tid"].Key(threading.get_native_id())]
    return dict(calls=mine.calls, sum=mine.sum,
                lru=[v.value for _, v in bpf["lru"].items()],
                total=bpf["totals"][ctypes.c_int(0)].value,
                tail=bpf["totals"][ctypes.c_int(1)].value,
                events=len(seen), mark=set(seen))


def test_image_loads_like_the_compiled_program():
    require_bpf()
    import bcc
    rng = random.Random(SEED)
    text = PROGRAM % dict(pad=rng.choice([8, 24, 200, 1000]),
                          pid=os.getpid(), step=rng.randrange(1, 1000))
    step = int(text.split("b->sum += ")[1].split(";")[0])
    image, compiler = s3slower.compile_image(bcc, text)
    assert set(image["functions"]) == {"second_step",
                                       "tp__syscalls__sys_enter_getppid"}
    # Every map reference was found: 7 lookups/updates/outputs/calls.
    referenced = {index for f in image["functions"].values()
                  for _, index in f["maps"]}
    assert {image["maps"][i]["name"] for i in referenced} == {
        "by_tid", "lru", "totals", "scratch", "events", "next_step"}
    compiled = s3slower.BpfObject(bcc, image, compiler)
    for bpf in (compiled, s3slower.BpfObject(bcc, json.loads(json.dumps(
            image)))):
        # BCC's maps first, then new ones from the image as saved on disk.
        if bpf is not compiled:
            assert not set(bpf.map_fds) & set(compiled.map_fds)
        calls = rng.randrange(1, 300)
        got = run_counts(bpf, calls)
        for fd in bpf.links:
            os.close(fd)          # detach before the next round
        assert got == dict(calls=calls, sum=calls * step, lru=[calls],
                           total=calls, tail=calls, events=calls,
                           mark={(0x5333534c4f574552).to_bytes(8, "little")})


@pytest.mark.parametrize("options", [
    dict(plain=None), dict(plain="syscalls"), dict(plain="tcp"),
    dict(plain="syscalls", port=9000),
    dict(plain=None, pid=1, comm="aws")])
def test_every_function_of_the_tool_loads_from_a_fresh_image(options):
    require_bpf()
    import bcc
    text = s3slower.bpf_program(options.get("pid"), options.get("comm"),
                                ringbuf_pages=16, plain=options["plain"],
                                port=options.get("port"))
    image, compiler = s3slower.compile_image(bcc, text)
    fresh = s3slower.BpfObject(bcc, json.loads(json.dumps(image)))
    assert not set(fresh.map_fds) & set(
        s3slower.BpfObject(bcc, image, compiler).map_fds)
    tracepoint = {"parse_tracepoint"} | {
        name for name in image["functions"] if name.startswith("tp__")}
    for name in image["functions"]:
        fd = fresh.load(name, s3slower.BPF_PROG_TYPE_TRACEPOINT
                        if name in tracepoint else
                        s3slower.BPF_PROG_TYPE_KPROBE)
        assert fd > 0
    del compiler


def test_cold_then_warm_start_report_the_same(s3_server, tmp_path):
    """The first start compiles (its image removed first), the second loads
    the image; both report the same generated requests exactly."""
    require_bpf()
    import bcc
    rng = random.Random(SEED)
    options = ["--comm", "curl", "--ringbuf-pages",
               str(1 << rng.randrange(5, 9))]
    args = s3slower.parse_args(options)
    path = s3slower.IMAGE_CACHE.path(bcc, s3slower.bpf_program(
        args.pid, args.comm, ringbuf_pages=args.ringbuf_pages,
        plain=s3slower.plain_method(args), port=args.port))
    if os.path.exists(path):
        os.unlink(path)
    # Around the record and read boundaries the bugs so far lived at, or
    # anywhere up to 2 MiB.
    sizes = [rng.choice([0, rng.randrange(1, (2 << 20) + 1),
                         rng.choice([4, 16, 48, 64, 1024]) * 1024 +
                         rng.randrange(-1, 2)]) for _ in range(4)]
    starts = []
    for round_ in ("cold", "warm"):
        t = Tracer(*options)
        try:
            starts.append(t.start_seconds)
            expected = []
            for i, size in enumerate(sizes):
                url = "%s/image-%d/%s%d" % (s3_server.url, SEED, round_, i)
                body = tmp_path / ("%s%d" % (round_, i))
                body.write_bytes(os.urandom(size))
                pid, _ = run_client(["curl", "-sk", "-X", "PUT",
                                     "--data-binary", "@%s" % body,
                                     "-o", "/dev/null", url])
                expected.append((pid, "PUT", size, None))
                pid, out = run_client(["curl", "-sk", "-o", "/dev/null", "-w",
                                       "%{size_download}", url])
                expected.append((pid, "GET", None, int(out)))
            for pid, method, req_bytes, resp_bytes in expected:
                got = t.wait_records(1, pid=pid)
                assert len(got) == 1, got
                assert got[0]["method"] == method
                assert got[0]["complete"] is True
                if req_bytes is not None:
                    assert got[0]["req_bytes"] == req_bytes
                else:
                    assert got[0]["resp_bytes"] == resp_bytes
        finally:
            t.stop()
        err = t.stderr()
        if round_ == "cold":
            assert "BPF program: compiled in" in err, err
        else:
            assert "BPF program: compiled image loaded from %s" % path in err
    print("start: cold %.2f s, warm %.2f s" % tuple(starts))
