//! WebSocket close codes a page can get (SPEC §4), defined once for the daemon. `client-js`
//! exports the same values as `CloseCode` (checked by a test below).

/// The page or the daemon ended the stream normally.
pub const NORMAL: u16 = 1000;
/// The page stopped answering pings.
pub const GOING_AWAY: u16 = 1001;
/// Policy: bad origin, bad authentication, bad frame. Reconnecting the same way will not help.
pub const POLICY: u16 = 1008;
/// The daemon is restarting with a state file: reconnect, the session survives.
pub const RESTARTING: u16 = 1012;
/// The session was revoked (logout): do not reconnect.
pub const REVOKED: u16 = 4001;
/// The page read too slowly and fell behind.
pub const SLOW: u16 = 4002;
/// Too many pages are open for this user.
pub const TOO_MANY_PAGES: u16 = 4003;
/// The upstream session is lost and cannot be restored (also: a stop without a state file).
pub const LOST: u16 = 4004;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_js_exports_the_same_values() {
        let js = include_str!("../../client-js/boshmux.js");
        let dts = include_str!("../../client-js/boshmux.d.ts");
        for (name, code) in [
            ("NORMAL", NORMAL),
            ("GOING_AWAY", GOING_AWAY),
            ("POLICY", POLICY),
            ("RESTARTING", RESTARTING),
            ("REVOKED", REVOKED),
            ("SLOW", SLOW),
            ("TOO_MANY_PAGES", TOO_MANY_PAGES),
            ("LOST", LOST),
        ] {
            assert!(
                js.contains(&format!("{name}: {code},")),
                "boshmux.js lacks {name}: {code}"
            );
            assert!(
                dts.contains(&format!("readonly {name}: {code};")),
                "boshmux.d.ts lacks {name}"
            );
        }
    }
}
