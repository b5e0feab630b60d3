//! Jabber IDs in canonical form (SPEC §3a): parsing a JID prepares it, so two `Jid`s are equal
//! exactly when an XMPP server takes them for the same address.
//!
//! Preparation is RFC 6122's, as Prosody and ejabberd apply it: the localpart with nodeprep, the
//! domainpart with nameprep (case folded, one trailing dot removed, and checked with IDNA ToASCII
//! under the STD3 rules), the resourcepart with resourceprep; each part 1 to 1023 bytes after
//! preparation. The profiles come from the `stringprep` crate and the IDNA check from `idna`.
//! RFC 7622's PRECIS classes differ from these only on characters no user types (unassigned or
//! compatibility code points), and the servers boshmux talks to apply stringprep.

use std::fmt;

/// A JID `local@domain/resource` in canonical form; local and resource are optional.
///
/// Only [`Jid::parse`] makes one from text, so every `Jid` is prepared and comparisons, hashing
/// and ordering are those of the canonical form.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Jid {
    local: Option<String>,
    domain: String,
    resource: Option<String>,
}

/// Why a string is not a JID. The text names the part and the rule it breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JidError {
    /// No domain part.
    #[error("empty domain")]
    EmptyDomain,
    /// `@` with nothing before it (or only characters preparation maps to nothing).
    #[error("empty localpart")]
    EmptyLocal,
    /// `/` with nothing after it (or only characters preparation maps to nothing).
    #[error("empty resource")]
    EmptyResource,
    /// A part longer than 1023 bytes after preparation (RFC 6122 §2.1).
    #[error("{0} longer than 1023 bytes")]
    TooLong(&'static str),
    /// A part its stringprep profile refuses: a prohibited character, bidirectional text against
    /// RFC 3454 §6, or an unassigned code point.
    #[error("{part} fails {profile}: {reason}")]
    Prep {
        /// `localpart`, `domain` or `resource`.
        part: &'static str,
        /// `nodeprep`, `nameprep` or `resourceprep`.
        profile: &'static str,
        /// What the profile refused.
        reason: String,
    },
    /// A domain that is no valid internationalized domain name (IDNA ToASCII with the STD3
    /// rules: letters, digits and hyphens, labels of 1 to 63 bytes).
    #[error("domain {0:?} is not a valid domain name")]
    BadDomain(String),
}

/// Longest part, in bytes after preparation (RFC 6122 §2.1, RFC 7622 §3).
const MAX_PART: usize = 1023;

impl Jid {
    /// Parses and prepares `s`.
    ///
    /// The resource is everything after the first `/`; the localpart everything before the first
    /// `@` that precedes it (RFC 7622 §3.1), so `a@b/c@d` has the resource `c@d`.
    ///
    /// # Errors
    ///
    /// A [`JidError`] naming the part that is empty, too long or refused by its profile.
    pub fn parse(s: &str) -> Result<Jid, JidError> {
        let (bare, resource) = match s.split_once('/') {
            Some((b, r)) => (b, Some(r)),
            None => (s, None),
        };
        let (local, domain) = match bare.split_once('@') {
            Some((l, d)) => (Some(l), d),
            None => (None, bare),
        };
        let domain = prepare_domain(domain)?;
        let local = local
            .map(|l| {
                prepare(
                    l,
                    "localpart",
                    "nodeprep",
                    stringprep::nodeprep,
                    JidError::EmptyLocal,
                )
            })
            .transpose()?;
        let resource = resource
            .map(|r| {
                prepare(
                    r,
                    "resource",
                    "resourceprep",
                    stringprep::resourceprep,
                    JidError::EmptyResource,
                )
            })
            .transpose()?;
        Ok(Jid {
            local,
            domain,
            resource,
        })
    }

    /// The localpart, if any.
    pub fn local(&self) -> Option<&str> {
        self.local.as_deref()
    }

    /// The domainpart.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The resourcepart, if any.
    pub fn resource(&self) -> Option<&str> {
        self.resource.as_deref()
    }

    /// This JID without its resource.
    pub fn to_bare(&self) -> Jid {
        Jid {
            local: self.local.clone(),
            domain: self.domain.clone(),
            resource: None,
        }
    }

    /// True when there is no resource.
    pub fn is_bare(&self) -> bool {
        self.resource.is_none()
    }

    /// Whether `to`, prepared as a JID (SPEC §3a), is the bare domain `domain` (already in
    /// canonical form): how a stream's or a BOSH session's `to` names this service, in any
    /// spelling (`LocalHost`, `localhost.`, full-width letters). Text that fails preparation,
    /// or carries a localpart or resource, is not the domain.
    pub fn names_domain(to: &str, domain: &str) -> bool {
        Jid::parse(to)
            .is_ok_and(|to| to.local.is_none() && to.resource.is_none() && to.domain == domain)
    }
}

