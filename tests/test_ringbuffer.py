"""The tracer reads its BPF ring buffer itself (RingBuffer): positions and
headers from the pages the kernel maps, no callback per record.

A generated program writes records whose sizes and contents come from a
seed, some of them reserved and discarded, through a one-page ring buffer
that wraps many times over; the reader must hand over every record that
was not discarded, whole, in order, once. Both ways of reading run: plain
loads (x86's ordering) and libatomic's acquire loads and release stores
(the other architectures').

S3SLOWER_RING_SEED=N reruns with the same generated values.
"""

import ctypes
import os
import random

import pytest

from conftest import require_bpf

import s3slower

SEED = int(os.environ.get("S3SLOWER_RING_SEED") or random.randrange(1 << 30))
PAGE = os.sysconf("SC_PAGE_SIZE")
MAX_RECORD = 1024

PROGRAM = r"""
#undef TRACEPOINT_PROBE
#define TRACEPOINT_PROBE(category, event) \
int tp__##category##__##event(struct tracepoint__##category##__##event *args)
struct plan {
    u8 bytes[%(max)d];      /* first: what is written is the value's start */
    u32 size;
    u32 discard;
};
struct discarded { u8 pad[%(pad)d]; };
BPF_RINGBUF_OUTPUT(events, 1);
BPF_ARRAY(plans, struct plan, 1);
BPF_ARRAY(failures, u64, 1);

TRACEPOINT_PROBE(syscalls, sys_enter_getppid)
{
    if (bpf_get_current_pid_tgid() >> 32 != %(pid)d)
        return 0;
    u32 zero = 0;
    struct plan *p = plans.lookup(&zero);
    if (!p)
        return 0;
    if (p->discard) {
        struct discarded *d = events.ringbuf_reserve(sizeof(struct discarded));
        if (d)
            events.ringbuf_discard(d, 0);
        return 0;
    }
    u32 size = p->size;
    if (size > %(max)d)
        return 0;
    if (events.ringbuf_output(p, size, 0) != 0) {
        u64 *f = failures.lookup(&zero);
        if (f)
            __sync_fetch_and_add(f, 1);
    }
    return 0;
}
"""


def setup_module():
    print("ring seed: %d (rerun: S3SLOWER_RING_SEED=%d)" % (SEED, SEED))


@pytest.mark.parametrize("ordered_loads", [True, False])
def test_every_record_whole_in_order_once(ordered_loads):
    require_bpf()
    import bcc
    rng = random.Random(SEED + ordered_loads)
    pad = rng.randrange(1, 200)
    text = PROGRAM % dict(max=MAX_RECORD, pid=os.getpid(), pad=pad)
    image, compiler = s3slower.compile_image(bcc, text)
    bpf = s3slower.BpfObject(bcc, image, compiler)
    definition = image["maps"][bpf.map_index["events"]]
    assert definition["max_entries"] == PAGE
    ring = bpf.open_ring_buffer("events")
    if not ordered_loads:
        ring = s3slower.RingBuffer(bpf.map_fds[bpf.map_index["events"]],
                                   PAGE, ordered_loads=False)
    plan = bpf["plans"]
    bpf.attach_tracepoints()
    expected, got = [], []
    written = 0
    try:
        for batch in range(400):
            # As many records as fit (a record takes its size and 8 more,
            # rounded up to 8; the kernel keeps them under the ring's
            # size), so the ring wraps and never fills.
            room = PAGE - 8
            while True:
                size = rng.choice([0, 1, 7, 8, 9, rng.randrange(MAX_RECORD),
                                   MAX_RECORD])
                discard = rng.random() < 0.15
                taken = ((pad if discard else size) + 15) & ~7
                if taken > room or (written and rng.random() < 0.1):
                    break
                room -= taken
                payload = bytes(rng.randrange(256) for _ in range(size))
                value = plan.Leaf()
                value.size, value.discard = size, discard
                ctypes.memmove(value.bytes, payload, size)
                plan[ctypes.c_int(0)] = value
                os.getppid()
                if not discard:
                    expected.append(payload)
                written += taken
            got_before = len(got)
            handled = ring.read(
                lambda data, at, size: got.append(bytes(data[at:at + size])))
            assert handled == len(got) - got_before
    finally:
        for fd in bpf.links:
            os.close(fd)
    assert bpf["failures"][ctypes.c_int(0)].value == 0
    assert written > 20 * PAGE        # wrapped many times
    assert len(got) == len(expected)
    for index, (one, other) in enumerate(zip(got, expected)):
        assert one == other, "record %d differs (seed %d)" % (index, SEED)
    # Nothing more, and reading again hands over nothing.
    assert ring.read(lambda *record: got.append(record)) == 0
    del compiler
