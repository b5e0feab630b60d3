// A small XML parser and builder for XMPP frames (RFC 7395: one element per WebSocket frame).
//
// Browsers have DOMParser, node does not, and XMPP needs only a slice of XML: elements,
// attributes, text, namespaces. This module covers that slice strictly (what it cannot read
// exactly it refuses, it never guesses) and writes text that a strict reader accepts, because
// boshmux closes a page that sends anything malformed (SPEC §5).

const NS_XML = "http://www.w3.org/XML/1998/namespace";
const NS_STREAM = "http://etherx.jabber.org/streams";

// Characters XML 1.0 forbids anywhere, even as character references; with the `u` flag a lone
// surrogate counts as one forbidden code point.
const FORBIDDEN = /[^\t\n\r\x20-\uD7FF\uE000-\uFFFD\u{10000}-\u{10FFFF}]/gu;
const NAMED = { amp: "&", lt: "<", gt: ">", quot: '"', apos: "'" };
const NAME = /[^\s/>=<"'&]+/y;
const SPACE = /\s*/y;

/** Thrown by `parse` for input that is not exactly one well-formed element. */
export class XmlError extends Error {
  name = "XmlError";
}

/** An XML element: `name` as written (maybe prefixed), `attrs` as written, `children` (elements and strings). */
export class Element {
  #parent = null;

  constructor(name, attrs = {}, children = []) {
    this.name = name;
    this.attrs = {};
    for (const [k, v] of Object.entries(attrs)) {
      if (v !== undefined && v !== null) this.attrs[k] = String(v);
    }
    this.children = [];
    this.append(...children);
  }

  /** The element this one was appended to, or null. */
  get parent() {
    return this.#parent;
  }

  /** The name without its prefix: `features` for `stream:features`. */
  get localName() {
    return this.name.slice(this.name.indexOf(":") + 1);
  }

  /** The namespace this element is in, declared here or inherited; "" for none. */
  get xmlns() {
    const colon = this.name.indexOf(":");
    if (colon < 0) return lookup(this, "xmlns") ?? "";
    const prefix = this.name.slice(0, colon);
    return lookup(this, `xmlns:${prefix}`) ?? WELL_KNOWN[prefix] ?? "";
  }

  /** Appends elements and strings (arrays are flattened; null, undefined, false and "" skipped). */
  append(...children) {
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false || child === "") continue;
      if (child instanceof Element) {
        // An element has one parent: its namespace is looked up through it.
        child.#parent = this;
        this.children.push(child);
      } else {
        this.children.push(String(child));
      }
    }
    return this;
  }

  attr(name) {
    return this.attrs[name];
  }

  /** Whether this element has local name `name` (or exactly this prefixed name) and, if given, namespace `xmlns`. */
  is(name, xmlns) {
    return (this.name === name || this.localName === name) && (xmlns === undefined || this.xmlns === xmlns);
  }

  getChild(name, xmlns) {
    return this.children.find((c) => c instanceof Element && c.is(name, xmlns));
  }

  getChildren(name, xmlns) {
    return this.children.filter((c) => c instanceof Element && (name === undefined || c.is(name, xmlns)));
  }

  /** The text directly inside this element (not that of its children). */
  text() {
    return this.children.filter((c) => typeof c === "string").join("");
  }

  /** Serializes the element; namespaces it inherits are declared on it so the text stands alone. */
  toString() {
    const needed = new Set(["xmlns"]);
    for (const prefix of prefixesIn(this)) needed.add(`xmlns:${prefix}`);
    const inherited = {};
    for (const key of needed) {
      const value = key in this.attrs ? undefined : lookup(this.#parent, key);
      if (value !== undefined) inherited[key] = value;
    }
    return write(this, inherited);
  }
}

// Prefixes that need no declaration: `xml` by definition; `stream` because RFC 7395 servers write
// `<stream:features>`/`<stream:error>` and some omit the declaration.
const WELL_KNOWN = { xml: NS_XML, stream: NS_STREAM };

// The prefixes an element's name and attributes use (`xmlns:` declarations aside).
function prefixesOf(el) {
  return [el.name, ...Object.keys(el.attrs)]
    .filter((n) => n.includes(":") && !n.startsWith("xmlns:"))
    .map((n) => n.slice(0, n.indexOf(":")));
}

function* prefixesIn(el) {
  yield* prefixesOf(el);
  for (const c of el.getChildren()) yield* prefixesIn(c);
}

function lookup(el, attr) {
  for (let e = el; e; e = e.parent) {
    if (attr in e.attrs) return e.attrs[attr];
  }
  return undefined;
}

/** Builds an element: `xml("message", { to, type: "chat" }, xml("body", {}, "hi"))`. Attributes that are null or undefined are left out. */
export function xml(name, attrs, ...children) {
  return new Element(name, attrs ?? {}, children);
}

// --- Writing ---

function clean(s) {
  // Text XML cannot carry at all would get the whole page closed: replace it visibly instead.
  return s.replace(FORBIDDEN, "\uFFFD");
}

function escapeText(s) {
  return clean(s).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
}

