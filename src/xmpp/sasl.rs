//! Client-side SASL mechanisms for logging in to the upstream XMPP server: SCRAM-SHA-256 (RFC 7677),
//! SCRAM-SHA-1 (RFC 5802) and PLAIN (RFC 4616).
//!
//! [`SaslClient`] works on raw payload bytes. The caller base64-encodes what it sends in `<auth/>`
//! and `<response/>` and decodes what arrives in `<challenge/>` and `<success/>`, following the XMPP
//! rule (RFC 6120 §6.4) that an empty payload is written as `=`. The SCRAM messages themselves
//! contain base64 fields (salt, proof, server signature). This module handles those.
//!
//! Channel binding is not supported: the GS2 header is always `n,,` and the `-PLUS` variants are
//! never chosen, because the upstream link is plain HTTP. No authorization identity is sent.
//!
//! The username and password are prepared with SASLprep (RFC 4013, as RFC 5802 §2.2 asks) before
//! SCRAM uses them, as the server does on its side (Prosody and ejabberd both prepare a password
//! before hashing it): a password with a no-break space or a compatibility character logs in
//! whichever spelling was registered. The SCRAM username is then escaped (`=`, `,`). PLAIN sends
//! the password as given (it must still pass SASLprep): RFC 4616 §2 leaves its preparation to the
//! server, and ejabberd, which keeps passwords as registered, compares a PLAIN password byte for
//! byte, so a prepared one would not match a password registered with a no-break space.

use std::fmt;
use std::mem;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{EagerHash, Hmac, KeyInit as _, Mac as _};
use rand::distr::{Alphanumeric, SampleString as _};
use sha1::Sha1;
use sha2::{Digest as _, Sha256};

/// The lowest SCRAM iteration count accepted from a server (RFC 7677 recommends at least 4096).
pub const MIN_ITERATIONS: u32 = 4096;

/// The highest SCRAM iteration count accepted from a server. This limits the CPU time that a
/// hostile or misconfigured server can make one login use.
pub const MAX_ITERATIONS: u32 = 1_000_000;

/// Length of a generated client nonce. The characters are alphanumeric, which gives about 190 bits.
const NONCE_LEN: usize = 32;

/// A SASL mechanism this client can use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mechanism {
    /// `SCRAM-SHA-256` (RFC 7677).
    ScramSha256,
    /// `SCRAM-SHA-1` (RFC 5802).
    ScramSha1,
    /// `PLAIN` (RFC 4616). It sends the password in the clear.
    Plain,
}

impl Mechanism {
    /// Every mechanism, strongest first.
    const BY_STRENGTH: [Mechanism; 3] = [
        Mechanism::ScramSha256,
        Mechanism::ScramSha1,
        Mechanism::Plain,
    ];

    /// The IANA-registered mechanism name, as used in `<mechanism/>` and `<auth mechanism=…>`.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::ScramSha256 => "SCRAM-SHA-256",
            Mechanism::ScramSha1 => "SCRAM-SHA-1",
            Mechanism::Plain => "PLAIN",
        }
    }

    /// The hash for a SCRAM mechanism, or `None` for PLAIN.
    fn scram_hash(self) -> Option<ScramHash> {
        match self {
            Mechanism::ScramSha256 => Some(ScramHash::Sha256),
            Mechanism::ScramSha1 => Some(ScramHash::Sha1),
            Mechanism::Plain => None,
        }
    }
}

/// Picks the strongest mechanism that the server offers and `allowed` contains. The order is
/// SCRAM-SHA-256, then SCRAM-SHA-1, then PLAIN.
///
/// `offered` holds the names from the server's `<mechanisms/>`. Names are compared exactly, so the
/// `-PLUS` variants and unknown mechanisms are ignored. Returns `None` if no mechanism matches.
#[must_use]
pub fn choose(offered: &[&str], allowed: &[Mechanism]) -> Option<Mechanism> {
    Mechanism::BY_STRENGTH
        .into_iter()
        .find(|m| allowed.contains(m) && offered.contains(&m.name()))
}

