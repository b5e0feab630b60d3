// xml.js: what the client reads from boshmux and what it writes to it.
import assert from "node:assert/strict";
import { test } from "node:test";

import { Element, XmlError, parse, xml } from "../xml.js";

const STREAM = "http://etherx.jabber.org/streams";
const SASL = "urn:ietf:params:xml:ns:xmpp-sasl";

test("stream:features resolves the stream prefix and the default namespace below it", () => {
  // The exact frame boshmux sends (src/page/frame.rs).
  const features = parse(
    '<stream:features xmlns:stream="http://etherx.jabber.org/streams"><mechanisms ' +
      'xmlns="urn:ietf:params:xml:ns:xmpp-sasl"><mechanism>EXTERNAL</mechanism><mechanism>PLAIN' +
      "</mechanism></mechanisms></stream:features>",
  );
  assert.equal(features.name, "stream:features");
  assert.equal(features.localName, "features");
  assert.equal(features.xmlns, STREAM);
  assert.ok(features.is("features", STREAM));
  assert.ok(!features.is("features", SASL));
  const mechanisms = features.getChild("mechanisms", SASL);
  assert.deepEqual(
    mechanisms.getChildren("mechanism").map((m) => [m.xmlns, m.text()]),
    [
      [SASL, "EXTERNAL"],
      [SASL, "PLAIN"],
    ],
  );
  assert.equal(features.getChild("mechanisms", STREAM), undefined);
});

test("the stream prefix is known even when a server does not declare it", () => {
  const error = parse("<stream:error><conflict xmlns='urn:ietf:params:xml:ns:xmpp-streams'/></stream:error>");
  assert.ok(error.is("error", STREAM));
  assert.throws(() => parse("<foo:bar/>"), /prefix foo is not declared/);
});

test("namespaces are inherited, redeclared and undeclared", () => {
  const m = parse(
    "<message xmlns='jabber:client' from='a@b'><body>hi</body><x xmlns='urn:x'><y/><z xmlns=''/></x></message>",
  );
  assert.equal(m.xmlns, "jabber:client");
  assert.equal(m.getChild("body").xmlns, "jabber:client");
  assert.ok(m.getChild("body", "jabber:client"));
  const x = m.getChild("x", "urn:x");
  assert.equal(x.getChild("y").xmlns, "urn:x");
  assert.equal(x.getChild("z").xmlns, "");
  assert.equal(xml("iq").xmlns, "");
});

test("a child serialized alone carries the namespaces it inherited", () => {
  const carbon = parse(
    "<message xmlns='jabber:client' xmlns:a='urn:a' from='u@d' to='u@d/r'><sent xmlns='urn:xmpp:carbons:2'>" +
      "<forwarded xmlns='urn:xmpp:forward:0'><message from='u@d/r' to='v@d'><body>x</body><a:b/></message>" +
      "</forwarded></sent></message>",
  );
  const inner = carbon.getChild("sent").getChild("forwarded").getChild("message");
  // The inner message is in urn:xmpp:forward:0 by inheritance (the sender wrote no xmlns on it).
  assert.equal(inner.xmlns, "urn:xmpp:forward:0");
  assert.equal(
    inner.toString(),
    '<message xmlns="urn:xmpp:forward:0" xmlns:a="urn:a" from="u@d/r" to="v@d"><body>x</body><a:b/></message>',
  );
  assert.equal(parse(inner.toString()).getChild("b", "urn:a").name, "a:b");
});

test("parse and serialize round trip", () => {
  for (const text of [
    '<iq xmlns="jabber:client" type="get" id="1"><query xmlns="http://jabber.org/protocol/disco#info"/></iq>',
    '<message xmlns="jabber:client" to="b@d"><body>a &lt; b &amp;&amp; c &gt; d "q" \'s\'</body></message>',
    '<presence xmlns="jabber:client" xml:lang="en"><status>two\nlines</status><priority>5</priority></presence>',
    '<x xmlns="urn:x" a="&lt;&amp;&gt;&quot;" b="tab&#9;newline&#10;cr&#13;">mixed <b>bold</b> text</x>',
    '<m xmlns="urn:x">😀 ünïcödé</m>',
  ]) {
    assert.equal(parse(text).toString(), text);
  }
});