function escapeAttr(s) {
  // Tabs and line breaks as references: a reader turns literal ones into spaces.
  return escapeText(s).replace(/"/g, "&quot;").replace(/\t/g, "&#9;").replace(/\n/g, "&#10;").replace(/\r/g, "&#13;");
}

function write(el, extraAttrs = {}) {
  let out = `<${el.name}`;
  for (const [k, v] of Object.entries({ ...extraAttrs, ...el.attrs })) out += ` ${k}="${escapeAttr(v)}"`;
  if (el.children.length === 0) return `${out}/>`;
  out += ">";
  for (const c of el.children) out += typeof c === "string" ? escapeText(c) : write(c);
  return `${out}</${el.name}>`;
}

// --- Reading ---

/**
 * Parses exactly one element (surrounding whitespace, an XML declaration, comments and processing
 * instructions are allowed and dropped). DOCTYPE is refused, so no entity is ever expanded beyond
 * the five predefined ones and character references.
 */
export function parse(input) {
  // XML line-end normalization (XML 1.0 §2.11) comes first.
  const s = String(input).replace(/\r\n?/g, "\n");
  FORBIDDEN.lastIndex = 0;
  const bad = FORBIDDEN.exec(s);
  if (bad) throw new XmlError(`character U+${bad[0].codePointAt(0).toString(16).toUpperCase()} is not allowed in XML`);

  let i = 0;
  let root = null;
  const stack = [];
  const fail = (why) => {
    throw new XmlError(`${why} at offset ${i}`);
  };
  const name = () => {
    NAME.lastIndex = i;
    const m = NAME.exec(s);
    if (!m) fail("name expected");
    i = NAME.lastIndex;
    return m[0];
  };
  const space = () => {
    SPACE.lastIndex = i;
    SPACE.exec(s);
    const skipped = SPACE.lastIndex > i;
    i = SPACE.lastIndex;
    return skipped;
  };
  const skipPast = (end) => {
    const at = s.indexOf(end, i);
    if (at < 0) fail(`"${end}" expected`);
    const skipped = s.slice(i, at);
    i = at + end.length;
    return skipped;
  };
  const addText = (text) => {
    if (stack.length === 0) {
      if (text.trim()) fail("text outside the element");
      return;
    }
    const children = stack.at(-1).children;
    if (typeof children.at(-1) === "string") children[children.length - 1] += text;
    else children.push(text);
  };
  const decode = (raw) =>
    raw.replace(/&(?:#x([0-9a-fA-F]+);|#([0-9]+);|([^\s&;<]+);)?/g, (ref, hex, dec, named) => {
      if (named !== undefined) {
        if (!(named in NAMED)) fail(`unknown entity &${named};`);
        return NAMED[named];
      }
      if (hex === undefined && dec === undefined) fail("bare '&'");
      const code = parseInt(hex ?? dec, hex === undefined ? 10 : 16);
      const char = code <= 0x10ffff ? String.fromCodePoint(code) : "";
      FORBIDDEN.lastIndex = 0;
      if (!char || FORBIDDEN.test(char)) fail(`character reference ${ref} is not allowed in XML`);
      return char;
    });

  while (i < s.length) {
    if (s[i] !== "<") {
      const end = s.indexOf("<", i);
      const raw = s.slice(i, end < 0 ? s.length : end);
      i += raw.length;
      addText(decode(raw));
    } else if (s.startsWith("<!--", i)) {
      i += 4;
      skipPast("-->");
    } else if (s.startsWith("<![CDATA[", i)) {
      if (stack.length === 0) fail("CDATA outside the element");
      i += 9;
      addText(skipPast("]]>"));
    } else if (s.startsWith("<?", i)) {
      i += 2;
      skipPast("?>");
    } else if (s.startsWith("<!", i)) {
      fail("DOCTYPE and other declarations are not accepted");
    } else if (s.startsWith("</", i)) {
      i += 2;
      const closing = name();
      space();
      if (s[i] !== ">") fail("'>' expected");
      i++;
      const open = stack.pop();
      if (!open || open.name !== closing) fail(`</${closing}> does not close ${open ? `<${open.name}>` : "anything"}`);
    } else {
      i++;
      if (root && stack.length === 0) fail("a second element");
      const el = new Element(name());
      for (;;) {
        const spaced = space();
        if (s.startsWith("/>", i) || s[i] === ">") break;
        if (!spaced) fail("space expected between attributes");
        const key = name();
        space();
        if (s[i] !== "=") fail("'=' expected");
        i++;
        space();
        const quote = s[i];
        if (quote !== '"' && quote !== "'") fail("quoted value expected");
        i++;
        const raw = skipPast(quote);
        if (raw.includes("<")) fail("'<' in an attribute value");
        if (key in el.attrs) fail(`attribute ${key} repeated`);
        // Attribute-value normalization (XML 1.0 §3.3.3): literal whitespace becomes a space.
        el.attrs[key] = decode(raw.replace(/[\t\n]/g, " "));
      }
      if (stack.length) stack.at(-1).append(el);
      else root = el;
      checkPrefixes(el, fail);
      if (s[i] === "/") i += 2;
      else {
        i++;
        stack.push(el);
      }
    }
  }
  if (stack.length) fail(`<${stack.at(-1).name}> is not closed`);
  if (!root) fail("no element");
  return root;
}

function checkPrefixes(el, fail) {
  for (const p of prefixesOf(el)) {
    if (!(p in WELL_KNOWN) && lookup(el, `xmlns:${p}`) === undefined) fail(`prefix ${p} is not declared`);
  }
}
