//! One HTTP POST of a BOSH body, with a deadline. Retrying is the scheduler's business.
//!
//! The deadline (`wait` plus the margin) covers the response head only: once the connection
//! manager answered 200, the body is read for as long as bytes keep arriving, with at most
//! [`Transport::body_idle`] between two chunks. A huge response that takes longer than the
//! deadline to stream is thus read once; timing it out would resend the rid and bring the same
//! response again (issue 15). A body that stops arriving is still a transient failure.

use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::cuts::CUT_MIN_HELD;
use super::error::TransportError;
use super::reader::{BodyReader, ReadLimits, Response};

/// What a POST can end in besides a body: transient failures, or a status that ends the session.
#[derive(Debug)]
pub(crate) enum PostError {
    /// Worth repeating with the same rid.
    Transient(TransportError),
    /// A 4xx or other non-retryable status, and the reason phrase when it is not the standard
    /// one (ejabberd puts its error reason there, e.g. `Session ID mismatch`).
    Status(u16, Option<String>),
}

/// The connection manager's URL and a pooled HTTP client, shared by every session.
#[derive(Clone, Debug)]
pub struct Transport {
    http: reqwest::Client,
    url: reqwest::Url,
    limits: ReadLimits,
    /// Longest silence between two chunks of a response body once its head arrived.
    body_idle: Duration,
    /// Set for an in-memory transport ([`Transport::channel`]): requests go there, not to `url`.
    channel: Option<mpsc::UnboundedSender<(Bytes, oneshot::Sender<Answer>)>>,
}

/// What the other end of an in-memory transport ([`Transport::channel`]) answers to a request.
#[derive(Debug, Clone)]
pub enum Answer {
    /// HTTP 200 with these body bytes, read as a real response is (the reader's limits apply;
    /// broken framing is a transient failure).
    Body(Bytes),
    /// HTTP 200 whose body arrives in these chunks, each after its delay (tokio's clock, so
    /// paused time works): a response streamed slowly, or one that stalls. The request deadline
    /// ends at the head; a delay over [`Transport::body_idle`] is a transient failure.
    Chunks(Vec<(Duration, Bytes)>),
    /// Another HTTP status, with the reason phrase when it is not the standard one.
    Status(u16, Option<String>),
    /// A transient failure (connection reset, proxy cut, …): the request may have reached the
    /// server or not.
    Fail(TransportError),
}