test("entities and character references are decoded", () => {
  const el = parse("<a x='&apos;&#65;&#x42;'>&lt;&gt;&amp;&quot;&apos;&#x1F600;<![CDATA[<raw & text>]]></a>");
  assert.equal(el.attr("x"), "'AB");
  assert.equal(el.text(), "<>&\"'😀<raw & text>");
  assert.equal(el.children.length, 1, "adjacent text is one string");
});

test("attribute values are normalized, line ends too", () => {
  assert.equal(parse("<a x='1\n2\t3\r\n4'/>").attr("x"), "1 2 3 4");
  assert.equal(parse("<a>1\r\n2\r3</a>").text(), "1\n2\n3");
});

test("the builder escapes what it must and skips what is absent", () => {
  const el = xml(
    "message",
    { to: 'b@d/"r"', type: "chat", id: undefined, thread: null },
    xml("body", {}, "1 < 2 & 3 > 2"),
    null,
    false,
    "",
    [xml("x", { xmlns: "urn:x", n: 5 })],
  );
  assert.equal(
    el.toString(),
    '<message to="b@d/&quot;r&quot;" type="chat"><body>1 &lt; 2 &amp; 3 &gt; 2</body><x xmlns="urn:x" n="5"/></message>',
  );
  assert.ok(el.getChild("x").parent === el);
  assert.ok(el instanceof Element);
});

test("characters XML forbids are replaced on output, refused on input", () => {
  const el = xml("body", {}, "bell\u0007 nul\u0000 lone\uD800 ok\u{1F600}");
  assert.equal(el.toString(), "<body>bell\uFFFD nul\uFFFD lone\uFFFD ok\u{1F600}</body>");
  assert.throws(() => parse("<a>\u0007</a>"), /U\+7 is not allowed/);
  assert.throws(() => parse("<a>&#0;</a>"), /not allowed/);
  assert.throws(() => parse("<a>&#x110000;</a>"), /not allowed/);
});

test("text() is the element's own text, not its children's", () => {
  const el = parse("<a>x<b>y</b>z</a>");
  assert.equal(el.text(), "xz");
  assert.equal(el.getChild("b").text(), "y");
  assert.deepEqual(
    el.getChildren().map((c) => c.name),
    ["b"],
  );
});

test("declarations, comments and processing instructions around the element are dropped", () => {
  const el = parse("<?xml version='1.0'?>\n<!-- hi --><a><!-- in -->x</a>\n");
  assert.equal(el.toString(), "<a>x</a>");
});

test("malformed input is refused with XmlError", () => {
  const cases = {
    "": /no element/,
    "   ": /no element/,
    "<a>": /<a> is not closed/,
    "<a></b>": /<\/b> does not close <a>/,
    "</a>": /does not close anything/,
    "<a/><b/>": /a second element/,
    "text<a/>": /text outside the element/,
    "<a/>tail": /text outside the element/,
    "<a x='1' x='2'/>": /attribute x repeated/,
    "<a x='1'y='2'/>": /space expected between attributes/,
    "<a x=1/>": /quoted value expected/,
    "<a x='<'/>": /'<' in an attribute value/,
    "<a>&nbsp;</a>": /unknown entity &nbsp;/,
    "<a>AT&T</a>": /bare '&'/,
    "<!DOCTYPE a [<!ENTITY e 'x'>]><a>&e;</a>": /DOCTYPE/,
    "<a><!-- never closed</a>": /"-->" expected/,
    "< a/>": /name expected/,
  };
  for (const [input, message] of Object.entries(cases)) {
    assert.throws(
      () => parse(input),
      (e) => e instanceof XmlError && message.test(e.message),
      input,
    );
  }
});
