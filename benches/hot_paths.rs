//! The daemon's hot paths: checking and re-serializing a frame from a page (every stanza a page
//! sends), and preparing one upstream stanza for N pages (every stanza fanned out).
//! Run with `cargo bench`; results go to BENCHMARKS.md.

use std::hint::black_box;

use boshmux::page::Frame;
use boshmux::page::frame::{PageInput, read};
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

criterion_group!(benches, page_input, fan_out);
criterion_main!(benches);