/// Why a SASL exchange failed on the client side.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SaslError {
    /// A `<challenge/>` arrived in a state where the mechanism expects none. Examples: any challenge
    /// to PLAIN, a challenge before the initial response, or a challenge after the SCRAM exchange
    /// has finished.
    #[error("unexpected challenge")]
    UnexpectedChallenge,
    /// A `<success/>` arrived before the exchange could finish. For SCRAM, this means the server
    /// claimed success before it proved that it knows the password.
    #[error("unexpected success before the exchange completed")]
    UnexpectedSuccess,
    /// The SCRAM server-first message could not be parsed. The text names the problem.
    #[error("malformed server-first message: {0}")]
    MalformedServerFirst(&'static str),
    /// The SCRAM server-final message (`v=…` or `e=…`) could not be parsed. The text names the problem.
    #[error("malformed server-final message: {0}")]
    MalformedServerFinal(&'static str),
    /// The server's nonce does not start with the client's nonce, or does not add anything to it.
    #[error("server nonce does not extend the client nonce")]
    NonceMismatch,
    /// The server asked for fewer PBKDF2 iterations than [`MIN_ITERATIONS`].
    #[error("iteration count {count} below minimum {min}")]
    IterationCountTooLow {
        /// The count the server sent.
        count: u64,
        /// The minimum accepted ([`MIN_ITERATIONS`]).
        min: u32,
    },
    /// The server asked for more PBKDF2 iterations than [`MAX_ITERATIONS`].
    #[error("iteration count {count} above maximum {max}")]
    IterationCountTooHigh {
        /// The count the server sent, saturated at `u64::MAX`.
        count: u64,
        /// The maximum accepted ([`MAX_ITERATIONS`]).
        max: u32,
    },
    /// SCRAM `<success/>` had no additional data, and no server signature came in an earlier
    /// challenge. The server has not proved that it knows the password.
    #[error("server did not send a server signature")]
    MissingServerSignature,
    /// The SCRAM server signature (`v=`) does not match the one computed from the password. The
    /// server does not know the password, or someone is impersonating it.
    #[error("server signature mismatch")]
    ServerSignatureMismatch,
    /// The server sent a SCRAM `e=` attribute. The field holds the server's error value as sent,
    /// for example `invalid-proof`.
    #[error("server error: {0}")]
    ServerError(String),
    /// The username or password fails SASLprep (RFC 4013): it holds a character the profile
    /// prohibits (a control character, a private-use or unassigned code point, …) or breaks the
    /// bidirectional-text rule. No server can accept it. The password's own characters are never
    /// part of the message.
    #[error("{0} fails SASLprep (RFC 4013)")]
    Prep(&'static str),
}

/// SASLprep (RFC 4013) of a password: what the server hashes and compares.
///
/// # Errors
///
/// [`SaslError::Prep`] when the password contains a character SASLprep prohibits.
pub fn prepare_password(password: &str) -> Result<std::borrow::Cow<'_, str>, SaslError> {
    stringprep::saslprep(password).map_err(|_| SaslError::Prep("password"))
}

/// SASLprep (RFC 4013) of a username (the account's localpart, already nodeprepped).
///
/// # Errors
///
/// [`SaslError::Prep`] when the username contains a character SASLprep prohibits.
pub fn prepare_username(username: &str) -> Result<std::borrow::Cow<'_, str>, SaslError> {
    stringprep::saslprep(username).map_err(|_| SaslError::Prep("username"))
}

/// The client half of one SASL authentication exchange.
///
/// Usage: send [`initial_response`](Self::initial_response) in `<auth mechanism=…>`. Answer each
/// `<challenge/>` with the bytes from [`challenge`](Self::challenge). On `<success/>`, call
/// [`success`](Self::success), and treat the login as failed unless it returns `Ok`. All payloads
/// are raw bytes: base64 is the caller's job.
///
/// After any error the exchange is dead, and every later call fails.
pub struct SaslClient {
    mechanism: Mechanism,
    authcid: String,
    password: String,
    nonce: String,
    state: State,
}

/// Where the exchange is.
enum State {
    /// Nothing sent yet.
    Start,
    /// PLAIN credentials sent. Waiting for `<success/>`.
    PlainSent,
    /// SCRAM client-first sent. Waiting for the server-first challenge.
    ScramFirstSent {
        hash: ScramHash,
        client_first_bare: String,
    },
    /// SCRAM client-final sent. Waiting for the server-final message, in a challenge or in
    /// `<success/>`. `verified` is set once a challenge carried a valid one.
    ScramFinalSent {
        hash: ScramHash,
        server_key: Vec<u8>,
        auth_message: String,
        verified: bool,
    },
    /// `<success/>` accepted.
    Done,
    /// An error happened. Nothing more is accepted.
    Failed,
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            State::Start => "start",
            State::PlainSent => "plain-sent",
            State::ScramFirstSent { .. } => "scram-first-sent",
            State::ScramFinalSent { .. } => "scram-final-sent",
            State::Done => "done",
            State::Failed => "failed",
        }
    }
}

impl fmt::Debug for SaslClient {
    // Leaves out the password and nonce.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SaslClient")
            .field("mechanism", &self.mechanism)
            .field("authcid", &self.authcid)
            .field("state", &self.state.name())
            .finish_non_exhaustive()
    }
}

impl SaslClient {
    /// Creates a client that logs in as `authcid` (the account's localpart) with `password`, both
    /// prepared with SASLprep (PLAIN: the password is checked against SASLprep but sent as given,
    /// see the module docs). For SCRAM, it generates a random client nonce from the
    /// thread-local CSPRNG.
    ///
    /// # Errors
    ///
    /// [`SaslError::Prep`] when `authcid` or `password` fails SASLprep.
    ///
    /// # Panics
    ///
    /// Panics only if the operating system's random source fails while the thread-local generator
    /// is seeded (see `rand::rng`). Server input cannot cause this panic.
    pub fn new(mechanism: Mechanism, authcid: &str, password: &str) -> Result<Self, SaslError> {
        let nonce = Alphanumeric.sample_string(&mut rand::rng(), NONCE_LEN);
        Self::build(mechanism, authcid, password, nonce)
    }

    /// Like [`new`](Self::new), but with a fixed client nonce, so that the RFC test vectors can be
    /// reproduced.
    #[cfg(test)]
    fn with_nonce(
        mechanism: Mechanism,
        authcid: &str,
        password: &str,
        nonce: &str,
    ) -> Result<Self, SaslError> {
        Self::build(mechanism, authcid, password, nonce.to_owned())
    }

    fn build(
        mechanism: Mechanism,
        authcid: &str,
        password: &str,
        nonce: String,
    ) -> Result<Self, SaslError> {
        let prepared = prepare_password(password)?;
        let password = match mechanism {
            Mechanism::Plain => password.to_owned(),
            Mechanism::ScramSha1 | Mechanism::ScramSha256 => prepared.into_owned(),
        };
        Ok(Self {
            mechanism,
            authcid: prepare_username(authcid)?.into_owned(),
            password,
            nonce,
            state: State::Start,
        })
    }

