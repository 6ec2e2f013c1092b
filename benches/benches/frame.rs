//! The frame codec and the stream multiplexer, in memory: no TLS, no sockets.
//!
//! * `codec/encode` and `codec/decode`: DATA frames of 64 B and 16 KiB (a batch per
//!   iteration; throughput counts frames and payload bytes), and decoding OPEN, the
//!   largest control frame a proxy handles per connection.
//! * `mux`: two `Session`s joined by byte buffers. One iteration sends one chunk on each
//!   stream of A, writes every transmit into a buffer, has B decode it and the
//!   application read it, and carries B's WINDOW frames back to A, so credit flows as in
//!   a real tunnel. One stream, and eight served round robin.
//!
//! Run: `cargo bench -p benches --bench frame -- --warm-up-time 1 --measurement-time 3`.
//! Figures are in docs/benchmarks.md.

use std::hint::black_box;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use frame::{Event, Frame, Limits, Open, Received, Role, Session, SessionConfig, decode};

const SIZES: [(usize, &str); 2] = [(64, "64B"), (16 * 1024, "16KiB")];

/// Frames per iteration in the codec benchmarks: enough to amortise the loop, few enough
/// that a batch of 16 KiB frames stays in L2.
fn batch(len: usize) -> usize {
    if len <= 1024 { 256 } else { 16 }
}

fn payload(len: usize) -> Bytes {
    (0..len)
        .map(|i| (i * 7 + 3) as u8)
        .collect::<Vec<u8>>()
        .into()
}

fn codec(c: &mut Criterion) {
    let limits = Limits::default();
    let mut group = c.benchmark_group("codec");
    for (len, label) in SIZES {
        let n = batch(len);
        let frames: Vec<Frame> = (0..n)
            .map(|i| Frame::Data {
                stream: 1 + 2 * (i as u32 % 8),
                payload: payload(len),
            })
            .collect();
        group.throughput(Throughput::ElementsAndBytes {
            elements: n as u64,
            bytes: (n * len) as u64,
        });

        let mut out = BytesMut::with_capacity(n * (len + 9));
        group.bench_function(format!("encode/data-{label}"), |b| {
            b.iter(|| {
                out.clear();
                for f in &frames {
                    f.encode(&mut out);
                }
                black_box(out.len())
            })
        });

        let mut wire = BytesMut::new();
        for f in &frames {
            f.encode(&mut wire);
        }
        group.bench_function(format!("decode/data-{label}"), |b| {
            b.iter_batched_ref(
                || wire.clone(),
                |buf| {
                    let mut count = 0;
                    while let Some(frame) = decode(buf, &limits).expect("valid frames") {
                        black_box(&frame);
                        count += 1;
                    }
                    assert_eq!(count, n);
                },
                BatchSize::SmallInput,
            )
        });
    }

    let open = Frame::Open {
        stream: 7,
        open: Open {
            session_id: [0x5A; 16],
            cluster: "leaf-eu-1".into(),
            node: "web-042.prod".into(),
            service: "ssh".into(),
            user: "alice".into(),
            login: "root".into(),
            client_addr: "203.0.113.7:52114".into(),
            credential: Bytes::new(),
        },
    };
    let n = 256;
    let mut wire = BytesMut::new();
    for _ in 0..n {
        open.encode(&mut wire);
    }
    group.throughput(Throughput::ElementsAndBytes {
        elements: n as u64,
        bytes: wire.len() as u64,
    });
    group.bench_function("decode/open", |b| {
        b.iter_batched_ref(
            || wire.clone(),
            |buf| {
                while let Some(frame) = decode(buf, &limits).expect("valid frames") {
                    black_box(&frame);
                }
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

/// Two sessions with default settings (1 MiB window, 16 KiB frames) and `streams` open
/// streams from A to B.
struct Pair {
    now: Instant,
    a: Session,
    b: Session,
    a_to_b: BytesMut,
    b_to_a: BytesMut,
    streams: Vec<u32>,
}

impl Pair {
    fn new(streams: usize) -> Self {
        let now = Instant::now();
        let mut pair = Pair {
            now,
            a: Session::new(SessionConfig::new(Role::Agent, true), [0xA; 16], now),
            b: Session::new(SessionConfig::new(Role::Proxy, false), [0xB; 16], now),
            a_to_b: BytesMut::with_capacity(1 << 20),
            b_to_a: BytesMut::with_capacity(1 << 16),
            streams: Vec::new(),
        };
        for i in 0..streams {
            let id = pair
                .a
                .open(Open {
                    node: format!("node-{i}"),
                    service: "ssh".into(),
                    ..Open::default()
                })
                .expect("open");
            pair.streams.push(id);
        }
        pair.exchange();
        while let Some(event) = pair.b.poll_event() {
            if let Event::IncomingOpen { stream, .. } = event {
                pair.b.accept(stream).expect("accept");
            }
        }
        pair.exchange();
        let mut opened = 0;
        while let Some(event) = pair.a.poll_event() {
            opened += usize::from(matches!(event, Event::Opened { .. }));
        }
        assert_eq!(opened, streams, "every stream opened");
        pair
    }

    /// Writes and delivers both ways until quiet.
    fn exchange(&mut self) {
        loop {
            let mut moved = false;
            while let Some(t) = self.a.poll_transmit() {
                t.write_to(&mut self.a_to_b);
                moved = true;
            }
            self.b
                .handle_input(&mut self.a_to_b, self.now)
                .expect("b input");
            while let Some(t) = self.b.poll_transmit() {
                t.write_to(&mut self.b_to_a);
                moved = true;
            }
            self.a
                .handle_input(&mut self.b_to_a, self.now)
                .expect("a input");
            if !moved {
                return;
            }
        }
    }

    /// One chunk on every stream: send on A, transmit, decode on B, read, WINDOW back.
    fn step(&mut self, chunk: &Bytes) -> usize {
        for &s in &self.streams {
            let taken = self.a.send(s, chunk.clone()).expect("send");
            debug_assert_eq!(
                taken,
                chunk.len(),
                "credit ran out: the window did not flow back"
            );
        }
        while let Some(t) = self.a.poll_transmit() {
            t.write_to(&mut self.a_to_b);
        }
        self.b
            .handle_input(&mut self.a_to_b, self.now)
            .expect("b input");
        while self.b.poll_event().is_some() {}
        let mut received = 0;
        for &s in &self.streams {
            while let Received::Data(bytes) = self.b.recv(s).expect("recv") {
                received += bytes.len();
            }
        }
        while let Some(t) = self.b.poll_transmit() {
            t.write_to(&mut self.b_to_a);
        }
        self.a
            .handle_input(&mut self.b_to_a, self.now)
            .expect("a input");
        while self.a.poll_event().is_some() {}
        received
    }
}

fn mux(c: &mut Criterion) {
    let mut group = c.benchmark_group("mux");
    for streams in [1usize, 8] {
        for (len, label) in SIZES {
            let chunk = payload(len);
            let mut pair = Pair::new(streams);
            // Warm the windows up so every iteration runs in the steady state.
            for _ in 0..64 {
                pair.step(&chunk);
            }
            group.throughput(Throughput::ElementsAndBytes {
                elements: streams as u64,
                bytes: (streams * len) as u64,
            });
            let name = if streams == 1 {
                format!("1-stream/{label}")
            } else {
                format!("{streams}-streams/{label}")
            };
            group.bench_function(name, |b| {
                b.iter(|| {
                    let received = pair.step(&chunk);
                    assert_eq!(received, streams * len);
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, codec, mux);
criterion_main!(benches);