/// Prepares a localpart or resource with `profile`, then checks its length.
fn prepare(
    raw: &str,
    part: &'static str,
    profile_name: &'static str,
    profile: fn(&str) -> Result<std::borrow::Cow<'_, str>, stringprep::Error>,
    empty: JidError,
) -> Result<String, JidError> {
    if raw.is_empty() {
        return Err(empty);
    }
    // A bound before preparation as well, so an absurd part costs no mapping work.
    if raw.len() > 4 * MAX_PART {
        return Err(JidError::TooLong(part));
    }
    let prepared = profile(raw).map_err(|e| JidError::Prep {
        part,
        profile: profile_name,
        reason: e.to_string(),
    })?;
    if prepared.is_empty() {
        return Err(empty);
    }
    if prepared.len() > MAX_PART {
        return Err(JidError::TooLong(part));
    }
    Ok(prepared.into_owned())
}

/// nameprep, one trailing dot removed (RFC 7622 §3.2), then the IDNA ToASCII check.
fn prepare_domain(raw: &str) -> Result<String, JidError> {
    let raw = raw.strip_suffix('.').unwrap_or(raw);
    let domain = prepare(
        raw,
        "domain",
        "nameprep",
        stringprep::nameprep,
        JidError::EmptyDomain,
    )?;
    let ascii = idna::uts46::Uts46::new().to_ascii(
        domain.as_bytes(),
        idna::uts46::AsciiDenyList::STD3,
        idna::uts46::Hyphens::CheckFirstLast,
        idna::uts46::DnsLength::Verify,
    );
    if ascii.is_err() {
        return Err(JidError::BadDomain(domain));
    }
    Ok(domain)
}