    /// The mechanism this client runs. Its [`name`](Mechanism::name) goes in `<auth mechanism=…>`.
    #[must_use]
    pub fn mechanism(&self) -> Mechanism {
        self.mechanism
    }

    /// Starts the exchange and returns the initial response (raw bytes, never empty) for `<auth/>`.
    ///
    /// For PLAIN this is `\0authcid\0password`. For SCRAM it is the client-first message
    /// `n,,n=<escaped authcid>,r=<client nonce>`. A second call restarts the exchange with the same
    /// nonce.
    pub fn initial_response(&mut self) -> Vec<u8> {
        match self.mechanism.scram_hash() {
            None => {
                self.state = State::PlainSent;
                let mut out = Vec::with_capacity(2 + self.authcid.len() + self.password.len());
                out.push(0);
                out.extend_from_slice(self.authcid.as_bytes());
                out.push(0);
                out.extend_from_slice(self.password.as_bytes());
                out
            }
            Some(hash) => {
                let client_first_bare =
                    format!("n={},r={}", escape_username(&self.authcid), self.nonce);
                let message = format!("{GS2_HEADER}{client_first_bare}");
                self.state = State::ScramFirstSent {
                    hash,
                    client_first_bare,
                };
                message.into_bytes()
            }
        }
    }

    /// Handles one `<challenge/>` payload (raw bytes) and returns the raw bytes for `<response/>`.
    ///
    /// For SCRAM, the first challenge is the server-first message. The reply is the client-final
    /// message with the proof. This step runs PBKDF2 with the server's iteration count, at most
    /// [`MAX_ITERATIONS`], so it can take a noticeable amount of CPU time. Async callers should run
    /// it on a blocking thread.
    ///
    /// A second challenge must be the server-final message. Some servers send it this way instead
    /// of in `<success/>`. It is verified here and the reply is empty. After that, `<success/>` may
    /// carry no data.
    ///
    /// # Errors
    ///
    /// Fails with [`SaslError::UnexpectedChallenge`] if the mechanism expects no challenge now.
    /// Otherwise it fails when the server's message is malformed or unacceptable, or when the
    /// server reports `e=`. See [`SaslError`].
    pub fn challenge(&mut self, data: &[u8]) -> Result<Vec<u8>, SaslError> {
        match mem::replace(&mut self.state, State::Failed) {
            State::ScramFirstSent {
                hash,
                client_first_bare,
            } => {
                let (reply, next) = self.client_final(hash, &client_first_bare, data)?;
                self.state = next;
                Ok(reply)
            }
            State::ScramFinalSent {
                hash,
                server_key,
                auth_message,
                verified: false,
            } => {
                verify_server_final(hash, &server_key, &auth_message, data)?;
                self.state = State::ScramFinalSent {
                    hash,
                    server_key,
                    auth_message,
                    verified: true,
                };
                Ok(Vec::new())
            }
            _ => Err(SaslError::UnexpectedChallenge),
        }
    }

    /// Handles `<success/>` and its additional data (raw bytes, empty if none).
    ///
    /// For SCRAM, this checks the server signature (`v=`) in `data`. If an earlier challenge
    /// already carried a valid signature, `data` may be empty; if it is not empty, it is checked
    /// again. For PLAIN, `data` is ignored.
    ///
    /// # Errors
    ///
    /// [`SaslError::MissingServerSignature`] if SCRAM never received a server signature,
    /// [`SaslError::ServerSignatureMismatch`] if the signature is wrong,
    /// [`SaslError::UnexpectedSuccess`] if the exchange has not reached this point, and the
    /// server-final errors listed on [`SaslError`].
    pub fn success(&mut self, data: &[u8]) -> Result<(), SaslError> {
        match mem::replace(&mut self.state, State::Failed) {
            State::PlainSent => {}
            State::ScramFinalSent {
                hash,
                server_key,
                auth_message,
                verified,
            } => {
                if !data.is_empty() {
                    verify_server_final(hash, &server_key, &auth_message, data)?;
                } else if !verified {
                    return Err(SaslError::MissingServerSignature);
                }
            }
            _ => return Err(SaslError::UnexpectedSuccess),
        }
        self.state = State::Done;
        Ok(())
    }

