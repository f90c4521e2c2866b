//! The per-request costs holdfast adds to a worker, one by one:
//! `cargo bench -p hf-bench --bench hot_path`.
//!
//! - `journal_store`: encoding a connection's record and copying it into
//!   the shared journal (done before each send and at each commit);
//! - `output_crc`: CRC-32C of a response (the replay check);
//! - `input`: taking a 64-byte request off a loopback socket by `recv` (as
//!   without holdfast) versus `MSG_PEEK` with `SO_PEEK_OFF` and a
//!   `MSG_TRUNC` discard every 4 KiB (as with it); the client's `send` is in
//!   both;
//! - `stream_positions`: reading the kernel's stream positions, once per
//!   recovered connection.

use std::io::Write;
use std::net::{TcpListener, TcpStream};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use hf_journal::record::{slot_of, Record, SLOT_SIZE};
use hf_sys::shm::SharedMem;
use rustix::net::RecvFlags;

fn journal_store(c: &mut Criterion) {
    let (_fd, mem) = SharedMem::create("bench", 1 << 20).expect("memfd");
    let mut rec = Record::new(7);
    rec.push_nondet(&[8, 1, 2, 3, 4, 5, 6, 7, 8])
        .expect("nondet");
    let mut buf = Box::new([0u8; SLOT_SIZE]);
    c.bench_function("journal_store", |b| {
        b.iter(|| {
            rec.seq += 1;
            rec.out_rec += 1200;
            let n = rec.encode(&mut buf);
            mem.write(4096 + slot_of(rec.seq) * SLOT_SIZE, &buf[..n])
                .expect("in range");
        })
    });
}

fn output_crc(c: &mut Criterion) {
    let mut g = c.benchmark_group("output_crc");
    for size in [1024usize, 16 * 1024, 256 * 1024] {
        let data = vec![0x5au8; size];
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_function(format!("{size}"), |b| {
            b.iter(|| crc32c::crc32c_append(1, &data))
        });
    }
    g.finish();
}

fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let c = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
    let (s, _) = l.accept().expect("accept");
    c.set_nodelay(true).expect("nodelay");
    (c, s)
}

fn input(c: &mut Criterion) {
    let req = [b'x'; 64];
    let mut g = c.benchmark_group("input");
    {
        let (mut client, server) = pair();
        let mut buf = [0u8; 64];
        g.bench_function("recv", |b| {
            b.iter(|| {
                client.write_all(&req).expect("send");
                let mut got = 0;
                while got < 64 {
                    got += rustix::net::recv(&server, &mut buf[got..], RecvFlags::empty())
                        .expect("recv")
                        .0;
                }
            })
        });
    }
    {
        let (mut client, server) = pair();
        hf_sys::tcp::set_peek_off(&server, 0).expect("SO_PEEK_OFF");
        let mut buf = [0u8; 64];
        let mut pending = 0usize;
        g.bench_function("peek+batched_trunc", |b| {
            b.iter(|| {
                client.write_all(&req).expect("send");
                let mut got = 0;
                while got < 64 {
                    got += rustix::net::recv(&server, &mut buf[got..], RecvFlags::PEEK)
                        .expect("peek")
                        .0;
                }
                pending += 64;
                if pending >= 4096 {
                    let mut left = pending;
                    while left > 0 {
                        left -= hf_sys::tcp::discard(&server, left).expect("discard");
                    }
                    pending = 0;
                }
            })
        });
    }
    g.finish();
}

fn stream_positions(c: &mut Criterion) {
    let (mut client, server) = pair();
    client.write_all(b"hello").expect("send");
    c.bench_function("stream_positions", |b| {
        b.iter(|| hf_sys::tcp::stream_positions(&server).expect("positions"))
    });
}

criterion_group!(benches, journal_store, output_crc, input, stream_positions);
criterion_main!(benches);
