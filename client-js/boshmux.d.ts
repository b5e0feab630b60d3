// Type declarations for boshmux-client (boshmux.js and the XML helpers it re-exports from xml.js).

/** An XML element as parsed from the server or built with `xml()`. */
export class Element {
  constructor(name: string, attrs?: Attrs, children?: Child[]);
  /** The name as written, maybe prefixed: `stream:features`. */
  name: string;
  /** Attributes as written, namespace declarations included. */
  attrs: Record<string, string>;
  /** Child elements and text, in document order. */
  children: Array<Element | string>;
  /** The element this one was appended to, or null. */
  readonly parent: Element | null;
  /** The name without its prefix: `features` for `stream:features`. */
  readonly localName: string;
  /** The namespace of this element, declared on it or inherited; "" for none. */
  readonly xmlns: string;
  /** Appends elements and text; arrays are flattened; null, undefined, false and "" are skipped. */
  append(...children: Child[]): this;
  attr(name: string): string | undefined;
  /** Whether the element has this local (or exact prefixed) name and, if given, this namespace. */
  is(name: string, xmlns?: string): boolean;
  getChild(name: string, xmlns?: string): Element | undefined;
  getChildren(name?: string, xmlns?: string): Element[];
  /** The text directly inside this element (not inside its children). */
  text(): string;
  /** XML text; namespaces the element inherits are declared on it so that the text stands alone. */
  toString(): string;
}

/** Attribute values; null and undefined ones are left out, others are converted with String(). */
export type Attrs = Record<string, string | number | boolean | null | undefined>;
export type Child = Element | string | number | null | undefined | false | Child[];

/** Builds an element: `xml("message", { to, type: "chat" }, xml("body", {}, "hi"))`. */
export function xml(name: string, attrs?: Attrs | null, ...children: Child[]): Element;

/** Parses exactly one element; throws XmlError for anything else (DOCTYPE included). */
export function parse(text: string): Element;

export class XmlError extends Error {}

/** The WebSocket close codes boshmux uses (SPEC §4); the daemon defines the same values. */
export declare const CloseCode: {
  /** The page or the daemon ended the stream normally. */
  readonly NORMAL: 1000;
  /** The page stopped answering pings. */
  readonly GOING_AWAY: 1001;
  /** Bad origin, authentication or frame: reconnecting the same way will not help. */
  readonly POLICY: 1008;
  /** The daemon is restarting with its state kept: reconnect. */
  readonly RESTARTING: 1012;
  /** The session was revoked (logout): do not reconnect. */
  readonly REVOKED: 4001;
  /** The page read too slowly. */
  readonly SLOW: 4002;
  /** Too many pages are open for this user. */
  readonly TOO_MANY_PAGES: 4003;
  /** The upstream session is lost and cannot be restored. */
  readonly LOST: 4004;
};

/** An error with an XMPP condition. */
export class BoshmuxError extends Error {
  constructor(condition: string, message?: string, details?: { stanza?: Element; code?: number });
  /**
   * A stanza error's condition (`item-not-found`, …) for `iq()`, a SASL or stream error's for
   * `connect()`, `"timeout"` when no answer came in time, `"disconnected"` when the connection was
   * closed first (or the client was not connected).
   */
  condition: string;
  /** The error stanza (iq error, SASL failure, stream error), when there was one. */
  stanza?: Element;
  /** The WebSocket close code, for `"disconnected"`. */
  code?: number;
}

