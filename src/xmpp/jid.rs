//! Jabber IDs: parsing with the length rules of RFC 7622 and no stringprep beyond lowercasing
//! the domain (boshmux compares what the server hands it, it does not normalize for it).

use std::fmt;

/// A JID `local@domain/resource`; local and resource are optional.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Jid {
    local: Option<String>,
    domain: String,
    resource: Option<String>,
}

/// Why a string is not a JID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JidError {
    /// No domain part.
    #[error("empty domain")]
    EmptyDomain,
    /// `@` with nothing before it.
    #[error("empty localpart")]
    EmptyLocal,
    /// `/` with nothing after it.
    #[error("empty resource")]
    EmptyResource,
    /// A part longer than 1023 bytes.
    #[error("{0} longer than 1023 bytes")]
    TooLong(&'static str),
    /// A character not allowed in that part.
    #[error("invalid character in {0}")]
    BadChar(&'static str),
}

impl Jid {
    /// Parses `s`.
    pub fn parse(s: &str) -> Result<Jid, JidError> {
        let (bare, resource) = match s.split_once('/') {
            Some((b, r)) => (b, Some(r)),
            None => (s, None),
        };
        let (local, domain) = match bare.split_once('@') {
            Some((l, d)) => (Some(l), d),
            None => (None, bare),
        };
        if domain.is_empty() {
            return Err(JidError::EmptyDomain);
        }
        check_part(domain, "domain", |c| {
            c.is_whitespace() || c.is_control() || matches!(c, '@' | '/')
        })?;
        if let Some(l) = local {
            if l.is_empty() {
                return Err(JidError::EmptyLocal);
            }
            check_part(l, "localpart", |c| {
                c.is_whitespace()
                    || c.is_control()
                    || matches!(c, '"' | '&' | '\'' | '/' | ':' | '<' | '>' | '@')
            })?;
        }
        if let Some(r) = resource {
            if r.is_empty() {
                return Err(JidError::EmptyResource);
            }
            check_part(r, "resource", char::is_control)?;
        }
        Ok(Jid {
            local: local.map(str::to_owned),
            domain: domain.trim_end_matches('.').to_lowercase(),
            resource: resource.map(str::to_owned),
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

    /// This JID's bare part with `resource` set.
    pub fn with_resource(&self, resource: &str) -> Jid {
        Jid {
            resource: Some(resource.to_owned()),
            ..self.to_bare()
        }
    }

    /// True when there is no resource.
    pub fn is_bare(&self) -> bool {
        self.resource.is_none()
    }
}

fn check_part(s: &str, what: &'static str, bad: impl Fn(char) -> bool) -> Result<(), JidError> {
    if s.len() > 1023 {
        return Err(JidError::TooLong(what));
    }
    if s.chars().any(bad) {
        return Err(JidError::BadChar(what));
    }
    Ok(())
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

    #[test]
    fn parses_parts() {
        let j = Jid::parse("alice@Example.COM/tab/1").unwrap();
        assert_eq!(j.local(), Some("alice"));
        assert_eq!(j.domain(), "example.com");
        assert_eq!(j.resource(), Some("tab/1"));
        assert_eq!(j.to_string(), "alice@example.com/tab/1");
        assert_eq!(j.to_bare().to_string(), "alice@example.com");
        assert_eq!(Jid::parse("example.com").unwrap().local(), None);
    }

    #[test]
    fn rejects_bad_jids() {
        assert_eq!(Jid::parse(""), Err(JidError::EmptyDomain));
        assert_eq!(Jid::parse("@x"), Err(JidError::EmptyLocal));
        assert_eq!(Jid::parse("a@x/"), Err(JidError::EmptyResource));
        assert_eq!(Jid::parse("a b@x"), Err(JidError::BadChar("localpart")));
        assert_eq!(Jid::parse("a@x y"), Err(JidError::BadChar("domain")));
        assert_eq!(
            Jid::parse(&format!("{}@x", "a".repeat(1024))),
            Err(JidError::TooLong("localpart"))
        );
    }
}