impl fmt::Display for Jid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(l) = &self.local {
            write!(f, "{l}@")?;
        }
        f.write_str(&self.domain)?;
        if let Some(r) = &self.resource {
            write!(f, "/{r}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Jid {
    type Err = JidError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Jid::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canonical(s: &str) -> String {
        Jid::parse(s)
            .unwrap_or_else(|e| panic!("{s:?}: {e}"))
            .to_string()
    }

    #[test]
    fn parses_parts() {
        let j = Jid::parse("alice@Example.COM/tab/1").unwrap();
        assert_eq!(j.local(), Some("alice"));
        assert_eq!(j.domain(), "example.com");
        assert_eq!(j.resource(), Some("tab/1"));
        assert_eq!(j.to_string(), "alice@example.com/tab/1");
        assert_eq!(j.to_bare().to_string(), "alice@example.com");
        assert_eq!(Jid::parse("example.com").unwrap().local(), None);
        assert_eq!(canonical("a@b/c@d"), "a@b/c@d");
        assert_eq!(canonical("example.com/r"), "example.com/r");
    }

    #[test]
    fn spellings_of_one_account_are_one_jid() {
        let alice = Jid::parse("alice@example.com").unwrap();
        for spelling in [
            "Alice@Example.COM",
            "ALICE@example.com.",
            "alice@EXAMPLE.com",
            // U+00AD SOFT HYPHEN and U+200B ZERO WIDTH SPACE map to nothing (RFC 3454 B.1).
            "al\u{ad}ice@example.com",
            "alice@exam\u{200b}ple.com",
            // Fullwidth letters are compatibility forms of ASCII (NFKC).
            "\u{ff21}lice@example.com",
        ] {
            assert_eq!(Jid::parse(spelling).unwrap(), alice, "{spelling:?}");
        }
        // Case folding beyond ASCII; a composed and a decomposed ë are the same.
        assert_eq!(canonical("ZOË@localhost"), "zoë@localhost");
        assert_eq!(canonical("zoe\u{308}@localhost"), "zoë@localhost");
        assert_eq!(canonical("Stra\u{df}e@x"), "strasse@x");
        assert_eq!(
            canonical("room@Conference.Example.COM/Nick"),
            "room@conference.example.com/Nick"
        );
    }

    #[test]
    fn resources_keep_their_case_but_are_normalized() {
        let a = Jid::parse("a@x/Tab").unwrap();
        assert_ne!(a, Jid::parse("a@x/tab").unwrap());
        assert_eq!(canonical("a@x/\u{2163}"), "a@x/IV"); // ROMAN NUMERAL FOUR: NFKC
        assert_eq!(canonical("a@x/with space"), "a@x/with space");
    }

    #[test]
    fn rfc_6122_nodeprep_prohibits_these_in_localparts() {
        for c in [
            '"', '&', '\'', '/', ':', '<', '>', '@', ' ', '\u{a0}', '\u{7}', '\u{e000}',
        ] {
            let jid = format!("a{c}b@x");
            // '/' and '@' change where the parts split; everything else is a nodeprep error.
            match Jid::parse(&jid) {
                Err(JidError::Prep {
                    part: "localpart",
                    profile: "nodeprep",
                    ..
                })
                | Err(JidError::BadDomain(_)) => {}
                Ok(j) if c == '/' => assert_eq!(j.resource(), Some("b@x")),
                other => panic!("{jid:?}: {other:?}"),
            }
        }
        assert!(
            Jid::parse("a\"b@x")
                .unwrap_err()
                .to_string()
                .starts_with("localpart fails nodeprep: prohibited character")
        );
    }

    #[test]
    fn bidi_rules_of_rfc_3454_section_6() {
        // Right-to-left text alone is fine; mixed with left-to-right, or not starting and ending
        // with a right-to-left character, it is not.
        assert!(Jid::parse("\u{5d0}\u{5d1}@x").is_ok());
        let mixed = Jid::parse("\u{5d0}a\u{5d1}@x").unwrap_err();
        assert_eq!(
            mixed.to_string(),
            "localpart fails nodeprep: prohibited bidirectional text"
        );
        assert!(matches!(
            Jid::parse("a@x/\u{627}1"),
            Err(JidError::Prep {
                part: "resource",
                ..
            })
        ));
    }

    #[test]
    fn domains_must_be_domain_names() {
        assert_eq!(Jid::parse("a@x y"), Err(JidError::BadDomain("x y".into())));
        assert!(matches!(Jid::parse("a@b@c"), Err(JidError::BadDomain(_))));
        assert!(matches!(Jid::parse("a@x..y"), Err(JidError::BadDomain(_))));
        assert!(matches!(Jid::parse("a@-x.y"), Err(JidError::BadDomain(_))));
        assert!(matches!(
            Jid::parse(&format!("a@{}.com", "l".repeat(64))),
            Err(JidError::BadDomain(_))
        ));
        // A no-break space is a space after NFKC, which no domain label may hold.
        assert_eq!(
            Jid::parse("a@x\u{a0}y"),
            Err(JidError::BadDomain("x y".into()))
        );
        assert!(matches!(
            Jid::parse("a@x\u{e000}y"), // private use
            Err(JidError::Prep {
                part: "domain",
                profile: "nameprep",
                ..
            })
        ));
        assert_eq!(canonical("a@b\u{fc}cher.example"), "a@bücher.example");
        assert_eq!(canonical("a@127.0.0.1"), "a@127.0.0.1");
        assert_eq!(canonical("localhost."), "localhost");
    }

    #[test]
    fn empty_and_overlong_parts() {
        assert_eq!(Jid::parse(""), Err(JidError::EmptyDomain));
        assert_eq!(Jid::parse("."), Err(JidError::EmptyDomain));
        assert_eq!(Jid::parse("@x"), Err(JidError::EmptyLocal));
        assert_eq!(Jid::parse("a@"), Err(JidError::EmptyDomain));
        assert_eq!(Jid::parse("a@x/"), Err(JidError::EmptyResource));
        // Only characters that map to nothing: empty after preparation.
        assert_eq!(Jid::parse("\u{ad}@x"), Err(JidError::EmptyLocal));
        assert_eq!(Jid::parse("a@x/\u{200b}"), Err(JidError::EmptyResource));

        let at_limit = "a".repeat(1023);
        assert!(Jid::parse(&format!("{at_limit}@x/{at_limit}")).is_ok());
        assert_eq!(
            Jid::parse(&format!("{}@x", "a".repeat(1024))),
            Err(JidError::TooLong("localpart"))
        );
        assert_eq!(
            Jid::parse(&format!("a@x/{}", "r".repeat(1024))),
            Err(JidError::TooLong("resource"))
        );
        assert_eq!(
            Jid::parse(&"d.".repeat(600)),
            Err(JidError::TooLong("domain"))
        );
        // The limit counts the prepared form: 512 × U+FB00 (1536 bytes) is "ff" × 512 after
        // NFKC, 1024 bytes.
        assert_eq!(
            Jid::parse(&format!("{}@x", "\u{fb00}".repeat(512))),
            Err(JidError::TooLong("localpart"))
        );
    }

    #[test]
    fn preparation_is_idempotent() {
        for s in [
            "ZOË@localhost",
            "Alice@Example.COM./Tab",
            "\u{ff21}@b\u{fc}cher.example/\u{2163}",
        ] {
            let once = canonical(s);
            assert_eq!(canonical(&once), once);
        }
    }

    #[test]
    fn a_domain_is_named_in_any_spelling_and_nothing_else() {
        for to in ["localhost", "LocalHost", "localhost.", "\u{ff4c}ocalhost"] {
            assert!(Jid::names_domain(to, "localhost"), "{to:?}");
        }
        for to in [
            "example.com",
            "a@localhost",
            "localhost/r",
            "localhost..",
            "",
            "local host",
        ] {
            assert!(!Jid::names_domain(to, "localhost"), "{to:?}");
        }
    }
}