    /// Reads the server-first message and builds the client-final message. Returns the reply and
    /// the state to enter.
    fn client_final(
        &self,
        hash: ScramHash,
        client_first_bare: &str,
        server_first: &[u8],
    ) -> Result<(Vec<u8>, State), SaslError> {
        use SaslError::MalformedServerFirst as Malformed;

        let text = std::str::from_utf8(server_first).map_err(|_| Malformed("not valid UTF-8"))?;
        let mut parts = text.split(',');
        let first = parts.next().unwrap_or_default();
        if let Some(message) = attribute(first, 'e') {
            return Err(SaslError::ServerError(message.to_owned()));
        }
        if attribute(first, 'm').is_some() {
            return Err(Malformed("unsupported mandatory extension (m=)"));
        }
        let nonce = attribute(first, 'r').ok_or(Malformed("missing nonce (r=)"))?;
        let salt = parts
            .next()
            .and_then(|p| attribute(p, 's'))
            .ok_or(Malformed("missing salt (s=)"))?;
        let iterations = parts
            .next()
            .and_then(|p| attribute(p, 'i'))
            .ok_or(Malformed("missing iteration count (i=)"))?;
        // Any attributes after i= are extensions. They are ignored.

        if !nonce.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Malformed("nonce contains non-printable characters"));
        }
        if nonce.len() <= self.nonce.len() || !nonce.starts_with(&self.nonce) {
            return Err(SaslError::NonceMismatch);
        }
        let iterations = check_iterations(iterations)?;
        let salt = BASE64
            .decode(salt)
            .map_err(|_| Malformed("salt is not valid base64"))?;
        if salt.is_empty() {
            return Err(Malformed("empty salt"));
        }

        let salted_password = hash.salted_password(self.password.as_bytes(), &salt, iterations);
        let client_key = hash.hmac(&salted_password, b"Client Key");
        let stored_key = hash.digest(&client_key);
        let server_key = hash.hmac(&salted_password, b"Server Key");

        let without_proof = format!("c={},r={nonce}", BASE64.encode(GS2_HEADER));
        let auth_message = format!("{client_first_bare},{text},{without_proof}");
        let client_signature = hash.hmac(&stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = client_key
            .iter()
            .zip(&client_signature)
            .map(|(k, s)| k ^ s)
            .collect();

        let reply = format!("{without_proof},p={}", BASE64.encode(proof)).into_bytes();
        let next = State::ScramFinalSent {
            hash,
            server_key,
            auth_message,
            verified: false,
        };
        Ok((reply, next))
    }
}

/// GS2 header: no channel binding, no authorization identity.
const GS2_HEADER: &str = "n,,";

/// Checks a server-final message (`v=…` or `e=…`) against the expected server signature.
fn verify_server_final(
    hash: ScramHash,
    server_key: &[u8],
    auth_message: &str,
    data: &[u8],
) -> Result<(), SaslError> {
    use SaslError::MalformedServerFinal as Malformed;

    let text = std::str::from_utf8(data).map_err(|_| Malformed("not valid UTF-8"))?;
    let first = text.split(',').next().unwrap_or_default();
    if let Some(message) = attribute(first, 'e') {
        return Err(SaslError::ServerError(message.to_owned()));
    }
    let verifier = attribute(first, 'v').ok_or(Malformed(
        "neither a server signature (v=) nor an error (e=)",
    ))?;
    let signature = BASE64
        .decode(verifier)
        .map_err(|_| Malformed("server signature is not valid base64"))?;
    if hash.verify_hmac(server_key, auth_message.as_bytes(), &signature) {
        Ok(())
    } else {
        Err(SaslError::ServerSignatureMismatch)
    }
}

/// Parses and bounds-checks the `i=` value.
fn check_iterations(value: &str) -> Result<u32, SaslError> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(SaslError::MalformedServerFirst(
            "iteration count is not a decimal number",
        ));
    }
    // All digits, so the parse can only fail by overflowing, which is "too high" anyway.
    let count: u64 = value.parse().unwrap_or(u64::MAX);
    if count < u64::from(MIN_ITERATIONS) {
        return Err(SaslError::IterationCountTooLow {
            count,
            min: MIN_ITERATIONS,
        });
    }
    match u32::try_from(count) {
        Ok(n) if n <= MAX_ITERATIONS => Ok(n),
        _ => Err(SaslError::IterationCountTooHigh {
            count,
            max: MAX_ITERATIONS,
        }),
    }
}

/// Returns the value of a SCRAM `x=value` attribute if `part` has the name `name`.
fn attribute(part: &str, name: char) -> Option<&str> {
    part.strip_prefix(name)?.strip_prefix('=')
}

/// SCRAM `saslname` escaping (RFC 5802 §5.1): `=` becomes `=3D` and `,` becomes `=2C`.
fn escape_username(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        match c {
            '=' => out.push_str("=3D"),
            ',' => out.push_str("=2C"),
            c => out.push(c),
        }
    }
    out
}

/// The hash behind a SCRAM mechanism.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ScramHash {
    Sha1,
    Sha256,
}

impl ScramHash {
    /// `Hi(password, salt, i)`: PBKDF2-HMAC with output length equal to the hash length.
    fn salted_password(self, password: &[u8], salt: &[u8], iterations: u32) -> Vec<u8> {
        match self {
            ScramHash::Sha1 => pbkdf2_hmac::<Sha1>(password, salt, iterations),
            ScramHash::Sha256 => pbkdf2_hmac::<Sha256>(password, salt, iterations),
        }
    }

    fn hmac(self, key: &[u8], data: &[u8]) -> Vec<u8> {
        match self {
            ScramHash::Sha1 => hmac_of::<Sha1>(key, data),
            ScramHash::Sha256 => hmac_of::<Sha256>(key, data),
        }
    }

    /// Checks `tag == HMAC(key, data)` in constant time.
    fn verify_hmac(self, key: &[u8], data: &[u8], tag: &[u8]) -> bool {
        match self {
            ScramHash::Sha1 => new_mac::<Sha1>(key, data).verify_slice(tag).is_ok(),
            ScramHash::Sha256 => new_mac::<Sha256>(key, data).verify_slice(tag).is_ok(),
        }
    }

    fn digest(self, data: &[u8]) -> Vec<u8> {
        match self {
            ScramHash::Sha1 => Sha1::digest(data).to_vec(),
            ScramHash::Sha256 => Sha256::digest(data).to_vec(),
        }
    }
}

