//! Writes the seed corpus: one valid encoding of every control message and
//! a few journal records, so the fuzzer starts past the checksums.
//! `cargo run --bin seed` (from fuzz/) fills fuzz/corpus/.

use hf_journal::record::{slot_of, Record, RECORD_SIZE, SLOT_SIZE};
use hf_journal::wire::{ConnEntry, Msg};

fn main() -> std::io::Result<()> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let wire = dir.join("wire_decode");
    let rec = dir.join("record_pick");
    std::fs::create_dir_all(&wire)?;
    std::fs::create_dir_all(&rec)?;
    let entries = |n: u64, flags: u8| {
        (0..n)
            .map(|i| ConnEntry {
                conn_id: i + 1,
                slot: i as u32,
                flags,
            })
            .collect::<Vec<_>>()
    };
    let msgs = [
        Msg::Hello {
            pid: 4711,
            proto: 2,
            state_writes: 2,
            state_reads: (1, 2),
        },
        Msg::Ready,
        Msg::Closed { conn_id: 7, slot: 3 },
        Msg::Spool { conn_id: 7, slot: 3 },
        Msg::Poisoned { conn_id: 7, slot: 3 },
        Msg::Released { conn_id: 7, slot: 3 },
        Msg::Refused { conn_id: 7, slot: 3 },
        Msg::Welcome {
            worker_id: 2,
            generation: 3,
            slots: 100,
        },
        Msg::Activate,
        Msg::Conns(entries(1, 0)),
        Msg::Conns(entries(3, 1 | 2 | 4 | 8)),
        Msg::Conns(entries(253, 1)),
        Msg::Shutdown,
        Msg::Drain,
        Msg::Stop,
    ];
    let mut buf = Vec::new();
    for (i, m) in msgs.iter().enumerate() {
        m.encode(&mut buf);
        std::fs::write(wire.join(format!("seed-{i:02}")), &buf)?;
    }
    // Records: fresh, mid-response with state and recorded values, closing,
    // and a torn newer slot beside a valid older one.
    let mut recs = Vec::new();
    let mut r = Record::new(42);
    r.seq = 1;
    recs.push(vec![r.clone()]);
    let mut r2 = r.clone();
    r2.seq = 6;
    r2.in_commit = 1000;
    r2.out_commit = 5000;
    r2.out_rec = 9000;
    r2.out_crc = 0xdead_beef;
    r2.deaths = 1;
    r2.set_state(2, b"offset=262144").expect("state");
    r2.push_nondet(&[8, 1, 2, 3, 4, 5, 6, 7, 8]).expect("nondet");
    recs.push(vec![r.clone(), r2.clone()]);
    let mut r3 = r2.clone();
    r3.seq = 7;
    r3.flags = hf_journal::record::FLAG_CLOSING;
    recs.push(vec![r2.clone(), r3]);
    for (i, versions) in recs.iter().enumerate() {
        let mut raw = vec![0u8; RECORD_SIZE + 8];
        for v in versions {
            let mut slot = [0u8; SLOT_SIZE];
            let n = v.encode(&mut slot);
            let at = slot_of(v.seq) * SLOT_SIZE;
            raw[at..at + n].copy_from_slice(&slot[..n]);
        }
        raw[RECORD_SIZE..].copy_from_slice(&42u64.to_le_bytes());
        std::fs::write(rec.join(format!("seed-{i:02}")), &raw)?;
        // The same with the newer slot torn halfway.
        if let Some(last) = versions.last() {
            let at = slot_of(last.seq) * SLOT_SIZE;
            raw[at + 100..at + SLOT_SIZE].fill(0xa5);
            std::fs::write(rec.join(format!("seed-{i:02}-torn")), &raw)?;
        }
    }
    // TLS: record streams (a ClientHello's start, application data, a
    // truncated record, garbage) and state blobs.
    let tls = dir.join("tls_record");
    std::fs::create_dir_all(&tls)?;
    let mut streams: Vec<Vec<u8>> = vec![
        vec![22, 3, 1, 0, 4, 1, 0, 0, 0],
        [vec![23, 3, 3, 0, 3, 1, 2, 3], vec![21, 3, 3, 0, 2, 1, 0]].concat(),
        vec![23, 3, 3, 0x40, 0xff, 0],
        b"GET / HTTP/1.1\r\n".to_vec(),
    ];
    for (suite, n) in [(0x1302u16, 48usize), (0x1303, 32)] {
        let mut b = Vec::new();
        holdfast_tls::record::Saved::Tls13 {
            suite,
            rx_seq: 3,
            rx_skip: 17,
            tx_seq: 9,
            rx_secret: vec![0x11; n],
            tx_secret: vec![0x22; n],
        }
        .encode(&mut b);
        b.extend_from_slice(b"app state");
        streams.push(b);
    }
    streams.push(vec![0x12, 1, 2, 3]);
    for (i, s) in streams.iter().enumerate() {
        std::fs::write(tls.join(format!("seed-{i:02}")), s)?;
    }
    println!("seed corpus written to {}", dir.display());
    Ok(())
}