impl Transport {
    /// A transport for the connection manager at `url`.
    pub fn new(url: &str) -> Result<Transport, String> {
        let url = reqwest::Url::parse(url).map_err(|e| format!("bosh_url {url:?}: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("bosh_url {url:?}: scheme must be http or https"));
        }
        // A BOSH POST is never redirected (the shared builder's policy): following one would
        // resend a rid elsewhere.
        let http = http_client_builder()
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?;
        Ok(Transport {
            http,
            url,
            limits: ReadLimits::DEFAULT,
            body_idle: BODY_IDLE,
            channel: None,
        })
    }

    /// An in-memory transport, **for tests**: each request arrives on the receiver as its exact
    /// bytes and a reply channel, and the test (playing the connection manager) answers when it
    /// chooses. Dropping the reply channel is a failed connection; the request deadline applies
    /// as over HTTP. No socket is involved, so it works on paused time
    /// ([`tokio::time::pause`]), where a real socket read would race the auto-advancing clock.
    pub fn channel() -> (
        Transport,
        mpsc::UnboundedReceiver<(Bytes, oneshot::Sender<Answer>)>,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut t = Transport::new("http://in-memory.invalid/").expect("a valid URL");
        t.channel = Some(tx);
        (t, rx)
    }

    /// The same transport reading responses under `limits`.
    #[must_use]
    pub fn with_read_limits(mut self, limits: ReadLimits) -> Transport {
        self.limits = limits;
        self
    }

    /// The same transport allowing `idle` between two chunks of a response body (default
    /// [`BODY_IDLE`]; [`BoshClient`](super::BoshClient) sets the margin of its
    /// [`Timeouts`](super::Timeouts)).
    #[must_use]
    pub fn with_body_idle(mut self, idle: Duration) -> Transport {
        self.body_idle = idle;
        self
    }

    /// Longest silence allowed between two chunks of a response body, once its head arrived.
    pub fn body_idle(&self) -> Duration {
        self.body_idle
    }

    /// The connection manager's URL.
    pub fn url(&self) -> &str {
        self.url.as_str()
    }

    /// POSTs `body` and reads the body of a 200 answer as it arrives ([`BodyReader`]): memory
    /// stays bounded whatever the response's size, and stanzas the reader drops are reported,
    /// not failures. A response whose framing cannot be read is transient (a proxy may have cut
    /// it short).
    ///
    /// `timeout` bounds the wait for the response head (status and headers); the body then
    /// streams as long as no gap between chunks exceeds [`Transport::body_idle`] (a longer gap
    /// is [`TransportError::Stalled`]).
    ///
    /// A connection closed before any response, or a gateway's 502/503/504, after the request was
    /// on the wire for [`CUT_MIN_HELD`] or longer is a [`TransportError::Cut`] (SPEC §7):
    /// something in between gave up on a request the server was holding.
    pub(crate) async fn post(&self, body: Bytes, timeout: Duration) -> Result<Response, PostError> {
        self.post_noting(body, timeout, || {}).await
    }

    /// Like [`Transport::post`]; `on_wire` runs once the HTTP client has taken the request's
    /// bytes to write them on the connection (or has given the request up without writing it),
    /// so that the next request goes out only after this one — however late the runtime got to
    /// this one's task. The scheduler orders its requests with it: a server that gets a younger
    /// rid before an older one defers it, and ejabberd then never processes it.
    pub(crate) async fn post_noting(
        &self,
        body: Bytes,
        timeout: Duration,
        on_wire: impl FnOnce() + Send + Sync + 'static,
    ) -> Result<Response, PostError> {
        if let Some(channel) = &self.channel {
            return self.post_channel(channel, body, timeout, on_wire).await;
        }
        let started = Instant::now();
        let length = body.len();
        let head = async {
            let resp = self
                .http
                .post(self.url.clone())
                .header(reqwest::header::CONTENT_TYPE, "text/xml; charset=utf-8")
                .header(reqwest::header::CONTENT_LENGTH, length)
                .body(reqwest::Body::wrap(NotingBody {
                    data: Some(body),
                    on_wire: Some(Box::new(on_wire)),
                }))
                .send()
                .await
                .map_err(|e| PostError::Transient(TransportError::Connection(error_chain(&e))))?;
            let status = resp.status().as_u16();
            let reason = reason_phrase(&resp);
            if status >= 500 {
                tracing::debug!(status, reason, "connection manager answered a server error");
                return Err(PostError::Transient(TransportError::ServerError(status)));
            }
            if status != 200 {
                return Err(PostError::Status(status, reason));
            }
            if let Some(reason) = reason {
                // ejabberd answers some errors 200 with a terminate body; the reason says more.
                tracing::info!(reason, "connection manager gave a reason with its answer");
            }
            Ok(resp)
        };
        let resp = match tokio::time::timeout(timeout, head).await {
            Ok(Ok(resp)) => resp,
            // What fails before a 200 may be a cut; what fails after is not, the server answered.
            Ok(Err(PostError::Transient(e))) => {
                return Err(PostError::Transient(cut_or(started, e)));
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(PostError::Transient(TransportError::Timeout(timeout))),
        };
        self.read_body(Chunks::Http(resp)).await
    }

    /// Reads a 200 answer's body from `chunks` into a [`BodyReader`], allowing
    /// [`Transport::body_idle`] between two chunks and no bound on the whole.
    async fn read_body(&self, mut chunks: Chunks) -> Result<Response, PostError> {
        let transient = PostError::Transient;
        let mut reader = BodyReader::new(self.limits);
        loop {
            let chunk = tokio::time::timeout(self.body_idle, chunks.next())
                .await
                .map_err(|_| transient(TransportError::Stalled(self.body_idle)))?
                .map_err(transient)?;
            let Some(chunk) = chunk else {
                break;
            };
            reader
                .feed(&chunk)
                .map_err(|e| transient(TransportError::BadBody(e)))?;
        }
        reader
            .finish()
            .map_err(|e| transient(TransportError::BadBody(e)))
    }
}

/// Default of [`Transport::body_idle`]: the default margin of
/// [`Timeouts`](super::Timeouts), the slack allowed a response beyond what the server promised.
pub const BODY_IDLE: Duration = Duration::from_secs(10);

/// Where the chunks of a response body come from.
enum Chunks {
    /// A real HTTP response.
    Http(reqwest::Response),
    /// An in-memory [`Answer::Chunks`]: each chunk after its delay.
    Channel(std::vec::IntoIter<(Duration, Bytes)>),
}

impl Chunks {
    /// The next chunk, `None` at the end of the body.
    async fn next(&mut self) -> Result<Option<Bytes>, TransportError> {
        match self {
            Chunks::Http(resp) => resp
                .chunk()
                .await
                .map_err(|e| TransportError::Connection(error_chain(&e))),
            Chunks::Channel(chunks) => {
                let Some((delay, chunk)) = chunks.next() else {
                    return Ok(None);
                };
                tokio::time::sleep(delay).await;
                Ok(Some(chunk))
            }
        }
    }
}

/// `error`, which ended a request before any 200 answer, as a [`TransportError::Cut`] when it is a
/// closed connection or a gateway's 502/503/504 and the request had been on the wire since
/// `started` for at least [`CUT_MIN_HELD`]. Our own timeout and other statuses stay as they are.
fn cut_or(started: Instant, error: TransportError) -> TransportError {
    let held = started.elapsed();
    let cut = matches!(
        error,
        TransportError::Connection(_) | TransportError::ServerError(502..=504)
    );
    if cut && held >= CUT_MIN_HELD {
        TransportError::Cut {
            held,
            cause: Box::new(error),
        }
    } else {
        error
    }
}

/// The daemon's HTTP client setup, shared by the BOSH transport and the web-app client of
/// [`session::relogin`](crate::session::relogin): rustls with ring (installed here), no
/// redirects followed (a request carries a rid or a bearer key and must not go elsewhere),
/// `TCP_NODELAY`, a `boshmux/<version>` user agent.
pub fn http_client_builder() -> reqwest::ClientBuilder {
    install_crypto_provider();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .tcp_nodelay(true)
        .user_agent(concat!("boshmux/", env!("CARGO_PKG_VERSION")))
}

impl Transport {
    /// [`Transport::post`] over the in-memory channel of [`Transport::channel`].
    async fn post_channel(
        &self,
        channel: &mpsc::UnboundedSender<(Bytes, oneshot::Sender<Answer>)>,
        body: Bytes,
        timeout: Duration,
        on_wire: impl FnOnce(),
    ) -> Result<Response, PostError> {
        let closed = || PostError::Transient(TransportError::Connection("channel closed".into()));
        let (tx, rx) = oneshot::channel();
        let sent = channel.send((body, tx));
        on_wire();
        sent.map_err(|_| closed())?;
        let answer = tokio::time::timeout(timeout, rx)
            .await
            .map_err(|_| PostError::Transient(TransportError::Timeout(timeout)))?
            .map_err(|_| closed())?;
        match answer {
            Answer::Body(bytes) => {
                let mut reader = BodyReader::new(self.limits);
                reader
                    .feed(&bytes)
                    .and_then(|()| reader.finish())
                    .map_err(|e| PostError::Transient(TransportError::BadBody(e)))
            }
            Answer::Chunks(chunks) => self.read_body(Chunks::Channel(chunks.into_iter())).await,
            Answer::Status(status, _) if status >= 500 => {
                Err(PostError::Transient(TransportError::ServerError(status)))
            }
            Answer::Status(status, reason) => Err(PostError::Status(status, reason)),
            Answer::Fail(e) => Err(PostError::Transient(e)),
        }
    }
}

/// The reason phrase of `resp` when it differs from the standard one for its status.
fn reason_phrase(resp: &reqwest::Response) -> Option<String> {
    resp.extensions()
        .get::<hyper::ext::ReasonPhrase>()
        .map(|r| String::from_utf8_lossy(r.as_bytes()).into_owned())
}

/// reqwest's top-level message is generic ("error sending request"); the cause says what failed.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}

/// reqwest is built without a default TLS provider so the build does not pull a second crypto
/// library; ring is installed once, before the first client is built. Anything in the process
/// that builds a `reqwest::Client` calls this first.
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Err only means another provider was installed first, which is as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A request body that says when the HTTP client took its bytes (see [`Transport::post_noting`]):
/// when its one data frame is polled, or when it is dropped unpolled (the request failed first).
struct NotingBody {
    data: Option<Bytes>,
    on_wire: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl NotingBody {
    fn note(&mut self) {
        if let Some(on_wire) = self.on_wire.take() {
            on_wire();
        }
    }
}

impl http_body::Body for NotingBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let frame = self.data.take().map(|d| Ok(http_body::Frame::data(d)));
        self.note();
        std::task::Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}

impl Drop for NotingBody {
    fn drop(&mut self) {
        self.note();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::BodyExt;

    use super::*;

    fn noting(count: &Arc<AtomicUsize>) -> NotingBody {
        let count = count.clone();
        NotingBody {
            data: Some(Bytes::from_static(b"<body/>")),
            on_wire: Some(Box::new(move || {
                count.fetch_add(1, Ordering::SeqCst);
            })),
        }
    }

    #[tokio::test]
    async fn the_body_notes_once_when_its_bytes_are_taken_or_when_dropped_unread() {
        let count = Arc::new(AtomicUsize::new(0));
        let body = noting(&count);
        assert_eq!(http_body::Body::size_hint(&body).exact(), Some(7));
        assert_eq!(
            count.load(Ordering::SeqCst),
            0,
            "not before the client takes it"
        );
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(&bytes[..], b"<body/>");
        assert_eq!(count.load(Ordering::SeqCst), 1, "once, not again on drop");
        drop(noting(&count));
        assert_eq!(
            count.load(Ordering::SeqCst),
            2,
            "a request given up still lets the next go"
        );
    }
}