export interface BoshmuxClientOptions {
  /** Default in a browser: `ws(s)://<this page's host>/ws`. Required elsewhere. */
  url?: string;
  /** The XMPP domain (`<open to=…>`). */
  domain: string;
  /** The user's localpart (or bare JID); required with `token`. */
  username?: string;
  /** A token from the handoff API, used as the SASL PLAIN password. Without one the client uses SASL EXTERNAL: the `boshmux_token` cookie. */
  token?: string;
  /** Opt in to boshmux's status notices (`status` events reconnecting / restored / lost). Default true. */
  statusNotices?: boolean;
  /** Reconnect automatically after a connection that had been online is lost. Default true. */
  reconnect?: boolean;
  /** First reconnect delay in ms; doubles per failed attempt, jittered to between half and all of it. Default 500. */
  initialDelay?: number;
  /** Upper bound of the reconnect delay in ms. Default 30000. */
  maxDelay?: number;
  /** Default time in ms `iq()` waits for an answer; also bounds the handshake. Default 30000. */
  iqTimeout?: number;
  /** The WebSocket class; default `globalThis.WebSocket` (in node 20, pass the `ws` package's). */
  WebSocket?: WebSocketConstructor;
}

/** What the client needs of a WebSocket class: the browser's, or a compatible one such as `ws`. */
export interface WebSocketConstructor {
  new (url: string, protocols: string): WebSocketLike;
}

export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  addEventListener(type: "open", listener: () => void): void;
  addEventListener(type: "message", listener: (event: { data: unknown }) => void): void;
  addEventListener(type: "close", listener: (event: { code: number; reason: string }) => void): void;
}

export type ClientState = "offline" | "connecting" | "online" | "reconnecting";

/** `connected` after every bind; the others are boshmux's notices about the upstream session. */
export type StatusState = "connected" | "reconnecting" | "restored" | "lost";

export interface DisconnectInfo {
  /** The WebSocket close code (1000 when this side closed it). */
  code: number;
  /** The close reason, or why this side closed (e.g. a SASL condition). */
  reason: string;
  /** Whether the client will try again by itself. */
  willReconnect: boolean;
}

export interface BoshmuxEvents {
  /** Bound (again): the session's full JID. */
  online: [jid: string];
  /** Every stanza received after bind, before the more specific event. */
  stanza: [stanza: Element];
  /** A message (not a carbon, not a status notice). */
  message: [message: Element];
  presence: [presence: Element];
  /** An incoming iq get/set; the app answers it with `send()` (boshmux answers for pages that do not). */
  iq: [iq: Element];
  /** What another page of the same user sent (XEP-0280): the forwarded message, and the carbon around it. */
  carbon: [message: Element, carbon: Element];
  status: [state: StatusState];
  disconnect: [info: DisconnectInfo];
  /** Problems no promise can report: stream errors, unreadable frames, failed reconnect attempts. */
  error: [error: Error];
}

export class BoshmuxClient {
  constructor(options: BoshmuxClientOptions);
  /** The session's full JID once bound, else null. */
  readonly jid: string | null;
  readonly state: ClientState;
  on<K extends keyof BoshmuxEvents>(event: K, listener: (...args: BoshmuxEvents[K]) => void): this;
  off<K extends keyof BoshmuxEvents>(event: K, listener: (...args: BoshmuxEvents[K]) => void): this;
  /** Opens the WebSocket, authenticates, binds; resolves with the full JID. A failure of this first attempt rejects and is not retried. */
  connect(): Promise<string>;
  /** Sends a message, presence or iq (`xmlns='jabber:client'` is added). Queued while (re)connecting; throws when offline. */
  send(stanza: Element): void;
  /** Sends an iq get/set (an id is added when missing); resolves with the result, rejects with a BoshmuxError. */
  iq(stanza: Element, options?: { timeout?: number }): Promise<Element>;
  /** Sends a message with a body; returns the stanza sent. */
  message(to: string, body: string, options?: { type?: "chat" | "normal" | "groupchat" | "headline"; id?: string }): Element;
  /** Sends presence; the last undirected available presence (and MUC joins) are repeated after a reconnect. */
  presence(options?: {
    to?: string;
    type?: "unavailable" | "subscribe" | "subscribed" | "unsubscribe" | "unsubscribed" | "probe";
    show?: "away" | "chat" | "dnd" | "xa";
    status?: string;
    priority?: number;
  }): Element;
  /** Ends this page's stream with `<close/>`; never reconnects. Resolves once the socket is closed. */
  close(): Promise<void>;
}