fn pbkdf2_hmac<D: EagerHash>(password: &[u8], salt: &[u8], iterations: u32) -> Vec<u8> {
    let mut out = vec![0; <D as sha2::Digest>::output_size()];
    pbkdf2::pbkdf2_hmac::<D>(password, salt, iterations, &mut out);
    out
}

fn hmac_of<D: EagerHash>(key: &[u8], data: &[u8]) -> Vec<u8> {
    new_mac::<D>(key, data).finalize().into_bytes().to_vec()
}

fn new_mac<D: EagerHash>(key: &[u8], data: &[u8]) -> Hmac<D> {
    // HMAC accepts keys of any length, and hmac's own `KeyInit::new` relies on this the same way.
    // This cannot fail, whatever the server sent.
    let mut mac = Hmac::<D>::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(data);
    mac
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 5802 §5.
    const SHA1_NONCE: &str = "fyko+d2lbbFgONRv9qkxdawL";
    const SHA1_SERVER_FIRST: &str =
        "r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096";
    const SHA1_CLIENT_FINAL: &str =
        "c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=";
    const SHA1_SERVER_FINAL: &str = "v=rmF9pqV8S7suAoZWja4dJRkFsKQ=";

    // RFC 7677 §3.
    const SHA256_NONCE: &str = "rOprNGfwEbeRWgbNEkqO";
    const SHA256_SERVER_FIRST: &str =
        "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
    const SHA256_CLIENT_FINAL: &str = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
                                       p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
    const SHA256_SERVER_FINAL: &str = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";

    /// A SCRAM-SHA-1 client with the RFC nonce, past the initial response.
    fn sha1_client() -> SaslClient {
        let mut c =
            SaslClient::with_nonce(Mechanism::ScramSha1, "user", "pencil", SHA1_NONCE).unwrap();
        let _ = c.initial_response();
        c
    }

    /// A SCRAM-SHA-1 client that has answered the RFC server-first.
    fn sha1_client_after_first() -> SaslClient {
        let mut c = sha1_client();
        let reply = c.challenge(SHA1_SERVER_FIRST.as_bytes());
        assert_eq!(reply.as_deref(), Ok(SHA1_CLIENT_FINAL.as_bytes()));
        c
    }

    /// The error for a server-first message given to a fresh SCRAM-SHA-1 client.
    fn first_error(server_first: &[u8]) -> SaslError {
        match sha1_client().challenge(server_first) {
            Ok(reply) => panic!("accepted, replied {:?}", String::from_utf8_lossy(&reply)),
            Err(e) => e,
        }
    }

    #[test]
    fn scram_sha1_rfc5802_example() {
        let mut c =
            SaslClient::with_nonce(Mechanism::ScramSha1, "user", "pencil", SHA1_NONCE).unwrap();
        assert_eq!(
            c.initial_response(),
            b"n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL"
        );
        assert_eq!(
            c.challenge(SHA1_SERVER_FIRST.as_bytes()).as_deref(),
            Ok(SHA1_CLIENT_FINAL.as_bytes())
        );
        assert_eq!(c.success(SHA1_SERVER_FINAL.as_bytes()), Ok(()));
    }

    /// RFC 4013 §3's examples, and spellings that SASLprep maps to the RFC vectors' "user" and
    /// "pencil": each reproduces the vectors byte for byte.
    #[test]
    fn saslprep_applies_to_username_and_password() {
        assert_eq!(prepare_password("I\u{ad}X").unwrap(), "IX");
        assert_eq!(prepare_password("user").unwrap(), "user");
        assert_eq!(prepare_password("USER").unwrap(), "USER");
        assert_eq!(prepare_password("\u{aa}").unwrap(), "a");
        assert_eq!(prepare_password("\u{2168}").unwrap(), "IX");
        assert_eq!(prepare_password("pass\u{a0}word").unwrap(), "pass word");
        assert_eq!(prepare_password("\u{7}"), Err(SaslError::Prep("password")));
        assert_eq!(
            prepare_password("\u{627}1"),
            Err(SaslError::Prep("password"))
        );
        assert_eq!(
            SaslError::Prep("password").to_string(),
            "password fails SASLprep (RFC 4013)"
        );

        for (user, password) in [
            ("user", "pen\u{ad}cil"),
            ("us\u{ad}er", "pencil"),
            ("user", "\u{ff50}encil"), // FULLWIDTH LATIN SMALL LETTER P
        ] {
            let mut c =
                SaslClient::with_nonce(Mechanism::ScramSha1, user, password, SHA1_NONCE).unwrap();
            assert_eq!(
                c.initial_response(),
                b"n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL"
            );
            assert_eq!(
                c.challenge(SHA1_SERVER_FIRST.as_bytes()).as_deref(),
                Ok(SHA1_CLIENT_FINAL.as_bytes())
            );
            let mut c =
                SaslClient::with_nonce(Mechanism::ScramSha256, user, password, SHA256_NONCE)
                    .unwrap();
            assert_eq!(c.initial_response(), b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO");
            assert_eq!(
                c.challenge(SHA256_SERVER_FIRST.as_bytes()).as_deref(),
                Ok(SHA256_CLIENT_FINAL.as_bytes())
            );
            assert_eq!(c.success(SHA256_SERVER_FINAL.as_bytes()), Ok(()));
        }
    }

    /// A no-break space (U+00A0) in a password is a space to the server: the proof is the one
    /// computed from the password with a plain space, with either hash.
    #[test]
    fn no_break_space_in_a_password_is_a_space() {
        for (mechanism, nonce, server_first) in [
            (Mechanism::ScramSha1, SHA1_NONCE, SHA1_SERVER_FIRST),
            (Mechanism::ScramSha256, SHA256_NONCE, SHA256_SERVER_FIRST),
        ] {
            let proof = |password: &str| {
                let mut c = SaslClient::with_nonce(mechanism, "user", password, nonce).unwrap();
                let _ = c.initial_response();
                c.challenge(server_first.as_bytes()).unwrap()
            };
            assert_eq!(proof("pen\u{a0}cil"), proof("pen cil"), "{mechanism:?}");
            assert_ne!(proof("pen\u{a0}cil"), proof("pencil"), "{mechanism:?}");
        }
        // PLAIN leaves preparation to the server (ejabberd compares the registered bytes).
        let mut plain = SaslClient::new(Mechanism::Plain, "user", "a\u{a0}b").unwrap();
        assert_eq!(plain.initial_response(), "\0user\0a\u{a0}b".as_bytes());
        for mechanism in [Mechanism::ScramSha256, Mechanism::Plain] {
            let refused = SaslClient::new(mechanism, "user", "bell\u{7}");
            assert_eq!(refused.err(), Some(SaslError::Prep("password")));
        }
    }

    #[test]
    fn scram_sha256_rfc7677_example() {
        let mut c =
            SaslClient::with_nonce(Mechanism::ScramSha256, "user", "pencil", SHA256_NONCE).unwrap();
        assert_eq!(c.initial_response(), b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO");
        assert_eq!(
            c.challenge(SHA256_SERVER_FIRST.as_bytes()).as_deref(),
            Ok(SHA256_CLIENT_FINAL.as_bytes())
        );
        assert_eq!(c.success(SHA256_SERVER_FINAL.as_bytes()), Ok(()));
    }

    #[test]
    fn server_final_in_challenge_then_empty_success() {
        let mut c = sha1_client_after_first();
        assert_eq!(c.challenge(SHA1_SERVER_FINAL.as_bytes()), Ok(Vec::new()));
        assert_eq!(c.success(b""), Ok(()));
    }

    #[test]
    fn server_final_in_challenge_and_repeated_in_success() {
        let mut c = sha1_client_after_first();
        assert_eq!(c.challenge(SHA1_SERVER_FINAL.as_bytes()), Ok(Vec::new()));
        assert_eq!(c.success(SHA1_SERVER_FINAL.as_bytes()), Ok(()));
    }

    #[test]
    fn server_final_extensions_are_ignored() {
        let mut c = sha1_client_after_first();
        assert_eq!(c.success(b"v=rmF9pqV8S7suAoZWja4dJRkFsKQ=,x=ext"), Ok(()));
    }

    #[test]
    fn wrong_server_signature() {
        let mut c = sha1_client_after_first();
        assert_eq!(
            c.success(b"v=AAAAAAAAAAAAAAAAAAAAAAAAAAA="),
            Err(SaslError::ServerSignatureMismatch)
        );

        // The SHA-256 example's verifier, offered to the SHA-1 exchange.
        let mut c = sha1_client_after_first();
        assert_eq!(
            c.challenge(SHA256_SERVER_FINAL.as_bytes()),
            Err(SaslError::ServerSignatureMismatch)
        );
        assert_eq!(
            SaslError::ServerSignatureMismatch.to_string(),
            "server signature mismatch"
        );
    }

    #[test]
    fn empty_success_without_signature() {
        let mut c = sha1_client_after_first();
        assert_eq!(c.success(b""), Err(SaslError::MissingServerSignature));
    }

    #[test]
    fn success_before_exchange_completes() {
        let mut c = sha1_client();
        assert_eq!(c.success(b""), Err(SaslError::UnexpectedSuccess));
        let mut c =
            SaslClient::with_nonce(Mechanism::ScramSha1, "user", "pencil", SHA1_NONCE).unwrap();
        assert_eq!(
            c.success(SHA1_SERVER_FINAL.as_bytes()),
            Err(SaslError::UnexpectedSuccess)
        );
    }

    #[test]
    fn nonce_not_extending_ours() {
        let e =
            first_error(b"r=xyzo+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096");
        assert_eq!(e, SaslError::NonceMismatch);
        assert_eq!(
            e.to_string(),
            "server nonce does not extend the client nonce"
        );
        // Echoing our nonce without adding to it is not extending it.
        assert_eq!(
            first_error(b"r=fyko+d2lbbFgONRv9qkxdawL,s=QSXCR+Q6sek8bf92,i=4096"),
            SaslError::NonceMismatch
        );
        assert_eq!(
            first_error(b"r=fyko,s=QSXCR+Q6sek8bf92,i=4096"),
            SaslError::NonceMismatch
        );
    }

    #[test]
    fn low_iteration_count() {
        let e = first_error(b"r=fyko+d2lbbFgONRv9qkxdawL3rfc,s=QSXCR+Q6sek8bf92,i=100");
        assert_eq!(
            e,
            SaslError::IterationCountTooLow {
                count: 100,
                min: 4096
            }
        );
        assert_eq!(e.to_string(), "iteration count 100 below minimum 4096");
    }

    #[test]
    fn high_iteration_count() {
        let e = first_error(b"r=fyko+d2lbbFgONRv9qkxdawL3rfc,s=QSXCR+Q6sek8bf92,i=1000001");
        assert_eq!(
            e,
            SaslError::IterationCountTooHigh {
                count: 1_000_001,
                max: 1_000_000
            }
        );
        assert_eq!(
            e.to_string(),
            "iteration count 1000001 above maximum 1000000"
        );
        let e = first_error(
            b"r=fyko+d2lbbFgONRv9qkxdawL3rfc,s=QSXCR+Q6sek8bf92,i=99999999999999999999999",
        );
        assert_eq!(
            e,
            SaslError::IterationCountTooHigh {
                count: u64::MAX,
                max: 1_000_000
            }
        );
    }

    #[test]
    fn server_error_in_server_final() {
        let mut c = sha1_client_after_first();
        let e = c.success(b"e=invalid-proof").unwrap_err();
        assert_eq!(e, SaslError::ServerError("invalid-proof".to_owned()));
        assert_eq!(e.to_string(), "server error: invalid-proof");

        let mut c = sha1_client_after_first();
        assert_eq!(
            c.challenge(b"e=other-error,x=ext"),
            Err(SaslError::ServerError("other-error".to_owned()))
        );
    }

    #[test]
    fn server_error_in_server_first() {
        assert_eq!(
            first_error(b"e=unknown-user"),
            SaslError::ServerError("unknown-user".to_owned())
        );
    }

    #[test]
    fn garbage_server_first() {
        use SaslError::MalformedServerFirst as M;
        let cases: &[(&[u8], SaslError)] = &[
            (b"\xff\xfe\x00", M("not valid UTF-8")),
            (b"", M("missing nonce (r=)")),
            (b"garbage", M("missing nonce (r=)")),
            (b"s=QSXCR+Q6sek8bf92,i=4096", M("missing nonce (r=)")),
            (
                b"m=ext,r=fyko+d2lbbFgONRv9qkxdawL3rfc,s=QSXCR+Q6sek8bf92,i=4096",
                M("unsupported mandatory extension (m=)"),
            ),
            (b"r=fyko+d2lbbFgONRv9qkxdawL3rfc", M("missing salt (s=)")),
            (
                b"r=fyko+d2lbbFgONRv9qkxdawL3rfc,i=4096",
                M("missing salt (s=)"),
            ),
            (
                b"r=fyko+d2lbbFgONRv9qkxdawL3rfc,s=QSXCR+Q6sek8bf92",
                M("missing iteration count (i=)"),
            ),
            (
                b"r=fyko+d2lbbFgONRv9qkxdawL3rfc,i=4096,s=QSXCR+Q6sek8bf92",
                M("missing salt (s=)"),
            ),
            (
                b"r=fyko+d2lbbFgONRv9qkxdawL3rfc,s=QSXCR+Q6sek8bf92,i=",
                M("iteration count is not a decimal number"),
            ),
            (
                b"r=fyko+d2lbbFgONRv9qkxdawL3rfc,s=QSXCR+Q6sek8bf92,i=+4096",
                M("iteration count is not a decimal number"),
            ),
            (
                b"r=fyko+d2lbbFgONRv9qkxdawL3rfc,s=QSXCR+Q6sek8bf92,i=-1",
                M("iteration count is not a decimal number"),
            ),
            (
                b"r=fyko+d2lbbFgONRv9qkxdawL3rfc,s=QSXCR+Q6sek8bf92,i=4k",
                M("iteration count is not a decimal number"),
            ),
            (
                b"r=fyko+d2lbbFgONRv9qkxdawL3rfc,s=not*base64!,i=4096",
                M("salt is not valid base64"),
            ),
            (
                b"r=fyko+d2lbbFgONRv9qkxdawL3rfc,s=QSXCR+Q6sek8bf9,i=4096",
                M("salt is not valid base64"),
            ),
            (b"r=fyko+d2lbbFgONRv9qkxdawL3rfc,s=,i=4096", M("empty salt")),
            (
                b"r=fyko+d2lbbFgONRv9qkxdawL3r\tfc,s=QSXCR+Q6sek8bf92,i=4096",
                M("nonce contains non-printable characters"),
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(
                &first_error(input),
                expected,
                "input {:?}",
                String::from_utf8_lossy(input)
            );
        }
        assert_eq!(
            M("salt is not valid base64").to_string(),
            "malformed server-first message: salt is not valid base64"
        );
    }

    #[test]
    fn garbage_server_final() {
        use SaslError::MalformedServerFinal as M;
        let cases: &[(&[u8], SaslError)] = &[
            (b"\xc3\x28", M("not valid UTF-8")),
            (
                b"garbage",
                M("neither a server signature (v=) nor an error (e=)"),
            ),
            (
                b"x=1,v=rmF9pqV8S7suAoZWja4dJRkFsKQ=",
                M("neither a server signature (v=) nor an error (e=)"),
            ),
            (b"v=***", M("server signature is not valid base64")),
        ];
        for (input, expected) in cases {
            let mut c = sha1_client_after_first();
            assert_eq!(
                &c.success(input).unwrap_err(),
                expected,
                "success {input:?}"
            );
            let mut c = sha1_client_after_first();
            assert_eq!(
                &c.challenge(input).unwrap_err(),
                expected,
                "challenge {input:?}"
            );
        }
    }

    #[test]
    fn truncated_server_messages_never_panic() {
        for end in 0..=SHA256_SERVER_FIRST.len() {
            let mut c =
                SaslClient::with_nonce(Mechanism::ScramSha256, "user", "pencil", SHA256_NONCE)
                    .unwrap();
            let _ = c.initial_response();
            let _ = c.challenge(&SHA256_SERVER_FIRST.as_bytes()[..end]);
        }
        for end in 0..SHA1_SERVER_FINAL.len() {
            let mut c = sha1_client_after_first();
            assert!(c.success(&SHA1_SERVER_FINAL.as_bytes()[..end]).is_err());
        }
    }

    #[test]
    fn unexpected_challenges() {
        let mut plain = SaslClient::new(Mechanism::Plain, "user", "pencil").unwrap();
        let _ = plain.initial_response();
        assert_eq!(plain.challenge(b""), Err(SaslError::UnexpectedChallenge));
        assert_eq!(
            SaslError::UnexpectedChallenge.to_string(),
            "unexpected challenge"
        );

        // Before the initial response.
        let mut c =
            SaslClient::with_nonce(Mechanism::ScramSha1, "user", "pencil", SHA1_NONCE).unwrap();
        assert_eq!(
            c.challenge(SHA1_SERVER_FIRST.as_bytes()),
            Err(SaslError::UnexpectedChallenge)
        );

        // After the server-final has been verified.
        let mut c = sha1_client_after_first();
        assert_eq!(c.challenge(SHA1_SERVER_FINAL.as_bytes()), Ok(Vec::new()));
        assert_eq!(
            c.challenge(SHA1_SERVER_FINAL.as_bytes()),
            Err(SaslError::UnexpectedChallenge)
        );
    }

    #[test]
    fn exchange_is_dead_after_an_error() {
        let mut c = sha1_client_after_first();
        assert_eq!(
            c.success(b"v=AAAA"),
            Err(SaslError::ServerSignatureMismatch)
        );
        assert_eq!(
            c.success(SHA1_SERVER_FINAL.as_bytes()),
            Err(SaslError::UnexpectedSuccess)
        );
        assert_eq!(
            c.challenge(SHA1_SERVER_FINAL.as_bytes()),
            Err(SaslError::UnexpectedChallenge)
        );
    }

    #[test]
    fn plain_encoding() {
        let mut c = SaslClient::new(Mechanism::Plain, "juliet", "r0m30,=\u{e9}").unwrap();
        assert_eq!(c.mechanism(), Mechanism::Plain);
        assert_eq!(c.initial_response(), b"\0juliet\0r0m30,=\xc3\xa9");
        assert_eq!(c.success(b""), Ok(()));
    }

    #[test]
    fn plain_success_before_auth() {
        let mut c = SaslClient::new(Mechanism::Plain, "juliet", "r0m30").unwrap();
        assert_eq!(c.success(b""), Err(SaslError::UnexpectedSuccess));
    }

    #[test]
    fn username_is_escaped() {
        let mut c = SaslClient::with_nonce(Mechanism::ScramSha256, "a=b,c", "pw", "abc").unwrap();
        assert_eq!(c.initial_response(), b"n,,n=a=3Db=2Cc,r=abc");
    }

    #[test]
    fn random_nonce() {
        let mut a = SaslClient::new(Mechanism::ScramSha256, "user", "pencil").unwrap();
        let b = SaslClient::new(Mechanism::ScramSha256, "user", "pencil").unwrap();
        let first = String::from_utf8(a.initial_response()).unwrap();
        let nonce = first.strip_prefix("n,,n=user,r=").unwrap();
        assert!(nonce.len() >= 24);
        assert!(nonce.bytes().all(|b| b.is_ascii_graphic() && b != b','));
        assert_ne!(a.nonce, b.nonce);
    }

    #[test]
    fn debug_hides_password() {
        let c = SaslClient::new(Mechanism::Plain, "juliet", "s3cret").unwrap();
        let shown = format!("{c:?}");
        assert!(
            shown.contains("juliet") && !shown.contains("s3cret"),
            "{shown}"
        );
    }

    #[test]
    fn mechanism_names() {
        assert_eq!(Mechanism::ScramSha256.name(), "SCRAM-SHA-256");
        assert_eq!(Mechanism::ScramSha1.name(), "SCRAM-SHA-1");
        assert_eq!(Mechanism::Plain.name(), "PLAIN");
    }

    #[test]
    fn choose_order() {
        use Mechanism::*;
        let all = [Plain, ScramSha1, ScramSha256];
        let offered = [
            "PLAIN",
            "SCRAM-SHA-1",
            "SCRAM-SHA-256",
            "SCRAM-SHA-256-PLUS",
        ];
        assert_eq!(choose(&offered, &all), Some(ScramSha256));
        assert_eq!(choose(&offered, &[Plain, ScramSha1]), Some(ScramSha1));
        assert_eq!(choose(&offered, &[Plain]), Some(Plain));
        assert_eq!(choose(&offered, &[]), None);
        assert_eq!(choose(&["PLAIN", "SCRAM-SHA-1"], &all), Some(ScramSha1));
        assert_eq!(
            choose(&["SCRAM-SHA-1-PLUS", "SCRAM-SHA-256-PLUS", "PLAIN"], &all),
            Some(Plain)
        );
        assert_eq!(
            choose(&["SCRAM-SHA-1-PLUS", "X-OAUTH2", "scram-sha-1"], &all),
            None
        );
        assert_eq!(choose(&["SCRAM-SHA-256"], &[Plain, ScramSha1]), None);
        assert_eq!(choose(&[], &all), None);
    }
}
