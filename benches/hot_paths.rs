//! The daemon's hot paths: checking and re-serializing a frame from a page (every stanza a page
//! sends), preparing one upstream stanza for N pages and passing it through their queues (every
//! stanza fanned out), and the floor under fan-out: one small `write` to each of N loopback TCP
//! sockets. Run with `cargo bench`; results go to BENCHMARKS.md.

use std::hint::black_box;
use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};

use boshmux::page::Frame;
use boshmux::page::frame::{PageInput, read};
use boshmux::session::{PageOut, page_queue};
use boshmux::xmpp::{Element, Jid, Limits, ns};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

/// A typical chat message from a page: body, chat state, an id, a receipt request.
fn chat_frame() -> String {
    "<message xmlns='jabber:client' to='bob@example.com' type='chat' id='a1b2c3d4-0001' from='mallory@evil'>\
     <body>Hello Bob, are we still on for lunch tomorrow? I booked the table for 12:30 &amp; told the others.</body>\
     <active xmlns='http://jabber.org/protocol/chatstates'/><request xmlns='urn:xmpp:receipts'/>\
     <origin-id xmlns='urn:xmpp:sid:0' id='a1b2c3d4-0001'/></message>"
        .to_owned()
}

fn page_input(c: &mut Criterion) {
    let me = Jid::parse("alice@example.com/boshmux").unwrap();
    let mut group = c.benchmark_group("page_input");
    for (name, frame) in [
        ("chat_message", chat_frame()),
        (
            "large_message_16k",
            format!(
                "<message xmlns='jabber:client' to='bob@example.com' type='chat'><body>{}</body></message>",
                "lorem ipsum ".repeat(1365)
            ),
        ),
    ] {
        group.throughput(Throughput::Bytes(frame.len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| {
                let Ok(PageInput::Stanza(stanza)) = read(black_box(&frame), &Limits::PAGE, &me)
                else {
                    panic!("rejected")
                };
                black_box(stanza.to_xml())
            });
        });
    }
    group.finish();
}

fn fan_out(c: &mut Criterion) {
    let stanza = Element::new("message", ns::CLIENT)
        .with_attr("from", "bob@example.com/phone")
        .with_attr("to", "alice@example.com/boshmux")
        .with_attr("type", "chat")
        .with_child(Element::new("body", ns::CLIENT).with_text("See you at 12:30!"));
    let mut group = c.benchmark_group("fan_out");
    for pages in [1usize, 100, 1000] {
        group.throughput(Throughput::Elements(pages as u64));
        group.bench_with_input(BenchmarkId::from_parameter(pages), &pages, |b, &pages| {
            b.iter(|| {
                // What the session actor does: serialize once, hand every page a shared frame.
                let frame = Frame::from(black_box(&stanza).to_xml());
                let frames: Vec<Frame> = (0..pages).map(|_| frame.clone()).collect();
                black_box(frames)
            });
        });
    }
    group.finish();
}

/// One stanza through N pages' queues, as the session actor and the page tasks pass it: queued
/// for every page (byte limit checked), then taken and counted as written by each.
fn page_queues(c: &mut Criterion) {
    let stanza = Element::new("message", ns::CLIENT)
        .with_attr("from", "bob@example.com/phone")
        .with_attr("to", "alice@example.com/boshmux")
        .with_child(Element::new("body", ns::CLIENT).with_text("See you at 12:30!"));
    let mut group = c.benchmark_group("page_queues");
    for pages in [1usize, 100, 1000] {
        let (senders, mut receivers): (Vec<_>, Vec<_>) = (0..pages).map(|_| page_queue()).unzip();
        group.throughput(Throughput::Elements(pages as u64));
        group.bench_with_input(BenchmarkId::from_parameter(pages), &pages, |b, _| {
            b.iter(|| {
                let frame = Frame::from(black_box(&stanza).to_xml());
                for tx in &senders {
                    tx.frame(frame.clone(), 1 << 20).unwrap();
                }
                for rx in &mut receivers {
                    let Some(PageOut::Frame(f)) = rx.try_recv() else {
                        panic!("queued")
                    };
                    rx.written(f.len());
                }
            });
        });
    }
    group.finish();
}

/// The floor under fan-out on this machine: one 200-byte `write` to each of N loopback TCP
/// sockets (TCP_NODELAY, as pages have), a thread draining the other ends. On loopback the
/// writer also pays for the receiving side of TCP, as the daemon does in `scripts/bench`.
fn socket_write_floor(c: &mut Criterion) {
    let mut group = c.benchmark_group("socket_write_floor");
    for pages in [100usize, 1000] {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        // One at a time: the listen backlog is smaller than a thousand.
        let (readers, writers): (Vec<TcpStream>, Vec<TcpStream>) = (0..pages)
            .map(|_| {
                let reader = TcpStream::connect(addr).unwrap();
                let (writer, _) = listener.accept().unwrap();
                writer.set_nodelay(true).unwrap();
                (reader, writer)
            })
            .unzip();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let drain = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                for r in &readers {
                    r.set_nonblocking(true).unwrap();
                }
                let mut buf = vec![0u8; 1 << 16];
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    for mut r in &readers {
                        while r.read(&mut buf).is_ok_and(|n| n > 0) {}
                    }
                }
            })
        };
        let frame = [b'x'; 200];
        group.throughput(Throughput::Elements(pages as u64));
        group.bench_with_input(BenchmarkId::from_parameter(pages), &pages, |b, _| {
            b.iter(|| {
                for mut w in &writers {
                    w.write_all(black_box(&frame)).unwrap();
                }
            });
        });
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        drain.join().unwrap();
    }
    group.finish();
}

criterion_group!(
    benches,
    page_input,
    fan_out,
    page_queues,
    socket_write_floor
);
criterion_main!(benches);
